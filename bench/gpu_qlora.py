"""GPU proof: our QLoRA path on a 7B-shaped Llama vs the plain QLoRA recipe, one GPU.

    bash bench/gpu_qlora.sh                   # on the GPU machine: installs the carried wheels, runs this
    python bench/gpu_qlora.py [--tiny] [--steps 20] [--warmup 3] [--seq 2048] [--budget 420]
                              [--out DIR] [--work DIR] [--keep] [--skip decode]
    python bench/gpu_qlora.py tokenizer DEST [--source DIR]   # the 32000-token tokenizer
    python bench/gpu_qlora.py report RESULTS.json   # summary and table again from saved results
    python bench/gpu_qlora.py smi-peak --seconds S  # peak device memory as nvidia-smi shows it

What runs, each phase in its own subprocess (clean CUDA memory statistics; DeepSpeed owns
torch.distributed in its process):

  setup   a Llama with 7B-class shapes (hidden 4096, 32 layers, intermediate 11008, vocab 32000,
          32 heads) and random bf16 weights, built on the GPU and saved as safetensors with a
          32000-token tokenizer (SmolLM2's BPE cut to its first 32000 ids, same ChatML template);
          then the card's bf16 matmul rate (8192^3 products), the denominator of MFU.
  ours    training.run: prepare() on the real MedicationQA spreadsheet (packed to --seq),
          load_model() (bitsandbytes NF4 + double quant, LoRA r=64 all-linear, gradient
          checkpointing), train() (transformers Trainer + DeepSpeed ZeRO-2, timed through its
          callbacks= argument), save() -> a run folder.
  plain   the usual recipe: from_pretrained(BitsAndBytesConfig NF4) + prepare_model_for_kbit_training
          + get_peft_model + Trainer, no DeepSpeed, no packing, each batch padded to its longest
          sample (DataCollatorForSeq2Seq). Same samples (training.run.prepare with packing off),
          same LoRA, optimizer, dtype, sequence cap and step count. Its batch size is the mean
          number of samples per packed row times ours, so both see the same real tokens per step
          on average (the measured real tokens per step are reported).
  decode  the adapter that `ours` saved, its B matrices re-drawn at random so that it changes
          the answers (decode_run), merged by training.merge.merge_run; medchat.engine.Engine
          streams greedy answers to held-out questions from the base, the base with the adapter
          attached, and the merged model: decode tokens/s and whether adapter and merged agree.

Measured per training recipe over --steps optimizer steps after --warmup: peak GPU memory
(torch.cuda.max_memory_allocated / max_memory_reserved, whole process: load + train), real
(non-padding) tokens/s, MFU = 4*N*tokens/s / measured bf16 matmul rate (N = all base parameters;
4N = forward 2N + backward through the frozen base 2N; gradient-checkpointing recompute, LoRA
FLOPs and attention's L^2 term are not counted), and the ratios ours/plain.

--tiny swaps in a 2-layer hidden-64 model (vocab still 32000, sequence 512, 1+2 steps) so the
whole script runs on a CPU in about a minute (GPU memory columns are then n/a).
Results: <out>/gpu_qlora[-tiny].json and .md (out = --out, else $OUT, else bench/out/), the
table on stdout, every child's output in <out>/gpu_qlora[-tiny]-children.log. Each training
phase also records the row lengths of every micro-batch it measured (`batch_lengths`), so its
token counts can be checked from the results alone.

Imports `training` and `medchat` as installed packages (`pip install -e .`; gpu_qlora.sh puts
the checkout on PYTHONPATH instead where nothing is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medchat.base_model import resolve_base_model
from medchat.engine import Engine, GenerationSettings
from medchat.registry import Registry
from medchat.run_folder import Run
from training.config import build_config
from training.encode import pack
from training.merge import merge_run
from training.run import ensure_dist_env, load_model, prepare, save, torch_dtype, train

# torch, transformers, peft, safetensors and bitsandbytes are imported in the functions that
# use them: the parent process must not create a CUDA context (it would hold memory on the card
# while the children are measured), and each phase imports only what it measures.

ROOT = Path(__file__).resolve().parents[1]

KIT = Path(os.environ.get("MEDCHAT_BENCH_KIT") or ROOT / "bench" / "wheels")  # carried along; ignored by git
SPREADSHEET = "MedInfo2019-QA-Medications.xlsx"
TOKENIZER_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRESET = "qwen2.5-7b-qlora"  # the 7B QLoRA recipe: NF4 + double quant, r=64 all-linear, ZeRO-2, packing
RUN_NAME = "bench-ours"
DECODE_RUN = "bench-decode"  # the trained adapter with its B matrices re-drawn (see decode_run)
PHASES = ("setup", "ours", "plain", "decode")
# Rough seconds a phase needs on an H100 (7B shapes); a phase is skipped when less is left.
GPU_PHASE_NEEDS = {"setup": 60, "ours": 75, "plain": 75, "decode": 120}
TINY_PHASE_NEEDS = {"setup": 5, "ours": 10, "plain": 10, "decode": 10}
# Longest a phase may run: a hang (say, in a collective) must not eat the other phases' time.
PHASE_CAPS = {"setup": 180, "ours": 240, "plain": 200, "decode": 240}
GB = 1e9


# ---------------------------------------------------------------------------------------------
# Settings shared by the parent and its children


@dataclass
class Spec:
    tiny: bool
    work: str
    data: str
    tokenizer: str  # folder of the 32000-token tokenizer
    hidden: int = 4096
    layers: int = 32
    intermediate: int = 11008
    heads: int = 32
    vocab: int = 32000
    seq: int = 2048
    warmup: int = 3
    steps: int = 20
    batch: int = 1  # packed rows per micro-batch for ours
    grad_accum: int = 1
    lora_r: int = 64
    lora_alpha: int = 16
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on a CPU (as training.run decides)
    matmul_n: int = 8192
    matmul_iters: int = 20
    decode_prompts: int = 4
    decode_tokens: int = 64
    preset: str = PRESET
    extra: list[str] = field(default_factory=list)  # --set overrides for both recipes' config

    @property
    def model_dir(self) -> Path:
        return Path(self.work) / "model"

    @property
    def runs_dir(self) -> Path:
        return Path(self.work) / "runs"

    @property
    def run(self) -> Run:
        """The run folder `ours` trains (the decode phase chats with a copy of it)."""
        return Run.create(RUN_NAME, self.runs_dir)

    def overrides(self, pack: bool) -> list[str]:
        """--set style overrides on the 7B preset: our model, data, shapes and step count."""
        return [f"name={RUN_NAME if pack else 'bench-plain-data'}", f"runs_dir={self.runs_dir}",
                f"model.name={self.model_dir}", f"model.dtype={self.dtype}",
                f"data.path={self.data}", f"data.max_length={self.seq}", f"data.pack={str(pack).lower()}",
                f"lora.r={self.lora_r}", f"lora.alpha={self.lora_alpha}",
                f"train.max_steps={self.warmup + self.steps}", f"train.batch_size={self.batch}",
                f"train.grad_accum={self.grad_accum}", "train.save_steps=1000000",
                "train.logging_steps=1", "train.eval_test_loss=false"] + list(self.extra)


def tiny_spec(**kw: Any) -> dict[str, Any]:
    return dict(hidden=64, layers=2, intermediate=128, heads=4, seq=512, warmup=1, steps=2,
                matmul_n=512, matmul_iters=5, decode_prompts=2, decode_tokens=8, **kw)


# ---------------------------------------------------------------------------------------------
# The 32000-token tokenizer


def make_tokenizer(dest: Path, source: str | None = None, vocab: int = 32000) -> Path:
    """SmolLM2's byte-level BPE cut to its first `vocab` ids (merges are in id order, so the
    merges that build kept tokens are exactly the first vocab-252), same template and specials."""
    src = Path(source) if source else resolve_base_model(TOKENIZER_SOURCE).path
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"{src}/tokenizer.json: expected a BPE model, got {model.get('type')}")
    kept = {tok: i for tok, i in model["vocab"].items() if i < vocab}
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    model["vocab"] = kept
    model["merges"] = [m for m in merges if "".join(m) in kept]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab]
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Child-side helpers: token accounting and step timing


class CountingRows(list):
    """The training rows; records the row lengths of each batch the DataLoader fetches, in order
    (torch's map-style fetcher calls `__getitems__` once per batch), so the real (non-padding)
    and padded tokens of every micro-batch are known exactly, short last batches included."""

    def __init__(self, rows):
        super().__init__(rows)
        self.batches: list[list[int]] = []

    def __getitems__(self, indices):
        rows = [list.__getitem__(self, i) for i in indices]
        self.batches.append([len(r["input_ids"]) for r in rows])
        return rows

    def lengths(self, first_micro: int, n_micro: int) -> list[list[int]]:
        """Row lengths of each micro-batch in the window (first_micro, first_micro + n_micro)."""
        lens = self.batches[first_micro:first_micro + n_micro]
        if len(lens) < n_micro:
            raise RuntimeError(f"{len(self.batches)} batches were fetched, the window needs "
                               f"{first_micro + n_micro}: the DataLoader did not go through __getitems__")
        return lens

    def window(self, first_micro: int, n_micro: int) -> dict[str, int]:
        lens = self.lengths(first_micro, n_micro)
        return {"real_tokens": sum(sum(b) for b in lens),
                "padded_tokens": sum(max(b) * len(b) for b in lens)}


def step_timer(rows: CountingRows, warmup: int, steps: int):
    """A TrainerCallback: synchronised wall time at the end of each optimizer step; also turns
    off the end-of-training checkpoint (a 7B DeepSpeed checkpoint is not what is measured)."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: dict[int, float] = {}
            self.start = None

        def on_train_begin(self, args, state, control, **kw):
            rows.batches.clear()  # count only what training fetches
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.ends[state.global_step] = time.perf_counter()
            control.should_save = False
            return control

        def window(self) -> float:
            t0 = self.ends[warmup] if warmup else self.start
            return self.ends[warmup + steps] - t0

    return StepTimer()


def gpu_memory() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GB, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GB, 3)}


