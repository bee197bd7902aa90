"""The run folder: one owner of the layout, a typed manifest with a schema version, manifests of
the previous release still load, and unreadable ones fail naming the file."""

import json
import shutil
from pathlib import Path

import pytest

from medchat.chat_format import Conversation
from medchat.run_folder import (MANIFEST_NAME, SCHEMA_VERSION, BaseModelRef, ChatSpec, Manifest,
                                ManifestError, ModelScores, Run, RunNotFoundError,
                                clear_stale_stages, staged_dir)

FIXTURES = Path(__file__).parent / "fixtures"


def make(tmp_path, name="r1") -> Run:
    run = Run.create(name, tmp_path / "runs")
    run.save_manifest(Manifest(name=name, base_model=BaseModelRef(name="owner/base"),
                               chat=ChatSpec(template="{{ x }}", stop_tokens=["<|im_end|>"])))
    return run


def test_manifest_of_the_previous_release_still_loads(tmp_path):
    run = Run.open(FIXTURES / "v1-run")
    m = run.manifest()
    raw = json.loads(run.manifest_path.read_text())
    assert raw["version"] == 1 and "chat_template" in raw  # really the old shape
    assert m.schema_version == SCHEMA_VERSION and m.name == "v1run" and m.kind == "adapter"
    assert m.chat.template == raw["chat_template"] and m.chat.stop_tokens == ["<|im_end|>"]
    assert m.chat.system_prompt == raw["system_prompt"]
    assert m.chat.generation.max_new_tokens == 256 and m.chat.generation.temperature == 0.2
    assert m.base_model.local_path == raw["base_model"]["local_path"]
    assert m.base_model.trust_remote_code is False
    assert m.training.max_length == 256 and m.training.stats["steps"] == raw["training"]["steps"]
    assert m.dataset.sizes == {"train": 6, "test": 2, "val": 0} and m.dataset.seed == 42
    assert m.dataset.stats["truncated"] == 0
    # metrics under one schema: training's test_loss_* and evaluation's models.* both land here
    assert m.metrics.models["base"].loss == raw["metrics"]["eval"]["models"]["base"]["loss"]
    assert m.metrics.models["adapter"].perplexity == raw["metrics"]["eval"]["models"]["adapter"]["perplexity"]
    assert m.metrics.test_samples == 2 and m.metrics.evaluation["generation"] == "greedy"
    assert m.merge["fidelity"]["greedy_agree"] is True
    assert [c.question for c in run.test_split()] == ["What are side effects of lisinopril?",
                                                      "Is acetaminophen safe in pregnancy?"]
    # saved again, it is schema 2 and reads back equal
    copy = Run(tmp_path / "copy")
    copy.save_manifest(m)
    assert json.loads(copy.manifest_path.read_text())["schema_version"] == SCHEMA_VERSION
    assert copy.manifest() == m


def test_v1_metrics_written_by_training_alone_map_to_models():
    data = json.loads((FIXTURES / "v1-run" / MANIFEST_NAME).read_text())
    data["metrics"].pop("eval")  # a run that was trained but never evaluated
    m = Manifest.from_dict(data)
    assert m.metrics.models["base"].loss == data["metrics"]["test_loss_base"]
    assert m.metrics.models["adapter"].perplexity == data["metrics"]["test_ppl_finetuned"]
    assert m.metrics.scores("merged") == m.metrics.models["adapter"]  # merged answers like it


@pytest.mark.parametrize("text,expect", [
    ("{not json", r"medchat.json: line 1: invalid JSON"),
    ("[1, 2]", r"medchat.json: expected a JSON object"),
    ('{"schema_version": 99, "name": "x"}', r"schema version 99 was written by a newer medchat"),
    ('{"schema_version": 2, "name": "x", "base_model": {"name": "a/b"}}', r"missing field\(s\) chat"),
    ('{"schema_version": 2, "name": "x", "base_model": {"name": "a/b"}, "chat": {"template": 3}}',
     r"field chat.template: expected str"),
    ('{"schema_version": 2, "name": "x", "base_model": {"name": "a/b"}, "chat": {"template": "t"},'
     ' "metrics": {"models": {"base": {"loss": "low"}}}}', r"field metrics.models.base.loss"),
])
def test_unreadable_manifest_names_the_file_and_field(tmp_path, text, expect):
    run = make(tmp_path)
    run.manifest_path.write_text(text)
    with pytest.raises(ManifestError, match=expect) as e:
        run.manifest()
    assert str(run.manifest_path) in str(e.value)


def test_missing_manifest_and_unknown_runs(tmp_path):
    (tmp_path / "runs" / "half").mkdir(parents=True)
    with pytest.raises(ManifestError, match="no manifest"):
        Run(tmp_path / "runs" / "half").manifest()
    with pytest.raises(RunNotFoundError, match="has no medchat.json"):
        Run.open(tmp_path / "runs" / "half")
    with pytest.raises(RunNotFoundError, match="no run of that name"):
        Run.open("nope", tmp_path / "runs")
    with pytest.raises(ManifestError, match="plain folder name"):
        Run.create("../escape", tmp_path / "runs")


