"""The chat engine: serves every registry entry (the base, adapters attached to it by name,
merged models and other bases in a small LRU cache) with token streaming, per-request settings
and cancellation.

    engine = Engine(Registry("runs"))
    stream = engine.stream("adapter:smollm2-medqa", "What is metformin for?")
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

import itertools
import logging
import math
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from medchat import lora_routing
from medchat.base_model import BaseModelError, resolve_ref
from medchat.chat_format import prompt_ids, stop_token_ids
from medchat.errors import UserError
from medchat.model_cache import (EngineError, LoadedModel, ModelCache, resolve_device,
                                 resolve_dtype)
from medchat.registry import BASE_ID, ModelEntry, Registry, UnknownModelError
from medchat.run_folder import BaseModelRef, GenerationDefaults

log = logging.getLogger(__name__)


class SettingsError(UserError, ValueError):
    """A generation setting out of range; the message names the field."""


# -- settings ------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    """Per-request generation settings (defaults come from the run's manifest)."""

    max_new_tokens: int = 256  # longest answer, in tokens
    temperature: float = 0.7  # 0 = greedy (deterministic); higher = more varied
    top_p: float = 0.9  # nucleus sampling: keep the smallest set of tokens with this much mass
    repetition_penalty: float = 1.1  # >1 discourages repeating tokens already in the text
    seed: int | None = None  # sampling seed; None = a fresh one per request (reported back)

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults | dict[str, Any] | None = None,
                      **overrides: Any) -> "GenerationSettings":
        """A run's generation defaults (its manifest's, or a dict), then explicit overrides
        (None = keep the default)."""
        if isinstance(defaults, GenerationDefaults):
            defaults = asdict(defaults)
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in (defaults or {}).items() if k in names and v is not None}
        values.update({k: v for k, v in overrides.items() if k in names and v is not None})
        return cls(**values).checked()

    def checked(self) -> "GenerationSettings":
        def num(name: str, cast, lo: float, hi: float, lo_open: bool = False):
            value = getattr(self, name)
            try:
                value = cast(value)
            except (TypeError, ValueError):
                raise SettingsError(f"{name}: {value!r} is not a number") from None
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{name}: must be a finite number, got {value}")
            if value < lo or value > hi or (lo_open and value == lo):
                bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
                raise SettingsError(f"{name}: {value} is out of range {bound}")
            setattr(self, name, value)

        num("max_new_tokens", int, 1, 32768)
        num("temperature", float, 0.0, 5.0)
        num("top_p", float, 0.0, 1.0, lo_open=True)
        num("repetition_penalty", float, 0.0, 5.0, lo_open=True)
        if self.seed is not None and self.seed != "":
            num("seed", int, 0, 2**63 - 1)
        else:
            self.seed = None
        return self


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


# -- a running request ---------------------------------------------------------------------------