def host_peak_rss_gb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)  # Linux: KiB


def measured(rows: CountingRows, timer, spec: Spec) -> dict[str, Any]:
    seconds = timer.window()
    first, n = spec.warmup * spec.grad_accum, spec.steps * spec.grad_accum
    tok = rows.window(first, n)
    return {"seconds": round(seconds, 3), **tok,
            "batches_fetched": len(rows.batches), "batch_lengths": rows.lengths(first, n),
            "real_tokens_per_s": round(tok["real_tokens"] / seconds, 1),
            "real_tokens_per_step": round(tok["real_tokens"] / spec.steps, 1),
            "padding_share": round(1 - tok["real_tokens"] / max(tok["padded_tokens"], 1), 4),
            "step_seconds": round(seconds / spec.steps, 4)}


# ---------------------------------------------------------------------------------------------
# Phases (each runs in a child process; `out` is written as it goes so partial results survive)


def phase_setup(spec: Spec, out: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch_dtype(spec.dtype)
    tok = AutoTokenizer.from_pretrained(spec.tokenizer)
    if len(tok) > spec.vocab:
        raise SystemExit(f"{spec.tokenizer}: {len(tok)} tokens do not fit vocab {spec.vocab}")
    cfg = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                      intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                      num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.02)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the GPU: seconds, not minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    init_s = time.perf_counter() - t0
    model.save_pretrained(spec.model_dir, max_shard_size="5GB")
    tok.save_pretrained(spec.model_dir)
    save_s = time.perf_counter() - t0 - init_s
    out.update(params=n_params, dtype=str(dtype).replace("torch.", ""), init_s=round(init_s, 1),
               save_s=round(save_s, 1),
               weights_gb=round(sum(p.stat().st_size for p in spec.model_dir.glob("*.safetensors")) / GB, 2))
    del model
    if cuda:
        torch.cuda.empty_cache()
    out["matmul"] = matmul_rate(spec, device)
    out["device"] = torch_device_info()