def test_open_by_name_or_folder_and_list(tmp_path, monkeypatch):
    run = make(tmp_path, "a")
    make(tmp_path, "b")
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert Run.open("a", tmp_path / "runs") == run == Run.open(run.path)
    monkeypatch.setenv("MEDCHAT_RUNS", str(tmp_path / "runs"))
    assert Run.open("a") == run
    assert [r.name for r in Run.all()] == ["a", "b"]


def test_layout_scores_and_split(tmp_path):
    run = make(tmp_path)
    assert run.model_kinds() == ["base"] and not run.has_adapter()
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    assert run.model_kinds() == ["base", "adapter"]
    run.record_scores({"base": ModelScores(loss=2.7), "adapter": ModelScores(loss=2.5)},
                      test_samples=10)
    run.record_scores({"adapter": ModelScores(rougeL=11.0)}, evaluation={"questions": 10})
    s = run.manifest().metrics
    assert s.models["adapter"] == ModelScores(loss=2.5, rougeL=11.0)  # merged, not replaced
    assert s.models["base"].loss == 2.7 and s.test_samples == 10 and s.evaluation == {"questions": 10}
    convs = [Conversation([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1?"},
                           {"role": "assistant", "content": "A1"}], {"row": 2}),
             Conversation([{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A"},
                           {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}])]
    run.write_split("test", convs)
    assert run.test_split() == convs and run.split_questions() == ["Q1?"]
    run.split_path("test").write_text(run.split_path("test").read_text() + "{cut short\n")
    with pytest.raises(ManifestError, match=r"test.jsonl line 3"):
        run.test_split()
    with pytest.raises(ManifestError, match="no train split"):
        run.read_split("train")


def test_checkpoints_sorted_by_step(tmp_path):
    run = make(tmp_path)
    for step in (100, 25, 50):
        (run.checkpoints_dir / f"checkpoint-{step}").mkdir(parents=True)
    (run.checkpoints_dir / "checkpoint-x").mkdir()
    assert [p.name for p in run.checkpoints()] == ["checkpoint-25", "checkpoint-50", "checkpoint-100"]


def test_saving_is_atomic(tmp_path, monkeypatch):
    run = make(tmp_path)
    before = run.manifest_path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        run.update_manifest(kind="merged")
    assert run.manifest_path.read_bytes() == before
    assert [p.name for p in run.path.iterdir()] == [MANIFEST_NAME]  # no temp file left
    shutil.rmtree(run.path)


_WRITER = """
import sys, time
from pathlib import Path
from medchat.run_folder import staged_dir
with staged_dir(Path(sys.argv[1]), overwrite=True) as tmp:
    (tmp / "weights.bin").write_bytes(b"half" * 1000)
    print("writing", flush=True)
    time.sleep(120)
"""


def _writer(target: Path):
    """A process in the middle of staging `target` (its partial folder written, not moved)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], text=True,
                            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _partials(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.partial"))


def test_a_stage_killed_mid_write_is_cleared_by_the_next_one_and_a_live_one_is_not(
        tmp_path, capsys):
    """SIGKILL while a folder is staged leaves its hidden partial folder (nothing can run
    then); the next stage of the same target removes it and says so, but never the partial
    folder of a writer that is still running."""
    import signal

    target = tmp_path / "run" / "merged"
    target.mkdir(parents=True)
    (target / "weights.bin").write_bytes(b"old")
    killed = _writer(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert len(_partials(target)) == 1 and (target / "weights.bin").read_bytes() == b"old"
    with staged_dir(target, overwrite=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert (target / "weights.bin").read_bytes() == b"new" and _partials(target) == []
    assert f"left by process {killed.pid}" in capsys.readouterr().err
    running = _writer(target)
    try:
        with staged_dir(target, overwrite=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"newer")
        assert (target / "weights.bin").read_bytes() == b"newer"
        left = _partials(target)
        assert len(left) == 1 and f"-{running.pid}." in left[0].name  # the live writer's
        assert clear_stale_stages(target) == []
    finally:
        running.kill()
        running.wait(30)
    assert clear_stale_stages(target) and _partials(target) == []


def test_an_interrupted_replace_is_undone_or_finished(tmp_path):
    """A kill between the two renames of a replace leaves `.name.old`: with the target gone it
    is put back (the new folder was never checked complete), beside a target it is removed."""
    target = tmp_path / "merged"
    old = tmp_path / ".merged.old"
    old.mkdir()
    (old / "weights.bin").write_bytes(b"old")
    assert "put merged back" in clear_stale_stages(target)[0]
    assert (target / "weights.bin").read_bytes() == b"old" and not old.exists()
    old.mkdir()
    assert "removed .merged.old" in clear_stale_stages(target)[0]
    assert not old.exists() and (target / "weights.bin").read_bytes() == b"old"


def test_hidden_folders_are_never_runs(tmp_path):
    """A pull being written (or cut by a kill) is a hidden partial folder that may already hold
    a manifest: the runs list never shows it."""
    for name in ("real", ".owner--repo.vm-1.abc.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST_NAME).write_text("{}")
    assert [r.name for r in Run.all(tmp_path)] == ["real"]
