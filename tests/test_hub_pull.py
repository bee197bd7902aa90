"""hub.pull against a loopback Hub: what was pushed comes back byte for byte, lands where the
registry lists it, and chats like the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub.client import HubError
from hub.pull import pull, pull_command
from hub.push import push
from medchat.chat_format import ensure_chat_template, render, stop_token_ids
from medchat.command_line import call
from medchat.run_folder import SCHEMA_VERSION, Run, SourceRecord
from tests.support.chat_runs import QUESTIONS, reference_answer
from tests.support.fake_hub import DEFAULT_USER, make_adapter_run

pytestmark = pytest.mark.timeout(180)
BASE_REPO = f"{DEFAULT_USER}/tiny-base"
ADAPTER_REPO = f"{DEFAULT_USER}/tiny-adapter"
V1_MANIFEST = Path(__file__).parent / "fixtures" / "v1-run" / "medchat.json"


def pull_main(argv: list[str]) -> int:
    return call(pull_command, argv, "medchat pull")


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter_run(tmp_path_factory.mktemp("runs"), tiny_model_dir,
                            base_hub_id=BASE_REPO)


def upload_base(tiny_model_dir: Path) -> None:
    """The tiny model as a plain full-model repo (how a base model sits on the Hub)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(BASE_REPO, exist_ok=True)
    api.upload_folder(folder_path=tiny_model_dir, repo_id=BASE_REPO, commit_message="tiny base")