def matmul_rate(spec: Spec, device: str) -> dict[str, Any]:
    """bf16 (GPU) or fp32 (CPU) dense matmul rate on this card: the MFU denominator."""
    import torch

    n = spec.matmul_n
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(spec.matmul_iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(spec.matmul_iters):
            a @ b
        seconds = time.perf_counter() - t0
    return {"n": n, "dtype": str(dt).replace("torch.", ""), "iters": spec.matmul_iters,
            "tflops": round(2 * n ** 3 * spec.matmul_iters / seconds / 1e12, 4)}


def phase_ours(spec: Spec, out: dict, flush) -> None:
    import torch

    cfg = build_config(spec.preset, spec.overrides(pack=True))
    out["config"] = {"preset": spec.preset, "overrides": spec.overrides(pack=True),
                     "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": cfg.lora.target_modules},
                     "model": cfg.model.__dict__, "max_length": cfg.data.max_length}
    # hash_base=False: a sha256 over 13 GB of random weights is ~10 s of disk reading per phase
    # (provenance for real runs), and not part of what is compared
    prep = prepare(cfg, hash_base=False)
    out["data"] = prep.data_stats
    flush()
    rows = CountingRows(prep.train_rows)
    prep.train_rows = rows
    ensure_dist_env()
    t0 = time.perf_counter()
    model = load_model(cfg, prep.base_path)
    out["load_s"] = round(time.perf_counter() - t0, 1)
    out.update(nf4_layers=_count_4bit(model), trainable_params=_trainable(model))
    if torch.cuda.is_available():
        out["allocated_after_load_gb"] = round(torch.cuda.memory_allocated() / GB, 3)
    flush()
    timer = step_timer(rows, spec.warmup, spec.steps)
    trainer, stats = train(prep, model=model, callbacks=[timer])
    out.update({**gpu_memory(), **measured(rows, timer, spec)}, train_stats=stats,
               wrapped_by=type(trainer.model_wrapped).__name__, micro_batch=spec.batch)
    flush()
    save(prep, trainer.model, stats)  # the run folder the decode phase chats with
    out["run_dir"] = str(prep.run.path)


