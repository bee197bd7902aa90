"""--resume after a kill: the newest complete checkpoint is picked, partial ones are skipped and
named; a run killed with SIGKILL at any moment (during a checkpoint save too) resumes to the
same adapter as a run that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medchat.run_folder import Run
from tests.support.training_runs import learnable_model, training_env, write_qa
from training.run import checkpoint_problem, resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Which checkpoint: fabricated folders (fast, default suite)


def _checkpoint(root: Path, step: int, deepspeed: bool = False, drop: str | None = None) -> Path:
    """checkpoint-<step>/ as the Trainer writes it (adapter, optimizer state, trainer state);
    `drop` leaves one part out or cuts it short, as a kill during the save does."""
    import torch
    from safetensors.torch import save_file

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, folder / "adapter_model.safetensors")
    if deepspeed:
        states = folder / f"global_step{step}"
        states.mkdir()
        torch.save({"m": torch.ones(2)}, states / "mp_rank_00_model_states.pt")
        torch.save({"o": torch.ones(2)}, states / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (folder / "latest").write_text(f"global_step{step}")
    else:
        torch.save({"o": torch.ones(2)}, folder / "optimizer.pt")
        torch.save({"s": 1}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if drop == "state":
        (folder / "trainer_state.json").unlink()
    elif drop == "half-state":
        (folder / "trainer_state.json").write_text('{"global_step": ')
    elif drop == "weights":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[:-10])
    elif drop == "optimizer":
        target = (folder / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
                  if deepspeed else folder / "optimizer.pt")
        target.write_bytes(target.read_bytes()[:100])
    elif drop == "latest":
        (folder / "latest").unlink()
    return folder


@pytest.mark.parametrize("deepspeed", [False, True])
def test_partial_checkpoints_are_skipped_and_named(tmp_path, deepspeed):
    run = Run(tmp_path / "run")
    root = run.checkpoints_dir
    good = _checkpoint(root, 2, deepspeed)
    assert checkpoint_problem(good) is None
    partial = {drop: _checkpoint(root, step, deepspeed, drop) for step, drop in
               [(4, "state"), (6, "half-state"), (8, "weights"), (10, "optimizer")]
               + ([(12, "latest")] if deepspeed else [])}
    found, skipped = resume_checkpoint(run)
    assert found == good
    reasons = {folder.name: why for folder, why in skipped}
    assert reasons["checkpoint-4"] == "no trainer_state.json"
    assert reasons["checkpoint-6"] == "trainer_state.json is cut short"
    assert reasons["checkpoint-8"] == "its weights are missing or cut short"
    assert reasons["checkpoint-10"] == "its optimizer state is missing or cut short"
    if deepspeed:
        assert "latest" in reasons["checkpoint-12"]
    assert [f.name for f, _ in skipped] == sorted(
        (f.name for f in partial.values()), key=lambda n: -int(n.split("-")[1]))
    for folder in partial.values():  # an older partial one is skipped too, never picked
        assert checkpoint_problem(folder) is not None
    import shutil

    shutil.rmtree(good)
    assert resume_checkpoint(run)[0] is None


# ---------------------------------------------------------------------------------------------
# The kill test: real training runs (tiny model, LoRA, DeepSpeed ZeRO-2) killed with SIGKILL

# Runs training.run.main in a child process; MEDCHAT_TEST_PAUSE=<where>:<step> makes the run
# write a marker file and stop at that moment (forever), so the test can SIGKILL it exactly
# there. Nothing of this is in medchat: the hooks are set on the libraries from outside.
DRIVER = textwrap.dedent("""
    import json, os, sys, time
    where, _, step = os.environ.get("MEDCHAT_TEST_PAUSE", "").partition(":")
    marker = os.environ.get("MEDCHAT_TEST_MARKER", "")

    def pause():
        open(marker, "w").close()
        while True:
            time.sleep(60)

    import transformers
    from transformers import trainer_callback

    def step_of(path):
        return os.path.basename(os.path.dirname(str(path))).rsplit("-", 1)[-1]

    real_state = trainer_callback.TrainerState.save_to_json

    def save_state(self, path):
        if where == "before-state" and step_of(path) == step:
            pause()
        if where == "half-state" and step_of(path) == step:
            text = json.dumps(self.__dict__, default=str)
            with open(path, "w") as fh:
                fh.write(text[: len(text) // 2])
            pause()
        return real_state(self, path)

    trainer_callback.TrainerState.save_to_json = save_state
    real_opt = transformers.Trainer._save_optimizer_and_scheduler

    def save_opt(self, output_dir):
        if where == "optimizer" and step_of(os.path.join(output_dir, "x")) == step:
            pause()
        return real_opt(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = save_opt

    class PauseAtStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if where == "step" and str(state.global_step) == step:
                pause()

    import training.run as run_mod
    real_callbacks = run_mod._callbacks
    run_mod._callbacks = lambda run: real_callbacks(run) + [PauseAtStep()]
    real_save = run_mod.save

    def save(prep, model, stats, metrics=None):
        if where == "final":
            real_staged = prep.run.staged

            def staged(target, overwrite=False):
                ctx = real_staged(target, overwrite)

                class Pausing:
                    def __enter__(self):
                        folder = ctx.__enter__()
                        model.save_pretrained(folder)  # half of the adapter folder written
                        pause()

                    def __exit__(self, *exc):
                        return ctx.__exit__(*exc)
                return Pausing()
            prep.run.staged = staged
        return real_save(prep, model, stats, metrics)

    run_mod.save = save
    sys.exit(run_mod.main(sys.argv[1:]))
""")
STEPS, SAVE_EVERY = 6, 2
# (what, when): stop there, SIGKILL, then `--resume` to the end
MOMENTS = [
    ("before-state", "2"),  # first checkpoint written but for trainer_state.json: none complete
    ("step", "3"),  # between checkpoints
    ("half-state", "4"),  # trainer_state.json half written
    ("optimizer", "4"),  # adapter saved, DeepSpeed optimizer state not yet
    ("final", ""),  # training done, the adapter folder half written
]


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory):
    return learnable_model(tmp_path_factory.mktemp("resume-model") / "m")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_qa(tmp_path_factory.mktemp("resume-data") / "qa.jsonl")


def _args(model_dir: Path, data: Path, name: str) -> list[str]:
    settings = {"model.name": str(model_dir), "data.path": str(data), "data.test_size": 0.25,
                "data.stratify": "null", "data.max_length": 256, "train.grad_accum": 1,
                "train.learning_rate": 3e-3, "train.warmup_ratio": 0, "lora.r": 8,
                "lora.alpha": 16, "lora.dropout": 0, "train.lr_scheduler": "cosine",
                "model.quantization": "none", "model.gradient_checkpointing": "false",
                "train.deepspeed": "zero2", "train.max_steps": STEPS,
                "train.save_steps": SAVE_EVERY, "train.save_total_limit": 2,
                "train.eval_test_loss": "false", "name": name}
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


def _env(runs: Path) -> dict[str, str]:
    return training_env(runs, drop=("MEDCHAT_TEST_PAUSE", "MEDCHAT_TEST_MARKER"))


def _train(args: list[str], env: dict[str, str], timeout: int = 240) -> str:
    r = subprocess.run([sys.executable, "-m", "training.run", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    return r.stderr


def _train_and_kill(args: list[str], env: dict[str, str], pause: str, marker: Path,
                    timeout: float = 240) -> None:
    """Start a run that stops at `pause`; SIGKILL its whole process group once it is there."""
    env = {**env, "MEDCHAT_TEST_PAUSE": pause, "MEDCHAT_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before {pause}: {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the run did not reach {pause} in {timeout} s")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_runs_resume_to_the_same_adapter(tmp_path, learnable_model_dir, data_file):
    import torch

    runs = tmp_path / "runs"
    env = _env(runs)
    _train(_args(learnable_model_dir, data_file, "ref"), env)
    reference = _adapter(runs / "ref")
    ref_losses = [json.loads(x) for x in (runs / "ref" / "logs" / "loss.jsonl").read_text()
                  .splitlines()]
    for i, (where, step) in enumerate(MOMENTS):
        name = f"killed-{i}-{where}"
        args = _args(learnable_model_dir, data_file, name)
        _train_and_kill(args, env, f"{where}:{step}", tmp_path / f"{name}.paused")
        run = Run(runs / name)
        if where in ("before-state", "half-state", "optimizer"):
            partial = run.checkpoints_dir / f"checkpoint-{step}"
            assert partial.is_dir() and checkpoint_problem(partial) is not None, where
        if where == "final":
            assert not run.adapter_dir.exists()  # the adapter folder is written staged
        err = _train(args + ["--resume"], env)
        if where in ("before-state",):
            assert "--resume: skipping checkpoint-2: no trainer_state.json" in err
            assert "starting from step 0" in err
        elif where in ("half-state", "optimizer"):
            assert "--resume: skipping checkpoint-4" in err
            assert "continuing from checkpoint-2 (step 2)" in err
        elif where == "step":
            assert "continuing from checkpoint-2 (step 2)" in err
        else:
            assert f"continuing from checkpoint-{STEPS} (step {STEPS})" in err
        got = _adapter(run.path)
        assert got.keys() == reference.keys()
        # bit-identical: same seed, restored optimizer, scheduler, RNG and data position
        for key in reference:
            assert torch.equal(got[key], reference[key]), (where, key)
        manifest = run.manifest()
        assert manifest.training.stats["steps"] == STEPS
        losses = [json.loads(x) for x in run.loss_log_path.read_text().splitlines()]
        assert [x["step"] for x in losses if "loss" in x] == list(range(1, STEPS + 1)), where
        assert [x["loss"] for x in losses if "loss" in x] == \
            [x["loss"] for x in ref_losses if "loss" in x], where
        assert [checkpoint_problem(c) for c in run.checkpoints()] == [None, None]