class Stream:
    """One generation: iterate for text pieces as they arrive; `cancel()` stops it.

    Attributes filled as it runs: text, notices (e.g. history trimmed), finish_reason,
    prompt_tokens, new_tokens, seed, first_token_s (seconds from submit to the first piece)."""

    _ids = itertools.count(1)

    def __init__(self, model: str, owner: str | None, streamer, settings: GenerationSettings,
                 notices: list[str], prompt_tokens: int):
        self.id = next(self._ids)
        self.model = model
        self.owner = owner
        self.settings = settings
        self.seed = settings.seed if settings.temperature > 0 else None
        self.notices = notices
        self.prompt_tokens = prompt_tokens
        self.text = ""
        self.new_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.cancel_event = threading.Event()
        self.done = threading.Event()
        self._streamer = streamer

    def cancel(self) -> None:
        """Stop at the next token (the generation thread then ends and frees its slot)."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            if not piece:
                continue
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.started
            self.text += piece
            yield piece
        self.done.wait()
        if self.error is not None:
            raise EngineError(f"generation with {self.model} failed: "
                              f"{type(self.error).__name__}: {self.error}") from self.error

    def batched(self, interval: float = 0.05) -> Iterator[str]:
        """Like iterating, but pieces that arrive within `interval` seconds of each other are
        joined, so a UI re-renders at most ~1/interval times a second however fast tokens come.
        The first piece is passed on at once (time to first token is unchanged)."""
        q, stop = self._streamer.text_queue, self._streamer.stop_signal
        buf, deadline = "", None
        while True:
            try:
                wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
                piece = q.get(timeout=wait)
            except queue.Empty:
                yield buf
                buf, deadline = "", None
                continue
            if piece is stop:
                break
            if not piece:
                continue
            self.text += piece
            if self.first_token_s is None:
                self.first_token_s = time.perf_counter() - self.started
                yield piece
                continue
            buf += piece
            if deadline is None:
                deadline = time.perf_counter() + interval
        if buf:
            yield buf
        self.done.wait()
        if self.error is not None:
            raise EngineError(f"generation with {self.model} failed: "
                              f"{type(self.error).__name__}: {self.error}") from self.error

    def result(self) -> str:
        """Consume the rest of the stream and return the whole answer."""
        for _ in self:
            pass
        return self.text


# -- the engine ----------------------------------------------------------------------------------

class Engine:
    """Serves every registry entry from as few models in memory as possible (see module doc)."""

    def __init__(self, registry: Registry, device: str = "auto", dtype: str = "auto",
                 max_cached_models: int = 2, max_context: int | None = None):
        self.registry = registry
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_cached_models = max(0, int(max_cached_models))
        self.max_context = max_context
        self._cache = ModelCache(self.device, self.dtype, self.max_cached_models, max_context)
        self._streams: dict[int, Stream] = {}
        self._streams_lock = threading.Lock()

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
            except (EngineError, OSError, ValueError) as e:
                problems.append(f"{entry.id}: {e}")
                log.warning("%s: not prepared: %s", entry.id, e)
        return problems

    def stream(self, model: str, message: str, history: Iterable[dict] | None = None,
               system_prompt: str | None = None, settings: GenerationSettings | None = None,
               owner: str | None = None) -> Stream:
        """Start generating the answer to `message` after `history`; returns at once."""
        entry = self.registry.get(model)  # refuses anything unregistered
        settings = (settings or GenerationSettings.from_defaults(entry.generation)).checked()
        if not isinstance(message, str) or not message.strip():
            raise EngineError("the message is empty; type a question")
        loaded, adapter, tok = self._prepare(entry)
        system = system_prompt if system_prompt and system_prompt.strip() else entry.system_prompt
        ids, notices, settings = fit_prompt(tok, loaded.context, system, history or [], message,
                                            settings)
        return self._start(entry, loaded, adapter, tok, ids, settings, notices, owner)

    def chat(self, model: str, message: str, **kwargs: Any) -> str:
        """The whole answer at once (tests, scripts)."""
        return self.stream(model, message, **kwargs).result()

    def cancel(self, owner: str | None = None) -> int:
        """Cancel the running generations of `owner` (a session), or all when None."""
        with self._streams_lock:
            targets = [s for s in self._streams.values() if owner is None or s.owner == owner]
        for s in targets:
            s.cancel()
        return len(targets)

    def active(self) -> int:
        with self._streams_lock:
            return len(self._streams)

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
            raise EngineError(str(e)) from e

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

    def _start(self, entry: ModelEntry, loaded: LoadedModel, adapter: str | None, tok,
               ids: list[int], settings: GenerationSettings, notices: list[str],
               owner: str | None) -> Stream:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
        from transformers import TemperatureLogitsWarper, TextIteratorStreamer, TopPLogitsWarper

        if settings.temperature > 0 and settings.seed is None:
            settings = GenerationSettings(**{**asdict(settings),
                                             "seed": random.SystemRandom().randrange(2**31)})
        SeededSampler, Cancelled = _logits_classes()
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stream = Stream(entry.id, owner, streamer, settings, notices, len(ids))
        stop_ids, stop_strings = self._stop_ids(entry, loaded, tok)
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
                stream.new_tokens = len(new)
                if stream.cancelled:
                    stream.finish_reason = "cancelled"
                elif len(new) >= settings.max_new_tokens and not (new and new[-1] in stop_ids):
                    stream.finish_reason = "length"
                else:
                    stream.finish_reason = "stop"
            except BaseException as e:  # reported to the reader; the stream must still end
                stream.error = e
                stream.finish_reason = "error"
                log.exception("generation %s (%s) failed", stream.id, entry.id)
                streamer.end()
            finally:
                with self._streams_lock:
                    self._streams.pop(stream.id, None)
                stream.done.set()

        with self._streams_lock:
            self._streams[stream.id] = stream
        threading.Thread(target=run, name=f"medchat-generate-{stream.id}", daemon=True).start()
        return stream


# -- prompts -------------------------------------------------------------------------------------

def fit_prompt(tok, context: int, system: str | None, history: Iterable[dict], message: str,
               settings: GenerationSettings) -> tuple[list[int], list[str], GenerationSettings]:
    """The prompt ids for `message` after `history`, trimmed to fit `context` tokens with room
    for the answer: the oldest exchanges are dropped first, then the answer is shortened.
    Returns (ids, notices for the user, settings with the answer length that fits)."""
    head = [{"role": "system", "content": system}] if system else []
    exchanges = _exchanges(history)
    tail = [{"role": "user", "content": message}]
    notices: list[str] = []
    budget = context - settings.max_new_tokens
    dropped = 0
    while True:
        messages = head + [m for ex in exchanges[dropped:] for m in ex] + tail
        ids = prompt_ids(tok, messages)
        if len(ids) <= budget or dropped >= len(exchanges):
            break
        dropped += 1
    if dropped:
        notices.append(f"The conversation was longer than this model's context "
                       f"({context} tokens); the {dropped} oldest exchange(s) were left "
                       "out of the prompt.")
    if len(ids) > budget:
        room = context - len(ids)
        if room < 1:
            raise EngineError(f"the message is too long: {len(ids)} tokens with the system "
                              f"prompt, and this model's context is {context}; shorten it")
        notices.append(f"The answer is limited to {room} tokens (not "
                       f"{settings.max_new_tokens}) to fit the model's context.")
        settings = GenerationSettings(**{**asdict(settings), "max_new_tokens": room})
    return ids, notices, settings


def _text(content: Any) -> str:
    """Message content as text: a string, or Gradio's list of {"type": "text", "text": ...}."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def _exchanges(history: Iterable[dict]) -> list[list[dict[str, str]]]:
    """History as exchanges (a user turn and what followed), oldest first; system turns and
    non-text content are left out (the system prompt is set separately)."""
    out: list[list[dict[str, str]]] = []
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        text = _text(m.get("content"))
        if not text.strip():
            continue
        if m["role"] == "user" or not out:
            out.append([])
        out[-1].append({"role": m["role"], "content": text})
    return out


__all__ = ["Engine", "EngineError", "GenerationSettings", "SettingsError", "Stream",
           "UnknownModelError", "fit_prompt"]
