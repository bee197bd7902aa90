"""The Space bundle: what it holds, and that the app started from it (in a fresh folder, against
a loopback Hub) serves a pushed model whose answer streams through gradio_client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hub.client import HubError
from hub.push import push
from hub.space import (ROOT, app_files, build_bundle, deploy_space_command, requirement_name,
                       third_party_imports)
from medchat.command_line import call
from medchat.run_folder import Run
from tests.support.chat_runs import QUESTIONS, reference_answer
from tests.support.fake_hub import DEFAULT_USER, hub_env, make_adapter_run
from tests.support.processes import free_port, stop, wait_until_up

BASE_REPO = f"{DEFAULT_USER}/tiny-base"
ADAPTER_REPO = f"{DEFAULT_USER}/tiny-adapter"
SPACE_REPO = f"{DEFAULT_USER}/medchat-demo"
# Imported by the bundled code, but not needed to serve: ZeroGPU's preinstalled `spaces`,
# gradio (sdk_version), httpx (huggingface_hub's).
NOT_REQUIRED = {"spaces", "gradio", "httpx", "httpx2"}
IMPORT_NAMES = {"huggingface_hub": "huggingface-hub", "yaml": "pyyaml"}


def space_main(argv: list[str]) -> int:
    """`medchat deploy-space ARGS` in-process (errors as exit 2)."""
    return call(deploy_space_command, argv, "medchat deploy-space")


def _front_matter(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8").split("---\n")[1])


@pytest.mark.timeout(60)
def test_bundle_holds_what_the_app_imports_and_no_training_code(tmp_path):
    import gradio

    bundle = build_bundle(tmp_path / "bundle", SPACE_REPO, [ADAPTER_REPO], BASE_REPO,
                          hardware="cpu-upgrade")
    files = {p.as_posix() for p in bundle.files}
    for must in ("launch.py", "README.md", "requirements.txt", "space_config.json",
                 "medchat/__init__.py", "medchat/server.py", "medchat/app.py",
                 "medchat/engine.py", "medchat/registry.py", "medchat/run_folder.py",
                 "medchat/chat_format.py", "medchat/base_model.py", "hub/__init__.py",
                 "hub/pull.py", "hub/client.py"):
        assert must in files, must
    # the training stages and the command table that reaches them are not the app's
    assert not any(f.startswith("training/") for f in files), sorted(files)
    for never in ("medchat/cli.py", "medchat/__main__.py", "pyproject.toml"):
        assert never not in files, never
    assert {p.as_posix() for p in app_files()} == {f for f in files if f.endswith(".py")}
    assert not any(f.startswith(("tests/", "runs/", "bench/", ".")) or "__pycache__" in f
                   for f in files)
    for f in bundle.files:  # the code is copied as is
        if (ROOT / f).is_file() and f.suffix == ".py":
            assert (bundle.folder / f).read_bytes() == (ROOT / f).read_bytes(), f

    meta = _front_matter(bundle.folder / "README.md")
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__
    assert meta["app_file"] == "launch.py"
    assert meta["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert meta["models"] == [BASE_REPO, ADAPTER_REPO]
    assert 0 < len(meta["short_description"]) <= 60
    assert meta["suggested_hardware"] == "cpu-upgrade"
    assert json.loads((bundle.folder / "space_config.json").read_text()) == \
        {"base_model": BASE_REPO, "models": [ADAPTER_REPO]}

    reqs = [line for line in (bundle.folder / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    names = {requirement_name(r) for r in reqs}
    assert not names & {"bitsandbytes", "deepspeed", "tensorboard", "gradio"}
    needed = {requirement_name(IMPORT_NAMES.get(m, m))
              for m in third_party_imports(bundle.files, bundle.folder)} - NOT_REQUIRED
    assert needed <= names, needed - names
    assert {"torch", "transformers", "peft", "huggingface-hub"} <= names


@pytest.mark.timeout(60)
def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    with pytest.raises(HubError, match="not a Space hardware"):
        build_bundle(tmp_path / "b", SPACE_REPO, [ADAPTER_REPO], BASE_REPO, hardware="gpu-9000")
    with pytest.raises(HubError, match="must be a Hub id"):
        build_bundle(tmp_path / "b", SPACE_REPO, [ADAPTER_REPO], str(tmp_path))
    assert space_main([SPACE_REPO, "--models", "not a repo,x/y", "--dry-run"]) == 2
    assert "--models: expected comma-separated OWNER/NAME" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.timeout(60)
def test_base_detection_gives_up_at_once_without_a_hub(monkeypatch):
    from huggingface_hub import constants

    from hub.space import detect_base_model

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    assert detect_base_model([ADAPTER_REPO, "test-user/other"]) is None
    assert time.perf_counter() - t0 < 5  # no backoff: it only picks a default


@pytest.mark.timeout(240)
def test_space_started_from_its_bundle_streams_a_pushed_model(fake_hub, tmp_path,
                                                              tiny_model_dir, capsys):
    from gradio_client import Client
    from huggingface_hub import HfApi, snapshot_download

    # the Hub side: a base model repo, an adapter trained on it, then the Space itself
    api = HfApi()
    api.create_repo(BASE_REPO)
    api.upload_folder(folder_path=tiny_model_dir, repo_id=BASE_REPO, commit_message="base")
    run = make_adapter_run(tmp_path / "runs", tiny_model_dir, base_hub_id=BASE_REPO)
    push(run, ADAPTER_REPO)
    assert space_main([SPACE_REPO, "--models", ADAPTER_REPO, "--output",
                       str(tmp_path / "bundle")]) == 0  # --base found in the adapter's manifest
    assert "Space test-user/medchat-demo updated" in capsys.readouterr().out
    repo = fake_hub.repos[("space", SPACE_REPO)]
    assert repo.sdk == "gradio"
    on_hub = fake_hub.repo_files(SPACE_REPO, repo_type="space")
    bundle = tmp_path / "bundle"
    local = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*")
             if p.is_file()}
    assert {k: v for k, v in on_hub.items() if k != ".gitattributes"} == local
    assert json.loads(on_hub["space_config.json"])["base_model"] == BASE_REPO

    # a fresh folder holding only what the Space repo holds, like a Space's checkout
    space_dir = Path(snapshot_download(SPACE_REPO, repo_type="space",
                                       local_dir=tmp_path / "space-checkout"))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
    env.update(hub_env(fake_hub, token=None))  # public repos: the Space needs no token
    env.update(HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "space-hf-home"),
               MEDCHAT_RUNS=str(tmp_path / "space-runs"), MEDCHAT_CACHE=str(tmp_path / "mc"),
               GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "launch.py", "--host", "127.0.0.1", "--port",
                                 str(port), "--device", "cpu"], cwd=space_dir, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", proc, log, 180)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        models = {m["id"] for m in client.predict(api_name="/models")}
        assert "adapter:test-user--tiny-adapter" in models
        job = client.submit(QUESTIONS[0], [], "adapter:test-user--tiny-adapter", "", 16, 0.0,
                            1.0, 1.0, -1, api_name="/chat")
        pieces = [p for p in job if p]
        final = job.result()
    finally:
        stop(proc)
    text = log.read_text()
    assert "pulling test-user/tiny-adapter" in text and "warning: could not pull" not in text
    want = reference_answer(tiny_model_dir, QUESTIONS[0], Run(run).adapter_dir, 16)
    assert final == want and len(pieces) >= 2  # streamed: several growing partial answers
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
    assert Run(tmp_path / "space-runs" / "test-user--tiny-adapter").adapter_dir.is_dir()
    # the app ran on the bundle's code: started from the checkout (`python -c` puts the current
    # folder first on the import path), every module the app imports resolves inside it, also
    # when medchat is installed, e.g. editable, in this venv
    where = subprocess.run(
        [sys.executable, "-c", "import launch, hub.pull, "
         "medchat.engine, medchat.run_folder as m; print(launch.__file__, hub.pull.__file__, "
         "medchat.engine.__file__, m.__file__, sep='\\n')"],
        cwd=space_dir, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    files = [Path(x).resolve() for x in where.stdout.split()]
    assert len(files) == 4 and all(space_dir.resolve() in f.parents for f in files), files
