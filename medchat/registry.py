"""What can be chatted with: the base model, every adapter and every merged model in the runs
folder, read from their manifests.

Entry ids are stable strings that the app and the API use as the model name:

    base              the base model the engine keeps in memory
    adapter:<run>     the run's adapter (LoRA, attached to its base by name)
    merged:<run>      the run's merged model (a full model: merged locally or pulled from the Hub)

Only ids listed here can be served: the engine looks every request up in the registry, so a
crafted request cannot make the server load an arbitrary path. Repos pulled from the Hub land in
the runs folder and appear here like local runs after `refresh()`.

    medchat models [--runs DIR] [--base MODEL]     # list what the app would offer
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from medchat.base_model import DEFAULT_BASE_MODEL, looks_like_repo_id
from medchat.errors import UserError
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, MODEL_KINDS, BaseModelRef,
                                GenerationDefaults, Manifest, ManifestError, Metrics, ModelScores,
                                Run, runs_root)

log = logging.getLogger(__name__)

BASE_ID = "base"


class UnknownModelError(UserError, KeyError):
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
    stop_tokens: tuple[str, ...] = ()  # where an answer ends (the manifest's chat.stop_tokens)
    generation: GenerationDefaults | None = None  # the run's sampling defaults; None: the app's
    score: str | None = None  # short eval summary, e.g. "ROUGE-L 31.0 · ppl 9.80"
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


# -- scores for the dropdown label -----------------------------------------------------------

# The quality score shown, best first (each 0-100 in the manifest): (field, display name).
QUALITY_SCORES = (("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("token_f1", "F1"))


def _fmt(value: float) -> str:
    """Three significant-ish digits: 18.2, 7.50, 0.412."""
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def score_text(scores: ModelScores | None) -> str | None:
    """'ROUGE-L 41.2 · ppl 7.50' from one model's scores: its quality score and perplexity,
    else its test loss; None when nothing was measured."""
    if scores is None:
        return None
    quality = next((f"{name} {getattr(scores, key):.1f}" for key, name in QUALITY_SCORES
                    if getattr(scores, key) is not None), None)
    ppl = f"ppl {_fmt(scores.perplexity)}" if scores.perplexity is not None else None
    parts = [p for p in (quality, ppl) if p]
    if not parts and scores.loss is not None:
        parts.append(f"loss {_fmt(scores.loss)}")
    return " · ".join(parts) or None


def summarize_metrics(metrics: Metrics, kind: str) -> str | None:
    """The label score of a run's adapter or merged model (a merged model without its own
    scores shows its adapter's: it answers like it)."""
    return score_text(metrics.scores(kind))


def base_score(metrics: Metrics) -> str | None:
    """The base model's own score as a run measured it, never the fine-tuned one's."""
    return score_text(metrics.models.get("base"))


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


# -- the registry ----------------------------------------------------------------------------

