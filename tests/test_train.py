"""The real training path on CPU with a tiny model: QLoRA (bitsandbytes NF4) + LoRA + gradient
checkpointing + DeepSpeed ZeRO-2 + packing, in subprocesses (DeepSpeed owns torch.distributed)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medchat.run_folder import Run
from tests.support.processes import free_port
from tests.support.training_runs import learnable_model, training_env, write_qa

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path):
    return training_env(tmp_path / "runs")


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory):
    return learnable_model(tmp_path_factory.mktemp("learnable") / "m")


@pytest.fixture
def tiny_data(tmp_path):
    return write_qa(tmp_path / "qa.jsonl")


def _settings(model_dir, data, **extra):
    s = {"model.name": str(model_dir), "data.path": str(data), "data.test_size": 0.25,
         "data.stratify": "null", "data.max_length": 256, "train.grad_accum": 1,
         "train.learning_rate": 3e-3, "train.warmup_ratio": 0, "lora.r": 8, "lora.alpha": 16,
         "lora.dropout": 0, "train.lr_scheduler": "constant", "model.quantization": "nf4",
         "model.gradient_checkpointing": "true", "train.deepspeed": "zero2"}
    s.update(extra)
    return [x for k, v in s.items() for x in ("--set", f"{k}={v}")]


def _run(args, env, timeout=300, launcher=None):
    """Run the CLI in its own process group so a timeout also ends torchrun's workers."""
    import signal

    cmd = (launcher or [sys.executable, "-m"]) + ["training.run"] + args
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.timeout(400)
def test_qlora_zero2_trains_and_only_lora_changes(tmp_path, learnable_model_dir, tiny_data):
    """Loss falls on a set it can memorise; LoRA weights change, the (4-bit) base does not."""
    driver = textwrap.dedent(f"""
        import dataclasses, json, torch, sys
        from training.config import build_config
        from training.run import prepare, load_model, train, save, held_out_losses
        cfg = build_config("cpu-smollm2", {_settings(learnable_model_dir, tiny_data, **{"train.max_steps": 60, "name": "q"})[1::2]!r})
        prep = prepare(cfg)
        model = load_model(cfg, prep.base_path)
        import bitsandbytes as bnb
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        before = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
        trainer, stats = train(prep, model=model)
        after = trainer.model.state_dict()
        lora = [k for k in before if "lora_" in k]
        base = [k for k in before if "lora_" not in k]
        # compare bytes: packed NF4 data stored as float32 holds NaN bit patterns (NaN != NaN)
        same = lambda k: torch.equal(before[k].contiguous().view(torch.uint8), after[k].contiguous().view(torch.uint8))
        out = dict(n4bit=n4, stats=stats,
                   lora_changed=sum(not same(k) for k in lora), n_lora=len(lora),
                   base_changed=[k for k in base if not same(k)], n_base=len(base),
                   ds=type(trainer.model_wrapped).__name__)
        metrics = held_out_losses(prep, trainer.model)
        save(prep, trainer.model, stats, metrics)
        out["metrics"] = dataclasses.asdict(metrics)
        print("RESULT" + json.dumps(out))
    """)
    env = _env(tmp_path)
    r = subprocess.run([sys.executable, "-c", driver], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=380)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res["n4bit"] > 0, "the base was not quantised to NF4"
    assert res["ds"] == "DeepSpeedEngine", "DeepSpeed did not wrap the model"
    assert res["lora_changed"] == res["n_lora"] > 0
    assert res["base_changed"] == [] and res["n_base"] > 0
    st = res["stats"]
    assert st["last_loss"] < 0.5 * st["first_loss"], st
    # run folder contract
    run = tmp_path / "runs" / "q"
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in weights) and not list(run.glob("adapter/*.bin"))
    man = json.loads((run / "medchat.json").read_text())
    assert man["schema_version"] == 2
    assert man["chat"]["template"] and man["chat"]["stop_tokens"] == ["<|im_end|>"]
    from transformers import AutoTokenizer

    # the template training rendered with is the one recorded (and saved with the adapter)
    for folder in (learnable_model_dir, run / "adapter"):
        assert man["chat"]["template"] == AutoTokenizer.from_pretrained(folder).chat_template
    assert man["dataset"]["sizes"] == {"train": 6, "test": 2, "val": 0}
    assert man["dataset"]["stats"]["max_length"] == 256 and man["dataset"]["sha256"]
    assert man["training"]["config"]["model"]["quantization"] == "nf4"
    assert man["training"]["stats"]["steps"] == 60
    typed = Run.open(run).manifest()  # the typed view reads back what training wrote
    assert typed.training.max_length == 256 and typed.training.quantization == "nf4"
    assert typed.base_model.local_path == str(learnable_model_dir)
    assert len(Run.open(run).test_split()) == 2
    held_out = res["metrics"]
    assert held_out["test_samples"] == 2 and held_out["test_tokens"] > 0
    for kind in ("base", "adapter"):
        assert man["metrics"]["models"][kind] == held_out["models"][kind]
        assert held_out["models"][kind]["loss"] > 0 and held_out["models"][kind]["perplexity"] > 1
    losses = [json.loads(x) for x in (run / "logs" / "loss.jsonl").read_text().splitlines()]
    assert len([x for x in losses if "loss" in x]) == 60
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob("runs/q/.adapter*"))  # nothing half-written left