def phase_plain(spec: Spec, out: dict, flush) -> None:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments, set_seed)

    cfg = build_config(spec.preset, spec.overrides(pack=False))
    prep = prepare(cfg, hash_base=False)  # the same encoded samples, not packed
    # Ours packs these samples into rows of spec.seq (same function, same seed); the plain batch
    # holds as many samples as `spec.batch` packed rows do on average.
    packed = pack(prep.train_rows, cfg.data.max_length, seed=cfg.train.seed)
    per_row = len(prep.train_rows) / len(packed)
    batch = max(1, round(spec.batch * per_row))
    out.update(data=prep.data_stats, samples_per_packed_row=round(per_row, 3), micro_batch=batch)
    flush()
    rows = CountingRows(prep.train_rows)
    dtype = torch_dtype(cfg.model.dtype)
    cuda = torch.cuda.is_available()
    set_seed(cfg.train.seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        prep.base_path, dtype=dtype, device_map={"": 0} if cuda else None,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype))
    # + gradient checkpointing, as peft documents; non-reentrant like ours (torch's advice)
    model = prepare_model_for_kbit_training(
        model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    out["load_s"] = round(time.perf_counter() - t0, 1)
    out.update(nf4_layers=_count_4bit(model), trainable_params=_trainable(model))
    if cuda:
        out["allocated_after_load_gb"] = round(torch.cuda.memory_allocated() / GB, 3)
    flush()
    t = cfg.train
    args = TrainingArguments(
        output_dir=str(Path(spec.work) / "plain-checkpoints"), max_steps=spec.warmup + spec.steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=spec.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        max_grad_norm=t.max_grad_norm, bf16=dtype == torch.bfloat16, logging_steps=1,
        save_strategy="no", report_to="none", remove_unused_columns=False, seed=t.seed,
        data_seed=t.seed, dataloader_num_workers=0, use_cpu=not cuda)
    timer = step_timer(rows, spec.warmup, spec.steps)
    collator = DataCollatorForSeq2Seq(prep.tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                      callbacks=[timer])
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.update({**gpu_memory(), **measured(rows, timer, spec)},
               train_stats={"steps": trainer.state.global_step,
                            "train_loss": round(result.metrics.get("train_loss", float("nan")), 4),
                            "first_loss": losses[0] if losses else None,
                            "last_loss": losses[-1] if losses else None},
               wrapped_by=type(trainer.model_wrapped).__name__)


def phase_decode(spec: Spec, out: dict, flush) -> None:
    import torch

    if not spec.run.has_adapter():
        raise SystemExit(f"{spec.run.adapter_dir} missing: the ours phase did not finish")
    run = decode_run(spec)
    # the fidelity check (fp32 peft vs merged) is the merge tests' business; here it would load
    # the 7B model twice more
    res = merge_run(run, max_shard_size="5GB", check_prompts=0, progress=False)
    out["merge"] = {"seconds": res.seconds, "shards": res.shards, "bytes": res.total_bytes}
    flush()
    questions = [c.question for c in run.test_split()][:spec.decode_prompts]
    engine = Engine(Registry(spec.runs_dir, base_name=str(spec.model_dir), base_path=spec.model_dir),
                    max_cached_models=1)
    greedy = GenerationSettings(max_new_tokens=spec.decode_tokens, temperature=0.0, top_p=1.0,
                                repetition_penalty=1.0)
    warm = GenerationSettings(max_new_tokens=4, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    rows = {}
    for model_id in ("base", f"adapter:{DECODE_RUN}", f"merged:{DECODE_RUN}"):
        t0 = time.perf_counter()
        engine.chat(model_id, questions[0], settings=warm)  # loads / attaches, warms the kernels
        load_s = time.perf_counter() - t0
        texts, tokens, gen_s, first_s, decode_s = [], 0, 0.0, [], 0.0
        for q in questions:
            s = engine.stream_turn(model_id, q, settings=greedy)
            text = s.result()
            end = time.perf_counter() - s.started
            texts.append(text)
            tokens += s.new_tokens
            gen_s += end
            first_s.append(s.first_token_s or end)
            decode_s += end - (s.first_token_s or end)
        rows[model_id] = {
            "load_s": round(load_s, 1), "new_tokens": tokens, "seconds": round(gen_s, 3),
            "tokens_per_s": round(tokens / gen_s, 2) if gen_s else None,
            # after the first piece: the per-token rate a reader sees while the answer streams
            "decode_tokens_per_s": round(max(tokens - len(questions), 0) / decode_s, 2) if decode_s else None,
            "first_token_s": round(sum(first_s) / len(first_s), 3), "texts": texts}
        out["models"] = rows
        flush()
    a, b, base = (rows[f"adapter:{DECODE_RUN}"]["texts"], rows[f"merged:{DECODE_RUN}"]["texts"],
                  rows["base"]["texts"])
    out["agreement"] = {
        "prompts": len(questions), "greedy_tokens": spec.decode_tokens,
        "adapter_eq_merged": sum(x == y for x, y in zip(a, b)),
        "mean_common_prefix": round(sum(_prefix(x, y) for x, y in zip(a, b)) / len(a), 3),
        "adapter_ne_base": sum(x != y for x, y in zip(a, base))}
    out["dtype"] = str(engine.dtype).replace("torch.", "")
    if torch.cuda.is_available():
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)


def decode_run(spec: Spec) -> Run:
    """A copy of the trained run whose LoRA B matrices are re-drawn at random.

    A few steps from B = 0 leave the adapter almost without effect, and then "adapter and merged
    agree" would be trivially true. Here each delta (alpha/r)*B@A gets an element std of a
    quarter of the base weights' init std (0.02), so the adapter visibly changes the answers;
    the shapes (and so the decode cost) are exactly those training produced."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = spec.run, Run.create(DECODE_RUN, spec.runs_dir)
    shutil.rmtree(dst.path, ignore_errors=True)
    shutil.copytree(src.path, dst.path, ignore=shutil.ignore_patterns(
        src.checkpoints_dir.name, src.logs_dir.name, src.merged_dir.name))
    m = dst.manifest()
    m.name = DECODE_RUN
    dst.save_manifest(m)
    path = dst.adapter_dir / "adapter_model.safetensors"
    weights = load_file(str(path))
    cfg = json.loads((dst.adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    gen = torch.Generator().manual_seed(0)
    for key, b in weights.items():
        if "lora_B" not in key:
            continue
        a_std = weights[key.replace("lora_B", "lora_A")].float().std().item()
        sigma = 0.25 * 0.02 / (scale * math.sqrt(cfg["r"]) * max(a_std, 1e-8))
        weights[key] = (torch.randn(b.shape, generator=gen) * sigma).to(b.dtype)
    save_file(weights, str(path), metadata={"format": "pt"})
    return dst


def _prefix(x: str, y: str) -> float:
    """Share of the longer text that both share as a prefix (1.0 = identical)."""
    n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return n / max(len(x), len(y), 1)


def _count_4bit(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_child(phase: str, spec_path: str, result_path: str) -> int:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    out: dict[str, Any] = {"phase": phase}
    t0 = time.perf_counter()

    def flush():
        out["seconds_total"] = round(time.perf_counter() - t0, 1)
        out["host_peak_rss_gb"] = host_peak_rss_gb()
        tmp = Path(result_path + ".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str))
        tmp.replace(result_path)

    fn = {"setup": lambda: phase_setup(spec, out), "ours": lambda: phase_ours(spec, out, flush),
          "plain": lambda: phase_plain(spec, out, flush),
          "decode": lambda: phase_decode(spec, out, flush)}[phase]
    smi = SmiPeak()
    try:
        fn()
        out["ok"] = True
    finally:
        out["peak_smi_gb"] = smi.stop()
        flush()
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: run the phases, assemble the report


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed",
                 "datasets", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_info(cuda: bool) -> dict[str, Any]:
    """The card, without creating a CUDA context here (it would hold GPU memory in this process
    while the children are measured); the setup child adds torch's view of it."""
    if cuda:
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            name, mem, driver = [x.strip() for x in q.stdout.splitlines()[0].split(",")]
            return {"device": name, "gpu_memory": mem, "driver": driver}
        except (OSError, IndexError, ValueError, subprocess.SubprocessError):
            return {"device": "CUDA GPU"}
    return {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}


def torch_device_info() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "gpu_memory_gb": round(p.total_memory / GB, 1),
            "cuda": torch.version.cuda, "sms": p.multi_processor_count}