class Registry:
    """The models the app offers, rebuilt from the runs folder on `refresh()`.

    `base_name` is what the base entry is called (a Hub id or a folder); `base_path` is the folder
    it was resolved to (the app's start-up resolves it with progress before building the
    registry)."""

    def __init__(self, runs_dir: str | os.PathLike | None = None,
                 base_name: str = DEFAULT_BASE_MODEL, base_path: str | os.PathLike | None = None,
                 base_hub_id: str | None = None):
        self.runs_dir = runs_root(runs_dir)
        self.base_name = str(base_name)
        self.base_path = Path(base_path) if base_path else None
        self.base_hub_id = base_hub_id or (self.base_name if looks_like_repo_id(self.base_name)
                                           else None)
        self.problems: list[str] = []  # runs skipped on the last refresh, and why
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self.refresh()

    # -- listing -------------------------------------------------------------------------------

    def refresh(self) -> list[ModelEntry]:
        """Rescan the runs folder (picks up runs trained or pulled while the app runs)."""
        base_ref = BaseModelRef(name=self.base_name, hub_id=self.base_hub_id,
                                local_path=str(self.base_path) if self.base_path else None)
        base = ModelEntry(id=BASE_ID, kind="base", path=self.base_path, base=base_ref)
        entries: dict[str, ModelEntry] = {}
        problems: list[str] = []
        for run in Run.all(self.runs_dir):
            try:
                manifest = run.manifest()
                found = self._entries_for_run(run, manifest)
            except ManifestError as e:
                problems.append(f"{run.name}: skipped: {e}")
                continue
            entries.update((e.id, e) for e in found)
            if base.score is None and self.same_base(manifest.base_model):
                # the base as the run's evaluation measured it
                base = dataclasses.replace(base, score=base_score(manifest.metrics))
        entries = {BASE_ID: base, **entries}
        with self._lock:
            self._entries = entries
            self.problems = problems
        for p in problems:
            log.warning(p)
        return self.entries()

    def _entries_for_run(self, run: Run, m: Manifest) -> list[ModelEntry]:
        common = dict(run=run.name, run_dir=run.path, base=m.base_model,
                      chat_template=m.chat.template or None,
                      system_prompt=m.chat.system_prompt or DEFAULT_SYSTEM_PROMPT,
                      stop_tokens=tuple(m.chat.stop_tokens), generation=m.chat.generation,
                      source=m.source.hub_repo)
        out = []
        if run.adapter_dir.is_dir():
            if not run.has_adapter():
                raise ManifestError(f"{run.adapter_dir}: no adapter_config.json; re-run training "
                                    "or pull again")
            if not _has_safetensors(run.adapter_dir):
                # .bin adapters are pickles: loading one from a pulled repo could run code
                raise ManifestError(f"{run.adapter_dir}: no adapter_model.safetensors (only "
                                    "safetensors adapters are served); re-save it with "
                                    "safe_serialization")
            out.append(ModelEntry(id=f"adapter:{run.name}", kind="adapter", path=run.adapter_dir,
                                  score=summarize_metrics(m.metrics, "adapter"), **common))
        if run.merged_dir.is_dir():
            if not (run.has_merged() and _has_safetensors(run.merged_dir)):
                raise ManifestError(f"{run.merged_dir}: needs config.json and *.safetensors; "
                                    "re-run `medchat merge` or pull again")
            out.append(ModelEntry(id=f"merged:{run.name}", kind="merged", path=run.merged_dir,
                                  score=summarize_metrics(m.metrics, "merged"), **common))
        if not out:
            raise ManifestError(f"{run.path}: neither adapter/ nor merged/ (training unfinished?)")
        return out

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            values = list(self._entries.values())
        order = {k: i for i, k in enumerate(MODEL_KINDS)}
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
        """Questions from a run's held-out test split: the model's run first, else the first
        run that has one. Empty when no run has a test split."""
        runs = [e.run_dir for e in self.entries() if e.run_dir is not None]
        if model_id is not None:
            try:
                own = self.get(model_id).run_dir
                if own is not None:
                    runs.insert(0, own)
            except UnknownModelError:
                pass
        for run_dir in dict.fromkeys(runs):
            try:
                questions = Run(run_dir).split_questions("test")
            except (ManifestError, OSError) as e:
                log.warning("%s: no examples (%s)", run_dir, e)
                continue
            if questions:
                return questions[:limit]
        return []


def models_command(*, runs: str | None = None, base: str = DEFAULT_BASE_MODEL) -> int:
    """List the models the app would offer: the base, and each run's adapter and merged model.

    Prints one line per model (its id, then its label with base model and scores) and, on
    stderr, the runs that were skipped and why.

    Args:
        runs: runs folder (default: $MEDCHAT_RUNS or ./runs)
        base: base model: Hub id or folder
    """
    reg = Registry(runs, base_name=base)
    for e in reg.entries():
        print(f"{e.id:40s} {e.label}")
    for p in reg.problems:
        print(f"skipped: {p}", file=sys.stderr)
    return 0
