"""Evaluation on a run's held-out split: base vs adapter vs merged.

    medchat evaluate RUN [--limit N] [--models base,adapter,merged] [--max-new-tokens 128]
                         [--batch-size 16] [--sample]

For each model: test loss / perplexity over the answer tokens (`test_loss`, also used by
training), and answers generated for the test questions (greedy unless --sample, prompts built
with the run manifest's chat template and system prompt, batched with left padding) scored
against the reference answers with ROUGE-L (rouge_score), BLEU (sacrebleu) and SQuAD token F1.
Writes the run's eval.json (scores + every question's answers) and eval.md (the table), both
atomically, and records the scores in the manifest's metrics.
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

from medchat.base_model import looks_like_repo_id, resolve_ref
from medchat.chat_format import ensure_chat_template, prompt_ids, stop_token_ids
from medchat.errors import UserError
from medchat.run_folder import MODEL_KINDS, Manifest, ModelScores, Run, atomic_write_text
from training.encode import IGNORE, PackedCollator, encode_all, pack

# torch, transformers, peft and the scoring libraries are imported in functions: the command
# line imports this module for evaluate's parser, and those libraries take seconds to import.

SCORE_ROWS = [("loss", "test loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
              ("rougeL", "ROUGE-L F1", "{:.2f}"), ("bleu", "BLEU", "{:.2f}"),
              ("token_f1", "token F1", "{:.2f}"),
              ("answer_words", "answer length (words)", "{:.1f}")]
# Test-loss row length when neither the manifest (a pulled repo may not say) nor --max-length does.
FALLBACK_MAX_LENGTH = 1024


class EvalError(UserError, ValueError):
    """Bad evaluation input: the message says what is missing and what to do."""


# ---------------------------------------------------------------------------------------------
# Test loss (training.run uses this too)


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
    prompt = manifest.chat.system_prompt
    system = [{"role": "system", "content": prompt}] if prompt else []
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
        for b in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                      leave=False):
            idx = order[b:b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i])
                                 for i in idx])
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


def _tokenizer(run: Run, base_dir: Path | None, manifest: Manifest):
    from transformers import AutoTokenizer

    for folder in (run.adapter_dir, run.merged_dir, base_dir):
        if folder is not None and folder.is_dir() and any(folder.glob("tokenizer*")):
            tok = AutoTokenizer.from_pretrained(str(folder))
            break
    else:
        raise EvalError(f"{run.path}: no tokenizer in the adapter, the merged model or the base")
    ensure_chat_template(tok, manifest.chat.template)  # the run's template, never re-guessed
    tok.padding_side = "left"
    return tok


def _load_models(run: Run, kinds: list[str], base_dir: Path | None):
    """Yield (kind, model): base and adapter share one loaded base (adapter disabled for base)."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if "base" in kinds or "adapter" in kinds:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(dev)
        if "adapter" in kinds:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run.adapter_dir))
            if "base" in kinds:
                with model.disable_adapter():
                    yield "base", model
            yield "adapter", model
        else:
            yield "base", model
        del model
    if "merged" in kinds:
        merged = AutoModelForCausalLM.from_pretrained(str(run.merged_dir), dtype=dtype)
        yield "merged", merged.to(dev)


def _test_loss_length(manifest: Manifest, opts: EvalOptions) -> tuple[int, str]:
    """Row length of the test loss and where it came from (said, never silently guessed)."""
    if opts.max_length:
        return opts.max_length, "--max-length"
    if manifest.training.max_length:
        return manifest.training.max_length, "training config (data.max_length)"
    print(f"note: the manifest records no training max_length (a run not trained here?); the "
          f"test loss uses rows of {FALLBACK_MAX_LENGTH} tokens, pass --max-length to choose",
          file=sys.stderr)
    return FALLBACK_MAX_LENGTH, (f"default {FALLBACK_MAX_LENGTH}: the manifest records no "
                                 "training max_length")


def _base_label(manifest: Manifest) -> str:
    """The base model by Hub id or folder name: eval.json names no local path."""
    ref = manifest.base_model
    if ref.hub_id:
        return ref.hub_id
    if looks_like_repo_id(ref.name):
        return ref.name
    return Path(ref.name).name or ref.name


def _sources(run: Run, manifest: Manifest, kinds) -> dict[str, str]:
    """What each column is: QLoRA runs are evaluated on the unquantised base, like the merge."""
    base = f"{_base_label(manifest)} (unquantised)"
    adapter = run.adapter_dir.relative_to(run.path).as_posix()
    merged = run.merged_dir.relative_to(run.path).as_posix()
    return {k: {"base": base, "adapter": f"{base} + {adapter}/ of run {run.name} via peft",
                "merged": f"{merged}/ of run {run.name}"}[k] for k in kinds}


