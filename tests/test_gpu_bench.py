"""bench/gpu_qlora.py (issue 6): the GPU proof script, checked on a CPU with its --tiny stand-in.

The CPU run goes through every phase the GPU run does (model build + save, matmul rate, our
training path with NF4 + ZeRO-2 + packing, the plain recipe, merge + chat-engine decode) with a
2-layer hidden-64 model; the `gpu` test runs the real 7B-shaped benchmark where CUDA exists.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_qlora  # noqa: E402


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUT"):
        env.pop(k, None)
    return env


# -- pieces ----------------------------------------------------------------------------------


def test_tokenizer_cut_to_32000_keeps_template_and_text(tmp_path):
    from transformers import AutoTokenizer

    from training.base_model import cache_root

    src = cache_root() / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    if not (src / "tokenizer.json").is_file():
        pytest.skip(f"{src} not prepared")
    tok = AutoTokenizer.from_pretrained(gpu_qlora.make_tokenizer(tmp_path / "tok", str(src)))
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


def test_counting_rows_accounts_real_and_padded_tokens():
    """Through a real DataLoader: batches of 2 over 5 rows, two epochs (a short last batch)."""
    from torch.utils.data import DataLoader

    rows = gpu_qlora.CountingRows([{"input_ids": [0] * n} for n in (5, 3, 8, 2, 7)])
    loader = DataLoader(rows, batch_size=2, collate_fn=lambda b: [len(r["input_ids"]) for r in b])
    seen = [b for _ in range(2) for b in loader]
    assert seen == [[5, 3], [8, 2], [7]] * 2 and rows.batches == seen
    # skip the first micro-batch, measure the next three: (8,2) (7) (5,3)
    assert rows.window(1, 3) == {"real_tokens": 10 + 7 + 8, "padded_tokens": 16 + 7 + 10}
    with pytest.raises(RuntimeError, match="batches were fetched"):
        rows.window(5, 2)


def test_summary_mfu_ratios_and_targets():
    res = {"phases": {
        "setup": {"params": 6_738_415_616, "matmul": {"tflops": 800.0}},
        "ours": {"real_tokens_per_s": 3000.0, "peak_allocated_gb": 7.0, "peak_reserved_gb": 7.5},
        "plain": {"real_tokens_per_s": 1500.0, "peak_allocated_gb": 10.0, "peak_reserved_gb": 12.0}}}
    s = gpu_qlora.summarize(res)
    assert res["phases"]["ours"]["mfu"] == pytest.approx(4 * 6_738_415_616 * 3000 / 800e12, abs=1e-4)
    assert s["speedup"] == 2.0 and s["target_speed_1_5x"] is True
    assert s["target_memory_8gb"] is True and s["peak_reserved_gb_ratio"] == 0.625
    res["phases"]["ours"]["peak_reserved_gb"] = 8.3
    assert gpu_qlora.summarize(res)["target_memory_8gb"] is False


def test_smi_peak_samples_nvml(monkeypatch):
    """The nvidia-smi column: NVML's device 'used' bytes, sampled, the maximum kept."""
    import time
    import types

    readings = iter([1e9, 5e9, 3e9] + [2e9] * 1000)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "gpu0",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=next(readings)))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    smi = gpu_qlora.SmiPeak()
    time.sleep(0.4)
    assert smi.stop() == 5.0
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: n/a, no thread
    assert gpu_qlora.SmiPeak().stop() is None


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
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_qlora.py"), "--tiny", "--out", str(out),
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
    assert all(ph[p].get("ok") for p in gpu_qlora.PHASES), {p: ph[p].get("error") for p in ph}
    setup, ours, plain, dec = (ph[p] for p in gpu_qlora.PHASES)
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
    # the trained run folder is a real medchat run (adapter + manifest)
    run = work / "runs" / gpu_qlora.RUN_NAME
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "medchat.json").is_file()
    # decode through the chat engine: fp32 on a CPU, so the merged model answers exactly as the
    # attached adapter does, and the (re-drawn) adapter changes what the base says
    ag = dec["agreement"]
    assert ag["adapter_eq_merged"] == ag["prompts"] > 0 and ag["mean_common_prefix"] == 1.0
    assert ag["adapter_ne_base"] >= 1
    assert all(m["new_tokens"] > 0 and m["tokens_per_s"] > 0 for m in dec["models"].values())
    assert (work / "runs" / gpu_qlora.DECODE_RUN / "merged" / "config.json").is_file()
    # the table: both recipes, the ratio row, n/a memory on a CPU, the decode rows
    for needle in ("| ours: NF4", "| plain: Trainer", "| ours / plain", "| n/a | n/a |",
                   f"| adapter:{gpu_qlora.DECODE_RUN} |", f"| merged:{gpu_qlora.DECODE_RUN} |"):
        assert needle in md, needle
    assert md in stdout


def test_budget_skips_phases_that_do_not_fit(tmp_path, spreadsheet):
    """With no time left every phase is skipped (named, with why) and the table still prints."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_qlora.py"), "--tiny", "--budget", "0",
                        "--out", str(tmp_path), "--data", str(spreadsheet)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_qlora-tiny.json").read_text())
    assert all("not enough time left" in res["phases"][p]["skipped"] for p in gpu_qlora.PHASES)
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
    assert all(ph[p].get("ok") for p in gpu_qlora.PHASES), {p: ph[p].get("error") or ph[p].get("skipped") for p in ph}
    assert ph["setup"]["params"] > 6.5e9
    assert ph["ours"]["nf4_layers"] == 7 * 32 and ph["ours"]["wrapped_by"] == "DeepSpeedEngine"
    assert ph["ours"]["peak_allocated_gb"] > 3  # 6.7 B parameters in 4 bits are ~3.5 GB alone


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_qlora_targets(gpu_run):
    """Issue 6's targets: peak <= 8 GB at sequence 2048, real tokens/s >= 1.5x the plain recipe."""
    s, ours = gpu_run["summary"], gpu_run["phases"]["ours"]
    assert s.get("target_memory_8gb"), f"peak reserved {ours.get('peak_reserved_gb')} GB > 8 GB"
    assert s.get("target_speed_1_5x"), f"speed-up {s.get('speedup')}x < 1.5x"
