"""medchat push (and the model card) against a loopback Hub (tests/support/fake_hub.py) with the
real huggingface_hub client."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

import hub.card
import hub.client
import hub.pull
import hub.push
import hub.space
from hub.card import card_command
from hub.client import HubError, human_size
from hub.local_paths import local_paths_in
from hub.pull import pull
from hub.push import deny_reason, plan_push, push, push_command
from hub.space import build_bundle, parse_models
from medchat.base_model import looks_like_repo_id
from medchat.command_line import call
from medchat.run_folder import Run
from tests.support.fake_hub import DEFAULT_TOKEN, DEFAULT_USER, make_adapter_run

pytestmark = pytest.mark.timeout(120)
REPO = f"{DEFAULT_USER}/tiny-adapter"
V1_RUN = Path(__file__).parent / "fixtures" / "v1-run"


def push_main(argv: list[str]) -> int:
    """`medchat push ARGS` in-process: the parser built from push_command, errors as exit 2."""
    return call(push_command, argv, "medchat push")


def weights(run: Path) -> Path:
    return Run(run).adapter_dir / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter_run(tmp_path_factory.mktemp("runs"), tiny_model_dir)


def _front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_dry_run_lists_files_and_sizes_without_network(adapter_run, fake_hub, capsys):
    assert push_main([str(adapter_run), REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    size = weights(adapter_run).stat().st_size
    assert "adapter_model.safetensors" in out and human_size(size) in out
    for name in ("README.md", "medchat.json", "eval.json", "tokenizer.json"):
        assert name in out
    assert "adapter/optimizer.pt  (optimizer state)" in out
    assert "adapter/.env  (environment file (secrets))" in out
    assert "checkpoints/  (not part of a model repo)" in out
    assert fake_hub.requests == []  # a dry run talks to nobody


def test_push_arrives_byte_identical_and_second_push_uploads_nothing(adapter_run, fake_hub):
    result = push(adapter_run, REPO)
    assert result.changed and len(fake_hub.commits) == 2  # the repo's initial commit + ours
    on_hub = fake_hub.repo_files(REPO)
    plan = result.plan
    assert set(on_hub) == {f.path_in_repo for f in plan.files} | {".gitattributes"}
    for f in plan.files:
        expected = f.source.read_bytes() if f.source else f.data
        assert on_hub[f.path_in_repo] == expected, f.path_in_repo
    # the weights went through LFS, configs as regular files
    assert len(fake_hub.lfs_uploads) == 1
    assert on_hub["adapter_model.safetensors"] == weights(adapter_run).read_bytes()
    for junk in ("optimizer.pt", "training_args.bin", ".env", "checkpoints", "logs"):
        assert not any(p == junk or p.startswith(junk + "/") for p in on_hub)

    uploads, blobs, commits = len(fake_hub.lfs_uploads), fake_hub.blob_writes, len(fake_hub.commits)
    again = push(adapter_run, REPO)
    assert not again.changed and again.commit_oid == result.commit_oid
    assert (len(fake_hub.lfs_uploads), fake_hub.blob_writes, len(fake_hub.commits)) == \
        (uploads, blobs, commits)


def test_card_metadata_parses_and_names_hub_ids(adapter_run, fake_hub, tmp_path):
    from huggingface_hub import ModelCard

    push(adapter_run, REPO)
    readme = fake_hub.repo_files(REPO)["README.md"]
    meta = _front_matter(readme)
    assert meta["base_model"] == "test-user/tiny-base"  # the Hub id, not the local folder
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["truehealth/medicationqa"]
    assert meta["license"] == "other" and meta["license_link"].endswith("test-user/tiny-base")
    assert meta["language"] == ["en"]
    assert {"medchat", "peft", "lora", "qlora"} <= set(meta["tags"])
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["loss"] == 2.4 and metrics["rougeL"] == 0.19  # the adapter row of eval.json
    (tmp_path / "README.md").write_bytes(readme)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "test-user/tiny-base"
    assert card.data.eval_results[0].dataset_type == "truehealth/medicationqa"
    text = card.text
    assert "not medical advice" in text
    assert 'PeftModel.from_pretrained(base, "test-user/tiny-adapter")' in text
    assert "merge_and_unload" in text and "Intended use" in text
    assert "| adapter | 2.4 | 11 | 0.19 | 4.2 |" in text  # the evaluation table
    assert "| base | 3.1 | 22.2 | 0.11 | 1.5 |" in text
    assert '"r": 8' in text  # the training configuration
    assert str(adapter_run.parent) not in readme.decode()  # no local paths
    manifest = json.loads(fake_hub.repo_files(REPO)["medchat.json"])
    assert manifest["base_model"]["name"] == "test-user/tiny-base"
    assert manifest["base_model"]["local_path"] is None and manifest["kind"] == "adapter"
    assert "/" not in manifest["dataset"]["source"] and str(adapter_run.parent) not in \
        json.dumps(manifest)
    assert manifest["schema_version"] == 2 and manifest["chat"]["stop_tokens"] == ["<|im_end|>"]
    assert manifest["source"]["pushed_from_run"] == "tiny-run"
    assert manifest["source"]["hub_repo"] == REPO
    assert manifest["metrics"]["models"]["adapter"]["rougeL"] == 0.19
    adapter_cfg = json.loads(fake_hub.repo_files(REPO)["adapter_config.json"])
    assert adapter_cfg["base_model_name_or_path"] == "test-user/tiny-base"


def test_merged_push_card_says_transformers(adapter_run, fake_hub, tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "merged-run"
    shutil.copytree(adapter_run, run)
    shutil.copytree(tiny_model_dir, Run(run).merged_dir)
    result = push(run, f"{DEFAULT_USER}/tiny-merged", merged=True)
    files = fake_hub.repo_files(f"{DEFAULT_USER}/tiny-merged")
    assert "model.safetensors" in files and "adapter_config.json" not in files
    assert files["model.safetensors"] == (tiny_model_dir / "model.safetensors").read_bytes()
    meta = _front_matter(files["README.md"])
    assert meta["library_name"] == "transformers" and meta["base_model"] == "test-user/tiny-base"
    assert json.loads(files["medchat.json"])["kind"] == "merged"
    assert result.plan.kind == "merged"


def test_transient_5xx_are_retried(adapter_run, fake_hub):
    fake_hub.inject("whoami", 503, times=1)  # not retried by huggingface_hub: ours
    fake_hub.inject("create", 502, times=2)  # ours
    fake_hub.inject("preupload", 503, times=1)  # huggingface_hub's http_backoff
    fake_hub.inject("lfs-upload", 500, times=1)  # huggingface_hub's http_backoff
    fake_hub.inject("commit", 504, times=1)  # ours
    result = push(adapter_run, REPO)
    for name in ("whoami", "create", "preupload", "lfs-upload", "commit"):
        assert fake_hub.pending_faults(name) == 0, name
    assert fake_hub.stats["create"] == 3 and fake_hub.stats["commit"] == 2
    assert fake_hub.repo_files(REPO)["adapter_model.safetensors"] == \
        weights(adapter_run).read_bytes()
    assert result.changed


def test_persistent_5xx_gives_a_clear_error(adapter_run, fake_hub):
    fake_hub.inject("commit", 503, times=50)
    with pytest.raises(HubError, match=r"kept answering 503 when trying to upload"):
        push(adapter_run, REPO)
    assert fake_hub.stats["commit"] == hub.client.RETRIES + 1


def test_rejected_token_401(adapter_run, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_NotAValidTokenAtAll000000000000000")
    assert push_main([str(adapter_run), REPO]) == 2
    err = capsys.readouterr().err
    assert "rejected the token from HF_TOKEN (401 Unauthorized)" in err
    assert "hf auth login" in err and "hf_NotAValid" not in err
    assert REPO not in {r for _, r in fake_hub.repos}


def test_missing_token(adapter_run, fake_hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert push_main([str(adapter_run), REPO]) == 2
    assert "no Hugging Face token found: set HF_TOKEN" in capsys.readouterr().err
    assert fake_hub.requests == []


def test_stored_login_is_used(adapter_run, fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(DEFAULT_TOKEN)
    assert push(adapter_run, REPO).changed


def test_repo_of_someone_else_403(adapter_run, fake_hub):
    with pytest.raises(HubError) as e:
        push(adapter_run, "someone-else/tiny-adapter")
    msg = str(e.value)
    assert "no write access to 'someone-else/tiny-adapter' (403 Forbidden)" in msg
    assert "Push to 'test-user/tiny-adapter' instead" in msg


def test_network_failure(adapter_run, fake_hub, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(HubError, match=r"cannot reach the Hub at http://127\.0\.0\.1:\d+ .*"
                                       r"ConnectError.*HF_ENDPOINT"):
        push(adapter_run, REPO)


def test_revision_and_private(adapter_run, fake_hub):
    push(adapter_run, REPO, revision="experiment", private=True,
         commit_message="try a branch")
    assert fake_hub.repos[("model", REPO)].private
    assert "adapter_model.safetensors" in fake_hub.repo_files(REPO, revision="experiment")
    assert "adapter_model.safetensors" not in fake_hub.repo_files(REPO, revision="main")
    assert fake_hub.commits[-1][2] == "try a branch"


def test_token_never_appears_in_logs_output_or_files(adapter_run, fake_hub, tmp_path, capfd,
                                                     caplog, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_DEBUG", True)  # the client's most verbose logging
    caplog.set_level(logging.DEBUG)
    assert push_main([str(adapter_run), REPO, "--private"]) == 0
    fake_hub.inject("commit", 503, times=1)
    (Run(adapter_run).adapter_dir / "notes.txt").write_text("changed\n")
    try:
        assert push_main([str(adapter_run), REPO, "--dry-run"]) == 0
        assert push_main([str(adapter_run), REPO]) == 0
    finally:
        (Run(adapter_run).adapter_dir / "notes.txt").unlink()
    assert "whoami" in fake_hub.seen_auth and "commit" in fake_hub.seen_auth  # it was sent
    out, err = capfd.readouterr()
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for where, text in (("stdout", out), ("stderr", err), ("logs", logged)):
        assert DEFAULT_TOKEN not in text, where
    for root in (tmp_path, adapter_run.parent):
        for f in root.rglob("*"):
            if f.is_file():
                assert DEFAULT_TOKEN.encode() not in f.read_bytes(), f


def test_a_file_holding_a_token_stops_the_push(adapter_run, fake_hub, capsys):
    leak = Run(adapter_run).adapter_dir / "notes.txt"
    leak.write_text("my token: hf_abcdefghijklmnopqrstuvwxyz0123456789\n")
    try:
        assert push_main([str(adapter_run), REPO]) == 2
    finally:
        leak.unlink()
    err = capsys.readouterr().err
    assert "notes.txt: contains text that looks like a Hugging Face token" in err
    assert "hf_abcdefghij" not in err and fake_hub.requests == []


@pytest.mark.parametrize("rel, denied", [
    ("adapter_model.safetensors", False), ("tokenizer_config.json", False),
    ("special_tokens_map.json", False), ("chat_template.jinja", False), ("merges.txt", False),
    ("model-00001-of-00002.safetensors", False), ("optimizer.pt", True), ("scheduler.pt", True),
    ("rng_state.pth", True), ("checkpoint-50/adapter_model.safetensors", True),
    ("logs/loss.jsonl", True), (".env", True), ("prod.env", True), ("hf_token.txt", True),
    ("token", True), ("secrets.json", True), ("pytorch_model.bin", True), ("id_rsa", True),
    ("trainer_state.json", True),
])
def test_allow_and_deny_lists(rel, denied):
    assert (deny_reason(rel) is not None) == denied


def test_clear_errors_before_any_upload(tmp_path, adapter_run):
    with pytest.raises(HubError, match="expected OWNER/NAME"):
        plan_push(adapter_run, "no-slash")
    with pytest.raises(HubError, match="no such folder"):
        plan_push(tmp_path / "nope", REPO)
    with pytest.raises(HubError, match=r"no config\.json.*medchat merge"):
        plan_push(adapter_run, REPO, merged=True)


@pytest.mark.parametrize("bad", ["a/b/c", "../x", "x/..", "owner/..", "/abs/x", "./x/y", "~/x",
                                 "x/.hidden", "no-slash", "a--b/c", "owner/"])
def test_the_one_repo_id_check_rejects_paths_dotdot_and_three_part_ids(bad, adapter_run,
                                                                       tmp_path):
    for module in (hub.client, hub.push, hub.pull, hub.space, hub.card):
        # every hub module uses medchat.base_model's check, none keeps a copy of its own
        assert getattr(module, "looks_like_repo_id", looks_like_repo_id) is looks_like_repo_id
    assert not looks_like_repo_id(bad)
    with pytest.raises(HubError, match="expected OWNER/NAME"):
        plan_push(adapter_run, bad)
    with pytest.raises(HubError, match="expected OWNER/NAME"):
        pull(bad, runs_dir=tmp_path / "runs")  # refused before any request
    with pytest.raises(HubError, match="Space id .*expected OWNER/NAME"):
        build_bundle(tmp_path / "bundle", bad, [REPO], "test-user/tiny-base")
    with pytest.raises(HubError, match="--models: expected comma-separated OWNER/NAME"):
        parse_models(f"{REPO},{bad}")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "bundle").exists()


def test_card_command_prints_the_card_push_uploads(adapter_run, capsys):
    assert call(card_command, [str(adapter_run), "--repo", REPO], "medchat card") == 0
    printed = capsys.readouterr().out
    card = str(plan_push(adapter_run, REPO).files[0].data, "utf-8")
    assert printed.strip() == card.strip()
    assert call(card_command, [str(adapter_run), "--merged"], "medchat card") == 0
    printed = capsys.readouterr().out
    assert _front_matter(printed.encode())["library_name"] == "transformers"
    assert "# tiny-run: merged model of test-user/tiny-base" in printed  # your-name/RUN


def test_card_of_a_schema_1_run_takes_its_scores_from_the_manifest(capsys):
    """The previous release kept test losses under loose keys and evaluation scores under
    metrics.eval.models; the card reads them through the typed manifest."""
    assert call(card_command, [str(V1_RUN)], "medchat card") == 2
    assert "pass --base-model OWNER/NAME" in capsys.readouterr().err  # a local base, no Hub id
    assert call(card_command, [str(V1_RUN), "--base-model", "test-user/tiny-base"],
                "medchat card") == 0
    text = capsys.readouterr().out
    meta = _front_matter(text.encode())
    assert meta["base_model"] == "test-user/tiny-base" and "qlora" not in meta["tags"]
    assert "model-index" not in meta  # no Hub dataset id to index the scores under
    assert "| base | 6.238 | 511.9 | 0 | 0 | 0 | 0 |" in text
    assert "| adapter | 6.237 | 511.2 | 0 | 0 | 0 | 0 |" in text
    assert "| merged | 6.237 | 511.2 | 0 | 0 | 0 | 0 |" in text
    assert "LoRA: r=16, alpha=32" in text and "Mean train loss: 6.247" in text
    assert "/data/medchat-v1" not in text  # local paths of the training machine stay out


def test_nothing_pushed_names_a_local_path(adapter_run, fake_hub, tiny_model_dir, tmp_path,
                                           capsys):
    """What the previous release left in runs: eval.json's sources naming the base folder and
    the run's adapter folder, the manifest's merge section naming the output and base folders,
    configs naming the base folder. The push takes them out, or refuses a file it cannot fix."""
    import shutil

    run = tmp_path / "runs" / "leaky"
    shutil.copytree(adapter_run, run)
    r = Run(run)
    ev = json.loads(r.eval_path.read_text())
    ev["sources"] = {"base": f"{tiny_model_dir} (unquantised)",
                     "adapter": f"{tiny_model_dir} (unquantised) + {r.adapter_dir} via peft"}
    r.eval_path.write_text(json.dumps(ev, indent=2))
    r.update_manifest(merge={"output": str(r.merged_dir), "base": str(tiny_model_dir),
                             "fidelity": {"reference": f"{tiny_model_dir} + adapter via peft"}})
    tok_cfg = r.adapter_dir / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()),
                                   "name_or_path": str(tiny_model_dir)}))
    repo = f"{DEFAULT_USER}/leaky"
    result = push(run, repo)
    on_hub = fake_hub.repo_files(repo)
    for name, data in on_hub.items():
        text = data.decode("utf-8", "replace") if not name.endswith(".safetensors") else ""
        assert str(tmp_path) not in text and not local_paths_in(text), name
    pushed_eval = json.loads(on_hub["eval.json"])
    assert pushed_eval["sources"]["adapter"] == f"{tiny_model_dir.name} (unquantised) + adapter " \
                                                "via peft"
    assert pushed_eval["items"] == ev["items"]  # the answers and the URLs go up unchanged
    assert json.loads(on_hub["medchat.json"])["merge"]["output"] == "merged"
    assert json.loads(on_hub["tokenizer_config.json"])["name_or_path"] == tiny_model_dir.name
    notes = {f.path_in_repo: f.note for f in result.plan.files}
    assert "local paths removed" in notes["eval.json"]
    assert on_hub["tokenizer.json"] == (r.adapter_dir / "tokenizer.json").read_bytes()

    # a file medchat did not write and cannot rewrite: the push stops, naming file and path
    (r.adapter_dir / "notes.txt").write_text("trained from /home/alice/medqa/data.xlsx\n")
    commits = len(fake_hub.commits)
    assert push_main([str(run), repo]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: names a local path ('/home/alice/medqa/data.xlsx')" in err
    assert len(fake_hub.commits) == commits
