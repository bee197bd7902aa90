"""The one interface between what asks for answers (the app, the /v1 API, the terminal chat,
evaluation) and what generates them (the in-process engine, or an OpenAI-compatible server such
as vLLM).

    request = ChatRequest("adapter:smollm2-medqa",
                          [{"role": "user", "content": "What is metformin for?"}],
                          GenerationSettings(max_new_tokens=128, temperature=0.0))
    stream = backend.stream(request)     # returns at once; the answer arrives as it is made
    for piece in stream:
        print(piece, end="")
    stream.finish_reason                 # "stop" | "length" | "cancelled" | "error"

Every backend does the same checks before generating (`Backend.stream`): the model must be in
the registry (`UnknownModelError` otherwise; the registry is the only list a request may choose
from), the request must fit the operator's `Limits` (message and history size, answer length),
and it must get a generation slot from the `Admission` queue (bounded: a full queue answers
"busy, retry" at once instead of piling up). A subclass implements `_start`, which launches the
generation and feeds the returned `Stream`.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Iterator

from medchat.errors import UserError
from medchat.registry import ModelEntry, Registry, UnknownModelError
from medchat.run_folder import GenerationDefaults

__all__ = ["Admission", "Backend", "BackendError", "Capabilities", "ChatRequest",
           "GenerationSettings", "LimitError", "Limits", "ModelUnavailableError",
           "OverloadedError", "SettingsError", "Stream", "UnknownModelError", "exchanges",
           "message_text"]


class SettingsError(UserError, ValueError):
    """A generation setting out of range; the message names the field."""


class BackendError(UserError, RuntimeError):
    """A request that cannot be served; the message says why and what to do."""


class LimitError(BackendError):
    """A request larger than the operator allows (message, history, answer length)."""


class OverloadedError(BackendError):
    """Every generation slot is busy and the waiting line is full: retry in a moment."""


class ModelUnavailableError(BackendError):
    """A registered model this backend cannot serve right now (server down, adapter missing)."""


# -- settings ------------------------------------------------------------------------------------

MAX_NEW_TOKENS_CEILING = 32768  # beyond any context here; Limits.max_new_tokens is the real cap


@dataclass
class GenerationSettings:
    """Per-request generation settings (defaults come from the run's manifest)."""

    max_new_tokens: int = 256  # longest answer, in tokens
    temperature: float = 0.7  # 0 = greedy (deterministic); higher = more varied
    top_p: float = 0.9  # nucleus sampling: keep the smallest set of tokens with this much mass
    repetition_penalty: float = 1.1  # >1 discourages repeating tokens already in the text
    seed: int | None = None  # sampling seed; None = a fresh one per request (reported back)
    stop: tuple[str, ...] = ()  # extra strings that end the answer (the model's own always do)

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
            if isinstance(value, bool):
                raise SettingsError(f"{name}: {value!r} is not a number")
            try:
                value = cast(value)
            except (TypeError, ValueError, OverflowError):
                raise SettingsError(f"{name}: {value!r} is not a number") from None
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{name}: must be a finite number, got {value}")
            if value < lo or value > hi or (lo_open and value == lo):
                bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
                raise SettingsError(f"{name}: {value} is out of range {bound}")
            setattr(self, name, value)

        num("max_new_tokens", int, 1, MAX_NEW_TOKENS_CEILING)
        num("temperature", float, 0.0, 5.0)
        num("top_p", float, 0.0, 1.0, lo_open=True)
        num("repetition_penalty", float, 0.0, 5.0, lo_open=True)
        if self.seed is not None and self.seed != "":
            num("seed", int, 0, 2**63 - 1)
        else:
            self.seed = None
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise SettingsError(f"stop: expected a list of non-empty strings, got {stop!r:.80}")
        self.stop = tuple(stop)
        return self


# -- limits and admission ------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many run at once: the operator's settings, the
    same for the UI and the API (`medchat app --help` lists the flags)."""

    max_message_chars: int = 8_000  # the new user message
    max_history_chars: int = 64_000  # every earlier turn together
    max_history_turns: int = 200  # earlier messages (a user turn and an answer are two)
    max_system_chars: int = 4_000  # a system prompt the visitor sets
    max_new_tokens: int = 2_048  # longest answer (the UI slider stops here too)
    max_stop_strings: int = 8  # extra stop strings of one request (each at most 64 chars)
    max_active: int = 8  # generations at once (Compare runs two); decoded together in one batch
    max_waiting: int = 16  # requests waiting for a slot; one more is told "busy, retry"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if f.name == "max_waiting" else 1):
                raise LimitError(f"limit {f.name}: {value!r} must be a positive whole number")

    def check(self, request: "ChatRequest") -> None:
        """Refuse a request beyond the limits, naming the field and the limit."""
        system, history, message = request.parts()
        if len(message) > self.max_message_chars:
            raise LimitError(f"message: {len(message)} characters; at most "
                             f"{self.max_message_chars} are accepted, shorten it")
        if system is not None and len(system) > self.max_system_chars:
            raise LimitError(f"system prompt: {len(system)} characters; at most "
                             f"{self.max_system_chars} are accepted")
        if len(history) > self.max_history_turns:
            raise LimitError(f"history: {len(history)} earlier messages; at most "
                             f"{self.max_history_turns} are accepted, start a new conversation")
        size = sum(len(m["content"]) for m in history)
        if size > self.max_history_chars:
            raise LimitError(f"history: {size} characters; at most {self.max_history_chars} "
                             "are accepted, start a new conversation")
        if request.settings.max_new_tokens > self.max_new_tokens:
            raise LimitError(f"max_new_tokens: {request.settings.max_new_tokens} is above this "
                             f"server's limit of {self.max_new_tokens}")
        stop = request.settings.stop
        if len(stop) > self.max_stop_strings or any(len(s) > 64 for s in stop):
            raise LimitError(f"stop: at most {self.max_stop_strings} strings of at most 64 "
                             "characters")


class Admission:
    """Generation slots and a bounded waiting line, shared by every caller of one backend.

    `acquire()` returns at once when a slot is free, waits in line otherwise, and raises
    OverloadedError at once when the line is full; `release()` frees the slot."""

    def __init__(self, max_active: int, max_waiting: int):
        self.max_active, self.max_waiting = max_active, max_waiting
        self._cond = threading.Condition()
        self._active = 0
        self._waiting = 0

    def acquire(self, timeout: float | None = None, count: int = 1) -> None:
        """Take `count` slots at once (all or none: a caller that needs two never holds one
        while it waits for the other)."""
        if count > self.max_active:
            raise OverloadedError(f"this needs {count} generations at once and the server runs "
                                  f"at most {self.max_active}; ask the operator to raise it")
        with self._cond:
            if self._active + count <= self.max_active and not self._waiting:
                self._active += count
                return
            if self._waiting >= self.max_waiting:
                raise OverloadedError(
                    f"the server is busy ({self._active} answers being written, {self._waiting} "
                    "waiting); retry in a moment")
            self._waiting += 1
            try:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._active + count > self.max_active:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise OverloadedError("the server stayed busy; retry in a moment")
                    self._cond.wait(left)
                self._active += count
            finally:
                self._waiting -= 1

    def release(self) -> None:
        with self._cond:
            self._active = max(0, self._active - 1)
            self._cond.notify_all()  # a waiter may need more than the one slot freed

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return self._active, self._waiting


# -- requests ------------------------------------------------------------------------------------

def message_text(content: Any) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": ...} parts
    (OpenAI's and Gradio's form); other parts (images...) are left out."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        text = content.get("text")
        return text if isinstance(text, str) else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content)
    return ""


def exchanges(history: Iterable[Any]) -> list[list[dict[str, str]]]:
    """History as exchanges (a user turn and what followed), oldest first; system turns and
    non-text content are left out (the system prompt is set separately)."""
    out: list[list[dict[str, str]]] = []
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        text = message_text(m.get("content"))
        if not text.strip():
            continue
        if m["role"] == "user" or not out:
            out.append([])
        out[-1].append({"role": m["role"], "content": text})
    return out


@dataclass
class ChatRequest:
    """One chat turn to answer: `messages` ends with the user's new message; a leading system
    message replaces the model's own system prompt."""

    model: str  # a registry id
    messages: list[dict[str, Any]]
    settings: GenerationSettings | None = None  # None: the model's own defaults (its manifest)
    owner: str | None = None  # who may cancel it (a UI session); None: only its stream

    @classmethod
    def from_turn(cls, model: str, message: str, history: Iterable[Any] | None = None,
                  system_prompt: str | None = None,
                  settings: GenerationSettings | None = None,
                  owner: str | None = None) -> "ChatRequest":
        """The app's shape (a message, the history before it, a system prompt) as a request."""
        msgs: list[dict[str, Any]] = []
        if system_prompt and system_prompt.strip():
            msgs.append({"role": "system", "content": system_prompt})
        msgs += [m for ex in exchanges(history or []) for m in ex]
        msgs.append({"role": "user", "content": message})
        return cls(model, msgs, settings, owner)

    def parts(self) -> tuple[str | None, list[dict[str, str]], str]:
        """(system prompt or None, earlier messages, the new user message)."""
        if not isinstance(self.messages, list) or not self.messages:
            raise BackendError("messages: expected a non-empty list ending with a user message")
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise BackendError(f"messages[{i}]: needs role system, user or assistant")
        last = self.messages[-1]
        if last["role"] != "user":
            raise BackendError("messages: the last message must be the user's")
        message = message_text(last.get("content"))
        if not message.strip():
            raise BackendError("the message is empty; type a question")
        system = None
        rest = self.messages[:-1]
        if rest and rest[0]["role"] == "system":
            system = message_text(rest[0].get("content"))
            rest = rest[1:]
        history = [m for ex in exchanges(rest) for m in ex]
        return system, history, message


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so callers can say what to expect."""

    seeded_sampling: bool  # same seed and settings -> same text
    runtime_adapter_loading: bool  # an adapter trained after start can be served without restart
    batched_decoding: bool  # concurrent requests share forward passes
    token_counts: bool  # prompt/answer token counts are exact


# -- a running generation ------------------------------------------------------------------------

_END = object()


class Stream:
    """One generation: iterate for text pieces as they arrive; `cancel()` stops it.

    A backend feeds it with `put(text)` and ends it with `finish(reason)` (or `fail(error)`).
    Attributes filled as it runs: text, notices (e.g. history trimmed), finish_reason,
    prompt_tokens, new_tokens, seed, first_token_s (seconds from submit to the first piece)."""

    _ids = itertools.count(1)

    def __init__(self, model: str, settings: GenerationSettings, owner: str | None = None,
                 notices: list[str] | None = None, prompt_tokens: int = 0):
        self.id = next(self._ids)
        self.model = model
        self.owner = owner
        self.settings = settings
        self.seed = settings.seed if settings.temperature > 0 else None
        self.notices = list(notices or [])
        self.prompt_tokens = prompt_tokens
        self.text = ""
        self.new_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.cancel_event = threading.Event()
        self.done = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._on_done: list[Callable[["Stream"], None]] = []
        self._lock = threading.Lock()

    # -- the producer side -----------------------------------------------------------------------

    def put(self, text: str) -> None:
        if text:
            self._queue.put(text)

    def finish(self, reason: str, new_tokens: int | None = None) -> None:
        """End the stream (idempotent): reason is stop, length or cancelled."""
        with self._lock:
            if self.done.is_set():
                return
            if new_tokens is not None:
                self.new_tokens = new_tokens
            self.finish_reason = "cancelled" if self.cancelled and reason != "error" else reason
            callbacks = list(self._on_done)
            self.done.set()
        self._queue.put(_END)
        for cb in callbacks:
            cb(self)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finish("error")

    def on_done(self, callback: Callable[["Stream"], None]) -> None:
        """Call `callback(stream)` once when the stream ends (at once if it already has)."""
        with self._lock:
            if not self.done.is_set():
                self._on_done.append(callback)
                return
        callback(self)

    # -- the consumer side -----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop at the next token (the backend then ends the stream and frees its slot). The
        consumer gets nothing more: pieces already on their way (a server may have sent a burst)
        are dropped, so what was shown when Stop was pressed is the answer."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def _take(self, piece: str) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.text += piece

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            if isinstance(self.error, UserError):
                raise self.error
            raise BackendError(f"generation with {self.model} failed: "
                               f"{type(self.error).__name__}: {self.error}") from self.error

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self._queue.get()
            if piece is _END:
                break
            if self.cancelled:
                continue  # drained until the backend ends the stream
            self._take(piece)
            yield piece
        self._raise_if_failed()

    def batched(self, interval: float = 0.05) -> Iterator[str]:
        """Like iterating, but pieces that arrive within `interval` seconds of each other are
        joined, so a UI re-renders at most ~1/interval times a second however fast tokens come.
        The first piece is passed on at once (time to first token is unchanged)."""
        buf, deadline = "", None
        while True:
            try:
                wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
                piece = self._queue.get(timeout=wait)
            except queue.Empty:
                yield buf
                buf, deadline = "", None
                continue
            if piece is _END:
                break
            if self.cancelled:
                buf = ""
                continue
            first = self.first_token_s is None
            self._take(piece)
            if first:
                yield piece
                continue
            buf += piece
            if deadline is None:
                deadline = time.perf_counter() + interval
        if buf:
            yield buf
        self._raise_if_failed()

    def result(self) -> str:
        """Consume the rest of the stream and return the whole answer."""
        for _ in self:
            pass
        return self.text


# -- the interface -------------------------------------------------------------------------------

class Backend(ABC):
    """Something that writes answers for the registry's models (see the module docstring)."""

    name = "backend"

    def __init__(self, registry: Registry, limits: Limits | None = None):
        self.registry = registry
        self.limits = limits or Limits()
        self.admission = Admission(self.limits.max_active, self.limits.max_waiting)
        self._streams: dict[int, Stream] = {}
        self._streams_lock = threading.Lock()

    # -- what subclasses implement ---------------------------------------------------------------

    @abstractmethod
    def _start(self, entry: ModelEntry, request: ChatRequest) -> Stream:
        """Launch the generation (returning at once) and feed the stream it returns."""

    @abstractmethod
    def capabilities(self) -> Capabilities:
        ...

    def unavailable(self) -> dict[str, str]:
        """Registered models this backend cannot serve now, with the reason (default: none)."""
        return {}

    def close(self) -> None:
        """Free what the backend holds (threads, connections)."""

    # -- what every caller uses ------------------------------------------------------------------

    def stream(self, request: ChatRequest) -> Stream:
        """Check the request, wait for a slot, start it; the stream frees the slot when done."""
        return self.stream_all([request])[0]

    def stream_all(self, requests: list[ChatRequest]) -> list[Stream]:
        """`stream` for several requests that belong together (Compare): every one is checked
        first, then all their slots are taken at once, or none."""
        checked = [self._checked(r) for r in requests]
        self.admission.acquire(count=len(checked))
        streams: list[Stream] = []
        try:
            for entry, request in checked:
                streams.append(self._start(entry, request))
        except BaseException:
            for s in streams:
                s.cancel()
            for _ in range(len(checked) - len(streams)):
                self.admission.release()
            for s in streams:
                self._track(s)
            raise
        for s in streams:
            self._track(s)
        return streams

    def _checked(self, request: ChatRequest) -> tuple[ModelEntry, ChatRequest]:
        entry = self.registry.get(request.model)  # refuses anything unregistered
        settings = request.settings or GenerationSettings.from_defaults(entry.generation)
        request = replace(request, settings=settings.checked())
        self.limits.check(request)
        reason = self.unavailable().get(entry.id)
        if reason:
            raise ModelUnavailableError(f"{entry.id} cannot be served right now: {reason}")
        return entry, request

    def _track(self, stream: Stream) -> None:
        with self._streams_lock:
            self._streams[stream.id] = stream
        stream.on_done(self._ended)  # frees its slot when it ends

    def stream_turn(self, model: str, message: str, history: Iterable[Any] | None = None,
                    system_prompt: str | None = None, settings: GenerationSettings | None = None,
                    owner: str | None = None) -> Stream:
        """`stream` for the app's shape: a message after a history, an optional system prompt."""
        return self.stream(ChatRequest.from_turn(model, message, history, system_prompt,
                                                 settings, owner))

    def chat(self, model: str, message: str, **kwargs: Any) -> str:
        """The whole answer at once (tests, scripts): kwargs as `stream_turn` takes."""
        return self.stream_turn(model, message, **kwargs).result()

    def _ended(self, stream: Stream) -> None:
        with self._streams_lock:
            self._streams.pop(stream.id, None)
        self.admission.release()

    def cancel(self, owner: str | None = None) -> int:
        """Cancel the running generations of `owner` (a session), or all when None."""
        with self._streams_lock:
            targets = [s for s in self._streams.values() if owner is None or s.owner == owner]
        for s in targets:
            s.cancel()
        return len(targets)

    def active(self) -> int:
        """Generations running now."""
        with self._streams_lock:
            return len(self._streams)

    def models(self) -> list[ModelEntry]:
        """The registry's models this backend can serve now."""
        missing = self.unavailable()
        return [e for e in self.registry.entries() if e.id not in missing]
