"""What can be chatted with: the base model, every adapter and every merged model in the runs
folder, read from their manifests (DESIGN.md, "the one contract: a run folder").

Entry ids are stable strings that the app and the API use as the model name:

    base              the base model the engine keeps in memory
    adapter:<run>     runs/<run>/adapter/  (LoRA, attached to its base by name)
    merged:<run>      runs/<run>/merged/   (a full model: merged locally or pulled from the Hub)

Only ids listed here can be served: the engine looks every request up in the registry, so a
crafted request cannot make the server load an arbitrary path. Repos pulled from the Hub
(`hub.pull`) land in the runs folder and appear here like local runs after `refresh()`.

    python -m medchat.registry [--runs DIR]     # list what the app would offer
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.base_model import DEFAULT_BASE_MODEL
from training.manifest import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, Manifest, ManifestError,
                               list_runs, load_manifest, runs_root)

log = logging.getLogger(__name__)

BASE_ID = "base"
KINDS = ("base", "adapter", "merged")


class UnknownModelError(KeyError):
    """A request named a model the registry does not list."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class ModelEntry:
    """One thing the app can chat with."""

    id: str  # stable name used by the app and the API: base | adapter:<run> | merged:<run>
    kind: str  # base | adapter | merged
    path: Path | None  # model folder (base, merged) or adapter folder; None: base not resolved yet
    base: BaseModelRef  # the base model (for a merged model: what it was merged from)
    run: str | None = None  # run folder name
    run_dir: Path | None = None
    chat_template: str | None = None  # None: the tokenizer's own template
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    eos_tokens: tuple[str, ...] = ()
    generation: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    score: str | None = None  # short eval summary, e.g. "ROUGE-L 0.31 · ppl 9.8"
    source: str | None = None  # e.g. the Hub repo a pulled run came from

    @property
    def label(self) -> str:
        """Dropdown text: kind, name, base model and eval score when known."""
        base = short_name(self.base.hub_id or self.base.name)
        if self.kind == "base":
            text = f"base · {base}"
        else:
            text = f"{self.kind} · {self.run} (base {base})"
        if self.score:
            text += f" · {self.score}"
        return text