@pytest.mark.timeout(500)
def test_cli_resume_continues_from_checkpoint(tmp_path, learnable_model_dir, tiny_data):
    env = _env(tmp_path)
    base = _settings(learnable_model_dir, tiny_data, **{"train.save_steps": 3, "model.quantization": "none",
                                                   "model.gradient_checkpointing": "false",
                                                   "train.eval_test_loss": "false"})
    r = _run(base + ["--name", "r", "--set", "train.max_steps=3"], env)
    assert "medchat run 'r' finished" in r.stderr
    run = tmp_path / "runs" / "r"
    assert (run / "checkpoints" / "checkpoint-3").is_dir()
    # a second plain run refuses to clobber the adapter
    r2 = subprocess.run([sys.executable, "-m", "training.run", "--name", "r"] + base, env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 2 and "--resume" in r2.stderr
    _run(base + ["--name", "r", "--set", "train.max_steps=6", "--resume"], env)
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    steps = [json.loads(x)["step"] for x in (run / "logs" / "loss.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4, not restarted at 1


@pytest.mark.timeout(500)
def test_two_process_data_parallel_run(tmp_path, learnable_model_dir, tiny_data):
    env = _env(tmp_path)
    torchrun = [shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun"),
                "--nproc_per_node", "2", "--master_port", str(free_port()), "-m"]
    args = _settings(learnable_model_dir, tiny_data, **{"train.max_steps": 4, "model.quantization": "none",
                                                   "model.gradient_checkpointing": "false",
                                                   "train.eval_test_loss": "false"})
    _run(args + ["--name", "dp"], env, launcher=torchrun)
    man = json.loads((tmp_path / "runs" / "dp" / "medchat.json").read_text())
    assert man["training"]["stats"]["world_size"] == 2 and man["training"]["stats"]["steps"] == 4
    assert (tmp_path / "runs" / "dp" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.timeout(120)
def test_trust_remote_code_is_recorded_and_used(tmp_path, tiny_model_dir, tiny_data):
    """A base whose classes live in its own folder (like InternLM2): training loads it with
    the config's trust_remote_code and the manifest's base records it for merge and chat."""
    from tests.support.tiny_model import remote_code_model
    from training.config import build_config
    from training.run import load_model, prepare

    base = remote_code_model(tiny_model_dir, tmp_path / "remote")
    settings = [f"model.name={base}", f"data.path={tiny_data}", "data.test_size=0.25",
                "data.stratify=null", f"runs_dir={tmp_path / 'runs'}", "name=rc",
                "train.deepspeed=null", "model.gradient_checkpointing=false"]
    cfg = build_config("cpu-smollm2", settings + ["model.trust_remote_code=true"])
    prep = prepare(cfg, hash_base=False)
    assert prep.base_ref.trust_remote_code and prep.base_ref.local_path == str(base)
    model = load_model(cfg, prep.base_path)
    assert type(model.get_base_model()).__name__ == "TinyForCausalLM"
    plain = build_config("cpu-smollm2", settings + ["name=rc2"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(plain, prepare(plain, hash_base=False).base_path)
