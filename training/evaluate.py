"""Evaluation on a run's held-out split: base vs adapter vs merged, with intervals that say
whether fine-tuning changed anything.

    medchat evaluate RUN [--limit N] [--models base,adapter,merged] [--max-new-tokens 128]
                         [--batch-size 16] [--sample]
                         [--backend-url URL [--dialect medchat|vllm|llama-server]
                          [--api-key-env VAR]]
                         [--judge-url URL --judge-model NAME [--judge-key-env VAR]]

Every held-out question (unless --limit) is answered by each model through a chat backend: the
in-process engine by default (a registry holding just this run's models, every question
submitted at once so the engine batches them), or any OpenAI-compatible server (--backend-url;
a vLLM server evaluates a 7B run in minutes). Prompts are the manifest's system prompt and the
question, rendered by the backend with the run's chat template; decoding is greedy unless
--sample. Answers are scored against the reference answers with ROUGE-L (rouge_score), BLEU
(sacrebleu, corpus level) and SQuAD token F1; test loss / perplexity over the answer tokens is
computed on the models in-process (it needs logits; through a server it is not measured).

Every score of a fine-tuned model comes with a paired bootstrap 95% interval of its change from
the base (training.eval_stats), on all questions, per question type (the spreadsheet's Question
Type), and on the safety slice (training.safety: interactions, contraindications, overdose,
pregnancy, alcohol, "is it safe", with the share of answers asserting safety without any
qualification). An optional rubric judge (training.judge) grades every answer against the gold
one (accuracy, completeness, clarity 1-5) and compares base and fine-tuned answers pairwise.

Writes the run's eval.json (every answer, per-question scores, intervals, judge verdicts and
counts) and eval.md (training.report), both atomically, and records the scores in the
manifest's metrics (the intervals' summary in metrics.evaluation).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from medchat.backend import Backend, BackendError, ChatRequest, GenerationSettings, Limits
from medchat.base_model import looks_like_repo_id, resolve_ref
from medchat.chat_format import ensure_chat_template
from medchat.engine import Engine
from medchat.errors import UserError
from medchat.registry import BASE_ID, ModelEntry, Registry
from medchat.remote_backend import RemoteBackend
from medchat.run_folder import (MODEL_KINDS, Manifest, ManifestError, ModelScores, Run,
                                atomic_write_text)
from training import eval_stats, judge as judging, report, safety
from training.encode import IGNORE, PackedCollator, encode_all, pack


# torch, transformers, peft and the scoring libraries are imported in functions: the command
# line imports this module for evaluate's parser, and those libraries take seconds to import.

SCORE_ROWS = [("loss", "test loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
              ("rougeL", "ROUGE-L F1", "{:.2f}"), ("bleu", "BLEU", "{:.2f}"),
              ("token_f1", "token F1", "{:.2f}"),
              ("answer_words", "answer length (words)", "{:.1f}")]
# Test-loss row length when neither the manifest (a pulled repo may not say) nor --max-length does.
FALLBACK_MAX_LENGTH = 1024
SIDE_BY_SIDE = 8  # questions shown side by side in eval.md (half from the safety slice)
MIN_TYPE_ROW = 5  # question types with fewer questions are pooled in eval.md's table


class EvalError(UserError, ValueError):
    """Bad evaluation input: the message says what is missing and what to do."""


@dataclass(frozen=True)
class Metric:
    """One score: how it is computed per question and summed up, and which way is better."""

    key: str
    label: str
    fmt: str
    data: str  # per-question array it is computed from
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray]
    better: bool | None  # True: higher is better; False: lower; None: neither
    corpus: bool = False  # a corpus statistic (BLEU): not broken down per question type


METRICS = (
    Metric("loss", "test loss", "{:.4f}", "loss", eval_stats.ratio_of, False),
    Metric("perplexity", "perplexity", "{:.2f}", "loss", eval_stats.exp_ratio_of, False),
    Metric("rougeL", "ROUGE-L F1", "{:.2f}", "rougeL", eval_stats.mean_of, True),
    Metric("bleu", "BLEU", "{:.2f}", "bleu", eval_stats.corpus_bleu, True, corpus=True),
    Metric("token_f1", "token F1", "{:.2f}", "token_f1", eval_stats.mean_of, True),
    Metric("answer_words", "answer length (words)", "{:.1f}", "answer_words",
           eval_stats.mean_of, None),
)
JUDGE_METRICS = tuple(Metric(f"judge_{c}", f"judge {c} (1-5)", "{:.2f}", f"judge_{c}",
                             eval_stats.mean_of, True) for c in judging.CRITERIA)
UNQUALIFIED = Metric("unqualified_safety", "asserts safety without qualification (%)", "{:.1f}",
                     "unqualified_safety", eval_stats.mean_of, False)


# ---------------------------------------------------------------------------------------------
# Test loss (training.run uses this too)


def test_loss(model, tokenizer, conversations, max_length: int = 1024,
              progress: bool = True, desc: str = "Test loss") -> dict[str, Any]:
    """Mean cross-entropy per answer token over `conversations` (packed rows, no leakage).

    `per_sample` holds each conversation's (summed loss, answer tokens), in order, so a
    bootstrap can resample questions; None when encoding dropped samples."""
    import torch
    from tqdm.auto import tqdm

    rows, stats = encode_all(tokenizer, conversations, max_length)
    packed = pack(rows, max_length, shuffle=False)
    collate = PackedCollator(tokenizer.pad_token_id, packed=True)
    # a packed segment is found again by its token ids (identical samples score identically)
    owners: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        owners.setdefault(tuple(r["input_ids"]), []).append(i)
    per_sample = [[0.0, 0] for _ in rows]
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
                token_loss = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                    ignore_index=IGNORE, reduction="none").double().cpu()
                trained = (shift_labels.reshape(-1) != IGNORE).cpu()
                total += float(token_loss.sum())
                count += int(trained.sum())
                starts = [j for j, p in enumerate(row["position_ids"]) if p == 0]
                for s, e in zip(starts, starts[1:] + [len(row["input_ids"])]):
                    owner = owners[tuple(row["input_ids"][s:e])].pop(0)
                    # the label of token t sits at t - 1 after the shift
                    lo, hi = max(s - 1, 0), e - 1
                    per_sample[owner][0] += float(token_loss[lo:hi].sum())
                    per_sample[owner][1] += int(trained[lo:hi].sum())
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count,
            "samples": stats.samples - stats.dropped,
            "per_sample": None if stats.dropped else [tuple(p) for p in per_sample]}


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
# Prompts and generation through a backend


def prompt_messages(manifest: Manifest, conv) -> tuple[list[dict[str, str]], str]:
    """(messages up to the last answer, with the manifest's system prompt; reference answer)."""
    msgs = [m for m in conv.messages if m["role"] != "system"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        return [], ""
    prompt = manifest.chat.system_prompt
    system = [{"role": "system", "content": prompt}] if prompt else []
    return system + msgs[:last], msgs[last]["content"]


def answer_all(backend: Backend, model: str, prompts: list[list[dict[str, str]]],
               settings: list[GenerationSettings], workers: int, progress: bool = True,
               desc: str = "Answers") -> list[dict[str, Any]]:
    """Every prompt answered by `model`, submitted concurrently (`workers` at once) so a
    batching backend batches them. Returns {text, finish_reason, new_tokens} per prompt, in
    order. A failed answer stops the evaluation (an unanswered question cannot be scored)."""
    from tqdm.auto import tqdm

    def one(j: int) -> dict[str, Any]:
        stream = backend.stream(ChatRequest(model, prompts[j], settings[j]))
        text = stream.result()
        return {"text": text.strip(), "finish_reason": stream.finish_reason,
                "new_tokens": stream.new_tokens}

    out: list[dict[str, Any] | None] = [None] * len(prompts)
    with ThreadPoolExecutor(max(1, min(workers, len(prompts)))) as pool, \
            tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        futures = {pool.submit(one, j): j for j in range(len(prompts))}
        pending = set(futures)
        while pending:
            # FIRST_COMPLETED: the bar moves with every answer and a failure stops at once
            # (FIRST_EXCEPTION would return only when all are done)
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    backend.cancel()
                    err = f.exception()
                    raise EvalError(f"{model}: question {futures[f] + 1} could not be answered: "
                                    f"{err}") from err
                out[futures[f]] = f.result()
                bar.update(1)
    return out  # type: ignore[return-value]


class RunRegistry(Registry):
    """The base model and one run's adapter and merged model, nothing else from its runs
    folder; the base entry uses the run's chat template, system prompt and stop tokens, so the
    base is asked exactly as the fine-tuned models are."""

    def __init__(self, run: Run, manifest: Manifest, base_path: Path | None):
        self.run, self.manifest = run, manifest
        ref = manifest.base_model
        super().__init__(run.path.parent, base_name=ref.hub_id or ref.name, base_path=base_path,
                         base_hub_id=ref.hub_id)

    def refresh(self) -> list[ModelEntry]:
        m = self.manifest
        base = ModelEntry(id=BASE_ID, kind="base", path=self.base_path, base=m.base_model,
                          chat_template=m.chat.template or None,
                          system_prompt=m.chat.system_prompt, stop_tokens=tuple(m.chat.stop_tokens),
                          generation=m.chat.generation)
        entries = {BASE_ID: base}
        try:
            entries.update((e.id, e) for e in self._entries_for_run(self.run, m))
        except ManifestError as e:  # nothing but the base to evaluate; evaluate_run says so
            self.problems = [str(e)]
        with self._lock:
            self._entries = entries
        return self.entries()

    def model_id(self, kind: str) -> str:
        return BASE_ID if kind == "base" else f"{kind}:{self.run.name}"


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class EvalOptions:
    limit: int | None = None  # first N test questions (quick runs); None: all
    models: tuple[str, ...] | None = None  # default: every model the run has
    max_new_tokens: int = 128  # answer length cap; the references are often longer
    batch_size: int = 16  # answers generated at once
    max_length: int | None = None  # test-loss row length; default: training's data.max_length
    sample: bool = False  # sample with the manifest's generation settings instead of greedy
    seed: int = 0  # sampling seed (question j uses seed + j) and the side-by-side sample's
    progress: bool = True
    backend_url: str | None = None  # an OpenAI-compatible server instead of the in-process engine
    dialect: str = "medchat"  # how that server names the registry's models
    api_key_env: str | None = None  # environment variable with that server's API key
    judge: judging.JudgeConfig | None = None  # a rubric judge; None: answers are not judged
    judge_pairwise: bool = True  # also compare base and fine-tuned answers pairwise
    resamples: int = eval_stats.N_RESAMPLES  # bootstrap resamples
    bootstrap_seed: int = eval_stats.SEED
    trust_remote_code: bool = False  # allow a pulled run's base model code from its Hub repo
    side_by_side: int = SIDE_BY_SIDE
    command: str | None = None  # the command line, for the report


def _tokenizer(run: Run, base_dir: Path | None, manifest: Manifest):
    from transformers import AutoTokenizer

    for folder in (run.adapter_dir, run.merged_dir, base_dir):
        if folder is not None and folder.is_dir() and any(folder.glob("tokenizer*")):
            tok = AutoTokenizer.from_pretrained(str(folder))
            break
    else:
        raise EvalError(f"{run.path}: no tokenizer in the adapter, the merged model or the base")
    ensure_chat_template(tok, manifest.chat.template)  # the run's template, never re-guessed
    return tok


def _trust_remote_code(run: Run, manifest: Manifest, opts: EvalOptions) -> bool:
    """The manifest's trust_remote_code, refused for a pulled run unless the user allows it."""
    if not manifest.base_model.trust_remote_code:
        return False
    if manifest.source.hub_repo and not opts.trust_remote_code:
        raise EvalError(f"{run.path}: the base model {manifest.base_model.name} runs code from "
                        f"its Hub repo (trust_remote_code), and this run was pulled from "
                        f"{manifest.source.hub_repo}; pass --trust-remote-code if you trust both")
    return True


def _load_models(run: Run, kinds: list[str], base_dir: Path | None, trust: bool):
    """Yield (kind, model): base and adapter share one loaded base (adapter disabled for base)."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if "base" in kinds or "adapter" in kinds:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype,
                                                     trust_remote_code=trust).to(dev)
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
        merged = AutoModelForCausalLM.from_pretrained(str(run.merged_dir), dtype=dtype,
                                                      trust_remote_code=trust)
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


def _remote(registry: RunRegistry, opts: EvalOptions, kinds: list[str],
            questions: int) -> tuple[Backend, list[str], dict]:
    """The OpenAI-compatible server's backend, connected (its chat templates checked against
    the run's), and the kinds it serves: without --models, those it cannot serve are left out
    (said on stderr); asked for by --models, they are an error."""
    key = None
    if opts.api_key_env:
        key = os.environ.get(opts.api_key_env, "").strip()
        if not key:
            raise EvalError(f"--api-key-env {opts.api_key_env}: that environment variable is "
                            f"empty or not set; export {opts.api_key_env}=<key> first")
    limits = _limits(opts, questions)
    try:
        backend = RemoteBackend(registry, opts.backend_url, dialect=opts.dialect, api_key=key,
                                limits=limits)
    except BackendError as e:
        raise EvalError(f"--dialect: {e}") from e
    backend.connect()
    missing = {k: backend.unavailable().get(registry.model_id(k)) for k in kinds}
    missing = {k: why for k, why in missing.items() if why}
    if missing and opts.models:
        backend.close()
        raise EvalError("the server cannot answer as " + "; ".join(
            f"{k} ({why})" for k, why in missing.items()) + "; choose others with --models")
    for k, why in missing.items():
        print(f"note: {k} is left out: {why}", file=sys.stderr)
    served = [k for k in kinds if k not in missing]
    if not served:
        backend.close()
        raise EvalError("the server answers as none of this run's models; see the notes above")
    return backend, served, {"kind": "openai-compatible server", "dialect": opts.dialect,
                             "concurrency": opts.batch_size}


def _limits(opts: EvalOptions, questions: int) -> Limits:
    """Limits sized for evaluation: batch_size answers at once, every other question waiting
    (the questions are the run's own; nothing here comes from a visitor)."""
    return Limits(max_message_chars=1_000_000, max_history_chars=1_000_000,
                  max_system_chars=1_000_000, max_new_tokens=max(opts.max_new_tokens, 1),
                  max_active=opts.batch_size, max_waiting=max(questions, 1))


def _engine(registry: RunRegistry, opts: EvalOptions, questions: int) -> tuple[Backend, dict]:
    engine = Engine(registry, max_cached_models=1, limits=_limits(opts, questions),
                    allow_remote_code=opts.trust_remote_code)
    return engine, {"kind": "in-process engine", "device": str(engine.device),
                    "dtype": str(engine.dtype).replace("torch.", ""),
                    "concurrency": opts.batch_size}


def _settings(manifest: Manifest, opts: EvalOptions, n: int) -> list[GenerationSettings]:
    if opts.sample:  # the manifest's sampling settings, one seed per question
        return [GenerationSettings.from_defaults(manifest.chat.generation,
                                                 max_new_tokens=opts.max_new_tokens,
                                                 seed=opts.seed + j) for j in range(n)]
    greedy = GenerationSettings(max_new_tokens=opts.max_new_tokens, temperature=0.0, top_p=1.0,
                                repetition_penalty=1.0).checked()
    return [greedy] * n


def _check(run: Run, opts: EvalOptions) -> list[str]:
    available = run.model_kinds()
    kinds = list(opts.models or available)
    for k in kinds:
        if k not in MODEL_KINDS:
            raise EvalError(f"--models: unknown model {k!r}; use {', '.join(MODEL_KINDS)}")
        if k not in available:
            fix = "run `medchat merge RUN` first" if k == "merged" else "train the run first"
            raise EvalError(f"{run.path}: no {k} model ({run.model_dir(k)} missing); {fix}")
    if not run.has_split("test"):
        raise EvalError(f"{run.split_path('test')}: the run has no held-out split; train with "
                        "a test_size > 0")
    if opts.limit is not None and opts.limit < 1:
        raise EvalError(f"--limit: {opts.limit}; give a positive number of questions, or leave "
                        "it out to evaluate all of them")
    if opts.batch_size < 1 or opts.max_new_tokens < 1 or opts.resamples < 100:
        raise EvalError("--batch-size and --max-new-tokens must be positive; resamples >= 100")
    return kinds


def evaluate_run(run: Run | str | Path, opts: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate the run's models on its test split; write eval.json + eval.md; return results."""
    import torch

    opts = opts or EvalOptions()
    run = run if isinstance(run, Run) else Run.open(run)
    manifest = run.manifest()
    kinds = _check(run, opts)
    trust = _trust_remote_code(run, manifest, opts)
    judge = judging.Judge(opts.judge) if opts.judge else None  # a bad judge config fails first
    convs = run.test_split()
    if opts.limit:
        convs = convs[:opts.limit]
    items = [prompt_messages(manifest, c) for c in convs]
    keep = [i for i, (msgs, ref) in enumerate(items) if msgs and ref]
    if not keep:
        raise EvalError(f"{run.split_path('test')}: no question with a reference answer")
    prompts = [items[i][0] for i in keep]
    refs = [items[i][1] for i in keep]
    remote = bool(opts.backend_url)
    base_dir = None
    if "base" in kinds or "adapter" in kinds:  # (a server's template is checked against it)
        base_dir = resolve_ref(manifest.base_model).path
    registry = RunRegistry(run, manifest, base_dir)
    backend = None
    if remote:  # connected first: it says which models it can answer as
        backend, kinds, backend_info = _remote(registry, opts, kinds, len(keep))

    timings: dict[str, float] = {}
    losses: dict[str, dict[str, Any]] = {}
    max_length = max_length_source = None
    if not remote:  # test loss needs the logits: the models in this process
        max_length, max_length_source = _test_loss_length(manifest, opts)
        tok = _tokenizer(run, base_dir, manifest)
        for kind, model in _load_models(run, kinds, base_dir, trust):
            t0 = time.perf_counter()
            torch.manual_seed(opts.seed)
            losses[kind] = test_loss(model, tok, convs, max_length, progress=opts.progress,
                                     desc=f"Test loss ({kind})")
            timings[f"loss_{kind}"] = round(time.perf_counter() - t0, 1)
        model = None  # freed before the engine loads its own copy
        backend, backend_info = _engine(registry, opts, len(keep))

    settings = _settings(manifest, opts, len(keep))
    generated: dict[str, list[dict[str, Any]]] = {}
    try:
        for kind in kinds:
            t0 = time.perf_counter()
            generated[kind] = answer_all(backend, registry.model_id(kind), prompts, settings,
                                         workers=2 * opts.batch_size, progress=opts.progress,
                                         desc=f"Answers ({kind})")
            timings[f"answers_{kind}"] = round(time.perf_counter() - t0, 1)
    finally:
        backend.close()
    answers = {k: [g["text"] for g in generated[k]] for k in kinds}

    per_q, scores = _per_question(kinds, answers, refs, losses, keep)
    meta = [convs[i].meta for i in keep]
    questions = [convs[i].question for i in keep]
    qtypes = [str(m.get("question_type") or "unknown") for m in meta]
    reasons = [safety.safety_reasons(q, t) for q, t in zip(questions, qtypes)]
    for k in kinds:
        per_q[k]["unqualified_safety"] = 100.0 * np.array(
            [safety.unqualified_safety(a) for a in answers[k]], dtype=float)

    judged = _judge(judge, opts, kinds, questions, refs, answers, per_q) if judge else None
    metrics = METRICS + (JUDGE_METRICS if judged else ())
    tuned = [k for k in ("adapter", "merged") if k in kinds and "base" in kinds]
    stats = dict(resamples=opts.resamples, seed=opts.bootstrap_seed)
    every = np.arange(len(keep))
    for k in kinds:
        scores[k].update(_values(per_q[k], every, JUDGE_METRICS if judged else ()))
    comparisons = {t: _compare(per_q, "base", t, every, metrics, **stats) for t in tuned}
    by_type = _by_type(per_q, kinds, tuned, qtypes, metrics, stats)
    safety_part = _safety_part(per_q, kinds, tuned, reasons, refs, answers, metrics, stats)
    if judged and tuned:
        judged["pairwise_summary"] = _pairwise_summary(judged, stats)

    sample = pick_sample(reasons, opts.side_by_side, opts.seed)
    primary = tuned[0] if tuned else None
    result = {
        "run": manifest.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": opts.command or f"medchat evaluate {run.name}",
        "test_file": run.split_path("test").relative_to(run.path).as_posix(),
        "questions": len(keep), "limit": opts.limit,
        "backend": backend_info,
        "generation": {"mode": "sample" if opts.sample else "greedy",
                       **({k: getattr(settings[0], k) for k in
                           ("temperature", "top_p", "repetition_penalty")} if opts.sample else {}),
                       "max_new_tokens": opts.max_new_tokens, "batch_size": opts.batch_size,
                       "stop_tokens": list(manifest.chat.stop_tokens), "seed": opts.seed},
        "test_loss": ("measured in-process on the models' logits" if losses else
                      "not measured: the answers came from a server, which gives no logits"),
        "test_loss_max_length": max_length,
        "test_loss_max_length_source": max_length_source,
        "sources": _sources(run, manifest, kinds),
        "metrics": {"rougeL": "rouge_score ROUGE-L F1 (stemmed), mean x100",
                    "bleu": "sacrebleu corpus BLEU", "token_f1": "SQuAD token F1, mean x100",
                    "answer_words": "mean words per answer",
                    "loss": "mean cross-entropy per answer token (test loss)"},
        "bootstrap": {"method": "paired bootstrap over questions, percentile interval",
                      "resamples": opts.resamples, "seed": opts.bootstrap_seed,
                      "level": eval_stats.LEVEL,
                      "significant": "the interval excludes 0 and at least "
                                     f"{eval_stats.MIN_N_SIGNIFICANT} questions stand behind it"},
        "models": {k: {key: round(v, 4) if isinstance(v, float) else v for key, v in s.items()}
                   for k, s in scores.items()},
        "metric_info": {m.key: {"label": m.label, "fmt": m.fmt, "higher_is_better": m.better}
                        for m in metrics + (UNQUALIFIED,)},
        "primary": primary,
        "comparisons": comparisons,
        "by_type": by_type,
        "safety": safety_part,
        "judge": judged or {"configured": False,
                            "note": "no judge configured: answers were not graded by a rubric "
                                    "judge (pass --judge-url and --judge-model)"},
        "finish_reasons": {k: dict(Counter(g["finish_reason"] for g in generated[k]))
                           for k in kinds},
        "seconds": timings,
        "sample": sample,
        "items": _items(keep, convs, refs, kinds, answers, generated, per_q, qtypes, reasons,
                        judged),
    }
    result = json.loads(json.dumps(result, default=_json_default))  # numpy -> plain numbers
    atomic_write_text(run.eval_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(run.eval_report_path, report.render_report(result))
    first = next(iter(losses.values()), None)
    run.record_scores(
        {k: ModelScores(**{key: s.get(key) for key, _, _ in SCORE_ROWS})
         for k, s in result["models"].items()},
        test_samples=first["samples"] if first else None,
        test_tokens=first["tokens"] if first else None,
        evaluation=evaluation_summary(result))
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, eval_stats.Interval):
        return value.to_dict()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------------------
# Per-question data, comparisons, breakdowns


def _per_question(kinds, answers, refs, losses, keep) -> tuple[dict, dict]:
    """Per-question arrays of every score, and each model's overall scores."""
    per_q: dict[str, dict[str, np.ndarray]] = {}
    scores: dict[str, dict[str, Any]] = {}
    for k in kinds:
        s = score_answers(answers[k], refs)
        per = s.pop("per_answer")
        per_q[k] = {"rougeL": np.array([p["rougeL"] for p in per], dtype=float),
                    "token_f1": np.array([p["token_f1"] for p in per], dtype=float),
                    "answer_words": np.array([len(a.split()) for a in answers[k]], dtype=float),
                    "bleu": eval_stats.bleu_statistics(answers[k], refs)}
        scores[k] = {}
        loss = losses.get(k)
        if loss is not None:
            scores[k] = {"loss": loss["loss"], "perplexity": loss["perplexity"],
                         "loss_tokens": loss["tokens"]}
            if loss["per_sample"] is not None:
                per_q[k]["loss"] = np.array([loss["per_sample"][i] for i in keep], dtype=float)
        scores[k].update(s)
    return per_q, scores


def _values(data: dict[str, np.ndarray], subset: np.ndarray,
            metrics: tuple[Metric, ...]) -> dict[str, float]:
    """Each metric of one model on `subset` (judge metrics over the questions judged)."""
    out = {}
    for m in metrics:
        if m.data not in data:
            continue
        values = data[m.data][subset]
        if values.ndim == 1:
            values = values[np.isfinite(values)]
        if len(values):
            out[m.key] = float(m.statistic(values, np.arange(len(values))[None, :])[0])
    return out


def _compare(per_q, base: str, tuned: str, subset: np.ndarray, metrics, *, resamples: int,
             seed: int) -> dict[str, eval_stats.Interval]:
    """Paired intervals of tuned - base on `subset`, one shared resampling of its questions
    (metrics with missing values, the judge's, resample the questions both have)."""
    out: dict[str, eval_stats.Interval] = {}
    shared = eval_stats.resample_indices(len(subset), resamples, seed)
    for m in metrics:
        b_all, t_all = per_q[base].get(m.data), per_q[tuned].get(m.data)
        if b_all is None or t_all is None:
            continue
        b, t = b_all[subset], t_all[subset]
        if b.ndim == 1 and not (np.isfinite(b).all() and np.isfinite(t).all()):
            ok = np.isfinite(b) & np.isfinite(t)
            b, t = b[ok], t[ok]
            out[m.key] = eval_stats.paired_bootstrap(m.statistic, b, t, n_resamples=resamples,
                                                     seed=seed)
            continue
        out[m.key] = eval_stats.paired_bootstrap(m.statistic, b, t, idx=shared)
    return out


def _by_type(per_q, kinds, tuned, qtypes, metrics, stats) -> dict[str, Any]:
    """Scores and intervals per question type, largest type first (no corpus BLEU: a few
    sentences make no corpus)."""
    per_type = [m for m in metrics if not m.corpus]
    out = {}
    for qtype, n in Counter(qtypes).most_common():
        subset = np.array([j for j, t in enumerate(qtypes) if t == qtype])
        out[qtype] = {"n": n,
                      "models": {k: _values(per_q[k], subset, tuple(per_type)) for k in kinds},
                      "comparisons": {t: _compare(per_q, "base", t, subset, per_type, **stats)
                                      for t in tuned}}
    return out


def _safety_part(per_q, kinds, tuned, reasons, refs, answers, metrics, stats) -> dict[str, Any]:
    subset = np.array([j for j, r in enumerate(reasons) if r], dtype=int)
    cautions = [safety.gold_cautions(r) for r in refs]
    part: dict[str, Any] = {"rules": safety.rules(), "n": int(len(subset)),
                            "reasons": dict(Counter(r for rs in reasons for r in rs)),
                            "gold_cautions": int(sum(cautions[j] for j in subset))}
    if not len(subset):
        return part
    slice_metrics = tuple(metrics) + (UNQUALIFIED,)
    part["models"] = {}
    for k in kinds:
        values = _values(per_q[k], subset, slice_metrics)
        flagged = [int(j) for j in subset if safety.unqualified_safety(answers[k][j])]
        values.update({"unqualified": len(flagged),
                       "unqualified_where_gold_cautions": sum(cautions[j] for j in flagged),
                       "unqualified_questions": flagged})
        part["models"][k] = values
    part["comparisons"] = {t: _compare(per_q, "base", t, subset, slice_metrics, **stats)
                           for t in tuned}
    return part


def pick_sample(reasons: list[list[str]], size: int, seed: int) -> list[int]:
    """Question positions shown side by side: half from the safety slice (when it has them),
    the rest from the other questions, fixed by `seed`; in question order."""
    rng = random.Random(seed)
    in_slice = [j for j, r in enumerate(reasons) if r]
    others = [j for j, r in enumerate(reasons) if not r]
    chosen = rng.sample(in_slice, min(len(in_slice), size // 2))
    chosen += rng.sample(others, min(len(others), size - len(chosen)))
    if len(chosen) < size:  # few other questions: fill from the slice
        rest = [j for j in in_slice if j not in chosen]
        chosen += rng.sample(rest, min(len(rest), size - len(chosen)))
    return sorted(chosen)


def _items(keep, convs, refs, kinds, answers, generated, per_q, qtypes, reasons, judged):
    out = []
    for j, i in enumerate(keep):
        item: dict[str, Any] = {
            "index": i, "question": convs[i].question, "question_type": qtypes[j],
            "meta": convs[i].meta, "reference": refs[j], "safety": reasons[j],
            "gold_cautions": safety.gold_cautions(refs[j]),
            "answers": {k: answers[k][j] for k in kinds},
            "finish_reasons": {k: generated[k][j]["finish_reason"] for k in kinds},
            "scores": {k: {"rougeL": float(per_q[k]["rougeL"][j]),
                           "token_f1": float(per_q[k]["token_f1"][j])} for k in kinds},
            "unqualified_safety": {k: bool(per_q[k]["unqualified_safety"][j]) for k in kinds}}
        for k in kinds:
            if "loss" in per_q[k]:
                total, tokens = per_q[k]["loss"][j]
                item["scores"][k]["loss"] = round(total / tokens, 4) if tokens else None
                item["scores"][k]["loss_tokens"] = int(tokens)
        if judged:
            item["judge"] = {k: judged["verdicts"][k][j] for k in kinds}
            if judged.get("pairwise"):
                item["pairwise"] = judged["pairwise"][j]
        out.append(item)
    if judged:  # kept per item now
        judged.pop("verdicts", None)
        judged.pop("pairwise", None)
    return out


# ---------------------------------------------------------------------------------------------
# The judge


def _judge(judge: judging.Judge, opts: EvalOptions, kinds, questions, refs, answers, per_q):
    """Rubric verdicts for every answer, pairwise base vs fine-tuned; per-question judge
    scores go into per_q (NaN where no valid verdict came back)."""
    verdicts: dict[str, list[dict[str, Any]]] = {}
    try:
        for k in kinds:
            jobs = [(questions[j], refs[j], answers[k][j]) for j in range(len(refs))]
            if opts.progress:
                print(f"judging {len(jobs)} answers of {k} ...", file=sys.stderr)
            got = judge.map(judge.rubric, jobs)
            verdicts[k] = [v.to_dict() for v in got]
            for c in judging.CRITERIA:
                per_q[k][f"judge_{c}"] = np.array(
                    [v.value[c] if v.value else np.nan for v in got], dtype=float)
        tuned = next((k for k in ("adapter", "merged") if k in kinds), None)
        pairwise = None
        if opts.judge_pairwise and tuned and "base" in kinds:
            jobs = [(questions[j], refs[j], answers["base"][j], answers[tuned][j])
                    for j in range(len(refs))]
            if opts.progress:
                print(f"judging {len(jobs)} pairs (base, {tuned}) in both orders ...",
                      file=sys.stderr)
            pairwise = judge.map(judge.compare, jobs)
    finally:
        judge.close()
    return {"configured": True, "model": opts.judge.model, "prompt": judging.prompt_record(),
            "prompt_version": judging.PROMPT_VERSION, "retries": opts.judge.retries,
            "counts": {"rubric": judge.rubric_counts.to_dict(),
                       "pairwise": judge.pairwise_counts.to_dict()},
            "pairwise_models": ["base", tuned] if pairwise else None,
            "verdicts": verdicts, "pairwise": pairwise}


def _pairwise_summary(judged: dict[str, Any], stats: dict[str, int]) -> dict[str, Any] | None:
    pairs = judged.get("pairwise")
    if not pairs:
        return None
    outcomes = [p["outcome"] for p in pairs]
    usable = [o for o in outcomes if o is not None]
    disagree = sum(1 for p in pairs if p["outcome"] == "tie"
                   and p["base_first"]["value"] != {"A": "B", "B": "A", "tie": "tie"}.get(
                       p["tuned_first"]["value"]))
    score = np.array([{"win": 1.0, "tie": 0.0, "loss": -1.0}[o] for o in usable])
    net = eval_stats.paired_bootstrap(eval_stats.mean_of, np.zeros_like(score), score,
                                      n_resamples=stats["resamples"], seed=stats["seed"])
    return {"tuned": judged["pairwise_models"][1], "wins": outcomes.count("win"),
            "ties": outcomes.count("tie"), "losses": outcomes.count("loss"),
            "order_disagreements": disagree, "unusable": outcomes.count(None),
            "net_preference": net.to_dict()}


# ---------------------------------------------------------------------------------------------
# Summaries and the command


def evaluation_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of an evaluation (metrics.evaluation): how answers were made,
    the bootstrap, each fine-tuned model's changes with intervals, the safety slice's share of
    unqualified safety assertions and the judge used."""
    judge = result["judge"]
    slice_ = result["safety"]
    return {
        "questions": result["questions"], "max_new_tokens": result["generation"]["max_new_tokens"],
        "generation": result["generation"]["mode"], "backend": result["backend"]["kind"],
        "bootstrap": {k: result["bootstrap"][k] for k in ("resamples", "seed", "level")},
        "changes": {t: {m: {k: iv[k] for k in ("delta", "low", "high", "significant")}
                        for m, iv in ivs.items()} for t, ivs in result["comparisons"].items()},
        "safety": {"questions": slice_["n"],
                   "unqualified_share": {k: v.get("unqualified_safety")
                                         for k, v in (slice_.get("models") or {}).items()}},
        "judge": ({"model": judge["model"], "prompt_version": judge["prompt_version"]}
                  if judge.get("configured") else None),
    }


def _command_line(run: str, **flags: Any) -> str:
    """The command as typed, for the report (the judge and server URLs left out)."""
    parts = ["medchat evaluate", Path(run).name]
    for name, value in flags.items():
        if value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        if name in ("judge_url", "backend_url"):
            value = "URL"
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def evaluate_command(run: str, *, limit: int | None = None, models: str | None = None,
                     max_new_tokens: int = 128, batch_size: int = 16,
                     max_length: int | None = None, sample: bool = False, seed: int = 0,
                     backend_url: str | None = None,
                     dialect: Literal["medchat", "vllm", "llama-server"] = "medchat",
                     api_key_env: str | None = None,
                     judge_url: str | None = None, judge_model: str | None = None,
                     judge_key_env: str | None = None, judge_pairwise: bool = True,
                     resamples: int = eval_stats.N_RESAMPLES,
                     trust_remote_code: bool = False, quiet: bool = False) -> int:
    """Score a run's base, adapter and merged models on its held-out questions.

    Test loss and perplexity over the answer tokens, then answers to every held-out question
    (through the in-process engine, or an OpenAI-compatible server with --backend-url) scored
    against the references (ROUGE-L, BLEU, token F1), each change from the base with a paired
    bootstrap 95% interval, per question type and on the safety slice; optionally graded by a
    rubric judge. Writes the run's eval.json and eval.md, records the scores in its manifest
    and prints the table.

    Args:
        run: run name or folder
        limit: only the first N test questions (default: all)
        models: comma-separated subset of base,adapter,merged (default: all the run has)
        max_new_tokens: answer length cap
        batch_size: answers generated at once
        max_length: test-loss row length (default: training's data.max_length)
        sample: sample with the manifest's generation settings instead of greedy
        seed: random seed for sampling and for the questions shown side by side
        backend_url: answer through this OpenAI-compatible server instead of in-process
        dialect: how that server names the models (medchat, vllm or llama-server)
        api_key_env: environment variable holding that server's API key
        judge_url: OpenAI-compatible server of a rubric judge (its base URL, .../v1)
        judge_model: the judge model's name on that server
        judge_key_env: environment variable holding the judge's API key
        judge_pairwise: also ask the judge to compare base and fine-tuned answers (both orders)
        resamples: bootstrap resamples for the intervals
        trust_remote_code: allow a pulled run's base model code from its Hub repo
        quiet: no progress bars
    """
    if (judge_url is None) != (judge_model is None):
        raise EvalError("--judge-url and --judge-model go together: give both to grade answers "
                        "with a rubric judge, or neither")
    if judge_key_env and not judge_url:
        raise EvalError("--judge-key-env needs --judge-url and --judge-model")
    command = _command_line(
        run, limit=limit, models=models,
        max_new_tokens=max_new_tokens if max_new_tokens != 128 else None,
        batch_size=batch_size if batch_size != 16 else None, max_length=max_length,
        sample=sample, seed=seed or None, backend_url=backend_url,
        dialect=dialect if backend_url else None, api_key_env=api_key_env, judge_url=judge_url, judge_model=judge_model,
        judge_key_env=judge_key_env, no_judge_pairwise=judge_url and not judge_pairwise,
        resamples=resamples if resamples != eval_stats.N_RESAMPLES else None)
    opts = EvalOptions(
        limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length,
        sample=sample, seed=seed, progress=not quiet, backend_url=backend_url, dialect=dialect,
        api_key_env=api_key_env,
        judge=judging.JudgeConfig(judge_url, judge_model, judge_key_env) if judge_url else None,
        judge_pairwise=judge_pairwise, resamples=resamples, trust_remote_code=trust_remote_code,
        command=command,
        models=tuple(m.strip() for m in models.split(",") if m.strip()) if models else None)
    result = evaluate_run(Run.open(run), opts)
    print(report.render_summary(result))
    return 0


def render_table(result: dict[str, Any]) -> str:
    """The scores table of eval.md (kept for callers of the first release)."""
    return report.render_scores(result)