def short_name(name: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' -> 'SmolLM2-135M-Instruct'; folders by last part."""
    return Path(str(name).rstrip("/")).name or str(name)


# Metric keys as the evaluation stage may write them, best first: (key, display name).
_QUALITY_KEYS = [("rougeL", "ROUGE-L"), ("rouge_l", "ROUGE-L"), ("rougeLsum", "ROUGE-L"),
                 ("bleu", "BLEU"), ("sacrebleu", "BLEU"), ("token_f1", "F1")]
# training writes test_{loss,ppl}_{base,finetuned} into the manifest; *_base is never used here
_PPL_KEYS = [("perplexity", "ppl"), ("test_perplexity", "ppl"), ("eval_perplexity", "ppl"),
             ("test_ppl_finetuned", "ppl"), ("test_ppl", "ppl")]
_LOSS_KEYS = [("test_loss", "loss"), ("eval_loss", "loss"), ("loss", "loss"),
              ("test_loss_finetuned", "loss")]


def _fmt(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _scopes(metrics: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """Where this model's numbers may sit: eval.json {"models": {kind: ...}}, the manifest's
    {"eval": {"models": {kind: ...}}}, a dict keyed by kind, or a flat dict."""
    roots = [metrics]
    for path in (("models",), ("eval", "models"), ("eval",)):
        d: Any = metrics
        for key in path:
            d = d.get(key) if isinstance(d, dict) else None
        if isinstance(d, dict):
            roots.append(d)
    # a merged model answers like its adapter, so its adapter's scores stand in when missing
    names = (kind, "finetuned", "fine_tuned") + (("adapter",) if kind == "merged" else ())
    scoped = [r[n] for n in names for r in roots if isinstance(r.get(n), dict)]
    return scoped + roots


def summarize_metrics(metrics: dict[str, Any], kind: str) -> str | None:
    """A short score for the dropdown from eval.json / manifest metrics, or None."""
    if not isinstance(metrics, dict):
        return None
    scopes = _scopes(metrics, kind)

    def first(keys, fmt=_fmt):
        for scope in scopes:
            for key, name in keys:
                v = scope.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return f"{name} {fmt(v)}"
        return None

    # ROUGE/BLEU/F1 come as 0-1 fractions or 0-100 percentages
    quality = first(_QUALITY_KEYS, lambda v: f"{v:.1f}" if abs(v) > 1 else f"{v:.3f}")
    parts = [p for p in (quality, first(_PPL_KEYS)) if p]
    if not parts and (loss := first(_LOSS_KEYS)):
        parts.append(loss)
    return " · ".join(parts) or None


def base_score(metrics: dict[str, Any]) -> str | None:
    """The base model's own score from a run's evaluation (eval.json {"models": {"base": ..}}
    or the manifest's test_ppl_base), never the fine-tuned one's."""
    scoped = [d.get("base") for d in (metrics.get("models"), (metrics.get("eval") or {}).get("models"))
              if isinstance(d, dict)]
    flat = {"test_perplexity": metrics.get("test_ppl_base"), "test_loss": metrics.get("test_loss_base")}
    for scope in [d for d in scoped if isinstance(d, dict)] + [flat]:
        found = summarize_metrics({"base": scope}, "base")
        if found:
            return found
    return None


def _eval_metrics(run_dir: Path, manifest: Manifest) -> dict[str, Any]:
    metrics = dict(manifest.metrics or {})
    ev = run_dir / "eval.json"
    if ev.is_file():
        try:
            data = json.loads(ev.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                metrics.update(data)
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s: unreadable (%s); showing the model without its score", ev, e)
    return metrics


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


class Registry:
    """The models the app offers, rebuilt from the runs folder on `refresh()`.

    `base_name` is what the base entry is called (a Hub id or a folder); `base_path` is the folder
    it was resolved to (launch.py resolves it with progress before building the registry)."""

    def __init__(self, runs_dir: str | os.PathLike | None = None,
                 base_name: str = DEFAULT_BASE_MODEL, base_path: str | os.PathLike | None = None,
                 base_hub_id: str | None = None):
        self.runs_dir = runs_root(runs_dir)
        self.base_name = str(base_name)
        self.base_path = Path(base_path) if base_path else None
        self.base_hub_id = base_hub_id or (self.base_name if _is_repo_id(self.base_name) else None)
        self.problems: list[str] = []  # runs skipped on the last refresh, and why
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self.refresh()

    # -- listing -------------------------------------------------------------------------------

    def refresh(self) -> list[ModelEntry]:
        """Rescan the runs folder (picks up runs trained or pulled while the app runs)."""
        entries: dict[str, ModelEntry] = {}
        base_ref = BaseModelRef(name=self.base_name, hub_id=self.base_hub_id,
                                local_path=str(self.base_path) if self.base_path else None)
        entries[BASE_ID] = ModelEntry(id=BASE_ID, kind="base", path=self.base_path, base=base_ref)
        problems: list[str] = []
        for run_dir in list_runs(self.runs_dir):
            try:
                for entry in self._entries_for_run(run_dir):
                    entries[entry.id] = entry
            except ManifestError as e:
                problems.append(f"{run_dir.name}: skipped: {e}")
                continue
            base = entries[BASE_ID]
            if base.score is None and self.same_base(load_manifest(run_dir).base_model):
                score = base_score(_eval_metrics(run_dir, load_manifest(run_dir)))
                if score:  # the base as the run's evaluation measured it
                    entries[BASE_ID] = dataclasses.replace(base, score=score)
        with self._lock:
            self._entries = entries
            self.problems = problems
        for p in problems:
            log.warning(p)
        return self.entries()

    def _entries_for_run(self, run_dir: Path) -> list[ModelEntry]:
        m = load_manifest(run_dir)
        metrics = _eval_metrics(run_dir, m)
        common = dict(run=run_dir.name, run_dir=run_dir, base=m.base_model,
                      chat_template=m.chat_template or None,
                      system_prompt=m.system_prompt or DEFAULT_SYSTEM_PROMPT,
                      eos_tokens=tuple(m.eos_tokens or ()), generation=dict(m.generation or {}),
                      source=(m.source or {}).get("hub_repo"))
        out = []
        adapter, merged = run_dir / "adapter", run_dir / "merged"
        if adapter.is_dir():
            if not (adapter / "adapter_config.json").is_file():
                raise ManifestError(f"{adapter}: no adapter_config.json; re-run training or pull again")
            if not _has_safetensors(adapter):
                # .bin adapters are pickles: loading one from a pulled repo could run code
                raise ManifestError(f"{adapter}: no adapter_model.safetensors (only safetensors "
                                    "adapters are served); re-save it with safe_serialization")
            out.append(ModelEntry(id=f"adapter:{run_dir.name}", kind="adapter", path=adapter,
                                  score=summarize_metrics(metrics, "adapter"), **common))
        if merged.is_dir():
            if not ((merged / "config.json").is_file() and _has_safetensors(merged)):
                raise ManifestError(f"{merged}: needs config.json and *.safetensors; "
                                    "re-run `medchat merge` or pull again")
            out.append(ModelEntry(id=f"merged:{run_dir.name}", kind="merged", path=merged,
                                  score=summarize_metrics(metrics, "merged"), **common))
        if not out:
            raise ManifestError(f"{run_dir}: neither adapter/ nor merged/ (training unfinished?)")
        return out

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            values = list(self._entries.values())
        order = {k: i for i, k in enumerate(KINDS)}
        return sorted(values, key=lambda e: (order[e.kind], e.run or ""))

    def ids(self) -> list[str]:
        return [e.id for e in self.entries()]

    def get(self, model_id: str) -> ModelEntry:
        """The entry for a registered id; anything else (a path, a Hub id, a typo) is refused."""
        with self._lock:
            entry = self._entries.get(model_id) if isinstance(model_id, str) else None
            known = list(self._entries)
        if entry is None:
            raise UnknownModelError(
                f"unknown model {str(model_id)[:200]!r}: not registered. Choose one of: "
                f"{', '.join(known)} (train a run, or pull one from the Hub, then refresh)")
        return entry

    def choices(self) -> list[tuple[str, str]]:
        """(label, id) pairs for a dropdown."""
        return [(e.label, e.id) for e in self.entries()]

    def same_base(self, ref: BaseModelRef) -> bool:
        """Whether a run's base is the registry's base model (by Hub id or folder)."""
        names = {ref.name, ref.hub_id, ref.local_path} - {None}
        ours = {self.base_name, self.base_hub_id, str(self.base_path) if self.base_path else None}
        if names & (ours - {None}):
            return True
        if self.base_path and ref.local_path and Path(ref.local_path).exists():
            return Path(ref.local_path).resolve() == self.base_path.resolve()
        return False

    # -- examples ------------------------------------------------------------------------------

    def examples(self, limit: int = 8, model_id: str | None = None) -> list[str]:
        """Questions from a run's held-out split (data/test.jsonl): the model's run first, else
        the first run that has one. Empty when no run has a test split."""
        from training.data import DataError, read_jsonl

        runs = [e.run_dir for e in self.entries() if e.run_dir is not None]
        if model_id is not None:
            try:
                own = self.get(model_id).run_dir
                if own is not None:
                    runs.insert(0, own)
            except UnknownModelError:
                pass
        seen: set[Path] = set()
        for run_dir in runs:
            if run_dir in seen:
                continue
            seen.add(run_dir)
            test = run_dir / "data" / "test.jsonl"
            if not test.is_file():
                continue
            try:
                convs = read_jsonl(test)
            except (DataError, OSError) as e:
                log.warning("%s: no examples (%s)", test, e)
                continue
            # the dataset repeats some questions; show each once
            questions = list(dict.fromkeys(c.question.strip() for c in convs if c.question.strip()))
            if questions:
                return questions[:limit]
        return []


def _is_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", help="runs folder (default: $MEDCHAT_RUNS or ./runs)")
    ap.add_argument("--base", default=DEFAULT_BASE_MODEL, help="base model id or folder")
    args = ap.parse_args(argv)
    reg = Registry(args.runs, base_name=args.base)
    for e in reg.entries():
        print(f"{e.id:40s} {e.label}")
    for p in reg.problems:
        print(f"skipped: {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
