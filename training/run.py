"""Fine-tune a chat model on question/answer data: setup -> train -> save.

    medchat train                                   # default preset (cpu-smollm2)
    medchat train --preset qwen2.5-7b-qlora         # a GPU recipe
    medchat train --set lora.r=32 --set train.epochs=2 --name my-run
    medchat train --resume                          # continue from the newest complete
                                                    # checkpoint (partial ones are skipped)

`python -m training.run` is the same command, for launchers that start a module: more than one
GPU runs the same entry and the same ZeRO-2 config data-parallel under
`torchrun --nproc_per_node N -m training.run ...` (or `deepspeed --num_gpus N -m training.run`).

Output: a run folder (medchat.run_folder) holding the adapter (PEFT safetensors), the manifest,
the split, logs (loss.jsonl + TensorBoard events) and checkpoints (for --resume).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from medchat.base_model import resolve_base_model
from medchat.chat_format import Conversation, ensure_chat_template, stop_tokens
from medchat.command_line import Opt, call
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, ChatSpec, DatasetRecord,
                                GenerationDefaults, Manifest, Metrics, ModelScores, Run,
                                TrainingRecord, atomic_write_text, hash_weights)
from training.config import DEEPSPEED_DIR, DEFAULT_PRESET, ConfigError, TrainConfig, build_config
from training.data import DataError, dataset_info, load_conversations, split_conversations
from training.encode import PackedCollator, encode_all, pack, padding_share
from training.evaluate import test_loss

# torch, transformers and peft are imported in functions: `medchat --help` imports this module
# for the train command's parser, and those libraries take seconds to import.

log = logging.getLogger("training.run")


# ---------------------------------------------------------------------------------------------
# Distributed helpers: one process by default, N under torchrun / the deepspeed launcher.


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """DeepSpeed always initialises torch.distributed; give a lone process a 1-rank world."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def say(*args: Any) -> None:
    if is_main():
        print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Setup


@dataclass
class Prepared:
    cfg: TrainConfig
    run: Run
    base_path: Path
    base_ref: BaseModelRef
    tokenizer: Any
    train_rows: list[dict]
    test: list[Conversation]
    split_sizes: dict[str, int]
    data_stats: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.run.path


def torch_dtype(name: str):
    import torch

    if name == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def prepare(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
            hash_base: bool = True) -> Prepared:
    """Data -> split files -> tokenizer -> encoded (packed) training rows.

    `hash_base` records a sha256 of a local base model's weights in the manifest (provenance;
    it reads every weight file, about 10 s for a 7B model)."""
    from transformers import AutoTokenizer

    run = Run.create(cfg.name, cfg.runs_dir)
    if run.adapter_dir.exists() and not (resume or overwrite):
        raise ConfigError(f"name: run folder {run.path} already holds an adapter; pick another "
                          "--name, or pass --resume to continue it or --overwrite to replace it")
    d = cfg.data
    convs = load_conversations(d.path, d.format, d.sheet, d.columns, d.system_prompt)
    split = split_conversations(convs, d.test_size, d.val_size, d.seed, d.stratify)
    if not split.train:
        raise DataError(f"{d.path}: the training split is empty ({len(convs)} samples); "
                        "add data or lower data.test_size")
    if is_main():
        for part, items in (("train", split.train), ("test", split.test), ("val", split.val)):
            if items:
                run.write_split(part, items)
    say(f"Data: {len(convs)} samples from {d.path} -> split {split.sizes()} (seed {d.seed}, "
        f"stratified by {d.stratify}, no question on two sides)")

    resolved = resolve_base_model(cfg.model.name, cfg.model.revision)
    tok = AutoTokenizer.from_pretrained(resolved.path,
                                        trust_remote_code=cfg.model.trust_remote_code)
    ensure_chat_template(tok)
    rows, stats = encode_all(tok, split.train, d.max_length, d.truncation)
    if not rows:
        raise DataError(f"{d.path}: no training sample fits data.max_length={d.max_length}")
    lengths = [len(r["input_ids"]) for r in rows]
    per_batch = cfg.train.batch_size
    data_stats = {
        "train_samples": len(rows), "truncated": stats.truncated, "dropped": stats.dropped,
        "train_tokens": stats.tokens, "trained_tokens": stats.trained_tokens,
        "truncation": d.truncation, "max_length": d.max_length,
        "padding_share_unpacked": round(padding_share(lengths, batch_size=max(per_batch, 4)), 4),
        "padding_share_unpacked_batch": max(per_batch, 4),
    }
    if d.pack:
        rows = pack(rows, d.max_length, seed=cfg.train.seed)
        plen = [len(r["input_ids"]) for r in rows]
        data_stats.update(packed_rows=len(rows),
                          padding_share_packed=round(padding_share(plen, batch_size=per_batch), 4))
    say(f"Encoded {len(lengths)} samples, {stats.tokens} tokens ({stats.trained_tokens} trained), "
        f"{stats.truncated} truncated, {stats.dropped} dropped; padding "
        f"{data_stats['padding_share_unpacked']:.1%} unpacked "
        f"(batch {data_stats['padding_share_unpacked_batch']})"
        + (f" vs {data_stats['padding_share_packed']:.1%} packed into {len(rows)} rows"
           if d.pack else ""))
    base_ref = BaseModelRef(
        name=cfg.model.name, revision=cfg.model.revision, local_path=str(resolved.path),
        hub_id=resolved.hub_id, trust_remote_code=cfg.model.trust_remote_code,
        content_hash=hash_weights(resolved.path) if resolved.source == "local" and hash_base
        else None)
    if resolved.source == "gguf-fallback":
        base_ref.revision = "gguf-q4_1-dequantized"
    return Prepared(cfg, run, resolved.path, base_ref, tok, rows, split.test,
                    split.sizes(), data_stats)


