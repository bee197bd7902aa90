"""The chat engine: serves every registry entry (the base, adapters attached to it by name,
merged models and other bases in a small LRU cache) with token streaming, per-request settings
and cancellation.

    engine = Engine(Registry("runs"))
    stream = engine.stream_turn("adapter:smollm2-medqa", "What is metformin for?")
    for piece in stream:            # text as it is generated
        print(piece, end="", flush=True)
    stream.finish_reason            # "stop" | "length" | "cancelled"

The jobs behind a request, each in its own module:
  * medchat.registry: which ids exist (anything else is refused with `UnknownModelError`) and
    what each one is (folder, base, chat template, stop tokens, generation defaults);
  * medchat.model_cache: loading folders, the LRU of models in memory (the base pinned),
    attaching adapters, and the shared/exclusive lock of each model;
  * medchat.lora_routing: which adapter a generation thread's forward passes use, so concurrent
    requests for different adapters share the base's weights and never each other's routing;
  * here: generation settings, fitting the prompt into the model's context (oldest exchanges
    dropped first), and streaming the answer from a generation thread.

Sampling uses a per-request `torch.Generator` (a logits processor that draws the token), not
torch's global RNG, so a seeded request gives the same text whatever runs beside it. Adapters
trained on another base than the one in memory are attached to that base, loaded into the cache.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from medchat import lora_routing
from medchat.backend import (Backend, BackendError, Capabilities, ChatRequest,
                             GenerationSettings, Limits, SettingsError, Stream, exchanges)
from medchat.base_model import BaseModelError, resolve_ref
from medchat.chat_format import prompt_ids, stop_token_ids
from medchat.model_cache import LoadedModel, ModelCache, resolve_device, resolve_dtype
from medchat.registry import BASE_ID, ModelEntry, Registry, UnknownModelError
from medchat.run_folder import BaseModelRef

__all__ = ["Engine", "BackendError", "GenerationSettings", "SettingsError", "Stream",
           "UnknownModelError", "fit_prompt"]

log = logging.getLogger(__name__)


# -- per-request pieces for transformers' generate -----------------------------------------------

def _logits_classes():
    # torch and transformers are imported in functions: importing the engine stays cheap.
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class SeededSampler(LogitsProcessor):
        """Draw the next token with this request's own generator; greedy then picks it."""

        def __init__(self, seed: int):
            self.seed = seed
            self.gen = None

        def __call__(self, input_ids, scores):
            if self.gen is None:
                self.gen = torch.Generator(device=scores.device).manual_seed(self.seed)
            probs = torch.softmax(scores.float(), dim=-1)
            token = torch.multinomial(probs, 1, generator=self.gen)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, token, 0.0)

    class Cancelled(StoppingCriteria):
        """Stops generation at the next token once the request's event is set (Stop button)."""

        def __init__(self, event: threading.Event):
            self.event = event

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    return SeededSampler, Cancelled


# -- the engine ----------------------------------------------------------------------------------

