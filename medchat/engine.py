"""The chat engine: one base model in memory, adapters attached to it by name, merged models in a
small LRU cache, and token streaming with per-request routing, settings and cancellation.

    engine = Engine(Registry("runs"))
    stream = engine.stream("adapter:smollm2-medqa", "What is metformin for?")
    for piece in stream:            # text as it is generated
        print(piece, end="", flush=True)
    stream.finish_reason            # "stop" | "length" | "cancelled"

How a request is routed (no shared state is changed per request):
  * peft's mixed-batch inference lets every LoRA layer take `adapter_names=[...]` per call
    ("__base__" = no adapter). peft injects that argument with forward hooks that it adds and
    removes around each `PeftModel.generate`, i.e. on the shared modules, so two threads
    generating at once would overwrite each other's routing. Here routing is installed once per
    LoRA layer and reads the adapter name from a thread-local set by the request's own
    generation thread: concurrent requests for different adapters share the weights and never
    each other's routing. `set_adapter` is never called.
  * Each request is one sequence, so a layer only ever applies one adapter (or none). For
    peft's plain `lora.Linear` (what training produces) the routed forward is peft's own
    single-adapter formula, base(x) + B(A(x)) * scaling: peft's mixed-batch path gathers and
    scatters sub-batches and measured ~15% slower decoding at batch size 1 (bench/results/
    app.md). Other layer types and LoRA variants keep peft's mixed-batch path via a pre-hook.
  * Sampling uses a per-request `torch.Generator` (a logits processor that draws the token), not
    torch's global RNG, so a seeded request gives the same text whatever runs beside it.
  * Attaching an adapter changes the model's modules, so it takes the base's lock exclusively;
    generations hold it shared (many at once). Adapters are attached once, on first use (the app
    attaches all of them at start), and stay attached: switching is then free.
  * Adapters trained on a different base than the one in memory: that base is loaded into the
    same bounded LRU cache as merged models (so it costs memory once, and may be evicted), and
    the adapter is attached to it there. Eviction drops the cache's reference only; a generation
    still running on an evicted model finishes normally.

Only ids listed by the registry are served (`UnknownModelError` otherwise); models load with
`trust_remote_code=False` and safetensors only.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import random
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from medchat.registry import BASE_ID, ModelEntry, Registry, UnknownModelError
from training.manifest import BaseModelRef

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in mixed-batch inference
DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer says


class EngineError(RuntimeError):
    """A request that cannot be served; the message says why and what to do."""


class SettingsError(ValueError):
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
    def from_defaults(cls, defaults: dict[str, Any] | None = None, **overrides: Any
                      ) -> "GenerationSettings":
        """Manifest `generation` defaults, then explicit overrides (None = keep the default)."""
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

_route = threading.local()  # .adapter: the peft adapter name of the generation on this thread


def _route_hook(module, args, kwargs):
    """Forward pre-hook for LoRA layers other than lora.Linear (and modules_to_save wrappers):
    peft's mixed-batch path, routed to this thread's request (see module docstring)."""
    batch = args[0].shape[0] if args and hasattr(args[0], "shape") else 1
    kwargs["adapter_names"] = [getattr(_route, "adapter", None) or BASE_ADAPTER] * batch
    return args, kwargs


def _routed_linear(layer):
    """A forward for one peft lora.Linear that applies this thread's adapter (or none)."""
    peft_forward = layer.forward  # the class's own, bound

    def forward(x, *args, **kwargs):
        kwargs.pop("adapter_names", None)
        name = getattr(_route, "adapter", None)
        if name is None or name not in layer.lora_A:  # the base, or not adapted in this layer
            return layer.base_layer(x, *args, **kwargs)
        if name in layer.lora_variant:  # DoRA & co. (refused at attach): peft's mixed path
            return peft_forward(x, *args, adapter_names=[name] * x.shape[0], **kwargs)
        # peft's vanilla LoRA formula for one active adapter (lora.Linear.forward)
        result = layer.base_layer(x, *args, **kwargs)
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        x = layer._cast_input_dtype(x, lora_a.weight.dtype)
        out = result + lora_b(lora_a(layer.lora_dropout[name](x))) * layer.scaling[name]
        return out.to(result.dtype)

    return forward