def evaluate_run(run: Run | str | Path, opts: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate the run's models on its test split; write eval.json + eval.md; return results."""
    import torch

    opts = opts or EvalOptions()
    run = run if isinstance(run, Run) else Run.open(run)
    manifest = run.manifest()
    available = run.model_kinds()
    kinds = list(opts.models or available)
    for k in kinds:
        if k not in MODEL_KINDS:
            raise EvalError(f"--models: unknown model {k!r}; use {', '.join(MODEL_KINDS)}")
        if k not in available:
            fix = "run `medchat merge RUN` first" if k == "merged" else "train the run first"
            raise EvalError(f"{run.path}: no {k} model ({run.model_dir(k)} missing); {fix}")
    test_path = run.split_path("test")
    if not run.has_split("test"):
        raise EvalError(f"{test_path}: the run has no held-out split; train with a test_size > 0")
    convs = run.test_split()
    if opts.limit:
        convs = convs[:opts.limit]
    base_dir = None
    if "base" in kinds or "adapter" in kinds:
        base_dir = resolve_ref(manifest.base_model).path
    tok = _tokenizer(run, base_dir, manifest)
    eos = stop_token_ids(tok, manifest.chat.stop_tokens)[0] or [tok.eos_token_id]
    max_length, max_length_source = _test_loss_length(manifest, opts)

    items = [prompt_messages(manifest, c) for c in convs]
    keep = [i for i, (msgs, ref) in enumerate(items) if msgs and ref]
    prompts = [prompt_ids(tok, items[i][0]) for i in keep]
    refs = [items[i][1] for i in keep]
    sample = None
    if opts.sample:
        g = manifest.chat.generation
        sample = {"temperature": g.temperature, "top_p": g.top_p,
                  "repetition_penalty": g.repetition_penalty}

    scores: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    per_answer: dict[str, list[dict[str, float]]] = {}
    timings: dict[str, float] = {}
    loss_samples = loss_tokens = None
    for kind, model in _load_models(run, kinds, base_dir):
        t0 = time.perf_counter()
        torch.manual_seed(opts.seed)
        loss = test_loss(model, tok, convs, max_length, progress=opts.progress,
                         desc=f"Test loss ({kind})")
        loss_samples, loss_tokens = loss["samples"], loss["tokens"]
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
        "test_file": test_path.relative_to(run.path).as_posix(), "questions": len(keep),
        "limit": opts.limit,
        "generation": {"mode": "sample" if sample else "greedy", **(sample or {}),
                       "max_new_tokens": opts.max_new_tokens, "batch_size": opts.batch_size,
                       "eos_token_ids": eos, "seed": opts.seed},
        "test_loss_max_length": max_length,
        "test_loss_max_length_source": max_length_source,
        "sources": _sources(run, manifest, scores),
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
    atomic_write_text(run.eval_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(run.eval_report_path, render_table(result))
    run.record_scores(
        {k: ModelScores(**{key: s[key] for key, _, _ in SCORE_ROWS if key in s})
         for k, s in result["models"].items()},
        test_samples=loss_samples, test_tokens=loss_tokens,
        evaluation={"questions": len(keep), "max_new_tokens": opts.max_new_tokens,
                    "generation": result["generation"]["mode"]})
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


def evaluate_command(run: str, *, limit: int | None = None, models: str | None = None,
                     max_new_tokens: int = 128, batch_size: int = 16,
                     max_length: int | None = None, sample: bool = False, seed: int = 0,
                     quiet: bool = False) -> int:
    """Score a run's base, adapter and merged models on its held-out questions.

    Test loss and perplexity over the answer tokens, then answers generated for the test
    questions and scored against the references (ROUGE-L, BLEU, token F1). Writes the run's
    eval.json and eval.md, records the scores in its manifest and prints the table.

    Args:
        run: run name or folder
        limit: only the first N test questions
        models: comma-separated subset of base,adapter,merged (default: all the run has)
        max_new_tokens: answer length cap
        batch_size: prompts generated together
        max_length: test-loss row length (default: training's data.max_length)
        sample: sample with the manifest's generation settings instead of greedy
        seed: random seed for sampling
        quiet: no progress bars
    """
    opts = EvalOptions(limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       max_length=max_length, sample=sample, seed=seed, progress=not quiet,
                       models=tuple(m.strip() for m in models.split(",") if m.strip())
                       if models else None)
    result = evaluate_run(Run.open(run), opts)
    print(render_table(result))
    return 0

