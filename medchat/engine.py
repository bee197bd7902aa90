"""The chat engine: serves every registry entry (the base, adapters attached to it by name,
merged models and other bases in a small LRU cache) with token streaming, per-request settings
and cancellation, batching the decode steps of concurrent requests on each model.

    engine = Engine(Registry("runs"))
    stream = engine.stream_turn("adapter:smollm2-medqa", "What is metformin for?")
    for piece in stream:            # text as it is generated
        print(piece, end="", flush=True)
    stream.finish_reason            # "stop" | "length" | "cancelled"

The jobs behind a request, each in its own module:
  * medchat.registry: which ids exist (anything else is refused with `UnknownModelError`) and
    what each one is (folder, base, chat template, stop tokens, generation defaults);
  * medchat.model_cache: loading folders (a lock per folder), the LRU of models in memory (the
    base pinned), attaching adapters without stopping running generations;
  * medchat.scheduler: one loop per model in memory that admits requests between decode steps
    and runs one forward pass for all of them, different adapters in the same pass
    (medchat.lora_routing routes each batch row), each row sampled with its own settings and
    seeded generator (medchat.sampling), so a seeded request gives the same text whatever runs
    beside it;
  * here: which folder and adapter a request needs (and whether its code may run), generation
    settings, fitting the prompt into the model's context (oldest exchanges dropped first).

Adapters trained on another base than the one in memory are attached to that base, loaded into
the cache. A run pulled from the Hub names its base by Hub id: the folder its manifest recorded
on the training machine is never used, and a base that needs `trust_remote_code` is loaded with
it only when the run's manifest says so and, for pulled runs, the operator allowed it
(`allow_remote_code`, the app's --allow-remote-code).
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from medchat.backend import (Backend, BackendError, Capabilities, ChatRequest,
                             GenerationSettings, Limits, SettingsError, Stream, exchanges)
from medchat.base_model import BaseModelError, looks_like_repo_id, resolve_ref
from medchat.chat_format import prompt_ids, stop_token_ids
from medchat.model_cache import LoadedModel, ModelCache, resolve_device, resolve_dtype
from medchat.registry import BASE_ID, ModelEntry, Registry, UnknownModelError
from medchat.run_folder import BaseModelRef
from medchat.scheduler import Job, SchedulerConfig

__all__ = ["Engine", "BackendError", "GenerationSettings", "SchedulerConfig", "SettingsError",
           "Stream", "UnknownModelError", "fit_prompt"]

log = logging.getLogger(__name__)


# -- the engine ----------------------------------------------------------------------------------

class Engine(Backend):
    """Serves every registry entry from as few models in memory as possible (see module doc).

    `allow_remote_code`: runs pulled from the Hub whose manifest says their base needs
    `trust_remote_code` may load it (that code then runs here); off by default. `scheduler`:
    how each model's loop shares its decode steps (medchat.scheduler.SchedulerConfig)."""

    name = "in-process"

    def __init__(self, registry: Registry, device: str = "auto", dtype: str = "auto",
                 max_cached_models: int = 2, max_context: int | None = None,
                 limits: Limits | None = None, *, allow_remote_code: bool = False,
                 pulled_base_token: str | bool | None = False,
                 pulled_base_max_bytes: int | None = 5_000_000_000,
                 scheduler: SchedulerConfig | None = None):
        super().__init__(registry, limits)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_cached_models = max(0, int(max_cached_models))
        self.max_context = max_context
        self.allow_remote_code = bool(allow_remote_code)
        # the base of a run pulled from the Hub is fetched anonymously (False) unless the
        # operator hands its token over, and only up to this size
        self.pulled_base_token = pulled_base_token
        self.pulled_base_max_bytes = pulled_base_max_bytes
        # base reference -> its folder, found once: finding it may ask the Hub (a snapshot
        # check, a size check), which has no place on every request
        self._base_folders: dict[tuple, Path] = {}
        self._cache = ModelCache(self.device, self.dtype, self.max_cached_models, max_context,
                                 scheduler)

    def capabilities(self) -> Capabilities:
        return Capabilities(seeded_sampling=True, runtime_adapter_loading=True,
                            batched_decoding=True, token_counts=True)

    # -- public API ------------------------------------------------------------------------------

    def load_base(self) -> None:
        """Load the base model now (otherwise on the first request)."""
        self._model_for(self.registry.get(BASE_ID))

    def prepare(self, model: str) -> None:
        """Load (or attach) what `model` needs now, as a request would before generating."""
        self._prepare(self.registry.get(model))

    def preload(self, ids: Iterable[str] | None = None) -> list[str]:
        """Attach adapters (all those on the base in memory by default) so switching is free,
        and read the merged models' tokenizers (their weights load on first use): reading one
        later would hold up the answers being written. Returns problems (one line per model
        that could not be prepared)."""
        wanted = None if ids is None else set(ids)
        problems = []
        for entry in self.registry.entries():
            if wanted is None and entry.kind == "merged":
                try:
                    self._cache.tokenizer(str(entry.path), entry.chat_template,
                                          trust_remote_code=lambda e=entry: self._remote_code(e),
                                          sandboxed=bool(entry.source))
                except (BackendError, OSError, ValueError) as e:
                    problems.append(f"{entry.id}: {e}")
                    log.warning("%s: tokenizer not read: %s", entry.id, e)
                continue
            if wanted is None and not (entry.kind == "adapter"
                                       and self.registry.same_base(entry.base)):
                continue
            if wanted is not None and entry.id not in wanted:
                continue
            try:
                self._prepare(entry)
            except (BackendError, OSError, ValueError) as e:
                problems.append(f"{entry.id}: {e}")
                log.warning("%s: not prepared: %s", entry.id, e)
        return problems

    def _start(self, entry: ModelEntry, request: ChatRequest) -> Stream:
        system_prompt, history, message = request.parts()
        loaded, adapter, tok = self._prepare(entry)
        system = system_prompt if system_prompt and system_prompt.strip() else entry.system_prompt
        ids, notices, settings = fit_prompt(tok, loaded.context, system, history, message,
                                            request.settings)
        if settings.temperature > 0 and settings.seed is None:
            settings = replace(settings, seed=random.SystemRandom().randrange(2**31))
        stream = Stream(entry.id, settings, request.owner, notices, len(ids))
        stop_ids, stop_strings = self._stop_ids(entry, loaded, tok)
        stop_strings = list(dict.fromkeys(stop_strings + list(settings.stop)))
        loaded.loop.submit(Job(stream, ids, adapter, settings, frozenset(stop_ids),
                               tuple(stop_strings), tok))
        return stream

    def loaded(self) -> dict[str, list[str]]:
        """Models in memory and the adapters attached to each (for status displays and tests)."""
        return self._cache.loaded()

    def close(self) -> None:
        """End the models' loop threads once the requests they run are done."""
        for model in self._cache.models():
            model.loop.retire()

    def scheduler_stats(self) -> dict[str, dict[str, Any]]:
        """Per model in memory: decode steps, the most rows one step ran, prefills (tests,
        benchmarks)."""
        return {m.key: dict(m.loop.stats) for m in self._cache.models()}

    # -- models ----------------------------------------------------------------------------------

    def _base_folder(self, entry: ModelEntry) -> Path:
        """The folder of the base `entry`'s run names: the registry's base, or its own (looked
        up once while that folder stays). A pulled run's base must be a Hub id: the local path
        its manifest recorded is never used."""
        ref = entry.base
        if self.registry.base_path and self.registry.same_base(ref):
            return self.registry.base_path
        key = (bool(entry.source), ref.hub_id, ref.name, ref.revision, ref.local_path)
        known = self._base_folders.get(key)
        if known is not None and known.is_dir():
            return known
        folder = self._find_base_folder(entry)
        self._base_folders[key] = folder
        return folder

    def _find_base_folder(self, entry: ModelEntry) -> Path:
        ref = entry.base
        if entry.source:
            repo = ref.hub_id or ref.name
            if not looks_like_repo_id(repo):
                raise BackendError(
                    f"{entry.id} was pulled from {entry.source}, and its base model "
                    f"{str(repo)[:200]!r} is neither a Hub id (owner/name) nor this server's base "
                    f"{self.registry.base_name}; it cannot be served here")
            ref = BaseModelRef(name=repo, revision=ref.revision, hub_id=repo)
            try:
                return resolve_ref(ref, progress=True, token=self.pulled_base_token,
                                   max_bytes=self.pulled_base_max_bytes).path
            except BaseModelError as e:
                raise BackendError(str(e)) from e
        try:
            return resolve_ref(ref, progress=True).path
        except BaseModelError as e:
            raise BackendError(str(e)) from e

    def _remote_code(self, entry: ModelEntry) -> bool:
        """Whether the model `entry` needs loads with trust_remote_code (see `_run_trusts`);
        the base in memory as the operator's own runs on it (or allowed pulled ones) say."""
        if entry.kind == "base" or (entry.kind == "adapter"
                                    and self.registry.same_base(entry.base)):
            return any(self._run_trusts(e, refuse=False) for e in self.registry.entries()
                       if e.kind != "base" and self.registry.same_base(e.base))
        return self._run_trusts(entry)

    def _run_trusts(self, entry: ModelEntry, refuse: bool = True) -> bool:
        """trust_remote_code only when the run's manifest says so, and for a run pulled from
        the Hub only when the operator allowed it (otherwise refused, or False when `refuse`
        is off)."""
        if not entry.base.trust_remote_code:
            return False
        if entry.source and not self.allow_remote_code:
            if not refuse:
                return False
            raise BackendError(
                f"{entry.id} was pulled from {entry.source}, and its manifest asks to load its "
                "model with trust_remote_code, which runs code from the Hub on this server. "
                "Start the app with --allow-remote-code to allow it, if you trust that code")
        return True

    def _model_for(self, entry: ModelEntry) -> LoadedModel:
        def remote() -> bool:  # decided (and refused) only when something must be loaded
            return self._remote_code(entry)

        if entry.kind == "merged":
            return self._cache.get(Path(entry.path), pinned=False, trust_remote_code=remote)
        if entry.kind == "base" or self.registry.same_base(entry.base):
            if self.registry.base_path is None:
                self.registry.base_path = self._base_folder(self.registry.get(BASE_ID))
            return self._cache.get(self.registry.base_path, pinned=True,
                                   trust_remote_code=remote)
        remote()  # a pulled run that may not run code is refused before its base is fetched
        return self._cache.get(self._base_folder(entry), pinned=False, trust_remote_code=remote)

    def _prepare(self, entry: ModelEntry) -> tuple[LoadedModel, str | None, Any]:
        loaded = self._model_for(entry)
        adapter = None
        if entry.kind == "adapter":
            adapter = self._cache.attach(loaded, entry.id, Path(entry.path), label=entry.run or "",
                                         trained_on=entry.base.hub_id or entry.base.name)
        tok_folder = str(entry.path) if entry.kind == "merged" else loaded.key
        tok = self._cache.tokenizer(tok_folder, entry.chat_template,
                                    trust_remote_code=lambda: self._remote_code(entry),
                                    sandboxed=bool(entry.source))  # a pulled run's template
        return loaded, adapter, tok

    # -- generation ------------------------------------------------------------------------------

    @staticmethod
    def _stop_ids(entry: ModelEntry, loaded: LoadedModel, tok) -> tuple[list[int], list[str]]:
        ids, strings = stop_token_ids(tok, entry.stop_tokens)
        eos = loaded.model.generation_config.eos_token_id
        if not entry.stop_tokens and eos is not None:  # no manifest: the model's own stop tokens
            ids += [eos] if isinstance(eos, int) else list(eos)
        return sorted(set(ids)), strings