def test_pull_adapter_lands_in_runs_and_chats_like_the_original(
        fake_hub, adapter_run, tiny_model_dir, tmp_path):
    from medchat.engine import Engine, GenerationSettings
    from medchat.registry import Registry

    upload_base(tiny_model_dir)
    push(adapter_run, ADAPTER_REPO)
    runs = tmp_path / "runs"
    base_run = pull(BASE_REPO, runs_dir=runs)
    run = pull(ADAPTER_REPO, runs_dir=runs)
    assert run == runs / "test-user--tiny-adapter" and base_run == runs / "test-user--tiny-base"
    assert not list(runs.glob(".*"))  # no temporary folders left behind

    # byte-identical: every file of the repo is in the run folder, and the weights are ours
    on_hub = fake_hub.repo_files(ADAPTER_REPO)
    for name, data in on_hub.items():
        if name == ".gitattributes":
            continue
        local = run / name if name in ("README.md", "eval.json") else \
            Run(run).adapter_dir / name
        if name == "medchat.json":
            continue  # rewritten for this copy: checked below
        assert local.read_bytes() == data, name
    assert (Run(run).adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (Run(adapter_run).adapter_dir / "adapter_model.safetensors").read_bytes()

    m = Run(run).manifest()
    assert m.kind == "adapter" and m.name == "test-user--tiny-adapter"
    assert m.base_model.name == BASE_REPO and m.base_model.hub_id == BASE_REPO
    assert m.base_model.local_path is None
    assert m.source == SourceRecord(hub_repo=ADAPTER_REPO, revision="main",
                                    commit=fake_hub.head(ADAPTER_REPO))
    assert m.chat == Run(adapter_run).manifest().chat  # template, stop tokens, generation
    assert m.metrics == Run(adapter_run).manifest().metrics
    base_m = Run(base_run).manifest()
    assert base_m.kind == "merged" and base_m.base_model.hub_id == BASE_REPO
    assert "im_start" in base_m.chat.template and base_m.chat.stop_tokens == ["<|im_end|>"]

    # the app's registry lists both, and the engine answers like plain transformers + peft
    # on the original files
    registry = Registry(runs, base_name=BASE_REPO, base_path=Run(base_run).merged_dir)
    assert {"adapter:test-user--tiny-adapter", "merged:test-user--tiny-base"} <= set(registry.ids())
    assert registry.same_base(registry.get("adapter:test-user--tiny-adapter").base)
    engine = Engine(registry, device="cpu")
    engine.load_base()
    greedy = GenerationSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
    got = engine.chat("adapter:test-user--tiny-adapter", QUESTIONS[0], settings=greedy)
    want = reference_answer(tiny_model_dir, QUESTIONS[0], Run(adapter_run).adapter_dir, 16)
    assert got == want and got != reference_answer(tiny_model_dir, QUESTIONS[0], None, 16)


def test_pull_same_commit_downloads_nothing_and_new_commit_updates(fake_hub, adapter_run,
                                                                   tmp_path):
    push(adapter_run, ADAPTER_REPO)
    runs = tmp_path / "runs"
    run = pull(ADAPTER_REPO, runs_dir=runs)
    downloads = fake_hub.stats["resolve"]
    assert pull(ADAPTER_REPO, runs_dir=runs) == run
    assert fake_hub.stats["resolve"] == downloads  # up to date: only the repo info was asked

    from huggingface_hub import HfApi

    HfApi().upload_file(path_or_fileobj=b"extra\n", path_in_repo="notes.txt",
                        repo_id=ADAPTER_REPO, commit_message="add notes")
    pull(ADAPTER_REPO, runs_dir=runs)
    assert (Run(run).adapter_dir / "notes.txt").read_bytes() == b"extra\n"
    assert json.loads((run / "medchat.json").read_text())["source"]["commit"] == \
        fake_hub.head(ADAPTER_REPO)


def test_plain_peft_repo_without_manifest(fake_hub, adapter_run, tmp_path):
    """A repo pushed by something else (no medchat.json): the manifest comes from its files."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(f"{DEFAULT_USER}/plain-peft")
    adapter_dir = Run(adapter_run).adapter_dir
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_REPO
    api.upload_folder(folder_path=adapter_dir, repo_id=f"{DEFAULT_USER}/plain-peft",
                      allow_patterns=["*.safetensors", "tokenizer*", "chat_template.jinja"])
    api.upload_file(path_or_fileobj=json.dumps(cfg).encode(), path_in_repo="adapter_config.json",
                    repo_id=f"{DEFAULT_USER}/plain-peft")
    api.upload_file(path_or_fileobj=b"\0" * 32, repo_id=f"{DEFAULT_USER}/plain-peft",
                    path_in_repo="checkpoint-10/adapter_model.safetensors")
    run = pull(f"{DEFAULT_USER}/plain-peft", runs_dir=tmp_path / "runs")
    assert not (Run(run).adapter_dir / "checkpoint-10").exists()  # what from_pretrained reads
    m = Run(run).manifest()
    assert m.kind == "adapter" and m.base_model.hub_id == BASE_REPO
    assert m.chat.template and m.chat.stop_tokens == ["<|im_end|>"]
    assert (Run(run).adapter_dir / "adapter_model.safetensors").is_file()


def test_transient_errors_during_download_are_retried(fake_hub, adapter_run, tmp_path):
    push(adapter_run, ADAPTER_REPO)
    fake_hub.inject("info", 503, times=1)
    fake_hub.inject("resolve", 503, times=2)
    run = pull(ADAPTER_REPO, runs_dir=tmp_path / "runs")
    assert fake_hub.pending_faults("resolve") == 0 and fake_hub.pending_faults("info") == 0
    assert (Run(run).adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (Run(adapter_run).adapter_dir / "adapter_model.safetensors").read_bytes()


def test_repo_pushed_by_the_previous_release_pulls_into_a_working_run(
        fake_hub, adapter_run, tiny_model_dir, tmp_path, capsys):
    """A schema-1 medchat.json (chat template, stop tokens and scores as loose top-level
    fields, the base named by a local folder) next to an adapter: pull converts it."""
    from huggingface_hub import HfApi
    from transformers import AutoTokenizer

    v1 = json.loads(V1_MANIFEST.read_text())
    assert v1["version"] == 1 and "chat_template" in v1  # the fixture is what it claims
    repo = f"{DEFAULT_USER}/v1-adapter"
    api = HfApi()
    api.create_repo(repo)
    adapter_dir = Run(adapter_run).adapter_dir
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_REPO  # what the previous push wrote
    api.upload_folder(folder_path=adapter_dir, repo_id=repo,
                      allow_patterns=["*.safetensors", "tokenizer*", "chat_template.jinja"])
    api.upload_file(path_or_fileobj=json.dumps(cfg).encode(), path_in_repo="adapter_config.json",
                    repo_id=repo)
    api.upload_file(path_or_fileobj=V1_MANIFEST.read_bytes(), path_in_repo="medchat.json",
                    repo_id=repo)

    assert pull_main([repo, "--runs-dir", str(tmp_path / "runs")]) == 0
    assert f"{repo} (adapter, commit {fake_hub.head(repo)[:12]})" in capsys.readouterr().out
    run = Run.open("test-user--v1-adapter", runs_dir=tmp_path / "runs")
    on_disk = json.loads(run.manifest_path.read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION and "chat_template" not in on_disk
    m = run.manifest()
    assert m.kind == "adapter" and m.name == "test-user--v1-adapter"
    assert m.chat.template == v1["chat_template"] and m.chat.stop_tokens == ["<|im_end|>"]
    assert m.chat.system_prompt == v1["system_prompt"]
    assert m.chat.generation.max_new_tokens == 256 and m.chat.generation.top_p == 0.9
    # the base named by a folder of the training machine: the adapter's config gives its Hub id
    assert m.base_model.hub_id == BASE_REPO and m.base_model.name == BASE_REPO
    assert m.base_model.local_path is None
    assert m.metrics.models["base"].loss == 6.2381 and m.metrics.models["adapter"].rougeL == 0.0
    assert m.source == SourceRecord(hub_repo=repo, revision="main", commit=fake_hub.head(repo))
    assert run.has_adapter() and run.model_kinds() == ["base", "adapter"]
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (adapter_dir / "adapter_model.safetensors").read_bytes()

    # the run's template and stop tokens drive chat formatting: the v1 template's own default
    # system prompt, ChatML turns, and <|im_end|> as a single stop token id
    tok = AutoTokenizer.from_pretrained(run.adapter_dir)
    ensure_chat_template(tok, m.chat.template)
    text = render(tok, [{"role": "user", "content": QUESTIONS[0]}], generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n")
    ids, strings = stop_token_ids(tok, m.chat.stop_tokens)
    assert ids == [tok.convert_tokens_to_ids("<|im_end|>")] and strings == []
    assert pull(repo, runs_dir=tmp_path / "runs") == run.path  # up to date: nothing downloaded


def test_clear_errors(fake_hub, adapter_run, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert pull_main([f"{DEFAULT_USER}/does-not-exist", "--runs-dir", str(runs)]) == 2
    assert "'test-user/does-not-exist' was not found" in capsys.readouterr().err
    with pytest.raises(HubError, match="expected OWNER/NAME"):
        pull("../../etc", runs_dir=runs)
    push(adapter_run, ADAPTER_REPO, private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match=r"needs a token \(401 Unauthorized\)"):
        pull(ADAPTER_REPO, runs_dir=runs)
    from huggingface_hub import HfApi

    api = HfApi(token=fake_hub.tokens and next(iter(fake_hub.tokens)))
    api.create_repo(f"{DEFAULT_USER}/not-a-model")
    api.upload_file(path_or_fileobj=b"hi", path_in_repo="notes.txt",
                    repo_id=f"{DEFAULT_USER}/not-a-model")
    with pytest.raises(HubError, match="neither adapter_config.json"):
        pull(f"{DEFAULT_USER}/not-a-model", runs_dir=runs)
    assert not runs.exists() or not any(runs.iterdir())  # nothing half-written


def _upload_manifest(repo: str, manifest: dict) -> None:
    from huggingface_hub import HfApi

    HfApi().upload_file(path_or_fileobj=json.dumps(manifest).encode(), path_in_repo="medchat.json",
                        repo_id=repo, commit_message="edit the manifest")


def _upload_adapter_config(repo: str, adapter_dir: Path, base: str) -> None:
    from huggingface_hub import HfApi

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    HfApi().upload_file(path_or_fileobj=json.dumps(cfg).encode(),
                        path_in_repo="adapter_config.json", repo_id=repo)


def test_a_pulled_manifest_never_points_at_local_folders(fake_hub, adapter_run, tmp_path,
                                                         monkeypatch):
    """A repo's manifest that names a base by a local path (and asks for remote code): the path
    is dropped, the Hub id from the adapter's config is used, remote code is recorded with the
    repo it came from (the engine asks the operator), and without any Hub id the pull stops."""
    push(adapter_run, ADAPTER_REPO)
    remote = json.loads(fake_hub.repo_files(ADAPTER_REPO)["medchat.json"])
    remote["base_model"] = {"name": "/etc", "hub_id": None, "local_path": "/etc",
                            "trust_remote_code": True}
    remote["dataset"]["source"] = "/home/alice/medqa.xlsx"
    remote["merge"] = {"output": "/home/alice/runs/x/merged"}
    _upload_manifest(ADAPTER_REPO, remote)
    runs = tmp_path / "runs"
    m = Run(pull(ADAPTER_REPO, runs_dir=runs)).manifest()
    assert m.base_model.hub_id == BASE_REPO and m.base_model.name == BASE_REPO
    assert m.base_model.local_path is None
    assert m.base_model.trust_remote_code and m.source.hub_repo == ADAPTER_REPO
    assert m.dataset.source == "medqa.xlsx" and m.merge == {"output": "merged"}

    # no Hub id anywhere (manifest and adapter config name folders): refused, nothing written
    _upload_adapter_config(ADAPTER_REPO, Run(adapter_run).adapter_dir, "/etc")
    other = tmp_path / "other-runs"
    with pytest.raises(HubError, match=r"its base model '/etc' is not a Hub id \(OWNER/NAME\)"):
        pull(ADAPTER_REPO, runs_dir=other)
    assert not other.exists() or not any(other.iterdir())
    # a name that exists as a folder here is never taken for a repo either
    _upload_adapter_config(ADAPTER_REPO, Run(adapter_run).adapter_dir, "runs/x")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match="is not a Hub id"):
        pull(ADAPTER_REPO, runs_dir=other)


def test_anonymous_pull_sends_no_token(fake_hub, adapter_run, tmp_path):
    push(adapter_run, ADAPTER_REPO)
    push(adapter_run, f"{DEFAULT_USER}/private-adapter", private=True)
    runs = tmp_path / "runs"
    fake_hub.seen_auth.clear()
    pull(ADAPTER_REPO, runs_dir=runs, anonymous=True)  # public: works without a token
    assert fake_hub.seen_auth == []  # HF_TOKEN is set, and was not sent
    with pytest.raises(HubError, match=r"private, gated or does not exist \(401\).*anonymous"):
        pull(f"{DEFAULT_USER}/private-adapter", runs_dir=runs, anonymous=True)
    assert fake_hub.seen_auth == [] and not (runs / "test-user--private-adapter").exists()
    assert pull(f"{DEFAULT_USER}/private-adapter", runs_dir=runs).is_dir()  # the operator can


def test_size_cap_is_checked_before_downloading_and_enforced(fake_hub, adapter_run, tmp_path,
                                                              monkeypatch, capsys):
    from tests.support import fake_hub as fake_hub_module

    push(adapter_run, ADAPTER_REPO)
    runs = tmp_path / "runs"
    resolves = fake_hub.stats["resolve"]
    with pytest.raises(HubError, match=r"over the limit of 1.0 kB; pick a smaller model"):
        pull(ADAPTER_REPO, runs_dir=runs, max_bytes=1000)
    assert fake_hub.stats["resolve"] == resolves  # refused before any download
    assert pull_main([ADAPTER_REPO, "--runs-dir", str(runs), "--max-bytes", "1000"]) == 2
    assert "over the limit" in capsys.readouterr().err

    # a server that lists smaller sizes than it sends: the download is stopped
    real = fake_hub_module._Handler._sibling
    with monkeypatch.context() as lying:
        lying.setattr(fake_hub_module._Handler, "_sibling",
                      staticmethod(lambda path, e: {**real(path, e), "size": 1}))
        with pytest.raises(HubError, match=r"sent more than the limit of 1.0 kB; the download "
                                           r"was stopped"):
            pull(ADAPTER_REPO, runs_dir=runs, max_bytes=1000)
    assert not runs.exists() or not any(runs.iterdir())
    assert fake_hub.stats["resolve"] > resolves  # it had started
    weights = (Run(adapter_run).adapter_dir / "adapter_model.safetensors").stat().st_size
    assert pull(ADAPTER_REPO, runs_dir=runs, max_bytes=weights + 200_000).is_dir()


def test_pull_never_replaces_a_run_it_did_not_pull(fake_hub, adapter_run, tmp_path):
    import shutil

    push(adapter_run, ADAPTER_REPO)
    push(adapter_run, f"{DEFAULT_USER}/other")
    runs = tmp_path / "runs"
    local = runs / "test-user--tiny-adapter"
    shutil.copytree(adapter_run, local)  # a run trained here that happens to have that name
    before = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    with pytest.raises(HubError, match=r"run 'test-user--tiny-adapter' already exists in the "
                                       r"runs folder and was trained or made here"):
        pull(ADAPTER_REPO, runs_dir=runs)
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before
    # a run pulled from another repo under that name
    shutil.rmtree(local)
    other = Run(pull(f"{DEFAULT_USER}/other", runs_dir=runs))
    other.path.rename(local)
    with pytest.raises(HubError, match="was pulled from 'test-user/other'"):
        pull(ADAPTER_REPO, runs_dir=runs)
    # a folder that is not a run at all
    shutil.rmtree(local)
    local.mkdir()
    (local / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match="is not a pulled run"):
        pull(ADAPTER_REPO, runs_dir=runs)
    assert (local / "notes.txt").read_text() == "mine"
    # its own earlier pull is updated in place
    shutil.rmtree(local)
    assert pull(ADAPTER_REPO, runs_dir=runs) == local
    from huggingface_hub import HfApi

    HfApi().upload_file(path_or_fileobj=b"v2\n", path_in_repo="notes.txt", repo_id=ADAPTER_REPO)
    assert pull(ADAPTER_REPO, runs_dir=runs) == local
    assert (Run(local).adapter_dir / "notes.txt").read_bytes() == b"v2\n"


@pytest.mark.parametrize("revision", ["../main", "main branch", "-x", "a" * 300])
def test_odd_revisions_are_refused(revision, tmp_path):
    with pytest.raises(HubError, match="expected a branch, tag or commit id"):
        pull(ADAPTER_REPO, revision=revision, runs_dir=tmp_path / "runs")


def test_a_full_model_with_remote_code_is_recorded_as_such(fake_hub, tiny_model_dir, tmp_path):
    from huggingface_hub import HfApi

    repo = f"{DEFAULT_USER}/remote-code-model"
    api = HfApi()
    api.create_repo(repo)
    api.upload_folder(folder_path=tiny_model_dir, repo_id=repo)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    api.upload_file(path_or_fileobj=json.dumps(cfg).encode(), path_in_repo="config.json",
                    repo_id=repo)
    api.upload_file(path_or_fileobj=b"raise SystemExit('remote code ran')\n",
                    path_in_repo="modeling_x.py", repo_id=repo)
    run = Run(pull(repo, runs_dir=tmp_path / "runs"))
    m = run.manifest()
    assert m.kind == "merged" and m.base_model.trust_remote_code
    assert m.source.hub_repo == repo and m.base_model.hub_id == repo
    assert not (run.merged_dir / "modeling_x.py").exists()  # code is never downloaded