def _logits_classes():
    from transformers import LogitsProcessor, StoppingCriteria

    class SeededSampler(LogitsProcessor):
        """Draw the next token with this request's own generator; greedy then picks it."""

        def __init__(self, seed: int):
            self.seed = seed
            self.gen = None

        def __call__(self, input_ids, scores):
            import torch

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
            import torch

            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    return SeededSampler, Cancelled


class _SharedLock:
    """Many holders at once (`shared`: generations) or one (`exclusive`: attaching an adapter).
    Waiting exclusive holders go first so an attach is not starved by a stream of requests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class _Slot:
    """One model in memory (a base, maybe with adapters attached, or a merged model)."""

    key: str  # resolved folder
    model: Any
    context: int
    lock: _SharedLock = field(default_factory=_SharedLock)
    peft: Any = None  # the PeftModel wrapping `model` once an adapter is attached
    adapters: dict[str, tuple[str, tuple]] = field(default_factory=dict)  # id -> (name, files sig)
    hooked: set[int] = field(default_factory=set)  # ids of LoRA modules carrying _route_hook
    pinned: bool = False


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
        import torch

        self.registry = registry
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if dtype == "auto":
            dtype = ("bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported()
                     else "float16" if device.startswith("cuda") else "float32")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.max_cached_models = max(0, int(max_cached_models))
        self.max_context = max_context
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # LRU order; the base is pinned
        self._load_lock = threading.RLock()  # one model load at a time (memory, and no duplicates)
        self._tokenizers: dict[tuple[str, str | None], Any] = {}
        self._tok_lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._streams_lock = threading.Lock()
        self._names = itertools.count(1)
        self._base_key: str | None = None

    # -- public API ------------------------------------------------------------------------------

    def load_base(self) -> None:
        """Load the base model now (otherwise on the first request)."""
        self._slot_for_entry(self.registry.get(BASE_ID))

    def preload(self, ids: Iterable[str] | None = None) -> list[str]:
        """Attach adapters (all those on the base in memory by default) so switching is free.
        Returns problems (one line per model that could not be prepared)."""
        problems = []
        for entry in self.registry.entries():
            if ids is None and not (entry.kind == "adapter" and self.registry.same_base(entry.base)):
                continue
            if ids is not None and entry.id not in set(ids):
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
        slot, adapter, tok = self._prepare(entry)
        messages, ids, notices, settings = self._fit(entry, slot, tok, message, history or [],
                                                     system_prompt, settings)
        return self._start(entry, slot, adapter, tok, ids, settings, notices, owner)

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
        return {k: sorted(s.adapters) for k, s in list(self._slots.items())}

    # -- models ----------------------------------------------------------------------------------

    def _base_folder(self, ref: BaseModelRef) -> Path:
        from training.base_model import BaseModelError, resolve_base_model

        if self.registry.base_path and self.registry.same_base(ref):
            return self.registry.base_path
        if ref is self.registry.get(BASE_ID).base:
            name = self.registry.base_name
        elif ref.local_path and Path(ref.local_path).is_dir():
            name = ref.local_path
        else:
            name = ref.hub_id or ref.name
        try:
            return resolve_base_model(name, ref.revision, progress=True).path
        except BaseModelError as e:
            raise EngineError(str(e)) from e

    def _slot_for_entry(self, entry: ModelEntry) -> _Slot:
        if entry.kind == "merged":
            return self._slot_for_folder(Path(entry.path), pinned=False)
        if entry.kind == "base" or self.registry.same_base(entry.base):
            folder = self.registry.base_path or self._base_folder(self.registry.get(BASE_ID).base)
            if self.registry.base_path is None:
                self.registry.base_path = Path(folder)
            return self._slot_for_folder(Path(folder), pinned=True)
        return self._slot_for_folder(self._base_folder(entry.base), pinned=False)

    def _slot_for_folder(self, folder: Path, pinned: bool) -> _Slot:
        key = str(Path(folder).resolve())
        with self._load_lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._load_model(key)
                self._slots[key] = slot
            slot.pinned = slot.pinned or pinned
            self._slots.move_to_end(key)
            self._evict()
        return slot

    def _evict(self) -> None:
        unpinned = [k for k, s in self._slots.items() if not s.pinned]
        while len(unpinned) > self.max_cached_models:
            key = unpinned.pop(0)
            del self._slots[key]  # running generations keep their own reference
            log.info("evicted %s from the model cache", key)

    def _load_model(self, folder: str) -> _Slot:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=self.dtype, trust_remote_code=False, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise EngineError(f"{folder}: cannot load the model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
        model.to(self.device).eval()
        ctx = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        if self.max_context:
            ctx = min(ctx, int(self.max_context))
        log.info("loaded %s in %.1f s (%s, %s)", folder, time.perf_counter() - t0,
                 self.device, self.dtype)
        return _Slot(key=folder, model=model, context=int(ctx))

    def _tokenizer(self, folder: str, template: str | None):
        from transformers import AutoTokenizer

        from training.encode import ensure_chat_template

        key = (folder, template)
        with self._tok_lock:
            tok = self._tokenizers.get(key)
            if tok is None:
                tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
                if template:
                    tok.chat_template = template  # the manifest's, as in training
                ensure_chat_template(tok)
                self._tokenizers[key] = tok
        return tok

    def _attach(self, slot: _Slot, entry: ModelEntry) -> str:
        """Attach an adapter to its base (once; again only if its files changed)."""
        path = Path(entry.path)
        weights = sorted(path.glob("*.safetensors"))
        sig = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in weights)
        current = slot.adapters.get(entry.id)
        if current and current[1] == sig:
            return current[0]
        _check_adapter_config(path)
        with slot.lock.exclusive():
            current = slot.adapters.get(entry.id)
            if current and current[1] == sig:
                return current[0]
            name = f"a{next(self._names)}_{re.sub(r'[^0-9A-Za-z_]', '_', entry.run or 'x')}"[:64]
            try:
                if slot.peft is None:
                    from peft import PeftModel

                    # low_cpu_mem_usage: no random init of LoRA weights about to be overwritten
                    slot.peft = PeftModel.from_pretrained(slot.model, str(path), adapter_name=name,
                                                          is_trainable=False, low_cpu_mem_usage=True)
                else:
                    slot.peft.load_adapter(str(path), adapter_name=name, is_trainable=False,
                                           low_cpu_mem_usage=True)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise EngineError(
                    f"{path}: the adapter does not fit the base model {slot.key} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); was it "
                    "trained on this base? Its manifest names "
                    f"{entry.base.hub_id or entry.base.name}") from e
            if current:  # a retrained run: drop the old weights
                slot.peft.delete_adapter(current[0])
            slot.model.eval()
            self._hook_lora_layers(slot)
            slot.adapters[entry.id] = (name, sig)
            log.info("attached %s as %s", entry.id, name)
            return name

    @staticmethod
    def _hook_lora_layers(slot: _Slot) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.utils import AuxiliaryTrainingWrapper

        for module in slot.model.modules():
            if id(module) in slot.hooked:
                continue
            if type(module) is LoraLinear:
                module.forward = _routed_linear(module)  # instance attribute: shadows the class's
            elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
                module.register_forward_pre_hook(_route_hook, with_kwargs=True)
            else:
                continue
            slot.hooked.add(id(module))

    def _prepare(self, entry: ModelEntry) -> tuple[_Slot, str | None, Any]:
        slot = self._slot_for_entry(entry)
        adapter = self._attach(slot, entry) if entry.kind == "adapter" else None
        tok_folder = str(entry.path) if entry.kind == "merged" else slot.key
        return slot, adapter, self._tokenizer(tok_folder, entry.chat_template)

    # -- prompts ---------------------------------------------------------------------------------

    def _fit(self, entry: ModelEntry, slot: _Slot, tok, message: str, history: Iterable[dict],
             system_prompt: str | None, settings: GenerationSettings):
        """The prompt for this request, trimming the oldest exchanges to fit the context."""
        from training.encode import prompt_ids

        system = system_prompt if system_prompt and system_prompt.strip() else entry.system_prompt
        head = [{"role": "system", "content": system}] if system else []
        exchanges = _exchanges(history)
        tail = [{"role": "user", "content": message}]
        notices: list[str] = []
        budget = slot.context - settings.max_new_tokens
        dropped = 0
        while True:
            messages = head + [m for ex in exchanges[dropped:] for m in ex] + tail
            ids = prompt_ids(tok, messages)
            if len(ids) <= budget or dropped >= len(exchanges):
                break
            dropped += 1
        if dropped:
            notices.append(f"The conversation was longer than this model's context "
                           f"({slot.context} tokens); the {dropped} oldest exchange(s) were left "
                           "out of the prompt.")
        if len(ids) > budget:
            room = slot.context - len(ids)
            if room < 1:
                raise EngineError(f"the message is too long: {len(ids)} tokens with the system "
                                  f"prompt, and this model's context is {slot.context}; "
                                  "shorten it")
            notices.append(f"The answer is limited to {room} tokens (not "
                           f"{settings.max_new_tokens}) to fit the model's context.")
            settings = GenerationSettings(**{**asdict(settings), "max_new_tokens": room})
        return messages, ids, notices, settings

    # -- generation ------------------------------------------------------------------------------

    def _stop_ids(self, entry: ModelEntry, slot: _Slot, tok) -> tuple[list[int], list[str]]:
        ids: set[int] = set()
        strings: list[str] = []
        for t in list(entry.eos_tokens) + [tok.eos_token]:
            if not t:
                continue
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id:
                ids.add(i)
            else:
                strings.append(t)  # not one token: matched on the text instead
        eos = slot.model.generation_config.eos_token_id
        if not entry.eos_tokens and eos is not None:  # no manifest: the model's own stop tokens
            ids.update([eos] if isinstance(eos, int) else eos)
        return sorted(ids), strings

    def _start(self, entry: ModelEntry, slot: _Slot, adapter: str | None, tok, ids: list[int],
               settings: GenerationSettings, notices: list[str], owner: str | None) -> Stream:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
        from transformers import TemperatureLogitsWarper, TextIteratorStreamer, TopPLogitsWarper

        if settings.temperature > 0 and settings.seed is None:
            settings = GenerationSettings(**{**asdict(settings),
                                             "seed": random.SystemRandom().randrange(2**31)})
        SeededSampler, Cancelled = _logits_classes()
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        stream = Stream(entry.id, owner, streamer, settings, notices, len(ids))
        stop_ids, stop_strings = self._stop_ids(entry, slot, tok)
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
            _route.adapter = adapter if slot.peft is not None else None
            try:
                with slot.lock.shared(), torch.inference_mode():
                    out = slot.model.generate(**kwargs)
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
                _route.adapter = None
                with self._streams_lock:
                    self._streams.pop(stream.id, None)
                stream.done.set()

        with self._streams_lock:
            self._streams[stream.id] = stream
        threading.Thread(target=run, name=f"medchat-generate-{stream.id}", daemon=True).start()
        return stream


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


def _check_adapter_config(path: Path) -> None:
    """Only LoRA without DoRA can be routed per request (peft's mixed-batch inference)."""
    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{cfg_path}: unreadable ({e}); re-save the adapter") from e
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise EngineError(f"{cfg_path}: peft_type {kind or '?'}; only LoRA adapters can be served "
                          "side by side (merge it with `medchat merge` and chat with the merged model)")
    if cfg.get("use_dora"):
        raise EngineError(f"{cfg_path}: DoRA adapters cannot be routed per request; merge it "
                          "(`medchat merge`) and chat with the merged model")


__all__ = ["Engine", "EngineError", "GenerationSettings", "SettingsError", "Stream",
           "UnknownModelError"]