class SmiPeak:
    """Peak device memory as nvidia-smi reports it (NVML, sampled every 50 ms): what the
    "7B in 8 GB" claims quote, CUDA context included. None where NVML is not there."""

    def __init__(self) -> None:
        import threading

        self.peak_gb: float | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._used = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self._used()
        except Exception:  # no NVML (CPU, or the package missing): the column says n/a
            return
        self.peak_gb = 0.0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_gb = max(self.peak_gb or 0.0, self._used() / GB)
            except Exception:
                return

    def stop(self) -> float | None:
        self._stop.set()
        return None if self.peak_gb is None else round(self.peak_gb, 3)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # each child is its own 1-rank world (training.run.ensure_dist_env)
    return env


def launch(phase: str, spec: Spec, timeout: float, log_path: Path) -> dict[str, Any]:
    work = Path(spec.work)
    spec_path, result_path = work / "spec.json", work / f"{phase}.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "_child", phase, str(spec_path),
           str(result_path)]
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {phase} =====\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                timeout=max(timeout, 1)).returncode
            error = None if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired:
            error = f"stopped after {timeout:.0f} s (time budget or phase cap)"
    res = json.loads(result_path.read_text()) if result_path.is_file() else {"phase": phase}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if error or not res.get("ok"):
        res["error"] = error or "no result"
        tail = log_path.read_text(encoding="utf-8", errors="replace").rsplit(f"===== {phase} =====", 1)[-1]
        print(f"[{phase}] FAILED ({res['error']}); last lines of its output:\n"
              + "\n".join(tail.strip().splitlines()[-25:]), file=sys.stderr, flush=True)
    return res


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    ph = res["phases"]
    setup, ours, plain = ph.get("setup", {}), ph.get("ours", {}), ph.get("plain", {})
    peak = (setup.get("matmul") or {}).get("tflops")
    n = setup.get("params")
    out: dict[str, Any] = {}
    for name, r in (("ours", ours), ("plain", plain)):
        tps = r.get("real_tokens_per_s")
        if tps and peak and n:
            r["mfu"] = round(4 * n * tps / (peak * 1e12), 4)
    if ours.get("real_tokens_per_s") and plain.get("real_tokens_per_s"):
        out["speedup"] = round(ours["real_tokens_per_s"] / plain["real_tokens_per_s"], 3)
    for key in ("peak_allocated_gb", "peak_reserved_gb", "peak_smi_gb"):
        if ours.get(key) and plain.get(key):
            out[f"{key}_ratio"] = round(ours[key] / plain[key], 3)
    if ours.get("peak_reserved_gb") is not None:
        out["target_memory_8gb"] = ours["peak_reserved_gb"] <= 8.0
    if "speedup" in out:
        out["target_speed_1_5x"] = out["speedup"] >= 1.5
    return out