def load_model(cfg: TrainConfig, base_path: Path):
    """Base model (NF4 when QLoRA) + LoRA adapter, ready for training."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    m = cfg.model
    dtype = torch_dtype(m.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": m.attn_implementation,
                              "trust_remote_code": m.trust_remote_code}
    if m.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=m.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if m.quantization == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=m.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lc = cfg.lora
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                          target_modules=lc.target_modules, modules_to_save=lc.modules_to_save,
                          task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def deepspeed_config(cfg: TrainConfig) -> dict | None:
    if not cfg.train.deepspeed:
        return None
    path = (DEEPSPEED_DIR / "zero2.json" if cfg.train.deepspeed == "zero2"
            else Path(cfg.train.deepspeed))
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Checkpoints: which one --resume continues from
#
# The Trainer writes checkpoint-N/ in place: the adapter, then the optimizer and scheduler
# (DeepSpeed: global_stepN/ and the `latest` file), the RNG state, and trainer_state.json last.
# A run killed on the way leaves a folder that looks like a checkpoint and is not one.

CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "model.safetensors")


def _safetensors_complete(path: Path) -> bool:
    """Header readable and the file as long as its tensors say (a cut-off write is not)."""
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` (checkpoint-N) cannot be resumed from; None when it is complete."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is cut short"
    if str(step) != folder.name.rsplit("-", 1)[-1]:
        return f"trainer_state.json is for step {step}"
    weights = [folder / w for w in CHECKPOINT_WEIGHTS if (folder / w).is_file()]
    if not weights or not all(_safetensors_complete(w) for w in weights):
        return "its weights are missing or cut short"
    latest = folder / "latest"
    if latest.is_file() or any(folder.glob("global_step*")):  # a DeepSpeed checkpoint
        tag = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
        states = folder / tag if tag else None
        if states is None or not states.is_dir():
            return "no DeepSpeed `latest` tag naming its global_step folder"
        needed = [sorted(states.glob("*model_states.pt")), sorted(states.glob("*optim_states.pt"))]
    else:
        needed = [[folder / "optimizer.pt"], [folder / "scheduler.pt"]]
    for files in needed:
        # torch.save writes a zip whose directory comes last: a cut-off file is no zip
        if not files or not all(f.is_file() and zipfile.is_zipfile(f) for f in files):
            return "its optimizer state is missing or cut short"
    return None


def resume_checkpoint(run: Run) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of `run` (None: there is none), and the newer ones that
    are incomplete, each with what is wrong with it."""
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(run.checkpoints()):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def _trim_loss_log(run: Run, step: int) -> None:
    """Forget the steps after `step` that a stopped run logged (they are trained again)."""
    path = run.loss_log_path
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue  # a line the stopped run did not finish
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _resume_from(run: Run) -> str | None:
    """The checkpoint --resume continues from, saying which partial ones it skipped (and
    removes them: training writes those steps again). None: start from step 0."""
    if not run.checkpoints():
        raise ConfigError(f"--resume: no checkpoint in {run.checkpoints_dir}; "
                          "start without --resume")
    found, skipped = resume_checkpoint(run)
    for folder, problem in skipped:
        say(f"--resume: skipping {folder.name}: {problem} (it was being written when the run "
            "stopped); removing it")
        if is_main():
            shutil.rmtree(folder, ignore_errors=True)
    if found is None:
        say(f"--resume: no complete checkpoint in {run.checkpoints_dir}; starting from step 0")
        if is_main():
            _trim_loss_log(run, 0)
        return None
    step = int(found.name.rsplit("-", 1)[-1])
    say(f"--resume: continuing from {found.name} (step {step})")
    if is_main():
        _trim_loss_log(run, step)
    return str(found)


