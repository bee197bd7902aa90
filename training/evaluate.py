"""Evaluation on a run's held-out split: base vs adapter vs merged.

    python -m training.evaluate RUN [--limit N] [--models base,adapter,merged]
                                    [--max-new-tokens 128] [--batch-size 16] [--sample]
    medchat evaluate RUN ...

For each model: test loss / perplexity over the answer tokens (`test_loss`, also used by
training), and answers generated for the test questions (greedy unless --sample, prompts built
with the run manifest's chat template and system prompt, batched with left padding) scored
against the reference answers with ROUGE-L (rouge_score), BLEU (sacrebleu) and SQuAD token F1.
Writes RUN/eval.json (scores + every question's answers) and RUN/eval.md (the table), both
atomically, and stores the summary in the manifest's `metrics.eval`.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.encode import IGNORE, PackedCollator, encode_all, pack
from training.manifest import (Manifest, ManifestError, atomic_write_text, load_manifest,
                               update_manifest)

MODEL_KINDS = ("base", "adapter", "merged")
SCORE_ROWS = [("loss", "test loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
              ("rougeL", "ROUGE-L F1", "{:.2f}"), ("bleu", "BLEU", "{:.2f}"),
              ("token_f1", "token F1", "{:.2f}"), ("answer_words", "answer length (words)", "{:.1f}")]


class EvalError(ValueError):
    """Bad evaluation input: the message says what is missing and what to do."""


# ---------------------------------------------------------------------------------------------
# Test loss (training/run.py uses this too)


def test_loss(model, tokenizer, conversations, max_length: int = 1024,
              progress: bool = True, desc: str = "Test loss") -> dict[str, Any]:
    """Mean cross-entropy per answer token over `conversations` (packed rows, no leakage)."""
    import torch
    from tqdm.auto import tqdm

    rows, stats = encode_all(tokenizer, conversations, max_length)
    packed = pack(rows, max_length, shuffle=False)
    collate = PackedCollator(tokenizer.pad_token_id, packed=True)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in tqdm(packed, desc=desc, disable=not progress, leave=False):
                batch = collate([row])
                dev = next(model.parameters()).device
                logits = model(input_ids=batch["input_ids"].to(dev),
                               position_ids=batch["position_ids"].to(dev),
                               use_cache=False).logits.float()  # no cache: packed mask applies
                labels = batch["labels"].to(dev)
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                    ignore_index=IGNORE, reduction="sum")
                total += loss.item()
                count += int((shift_labels != IGNORE).sum())
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count,
            "samples": stats.samples - stats.dropped}


# ---------------------------------------------------------------------------------------------
# Scores


def _squad_normalize(text: str) -> list[str]:
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 (bag-of-words overlap), as in the official evaluate-v1.1 script.

    Written out because the libraries that ship it (`evaluate`'s squad metric) fetch the
    metric code from the Hub at run time, which offline machines cannot do."""
    pred, ref = _squad_normalize(prediction), _squad_normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_answers(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Corpus scores (0-100) and per-answer ROUGE-L / token F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
    n = max(len(predictions), 1)
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score if predictions else 0.0
    return {"rougeL": 100 * sum(rouge) / n, "bleu": bleu, "token_f1": 100 * sum(f1) / n,
            "answer_words": sum(len(p.split()) for p in predictions) / n,
            "per_answer": [{"rougeL": round(100 * a, 2), "token_f1": round(100 * b, 2)}
                           for a, b in zip(rouge, f1)]}


# ---------------------------------------------------------------------------------------------
# Prompts and generation


def prompt_messages(manifest: Manifest, conv) -> tuple[list[dict[str, str]], str]:
    """(messages up to the last answer, with the manifest's system prompt; reference answer)."""
    msgs = [m for m in conv.messages if m["role"] != "system"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        return [], ""
    system = [{"role": "system", "content": manifest.system_prompt}] if manifest.system_prompt else []
    return system + msgs[:last], msgs[last]["content"]


def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int, eos_ids: list[int], sample: dict[str, Any] | None = None,
                     progress: bool = True, desc: str = "Generating") -> list[str]:
    """Answers for token-id prompts; batched (shortest first) with left padding."""
    import torch
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    kwargs = dict(do_sample=False) if not sample else dict(do_sample=True, **sample)
    model.eval()
    with torch.no_grad():
        for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[b:b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                                 pad_token_id=pad, **kwargs)
            for row, i in zip(gen[:, width:].tolist(), idx):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class EvalOptions:
    limit: int | None = None  # first N test questions (quick runs)
    models: tuple[str, ...] | None = None  # default: every model the run has
    max_new_tokens: int = 128  # answer length cap; the references are often longer
    batch_size: int = 16
    max_length: int | None = None  # test-loss row length; default: training's data.max_length
    sample: bool = False  # sample with the manifest's generation settings instead of greedy
    seed: int = 0
    progress: bool = True


def _available(run_dir: Path) -> list[str]:
    kinds = ["base"]
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        kinds.append("adapter")
    if (run_dir / "merged" / "config.json").is_file():
        kinds.append("merged")
    return kinds


def _tokenizer(run_dir: Path, base_dir: Path | None, manifest: Manifest):
    from transformers import AutoTokenizer

    from training.encode import ensure_chat_template

    for folder in (run_dir / "adapter", run_dir / "merged", base_dir):
        if folder is not None and folder.is_dir() and any(folder.glob("tokenizer*")):
            tok = AutoTokenizer.from_pretrained(str(folder))
            break
    else:
        raise EvalError(f"{run_dir}: no tokenizer in adapter/, merged/ or the base model")
    tok.chat_template = manifest.chat_template  # the run's template, never re-guessed
    ensure_chat_template(tok)
    tok.padding_side = "left"
    return tok


def _eos_ids(tok, manifest: Manifest) -> list[int]:
    ids = []
    for t in list(manifest.eos_tokens) + [tok.eos_token]:
        i = tok.convert_tokens_to_ids(t) if t else None
        if isinstance(i, int) and i != tok.unk_token_id and i not in ids:
            ids.append(i)
    return ids or [tok.eos_token_id]


def _load_models(run_dir: Path, kinds: list[str], base_dir: Path | None):
    """Yield (kind, model): base and adapter share one loaded base (adapter disabled for base)."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if "base" in kinds or "adapter" in kinds:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(dev)
        if "adapter" in kinds:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
            if "base" in kinds:
                with model.disable_adapter():
                    yield "base", model
            yield "adapter", model
        else:
            yield "base", model
        del model
    if "merged" in kinds:
        yield "merged", AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), dtype=dtype).to(dev)


def evaluate_run(run_dir: str | Path, opts: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate the run's models on its test split; write eval.json + eval.md; return results."""
    import torch

    from training.data import read_jsonl

    opts = opts or EvalOptions()
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    available = _available(run_dir)
    kinds = list(opts.models or available)
    for k in kinds:
        if k not in MODEL_KINDS:
            raise EvalError(f"--models: unknown model {k!r}; use {', '.join(MODEL_KINDS)}")
        if k not in available:
            fix = "run `medchat merge RUN` first" if k == "merged" else "train the run first"
            raise EvalError(f"{run_dir}: no {k} model ({k}/ missing); {fix}")
    test_rel = manifest.dataset.get("files", {}).get("test", "data/test.jsonl")
    test_path = run_dir / test_rel
    if not test_path.is_file():
        raise EvalError(f"{test_path}: the run has no held-out split; train with a test_size > 0")
    convs = read_jsonl(test_path)
    if opts.limit:
        convs = convs[:opts.limit]
    base_dir = None
    if "base" in kinds or "adapter" in kinds:
        from training.merge import base_dir_from_manifest

        base_dir = base_dir_from_manifest(manifest)
    tok = _tokenizer(run_dir, base_dir, manifest)
    eos = _eos_ids(tok, manifest)
    cfg = manifest.training.get("config", manifest.training)
    max_length = opts.max_length or (cfg.get("data") or {}).get("max_length") or 1024

    from training.encode import prompt_ids

    items = [prompt_messages(manifest, c) for c in convs]
    keep = [i for i, (msgs, ref) in enumerate(items) if msgs and ref]
    prompts = [prompt_ids(tok, items[i][0]) for i in keep]
    refs = [items[i][1] for i in keep]
    sample = None
    if opts.sample:
        g = manifest.generation
        sample = {k: g[k] for k in ("temperature", "top_p", "repetition_penalty") if k in g}

    scores: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    per_answer: dict[str, list[dict[str, float]]] = {}
    timings: dict[str, float] = {}
    for kind, model in _load_models(run_dir, kinds, base_dir):
        t0 = time.perf_counter()
        torch.manual_seed(opts.seed)
        loss = test_loss(model, tok, convs, max_length, progress=opts.progress,
                         desc=f"Test loss ({kind})")
        answers[kind] = generate_answers(model, tok, prompts, opts.max_new_tokens, opts.batch_size,
                                         eos, sample, opts.progress, desc=f"Answers ({kind})")
        s = score_answers(answers[kind], refs)
        per_answer[kind] = s.pop("per_answer")
        scores[kind] = {"loss": loss["loss"], "perplexity": loss["perplexity"],
                        "loss_tokens": loss["tokens"], **s}
        timings[kind] = round(time.perf_counter() - t0, 1)
        if opts.progress:
            print(f"{kind}: " + ", ".join(f"{label} {fmt.format(scores[kind][key])}"
                                          for key, label, fmt in SCORE_ROWS), file=sys.stderr)

    result = {
        "run": manifest.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "test_file": test_rel, "questions": len(keep), "limit": opts.limit,
        "generation": {"mode": "sample" if sample else "greedy", **(sample or {}),
                       "max_new_tokens": opts.max_new_tokens, "batch_size": opts.batch_size,
                       "eos_token_ids": eos, "seed": opts.seed},
        "test_loss_max_length": max_length,
        # what each column is: QLoRA runs are evaluated on the unquantised base, like the merge
        "sources": {k: {"base": f"{base_dir} (unquantised)",
                        "adapter": f"{base_dir} (unquantised) + {run_dir / 'adapter'} via peft",
                        "merged": str(run_dir / "merged")}[k] for k in scores},
        "metrics": {"rougeL": "rouge_score ROUGE-L F1 (stemmed), mean x100",
                    "bleu": "sacrebleu corpus BLEU", "token_f1": "SQuAD token F1, mean x100"},
        "models": {k: {key: round(v, 4) if isinstance(v, float) else v for key, v in s.items()}
                   for k, s in scores.items()},
        "seconds": timings,
        "items": [{"index": i, "question": convs[i].question, "meta": convs[i].meta,
                   "reference": refs[j],
                   "answers": {k: answers[k][j] for k in answers},
                   "scores": {k: per_answer[k][j] for k in per_answer}}
                  for j, i in enumerate(keep)],
    }
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(run_dir / "eval.md", render_table(result))
    update_manifest(run_dir, metrics={"eval": {
        "questions": len(keep), "max_new_tokens": opts.max_new_tokens,
        "generation": result["generation"]["mode"],
        "models": {k: {key: s[key] for key, _, _ in SCORE_ROWS if key in s}
                   for k, s in result["models"].items()}}})
    return result


def render_table(result: dict[str, Any]) -> str:
    """Markdown: one row per score, one column per model, and the fine-tuning change."""
    models = list(result["models"])
    tuned = next((k for k in ("adapter", "merged") if k in models), None)
    delta = "base" in models and tuned is not None
    head = "| | " + " | ".join(models) + (f" | change ({tuned} - base)" if delta else "") + " |"
    lines = [f"Run `{result['run']}`: {result['questions']} held-out questions, "
             f"{result['generation']['mode']} decoding, at most "
             f"{result['generation']['max_new_tokens']} new tokens.", "", head,
             "|---" * (len(models) + 1 + delta) + "|"]
    for key, label, fmt in SCORE_ROWS:
        vals = [result["models"][m].get(key) for m in models]
        cells = [fmt.format(v) if v is not None else "" for v in vals]
        if delta:
            b, t = result["models"]["base"].get(key), result["models"][tuned].get(key)
            cells.append(("+" if t - b >= 0 else "") + fmt.format(t - b))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from training.base_model import BaseModelError
    from training.merge import MergeError, resolve_run

    ap = argparse.ArgumentParser(prog="medchat evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run name or folder")
    ap.add_argument("--limit", type=int, help="only the first N test questions")
    ap.add_argument("--models", help="comma-separated subset of base,adapter,merged "
                                     "(default: all the run has)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    ap.add_argument("--max-length", type=int, help="test-loss row length (default: training's)")
    ap.add_argument("--sample", action="store_true",
                    help="sample with the manifest's generation settings instead of greedy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    opts = EvalOptions(limit=args.limit, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, max_length=args.max_length,
                       sample=args.sample, seed=args.seed, progress=not args.quiet,
                       models=tuple(m.strip() for m in args.models.split(",") if m.strip())
                       if args.models else None)
    try:
        result = evaluate_run(resolve_run(args.run), opts)
    except (EvalError, MergeError, ManifestError, BaseModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