def _f(v: Any, fmt: str = "{:.2f}", none: str = "n/a") -> str:
    return none if v is None else fmt.format(v)


def markdown(res: dict[str, Any]) -> str:
    s, ph, summ, dev = res["spec"], res["phases"], res["summary"], res["device"]
    setup, ours, plain, dec = (ph.get(k, {}) for k in PHASES)
    v = res["versions"]
    mm = setup.get("matmul") or {}
    lora = (ours.get("config") or {}).get("lora") or {}
    lines = [
        f"## QLoRA on a 7B-shaped Llama{' (tiny stand-in)' if s['tiny'] else ''}: "
        f"{dev['device']}, {res['date']}",
        "",
        f"Command: `{res['command']}`  ",
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + "  ",
        f"Model: Llama, hidden {s['hidden']}, {s['layers']} layers, intermediate {s['intermediate']}, "
        f"vocab {s['vocab']}, {s['heads']} heads; N = {_f(setup.get('params'), '{:,}')} parameters, "
        f"random {setup.get('dtype', '?')} weights, NF4 + double quant on load. "
        f"LoRA r={lora.get('r', s['lora_r'])} alpha={lora.get('alpha', s['lora_alpha'])} all-linear "
        f"({_f(ours.get('trainable_params'), '{:,}')} trainable). Sequence {s['seq']}; "
        f"{s['warmup']} warm-up + {s['steps']} measured optimizer steps, grad_accum {s['grad_accum']}. "
        f"Data: MedicationQA train split ({_f((ours.get('data') or {}).get('train_samples'), '{}')} samples)."
        + (f" Overrides: {' '.join(s['extra'])}." if s.get("extra") else "") + "  ",
        f"Measured {mm.get('dtype', '?')} matmul ({mm.get('n', '?')}^3): {_f(mm.get('tflops'), '{:.4g}')} TFLOP/s.",
        "",
        "| recipe | peak alloc (GB) | peak reserved (GB) | peak nvidia-smi (GB) | real tokens/s | MFU "
        "| real tokens/step | padding | micro-batch | step (s) | load (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in (("ours: NF4 + LoRA + grad-ckpt + ZeRO-2 + packing (training.run)", ours),
                     ("plain: Trainer + peft + bnb, pad to longest", plain)):
        if r.get("error") and not r.get("real_tokens_per_s"):
            lines.append(f"| {label} | failed: {r['error']} | | | | | | | | | |")
            continue
        lines.append(
            f"| {label} | {_f(r.get('peak_allocated_gb'))} | {_f(r.get('peak_reserved_gb'))} "
            f"| {_f(r.get('peak_smi_gb'))} "
            f"| {_f(r.get('real_tokens_per_s'), '{:.0f}')} | {_f(r.get('mfu'), '{:.1%}')} "
            f"| {_f(r.get('real_tokens_per_step'), '{:.0f}')} | {_f(r.get('padding_share'), '{:.1%}')} "
            f"| {r.get('micro_batch', 'n/a')} {'row' if r is ours else 'samples'} "
            f"| {_f(r.get('step_seconds'), '{:.3f}')} | {_f(r.get('load_s'), '{:.0f}')} |")
    lines.append(
        f"| ours / plain | {_f(summ.get('peak_allocated_gb_ratio'), '{:.2f}x')} "
        f"| {_f(summ.get('peak_reserved_gb_ratio'), '{:.2f}x')} | {_f(summ.get('peak_smi_gb_ratio'), '{:.2f}x')} "
        f"| {_f(summ.get('speedup'), '{:.2f}x')} | | | | | | |")
    lines += [
        "",
        "MFU = 4·N·(real tokens/s) / measured matmul rate (4N: forward 2N + backward through the "
        "frozen base 2N; recompute, LoRA FLOPs and attention's L² term not counted). GB = 1e9 bytes; "
        "peaks are torch.cuda.max_memory_allocated/reserved over the whole process (load + train); "
        "nvidia-smi's (NVML, sampled every 50 ms, whole device) adds the CUDA context.",
        "",
        ("Targets (ours peak ≤ 8 GB at sequence 2048, real tokens/s ≥ 1.5× plain) apply to the "
         "7B shapes on a GPU; the tiny stand-in only shows that every phase runs."
         if s["tiny"] else
         "Targets: ours peak ≤ 8 GB at sequence "
         f"{s['seq']}: **{_verdict(summ.get('target_memory_8gb'))}** "
         f"({_f(ours.get('peak_reserved_gb'))} GB reserved); real tokens/s ≥ 1.5× plain: "
         f"**{_verdict(summ.get('target_speed_1_5x'))}** ({_f(summ.get('speedup'), '{:.2f}x')}).")
        + " References: XTuner \"7B QLoRA within 8 GB\"; LLaMA-Factory 4-bit Llama-2-7B LoRA "
        "≈9 GB and 2415 tokens/s/GPU on an A100 (plain HF), 7 GB and 3726 tokens/s with Unsloth.",
    ]
    if dec.get("models"):
        ag = dec.get("agreement", {})
        lines += [
            "",
            f"Decode through medchat.engine.Engine ({dec.get('dtype', '?')}, greedy, "
            f"{s['decode_tokens']} new tokens, {ag.get('prompts', '?')} held-out questions; merge by "
            f"training.merge in {_f((dec.get('merge') or {}).get('seconds'), '{:.0f}')} s). The "
            "adapter is the one `ours` trained, its B matrices re-drawn at random so that it "
            "changes the answers (a few steps from B = 0 barely do):",
            "",
            "| model | tokens/s (whole answer) | tokens/s after first piece | first piece (s) | new tokens |",
            "|---|---|---|---|---|",
        ]
        for mid, r in dec["models"].items():
            lines.append(f"| {mid} | {_f(r.get('tokens_per_s'), '{:.1f}')} "
                         f"| {_f(r.get('decode_tokens_per_s'), '{:.1f}')} "
                         f"| {_f(r.get('first_token_s'), '{:.3f}')} | {r.get('new_tokens')} |")
        if ag:
            lines += ["", f"Greedy agreement adapter vs merged: {ag['adapter_eq_merged']}/{ag['prompts']} "
                      f"answers identical (mean common prefix {ag['mean_common_prefix']:.0%}); the "
                      f"adapter changed {ag['adapter_ne_base']}/{ag['prompts']} answers vs the base. "
                      "On random weights near-ties are common, so bf16 rounding of W+BA can flip a "
                      "greedy pick; the fp32 fidelity proof is training.merge's own check."]
    elif dec.get("error") or dec.get("skipped"):
        lines += ["", f"Decode: {dec.get('skipped') or dec.get('error')}"]
    for name in ("setup", "ours", "plain", "decode"):
        r = ph.get(name, {})
        if r.get("error"):
            lines.append(f"\n{name}: FAILED: {r['error']}")
    return "\n".join(lines) + "\n"


