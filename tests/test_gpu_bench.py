"""bench/gpu_qlora.py: the GPU proof script, checked on a CPU with its --tiny stand-in.

The CPU run goes through every phase the GPU run does (model build + save, matmul rate, our
training path with NF4 + ZeRO-2 + packing, the plain recipe, merge + chat-engine decode) with a
2-layer hidden-64 model; the `gpu` test runs the real 7B-shaped benchmark where CUDA exists.
The script only ever runs as a subprocess: what is checked is what it writes and prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medchat.base_model import cache_root
from medchat.run_folder import Run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_qlora.py"
# The script's phases and run names, as its results name them.
PHASES = ("setup", "ours", "plain", "decode")
RUN_NAME, DECODE_RUN = "bench-ours", "bench-decode"


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT"):
        env.pop(k, None)
    return env


def _script(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                       env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# -- pieces ----------------------------------------------------------------------------------


def test_tokenizer_cut_to_32000_keeps_template_and_text(tmp_path):
    from transformers import AutoTokenizer

    src = cache_root() / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    if not (src / "tokenizer.json").is_file():
        pytest.skip(f"{src} not prepared")
    r = _script("tokenizer", tmp_path / "tok", "--source", src)
    assert r.stdout.strip() == str(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    full = AutoTokenizer.from_pretrained(src)
    assert len(tok) == 32000
    text = "Can I take ibuprofen 400 mg with lisinopril? Ask your pharmacist about interactions."
    ids = tok(text)["input_ids"]
    assert max(ids) < 32000 and tok.decode(ids) == text
    assert len(ids) >= len(full(text)["input_ids"])  # fewer merges: never shorter
    msgs = [{"role": "user", "content": "What is metformin for?"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == full.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == full.eos_token_id


def _results(ours: dict, plain: dict, params=6_738_415_616, tflops=800.0) -> dict:
    """A results file as the script writes it, with chosen numbers in the measured fields."""
    spec = dict(tiny=False, work="/w", data="/d.xlsx", tokenizer="/t", hidden=4096, layers=32,
                intermediate=11008, heads=32, vocab=32000, seq=2048, warmup=3, steps=20, batch=1,
                grad_accum=1, lora_r=64, lora_alpha=16, dtype="auto", matmul_n=8192,
                matmul_iters=20, decode_prompts=4, decode_tokens=64, preset="qwen2.5-7b-qlora",
                extra=[])
    return {"date": "2025-01-01 00:00 UTC", "command": "bash bench/gpu_qlora.sh",
            "device": {"device": "GPU"}, "versions": {"torch": "2"}, "spec": spec,
            "phases": {"setup": {"ok": True, "params": params, "matmul": {"tflops": tflops}},
                       "ours": {"ok": True, **ours}, "plain": {"ok": True, **plain},
                       "decode": {"skipped": "left out (--skip)"}}}


def test_report_mfu_ratios_and_targets(tmp_path):
    """`report` recomputes the summary from a results file: MFU, speed-up, memory ratio, targets."""
    path = tmp_path / "gpu_qlora.json"
    path.write_text(json.dumps(_results(
        ours={"real_tokens_per_s": 3000.0, "peak_allocated_gb": 7.0, "peak_reserved_gb": 7.5},
        plain={"real_tokens_per_s": 1500.0, "peak_allocated_gb": 10.0, "peak_reserved_gb": 12.0})))
    md = _script("report", path).stdout
    res = json.loads(path.read_text())
    s = res["summary"]
    assert res["phases"]["ours"]["mfu"] == pytest.approx(4 * 6_738_415_616 * 3000 / 800e12, abs=1e-4)
    assert s["speedup"] == 2.0 and s["target_speed_1_5x"] is True
    assert s["target_memory_8gb"] is True and s["peak_reserved_gb_ratio"] == 0.625
    assert "**met** (7.50 GB reserved)" in md and "| 2.00x |" in md
    assert (tmp_path / "gpu_qlora.md").read_text() == md
    path.write_text(json.dumps(_results(
        ours={"real_tokens_per_s": 3000.0, "peak_allocated_gb": 7.0, "peak_reserved_gb": 8.3},
        plain={"real_tokens_per_s": 1500.0, "peak_allocated_gb": 10.0, "peak_reserved_gb": 12.0})))
    md = _script("report", path).stdout
    assert json.loads(path.read_text())["summary"]["target_memory_8gb"] is False
    assert "**NOT met** (8.30 GB reserved)" in md


def test_smi_peak_samples_nvml(tmp_path):
    """The nvidia-smi column: NVML's device 'used' bytes, sampled, the maximum kept."""
    fake = tmp_path / "fake_nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(
        "import types\n"
        "readings = iter([1e9, 5e9, 3e9] + [2e9] * 1000)\n"
        "def nvmlInit(): pass\n"
        "def nvmlDeviceGetHandleByIndex(i): return 'gpu0'\n"
        "def nvmlDeviceGetMemoryInfo(h): return types.SimpleNamespace(used=next(readings))\n")
    path = os.pathsep.join([str(fake)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    r = _script("smi-peak", "--seconds", "0.4", env=_env(PYTHONPATH=path))
    assert r.stdout.strip() == "5.0 GB"
    # not installed (as in this venv) or no device: n/a, no thread
    (fake / "pynvml.py").write_text("raise ImportError('no NVML here')\n")
    r = _script("smi-peak", "--seconds", "0.1", env=_env(PYTHONPATH=path))
    assert r.stdout.strip() == "n/a (no NVML)"


def test_wheels_stay_out_of_git():
    """The carried kit (43 MB of wheels, the spreadsheet) must never be committed."""
    r = subprocess.run(["git", "check-ignore", "-q", "bench/wheels/bitsandbytes-0.50.2-py3-none-any.whl"],
                       cwd=ROOT)
    assert r.returncode == 0


# -- the whole script on a CPU ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, spreadsheet):
    out = tmp_path_factory.mktemp("gpu_bench_out")
    work = tmp_path_factory.mktemp("gpu_bench_work")
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out),
                        "--work", str(work), "--data", str(spreadsheet)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280)
    log = (out / "gpu_qlora-tiny-children.log")
    assert r.returncode == 0, (r.stdout[-3000:] + r.stderr[-3000:]
                               + (log.read_text()[-4000:] if log.is_file() else ""))
    return json.loads((out / "gpu_qlora-tiny.json").read_text()), (out / "gpu_qlora-tiny.md").read_text(), r.stdout, work