# ---------------------------------------------------------------------------------------------
# Train


def _callbacks(run: Run):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Per-step loss to logs/loss.jsonl and TensorBoard events under logs/."""

        def __init__(self):
            self.writer = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                from torch.utils.tensorboard import SummaryWriter

                run.logs_dir.mkdir(parents=True, exist_ok=True)
                self.writer = SummaryWriter(log_dir=str(run.logs_dir))

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            with open(run.loss_log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, state.global_step)

        def on_train_end(self, args, state, control, **kw):
            if self.writer:
                self.writer.close()

    return [LossLog()]


def train(prep: Prepared, resume: bool = False, model=None,
          callbacks: list | None = None) -> tuple[Any, dict[str, Any]]:
    """Run the Trainer (DeepSpeed when configured); `model` may be preloaded by load_model;
    `callbacks` are extra TrainerCallbacks (bench/gpu_qlora.py times steps with one)."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    cfg, t = prep.cfg, prep.cfg.train
    set_seed(t.seed)
    ds_cfg = deepspeed_config(cfg)
    if ds_cfg is not None:
        ensure_dist_env()
    model = model if model is not None else load_model(cfg, prep.base_path)
    if is_main():
        model.print_trainable_parameters()
    bf16 = torch_dtype(cfg.model.dtype) == torch.bfloat16
    args = TrainingArguments(
        output_dir=str(prep.run.checkpoints_dir),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        bf16=bf16, fp16=torch_dtype(cfg.model.dtype) == torch.float16,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, seed=t.seed, data_seed=t.seed,
        deepspeed=ds_cfg, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False, disable_tqdm=not is_main(),
        gradient_checkpointing=False,  # already enabled (with the kbit preparation) in load_model
    )
    trainer = Trainer(model=model, args=args, train_dataset=prep.train_rows,
                      data_collator=PackedCollator(prep.tokenizer.pad_token_id,
                                                   packed=cfg.data.pack),
                      callbacks=_callbacks(prep.run) + list(callbacks or []))
    checkpoint = _resume_from(prep.run) if resume else None
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.time() - t0
    steps_done = trainer.state.global_step
    world = int(os.environ.get("WORLD_SIZE", "1"))
    real_tokens = sum(len(r["input_ids"]) for r in prep.train_rows) * (
        t.epochs if t.max_steps <= 0 else min(1.0, steps_done * t.batch_size * t.grad_accum
                                              * world / len(prep.train_rows)))
    runtime = result.metrics.get("train_runtime", wall)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    stats = {
        "steps": steps_done, "wall_seconds": round(wall, 1),
        "train_runtime": round(runtime, 1),
        "tokens_per_second": round(real_tokens / max(runtime, 1e-9), 1),
        "train_loss": round(result.metrics.get("train_loss", float("nan")), 4),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "world_size": world,
    }
    return trainer, stats


# ---------------------------------------------------------------------------------------------
# Save


def save(prep: Prepared, model, train_stats: dict[str, Any],
         metrics: Metrics | None = None) -> Path:
    """adapter/ (PEFT format, safetensors) and the manifest, both written atomically."""
    cfg, tok, d = prep.cfg, prep.tokenizer, prep.cfg.data
    run = prep.run
    with run.staged(run.adapter_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)  # the adapter folder alone is enough to chat with
    manifest = Manifest(
        name=cfg.name, base_model=prep.base_ref, kind="adapter",
        chat=ChatSpec(template=tok.chat_template,
                      system_prompt=d.system_prompt or DEFAULT_SYSTEM_PROMPT,
                      stop_tokens=stop_tokens(tok), generation=GenerationDefaults()),
        dataset=DatasetRecord(**dataset_info(d.path), seed=d.seed, test_size=d.test_size,
                              val_size=d.val_size, stratify=d.stratify, sizes=prep.split_sizes,
                              stats=prep.data_stats),
        training=TrainingRecord(config=cfg.to_dict(), stats=train_stats),
        metrics=metrics or Metrics())
    run.save_manifest(manifest)
    return run.path