def report(path: Path) -> str:
    """Summary and table again from a results file (after editing it, or from a stopped run):
    the summary is rewritten into the file, the table into the .md beside it and returned."""
    res = json.loads(path.read_text())
    res["summary"] = summarize(res)
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    path.with_suffix(".md").write_text(md)
    return md


def _verdict(v: bool | None) -> str:
    return "n/a" if v is None else ("met" if v else "NOT met")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python bench/gpu_qlora.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run",
                    choices=["run", "tokenizer", "report", "smi-peak", "_child"])
    ap.add_argument("args", nargs="*", help="tokenizer: DEST; report: RESULTS.json")
    ap.add_argument("--source", help="tokenizer: the tokenizer folder to cut (default: SmolLM2's)")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="smi-peak: how long to sample device memory")
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-64 stand-in (CPU, ~1 min)")
    ap.add_argument("--steps", type=int, help="measured optimizer steps (default 20; tiny 2)")
    ap.add_argument("--warmup", type=int, help="unmeasured steps first (default 3; tiny 1)")
    ap.add_argument("--seq", type=int, help="sequence cap / packed row length (default 2048; tiny 512)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="model/compute dtype (auto: bf16 on a GPU, fp32 on a CPU)")
    ap.add_argument("--decode-tokens", type=int, help="greedy tokens per answer (default 64)")
    ap.add_argument("--decode-prompts", type=int, help="held-out questions (default 4)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="FIELD=VALUE",
                    help=f"override a field of the {PRESET} preset for both recipes, e.g. "
                         "--set lora.r=16 (repeatable; plain reads lora.*, model.dtype, train.*)")
    ap.add_argument("--budget", type=float, default=420,
                    help="seconds for all phases; a phase that would not fit is skipped")
    ap.add_argument("--skip", action="append", default=[], choices=PHASES[1:],
                    help="leave a phase out (repeatable)")
    ap.add_argument("--data", help=f"the MedicationQA spreadsheet (default: bench/wheels/{SPREADSHEET}, "
                                    f"else ../shared/data/{SPREADSHEET})")
    ap.add_argument("--tokenizer", help="32000-token tokenizer folder (default: bench/wheels/"
                                        "tokenizer-32k, else built from SmolLM2's)")
    ap.add_argument("--out", help="results folder (default $OUT, else bench/out)")
    ap.add_argument("--work", help="scratch folder for the model and run (default: a temporary "
                                   "folder under bench/out, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return ap.parse_args(argv)


def find_data(arg: str | None) -> Path:
    candidates = [Path(arg)] if arg else [KIT / SPREADSHEET, ROOT.parent / "shared" / "data" / SPREADSHEET]
    for p in candidates:
        if p.is_file():
            return p.resolve()
    raise SystemExit(f"MedicationQA spreadsheet not found (looked at {', '.join(map(str, candidates))}); "
                     "run bench/fetch_gpu_wheels.sh (it copies it into bench/wheels/) or pass --data")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.command == "_child":
        return run_child(*a.args)
    if a.command == "tokenizer":
        if len(a.args) != 1:
            raise SystemExit("usage: python bench/gpu_qlora.py tokenizer DEST [--source DIR]")
        print(make_tokenizer(Path(a.args[0]), a.source))
        return 0
    if a.command == "report":
        if len(a.args) != 1:
            raise SystemExit("usage: python bench/gpu_qlora.py report RESULTS.json")
        print(report(Path(a.args[0])), end="")
        return 0
    if a.command == "smi-peak":
        smi = SmiPeak()
        time.sleep(a.seconds)
        peak = smi.stop()
        print("n/a (no NVML)" if peak is None else f"{peak} GB")
        return 0

    t_start = time.time()
    import signal

    def _term(signum, frame):  # `timeout` in gpu_qlora.sh: still write what was measured
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    import torch  # the parent only asks what the device is; children do the CUDA work

    cuda = torch.cuda.is_available()
    out_dir = Path(a.out or os.environ.get("OUT") or ROOT / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_qlora-tiny" if a.tiny else "gpu_qlora"
    log_path = out_dir / f"{stem}-children.log"
    log_path.write_text("")
    data = find_data(a.data)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_qlora-", dir=_mk(ROOT / "bench" / "out")))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(a.tokenizer) if a.tokenizer else KIT / "tokenizer-32k"
    if not (tok_dir / "tokenizer.json").is_file():
        tok_dir = work / "tokenizer-32k"  # built from SmolLM2's before the setup phase
    base = tiny_spec() if a.tiny else {}
    for key, val in (("steps", a.steps), ("warmup", a.warmup), ("seq", a.seq),
                     ("decode_tokens", a.decode_tokens), ("decode_prompts", a.decode_prompts)):
        if val is not None:
            base[key] = val
    spec = Spec(tiny=a.tiny, work=str(work.resolve()), data=str(data), tokenizer=str(tok_dir.resolve()),
                grad_accum=a.grad_accum, dtype=a.dtype, extra=a.extra, **base)
    if not cuda and not a.tiny:
        print("warning: no CUDA device; the 7B shapes on a CPU will take hours. Use --tiny.",
              file=sys.stderr)
    needs = TINY_PHASE_NEEDS if a.tiny else GPU_PHASE_NEEDS
    deadline = t_start + a.budget
    if os.environ.get("MEDCHAT_BENCH_DEADLINE"):  # gpu_qlora.sh: 8 minutes for install + run
        deadline = min(deadline, float(os.environ["MEDCHAT_BENCH_DEADLINE"]))
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([os.environ.get("MEDCHAT_BENCH_ENTRY", "python bench/gpu_qlora.py")]
                            + (argv if argv is not None else sys.argv[1:])),
        "device": device_info(cuda), "versions": versions(), "spec": asdict(spec), "phases": {}}
    print(f"gpu_qlora: {res['device']['device']}; work {work}; budget {deadline - t_start:.0f} s", flush=True)
    try:
        for phase in PHASES:
            left = deadline - time.time()
            if phase in a.skip:
                res["phases"][phase] = {"skipped": "left out (--skip)"}
                continue
            if left < needs[phase]:
                res["phases"][phase] = {"skipped": f"not enough time left ({left:.0f} s < ~{needs[phase]} s)"}
                print(f"[{phase}] skipped: {res['phases'][phase]['skipped']}", flush=True)
                continue
            if phase in ("ours", "plain", "decode") and not res["phases"]["setup"].get("ok"):
                res["phases"][phase] = {"skipped": "setup failed"}
                continue
            if phase == "decode" and not spec.run.has_adapter():
                res["phases"][phase] = {"skipped": "no adapter (the ours phase did not finish)"}
                continue
            if phase == "setup" and not (tok_dir / "tokenizer.json").is_file():
                make_tokenizer(tok_dir)
            print(f"[{phase}] running ({left:.0f} s left) ...", flush=True)
            res["phases"][phase] = {"error": "interrupted (the script was stopped)"}
            res["phases"][phase] = launch(phase, spec, min(left, PHASE_CAPS[phase]), log_path)
            res["device"].update(res["phases"][phase].get("device") or {})
            print(f"[{phase}] {'done' if res['phases'][phase].get('ok') else 'FAILED'} in "
                  f"{res['phases'][phase]['wall_s']:.0f} s", flush=True)
    finally:
        res["summary"] = summarize(res)
        res["wall_s"] = round(time.time() - t_start, 1)
        (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        md = markdown(res)
        (out_dir / f"{stem}.md").write_text(md)
        print("\n" + md, flush=True)
        print(f"results: {out_dir / (stem + '.json')}, {out_dir / (stem + '.md')}; "
              f"children's output: {log_path}; {res['wall_s']:.0f} s in all", flush=True)
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [p for p, r in res["phases"].items() if r.get("error")]
    return 1 if failed else 0


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


if __name__ == "__main__":
    raise SystemExit(main())