@pytest.mark.slow  # four child interpreters (torch, transformers, deepspeed): ~1 min idle, 2 loaded
@pytest.mark.timeout(300)
def test_tiny_run_end_to_end_on_cpu(tiny_run):
    res, md, stdout, work = tiny_run
    ph = res["phases"]
    assert all(ph[p].get("ok") for p in PHASES), {p: ph[p].get("error") for p in ph}
    setup, ours, plain, dec = (ph[p] for p in PHASES)
    # the stand-in model was built and saved with the 32000-token vocabulary
    assert setup["params"] > 32000 * 64 and setup["matmul"]["tflops"] > 0
    # ours went through training.run: NF4 layers, DeepSpeed engine, packed rows without padding
    n_linear = 7 * res["spec"]["layers"]
    assert ours["nf4_layers"] == n_linear and ours["wrapped_by"] == "DeepSpeedEngine"
    assert ours["padding_share"] == 0.0 and ours["real_tokens"] > 0
    assert ours["train_stats"]["steps"] == res["spec"]["warmup"] + res["spec"]["steps"]
    # plain: no DeepSpeed, padded batches of whole samples, same LoRA size
    assert plain["nf4_layers"] == n_linear and plain["wrapped_by"] != "DeepSpeedEngine"
    assert plain["padding_share"] > 0 and plain["micro_batch"] > 1
    assert plain["trainable_params"] == ours["trainable_params"] > 0
    assert plain["train_stats"]["steps"] == ours["train_stats"]["steps"]
    for r in (ours, plain):
        assert r["real_tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_allocated_gb"] is None
    assert res["summary"]["speedup"] > 0
    # token accounting: every micro-batch the DataLoader fetched was counted (through
    # __getitems__; accelerate's loader reads one batch ahead), and the measured window's
    # real/padded tokens are the recorded row lengths
    spec = res["spec"]
    micro = (spec["warmup"] + spec["steps"]) * spec["grad_accum"]
    for r in (ours, plain):
        lens = r["batch_lengths"]
        assert micro <= r["batches_fetched"] <= micro + 1
        assert len(lens) == spec["steps"] * spec["grad_accum"]
        assert r["real_tokens"] == sum(sum(b) for b in lens)
        assert r["padded_tokens"] == sum(max(b) * len(b) for b in lens)
    assert all(len(b) == 1 for b in ours["batch_lengths"])  # one packed row per micro-batch
    assert all(len(b) == plain["micro_batch"] for b in plain["batch_lengths"])
    assert plain["padded_tokens"] > plain["real_tokens"]
    # the trained run folder is a real medchat run (adapter + manifest)
    run = Run.open(RUN_NAME, work / "runs")
    assert run.has_adapter() and (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert run.manifest().name == RUN_NAME
    # decode through the chat engine: fp32 on a CPU, so the merged model answers exactly as the
    # attached adapter does, and the (re-drawn) adapter changes what the base says
    ag = dec["agreement"]
    assert ag["adapter_eq_merged"] == ag["prompts"] > 0 and ag["mean_common_prefix"] == 1.0
    assert ag["adapter_ne_base"] >= 1
    assert all(m["new_tokens"] > 0 and m["tokens_per_s"] > 0 for m in dec["models"].values())
    decode_run = Run.open(DECODE_RUN, work / "runs")
    assert decode_run.has_merged() and decode_run.manifest().merge["shards"] >= 1
    # the table: both recipes, the ratio row, n/a memory on a CPU, the decode rows
    for needle in ("| ours: NF4", "| plain: Trainer", "| ours / plain", "| n/a | n/a |",
                   f"| adapter:{DECODE_RUN} |", f"| merged:{DECODE_RUN} |"):
        assert needle in md, needle
    assert md in stdout


def test_budget_skips_phases_that_do_not_fit(tmp_path, spreadsheet):
    """With no time left every phase is skipped (named, with why) and the table still prints."""
    r = _script("--tiny", "--budget", "0", "--out", tmp_path, "--data", spreadsheet)
    res = json.loads((tmp_path / "gpu_qlora-tiny.json").read_text())
    assert all("not enough time left" in res["phases"][p]["skipped"] for p in PHASES)
    assert "| ours / plain |" in r.stdout
    work = r.stdout.split("; work ", 1)[1].split(";", 1)[0]
    assert not Path(work).exists()  # the scratch folder is removed


# -- the real thing ----------------------------------------------------------------------------


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_qlora")
    env = dict(_env(), OUT=str(out))
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_qlora.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=560)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads((out / "gpu_qlora.json").read_text())


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_qlora_7b_shapes(gpu_run):
    ph = gpu_run["phases"]
    assert all(ph[p].get("ok") for p in PHASES), {p: ph[p].get("error") or ph[p].get("skipped")
                                                  for p in ph}
    assert ph["setup"]["params"] > 6.5e9
    assert ph["ours"]["nf4_layers"] == 7 * 32 and ph["ours"]["wrapped_by"] == "DeepSpeedEngine"
    assert ph["ours"]["peak_allocated_gb"] > 3  # 6.7 B parameters in 4 bits are ~3.5 GB alone


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_qlora_targets(gpu_run):
    """The targets: peak <= 8 GB at sequence 2048, real tokens/s >= 1.5x the plain recipe."""
    s, ours = gpu_run["summary"], gpu_run["phases"]["ours"]
    assert s.get("target_memory_8gb"), f"peak reserved {ours.get('peak_reserved_gb')} GB > 8 GB"
    assert s.get("target_speed_1_5x"), f"speed-up {s.get('speedup')}x < 1.5x"