# -- prompts -------------------------------------------------------------------------------------

def fit_prompt(tok, context: int, system: str | None, history: Iterable[dict], message: str,
               settings: GenerationSettings) -> tuple[list[int], list[str], GenerationSettings]:
    """The prompt ids for `message` after `history`, trimmed to fit `context` tokens with room
    for the answer: the oldest exchanges are dropped first, then the answer is shortened.
    Returns (ids, notices for the user, settings with the answer length that fits).

    Linear in the history: each exchange is tokenized once to count its tokens, the exchanges
    to drop are counted from the front, and the prompt is rendered once more to check (the
    counts are exact for templates that render each message on its own; for others the check
    moves one exchange at a time to the same answer)."""
    head = [{"role": "system", "content": system}] if system else []
    turns = exchanges(history)
    tail = [{"role": "user", "content": message}]
    notices: list[str] = []
    budget = context - settings.max_new_tokens

    def render(dropped: int) -> list[int]:
        return prompt_ids(tok, head + [m for ex in turns[dropped:] for m in ex] + tail)

    ids = render(0)
    dropped = 0
    if len(ids) > budget and turns:
        # what each exchange adds in front of a one-message chat (a default system prompt the
        # template may add is in both and cancels out)
        probe = [{"role": "user", "content": "?"}]
        alone = len(prompt_ids(tok, probe))
        excess = len(ids) - budget
        while dropped < len(turns) and excess > 0:
            excess -= len(prompt_ids(tok, turns[dropped] + probe)) - alone
            dropped += 1
        ids = render(dropped)
        while len(ids) > budget and dropped < len(turns):  # counted too few
            dropped += 1
            ids = render(dropped)
        while dropped > 0:  # counted too many: keep the newest exchanges that fit
            fewer = render(dropped - 1)
            if len(fewer) > budget:
                break
            dropped, ids = dropped - 1, fewer
    if dropped:
        notices.append(f"The conversation was longer than this model's context "
                       f"({context} tokens); the {dropped} oldest exchange(s) were left "
                       "out of the prompt.")
    if len(ids) > budget:
        room = context - len(ids)
        if room < 1:
            raise BackendError(f"the message is too long: {len(ids)} tokens with the system "
                              f"prompt, and this model's context is {context}; shorten it")
        notices.append(f"The answer is limited to {room} tokens (not "
                       f"{settings.max_new_tokens}) to fit the model's context.")
        settings = replace(settings, max_new_tokens=room)
    return ids, notices, settings