class Engine(Backend):
    """Serves every registry entry from as few models in memory as possible (see module doc)."""

    name = "in-process"

    def __init__(self, registry: Registry, device: str = "auto", dtype: str = "auto",
                 max_cached_models: int = 2, max_context: int | None = None,
                 limits: Limits | None = None):
        super().__init__(registry, limits)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_cached_models = max(0, int(max_cached_models))
        self.max_context = max_context
        self._cache = ModelCache(self.device, self.dtype, self.max_cached_models, max_context)

    def capabilities(self) -> Capabilities:
        return Capabilities(seeded_sampling=True, runtime_adapter_loading=True,
                            batched_decoding=False, token_counts=True)

    # -- public API ------------------------------------------------------------------------------

    def load_base(self) -> None:
        """Load the base model now (otherwise on the first request)."""
        self._model_for(self.registry.get(BASE_ID))

    def prepare(self, model: str) -> None:
        """Load (or attach) what `model` needs now, as a request would before generating."""
        self._prepare(self.registry.get(model))

    def preload(self, ids: Iterable[str] | None = None) -> list[str]:
        """Attach adapters (all those on the base in memory by default) so switching is free.
        Returns problems (one line per model that could not be prepared)."""
        wanted = None if ids is None else set(ids)
        problems = []
        for entry in self.registry.entries():
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
        return self._generate(entry, loaded, adapter, tok, ids, settings, notices, request.owner)

    def loaded(self) -> dict[str, list[str]]:
        """Models in memory and the adapters attached to each (for status displays and tests)."""
        return self._cache.loaded()

    # -- models ----------------------------------------------------------------------------------

    def _base_folder(self, ref: BaseModelRef) -> Path:
        """The folder of the base a run names: the registry's base, or its own."""
        if self.registry.base_path and self.registry.same_base(ref):
            return self.registry.base_path
        try:
            return resolve_ref(ref, progress=True).path
        except BaseModelError as e:
            raise BackendError(str(e)) from e

    def _model_for(self, entry: ModelEntry) -> LoadedModel:
        if entry.kind == "merged":
            return self._cache.get(Path(entry.path), pinned=False)
        if entry.kind == "base" or self.registry.same_base(entry.base):
            if self.registry.base_path is None:
                self.registry.base_path = self._base_folder(self.registry.get(BASE_ID).base)
            return self._cache.get(self.registry.base_path, pinned=True)
        return self._cache.get(self._base_folder(entry.base), pinned=False)

    def _prepare(self, entry: ModelEntry) -> tuple[LoadedModel, str | None, Any]:
        loaded = self._model_for(entry)
        adapter = None
        if entry.kind == "adapter":
            adapter = self._cache.attach(loaded, entry.id, Path(entry.path), label=entry.run or "",
                                         trained_on=entry.base.hub_id or entry.base.name)
        tok_folder = str(entry.path) if entry.kind == "merged" else loaded.key
        return loaded, adapter, self._cache.tokenizer(tok_folder, entry.chat_template)

    # -- generation ------------------------------------------------------------------------------

    @staticmethod
    def _stop_ids(entry: ModelEntry, loaded: LoadedModel, tok) -> tuple[list[int], list[str]]:
        ids, strings = stop_token_ids(tok, entry.stop_tokens)
        eos = loaded.model.generation_config.eos_token_id
        if not entry.stop_tokens and eos is not None:  # no manifest: the model's own stop tokens
            ids += [eos] if isinstance(eos, int) else list(eos)
        return sorted(set(ids)), strings

    def _generate(self, entry: ModelEntry, loaded: LoadedModel, adapter: str | None, tok,
                  ids: list[int], settings: GenerationSettings, notices: list[str],
                  owner: str | None) -> Stream:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        if settings.temperature > 0 and settings.seed is None:
            settings = replace(settings, seed=random.SystemRandom().randrange(2**31))
        SeededSampler, Cancelled = _logits_classes()
        stream = Stream(entry.id, settings, owner, notices, len(ids))
        streamer = _StreamFeeder(tok, stream)
        stop_ids, stop_strings = self._stop_ids(entry, loaded, tok)
        stop_strings = list(dict.fromkeys(stop_strings + list(settings.stop)))
        # do_sample stays False: sampling (when asked) is done by SeededSampler with the request's
        # own generator; greedy then picks the one token it left.
        gen_config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
            repetition_penalty=settings.repetition_penalty, eos_token_id=stop_ids or None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (stop_ids or [0])[0],
            stop_strings=stop_strings or None)
        processors = LogitsProcessorList()
        if settings.temperature > 0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
            processors.append(SeededSampler(int(settings.seed)))
        input_ids = torch.tensor([ids], device=self.device)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      generation_config=gen_config, logits_processor=processors,
                      stopping_criteria=StoppingCriteriaList([Cancelled(stream.cancel_event)]),
                      streamer=streamer)
        if stop_strings:
            kwargs["tokenizer"] = tok

        def run() -> None:
            try:
                with lora_routing.use_adapter(adapter), loaded.lock.shared(), \
                        torch.inference_mode():
                    out = loaded.model.generate(**kwargs)
                new = out[0, len(ids):].tolist()
                if len(new) >= settings.max_new_tokens and not (new and new[-1] in stop_ids):
                    stream.finish("length", len(new))
                else:
                    stream.finish("stop", len(new))
            except BaseException as e:  # reported to the reader; the stream must still end
                log.exception("generation %s (%s) failed", stream.id, entry.id)
                stream.fail(e)

        threading.Thread(target=run, name=f"medchat-generate-{stream.id}", daemon=True).start()
        return stream


def _StreamFeeder(tok, stream: Stream):
    """A transformers streamer that passes decoded text on to `stream` (word by word, as
    TextIteratorStreamer decodes it)."""
    from transformers import TextStreamer

    class Feeder(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.put(text)

    return Feeder(tok, skip_prompt=True, skip_special_tokens=True)


# -- prompts -------------------------------------------------------------------------------------

def fit_prompt(tok, context: int, system: str | None, history: Iterable[dict], message: str,
               settings: GenerationSettings) -> tuple[list[int], list[str], GenerationSettings]:
    """The prompt ids for `message` after `history`, trimmed to fit `context` tokens with room
    for the answer: the oldest exchanges are dropped first, then the answer is shortened.
    Returns (ids, notices for the user, settings with the answer length that fits)."""
    head = [{"role": "system", "content": system}] if system else []
    turns = exchanges(history)
    tail = [{"role": "user", "content": message}]
    notices: list[str] = []
    budget = context - settings.max_new_tokens
    dropped = 0
    while True:
        messages = head + [m for ex in turns[dropped:] for m in ex] + tail
        ids = prompt_ids(tok, messages)
        if len(ids) <= budget or dropped >= len(turns):
            break
        dropped += 1
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
