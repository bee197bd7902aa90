"""medchat push against a loopback Hub (tests/fake_hub.py) with the real huggingface_hub client."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from fake_hub import DEFAULT_TOKEN, DEFAULT_USER, make_adapter_run

import hub.push as push_mod
from hub.push import HubError, deny_reason, plan_push, push

pytestmark = pytest.mark.timeout(120)
REPO = f"{DEFAULT_USER}/tiny-adapter"


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter_run(tmp_path_factory.mktemp("runs"), tiny_model_dir)


def _front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_dry_run_lists_files_and_sizes_without_network(adapter_run, fake_hub, capsys):
    assert push_mod.main([str(adapter_run), REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    size = (adapter_run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert "adapter_model.safetensors" in out and push_mod.human_size(size) in out
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
    weights = (adapter_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert len(fake_hub.lfs_uploads) == 1
    assert on_hub["adapter_model.safetensors"] == weights
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
    assert '"r": 8' in text  # the training configuration
    assert str(adapter_run.parent) not in readme.decode()  # no local paths
    manifest = json.loads(fake_hub.repo_files(REPO)["medchat.json"])
    assert manifest["base_model"]["name"] == "test-user/tiny-base"
    assert manifest["base_model"]["local_path"] is None and manifest["kind"] == "adapter"
    assert "/" not in manifest["dataset"]["source"] and str(adapter_run.parent) not in \
        json.dumps(manifest)
    adapter_cfg = json.loads(fake_hub.repo_files(REPO)["adapter_config.json"])
    assert adapter_cfg["base_model_name_or_path"] == "test-user/tiny-base"


def test_merged_push_card_says_transformers(adapter_run, fake_hub, tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "merged-run"
    shutil.copytree(adapter_run, run)
    shutil.copytree(tiny_model_dir, run / "merged")
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
        (adapter_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert result.changed


def test_persistent_5xx_gives_a_clear_error(adapter_run, fake_hub):
    fake_hub.inject("commit", 503, times=50)
    with pytest.raises(HubError, match=r"kept answering 503 when trying to upload"):
        push(adapter_run, REPO)
    assert fake_hub.stats["commit"] == push_mod.RETRIES + 1


def test_rejected_token_401(adapter_run, fake_hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_NotAValidTokenAtAll000000000000000")
    assert push_mod.main([str(adapter_run), REPO]) == 2
    err = capsys.readouterr().err
    assert "rejected the token from HF_TOKEN (401 Unauthorized)" in err
    assert "hf auth login" in err and "hf_NotAValid" not in err
    assert REPO not in {r for _, r in fake_hub.repos}


def test_missing_token(adapter_run, fake_hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert push_mod.main([str(adapter_run), REPO]) == 2
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
    assert push_mod.main([str(adapter_run), REPO, "--private"]) == 0
    fake_hub.inject("commit", 503, times=1)
    (adapter_run / "adapter" / "notes.txt").write_text("changed\n")
    try:
        assert push_mod.main([str(adapter_run), REPO, "--dry-run"]) == 0
        assert push_mod.main([str(adapter_run), REPO]) == 0
    finally:
        (adapter_run / "adapter" / "notes.txt").unlink()
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
    leak = adapter_run / "adapter" / "notes.txt"
    leak.write_text("my token: hf_abcdefghijklmnopqrstuvwxyz0123456789\n")
    try:
        assert push_mod.main([str(adapter_run), REPO]) == 2
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