def held_out_losses(prep: Prepared, model) -> Metrics | None:
    """Test loss of the base (adapter disabled) and of the fine-tuned model, same tokens."""
    t = prep.cfg.train
    convs = prep.test[: t.eval_max_samples] if t.eval_max_samples else prep.test
    if not convs:
        return None
    max_length = prep.cfg.data.max_length
    with model.disable_adapter():
        base = test_loss(model, prep.tokenizer, convs, max_length, desc="Test loss (base)")
    tuned = test_loss(model, prep.tokenizer, convs, max_length, desc="Test loss (fine-tuned)")
    scores = {kind: ModelScores(loss=round(r["loss"], 4), perplexity=round(r["perplexity"], 3))
              for kind, r in (("base", base), ("adapter", tuned))}
    return Metrics(models=scores, test_samples=tuned["samples"], test_tokens=tuned["tokens"])


def summary(prep: Prepared, stats: dict[str, Any], metrics: Metrics | None) -> str:
    d = prep.data_stats
    lines = [
        "", "=" * 64, f" medchat run '{prep.cfg.name}' finished -> {prep.run.path}", "=" * 64,
        f" base model      {prep.cfg.model.name} ({prep.cfg.model.quantization}, "
        f"LoRA r={prep.cfg.lora.r})",
        f" data            {prep.split_sizes} ; {d['train_tokens']} train tokens, "
        f"{d['truncated']} truncated, {d['dropped']} dropped",
        f" padding         {d['padding_share_unpacked']:.1%} unpacked -> "
        + (f"{d['padding_share_packed']:.1%} packed ({d['packed_rows']} rows)"
           if "packed_rows" in d else "packing off"),
        f" steps           {stats['steps']} in {stats['train_runtime']:.0f}s "
        f"({stats['tokens_per_second']:.0f} tokens/s, world size {stats['world_size']})",
        f" train loss      {stats['first_loss']} (first step) -> {stats['last_loss']} (last), "
        f"mean {stats['train_loss']}",
    ]
    if metrics:
        base, tuned = metrics.models["base"], metrics.models["adapter"]
        lines.append(f" test loss       base {base.loss:.4f} -> fine-tuned "
                     f"{tuned.loss:.4f} ({metrics.test_samples} held-out samples)")
    lines += [f" adapter         {prep.run.adapter_dir}",
              f" next            medchat merge {prep.run.path} ; "
              f"medchat evaluate {prep.run.path} ; python launch.py",
              "=" * 64]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command


def train_command(*, preset: Annotated[str, Opt("--preset", "--config")] = DEFAULT_PRESET,
                  overrides: Annotated[list[str], Opt("--set", metavar="FIELD=VALUE")] = (),
                  data: str | None = None, name: str | None = None, runs: str | None = None,
                  resume: bool = False, overwrite: bool = False) -> int:
    """Fine-tune a chat model on question/answer data (setup -> train -> save).

    Reads the data, writes the split into the run folder, encodes (chat template, answer-only
    labels, packing), trains LoRA (QLoRA and DeepSpeed ZeRO-2 as the preset says), measures
    the held-out test loss of base and fine-tuned model, and saves the adapter and manifest.
    Under torchrun (or the deepspeed launcher) the same command trains data-parallel.

    Args:
        preset: preset name (see `medchat list-presets`) or a YAML file
        overrides: override a config field, e.g. --set lora.r=16 (repeatable)
        data: shortcut for --set data.path=...
        name: shortcut for --set name=...
        runs: runs root (default $MEDCHAT_RUNS or ./runs)
        resume: continue from the newest complete checkpoint (partial ones, left by a run
            stopped while saving, are named and removed; none complete: start from step 0)
        overwrite: replace an existing run's adapter
    """
    logging.basicConfig(level=logging.WARNING)
    overrides = list(overrides)
    if data:
        overrides.append(f"data.path={data}")
    if name:
        overrides.append(f"name={name}")
    if runs:
        overrides.append(f"runs_dir={runs}")
    cfg = build_config(preset, overrides)
    prep = prepare(cfg, resume=resume, overwrite=overwrite)
    trainer, stats = train(prep, resume=resume)
    if not is_main():
        return 0
    model = trainer.model
    metrics = held_out_losses(prep, model) if cfg.train.eval_test_loss else None
    save(prep, model, stats, metrics)
    print(summary(prep, stats, metrics), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return call(train_command, argv, "python -m training.run")


if __name__ == "__main__":
    raise SystemExit(main())
