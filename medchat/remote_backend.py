"""A backend that hands generation to an OpenAI-compatible server: vLLM (multi-LoRA, continuous
batching, tensor parallel), llama.cpp's `llama-server`, or another medchat.

    backend = RemoteBackend(registry, "http://127.0.0.1:8000", dialect="vllm")
    for problem in backend.connect():       # what cannot be served, and why
        print(problem)
    backend.chat("adapter:smollm2-medqa", "What is metformin for?")

    medchat app --backend openai --backend-url http://127.0.0.1:8000 --dialect vllm

The registry stays the only list a request may select from: a registry id is mapped to the
server's name for it by the dialect (vLLM: the base is `base`, `adapter:<run>` the LoRA module
`<run>`, as `medchat vllm-command` starts it; medchat: the same ids). At `connect()`:

  * the server's models are listed; a vLLM adapter it lacks is loaded at runtime
    (`/v1/load_lora_adapter`, the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the
    adapter's folder on its own disk);
  * each model's chat template is checked token for token: the server renders a probe
    conversation (`POST /tokenize` with `messages`, `add_generation_prompt`), and medchat renders
    it as the run's manifest says (medchat.chat_format.prompt_ids with the run's template); a
    model whose prompts differ is refused, with where they differ;
  * an unreachable server, a missing adapter or a refused template makes that model unavailable
    (`Backend.unavailable()`, with the reason) and the app serves the others. Models the server
    cannot hold (vLLM: merged models, adapters of another base) go to the `local` backend (the
    in-process engine) when one is given.

Every sampling setting is sent explicitly (servers differ in their defaults: llama-server
applies a repetition penalty of 1.1, top-k 40 and min-p 0.05 unless told otherwise), the answer
arrives as server-sent events, and `cancel()` closes the connection, which stops the server's
generation.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from medchat import template_sandbox
from medchat.backend import (Backend, BackendError, Capabilities, ChatRequest,
                             GenerationSettings, Limits, ModelUnavailableError, Stream)
from medchat.base_model import BaseModelError, resolve_ref
from medchat.chat_format import (ensure_chat_template, prompt_ids, render,
                                  sandbox_templates, stop_token_ids)
from medchat.registry import ModelEntry, Registry
from medchat.vllm import BASE_SERVED_NAME

__all__ = ["DIALECTS", "Dialect", "RemoteBackend", "entry_tokenizer", "reference_prompt_ids"]

log = logging.getLogger(__name__)

# The conversation both sides render at start-up to compare chat templates (system prompt,
# one earlier exchange, a new question: every part of the template a request uses).
PROBE = [{"role": "user", "content": "What is metformin used for?"},
         {"role": "assistant", "content": "It lowers blood sugar in type 2 diabetes."},
         {"role": "user", "content": "Should I take it with food?"}]


# -- the run's own rendering ---------------------------------------------------------------------

def tokenizer_folder(registry: Registry, entry: ModelEntry) -> Path:
    """The folder whose tokenizer the in-process engine uses for `entry`."""
    if entry.kind == "merged":
        return Path(entry.path)
    if entry.kind == "base" or registry.same_base(entry.base):
        if registry.base_path is None:
            raise BackendError("the base model has no folder; resolve it first")
        return registry.base_path
    try:
        return resolve_ref(entry.base, progress=False).path
    except BaseModelError as e:
        raise BackendError(str(e)) from e


@lru_cache(maxsize=32)
def _tokenizer(folder: str, template: str | None, sandboxed: bool = False):
    # transformers is imported in functions: importing this module stays cheap
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # a pulled folder's files can make it raise anything
        first = str(e).splitlines()[0] if str(e) else ""
        raise BackendError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                           f"{first})") from e
    ensure_chat_template(tok, template)
    if sandboxed:  # a pulled run's template: rendered in the sandbox's worker process
        sandbox_templates(tok, template_sandbox.shared(), folder, template)
    return tok


def entry_tokenizer(registry: Registry, entry: ModelEntry):
    """The tokenizer, with the run's chat template, that `entry`'s prompts are rendered with."""
    return _tokenizer(str(tokenizer_folder(registry, entry)), entry.chat_template,
                      bool(entry.source))


def with_system(entry: ModelEntry, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` with the model's own system prompt first when they bring none (as the
    in-process engine renders them)."""
    if messages and messages[0]["role"] == "system" and messages[0]["content"].strip():
        return messages
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": entry.system_prompt}] + rest


def reference_prompt_ids(registry: Registry, entry: ModelEntry,
                         messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids the run's manifest gives `messages` (system prompt included)."""
    return prompt_ids(entry_tokenizer(registry, entry), with_system(entry, messages))


# -- dialects ------------------------------------------------------------------------------------

def _vllm_name(registry: Registry, entry: ModelEntry) -> str | None:
    if entry.kind == "base":
        return BASE_SERVED_NAME
    if entry.kind == "adapter" and registry.same_base(entry.base):
        return entry.run
    return None  # merged models and adapters of other bases are not on a vLLM server


def _same_id(registry: Registry, entry: ModelEntry) -> str | None:
    return entry.id


def _vllm_sampling(s: GenerationSettings, props: dict) -> dict:
    return {"repetition_penalty": s.repetition_penalty, "top_k": 0, "min_p": 0.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "skip_special_tokens": True,
            "include_stop_str_in_output": False}


def _llama_sampling(s: GenerationSettings, props: dict) -> dict:
    # llama-server's own defaults (repeat_penalty 1.1 over the last 64 tokens, top_k 40,
    # min_p 0.05, or what the GGUF's sampling fields say) would change every answer: set each
    # one to what medchat means. The penalty covers the whole sequence, as transformers'
    # does: the server's context (/props), since it takes no -1 for "all" (400 since 2025).
    out = {"repeat_penalty": s.repetition_penalty, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
           "presence_penalty": 0.0, "frequency_penalty": 0.0}
    if props.get("n_ctx"):
        out["repeat_last_n"] = int(props["n_ctx"])
    return out


def _llama_props(data: Any) -> dict:
    """What medchat needs from llama-server's /props: the context of a slot."""
    settings = data.get("default_generation_settings") if isinstance(data, dict) else None
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return {"n_ctx": n_ctx} if isinstance(n_ctx, int) and n_ctx > 0 else {}


def _medchat_sampling(s: GenerationSettings, props: dict) -> dict:
    return {"repetition_penalty": s.repetition_penalty}


@dataclass(frozen=True)
class Dialect:
    """Where OpenAI-compatible servers differ."""

    name: str
    served_name: Callable[[Registry, ModelEntry], str | None]  # None: not on this server
    sampling: Callable[[GenerationSettings, dict], dict]  # settings beyond OpenAI's fields,
    # given what `props` read from the server
    tokenize_path: str | None  # renders + tokenizes `messages` (vLLM's /tokenize shape)
    template_path: str | None  # renders `messages` to text (llama-server's /apply-template)
    load_adapter_path: str | None  # runtime LoRA loading
    stop_token_ids: bool  # takes `stop_token_ids` (the manifest's end-of-turn tokens)
    capabilities: Capabilities
    props: tuple[str, Callable[[Any], dict]] | None = None  # (GET path, what to keep of it)


DIALECTS = {
    "vllm": Dialect("vllm", _vllm_name, _vllm_sampling, "/tokenize", None,
                    "/v1/load_lora_adapter", True,
                    Capabilities(seeded_sampling=True, runtime_adapter_loading=True,
                                 batched_decoding=True, token_counts=True)),
    "llama-server": Dialect("llama-server", _vllm_name, _llama_sampling, None,
                            "/apply-template", None, False,
                            Capabilities(seeded_sampling=True, runtime_adapter_loading=False,
                                         batched_decoding=True, token_counts=True),
                            props=("/props", _llama_props)),
    "medchat": Dialect("medchat", _same_id, _medchat_sampling, "/tokenize", None, None, False,
                       Capabilities(seeded_sampling=True, runtime_adapter_loading=False,
                                    batched_decoding=True, token_counts=True)),
}


# -- the backend ---------------------------------------------------------------------------------

@dataclass
class _Served:
    name: str  # the server's model name
    stop_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)


class RemoteBackend(Backend):
    """Generation by an OpenAI-compatible server (see the module docstring)."""

    name = "openai"

    def __init__(self, registry: Registry, url: str, dialect: str = "vllm",
                 api_key: str | None = None, limits: Limits | None = None,
                 local: Backend | None = None, timeout: float = 10.0,
                 check_templates: bool = True):
        super().__init__(registry, limits)
        if dialect not in DIALECTS:
            raise BackendError(f"dialect {dialect!r}: expected one of {', '.join(DIALECTS)}")
        import httpx  # gradio's dependency; imported here like the other heavy libraries

        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.dialect = DIALECTS[dialect]
        self.local = local
        self.check_templates = check_templates
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        pool = httpx.Limits(max_connections=self.limits.max_active + 8,
                            max_keepalive_connections=self.limits.max_active + 8)
        self._http = httpx.Client(headers=headers, limits=pool, timeout=httpx.Timeout(
            timeout, read=None))  # an answer may take long to start: no read timeout
        self._served: dict[str, _Served] = {}
        self._props: dict = {}  # what the dialect reads from the server (llama-server: n_ctx)
        self._local_ids: set[str] = set()
        self._unavailable: dict[str, str] = {}
        self._lock = threading.Lock()
        self.connected = False

    # -- start-up checks -------------------------------------------------------------------------

    def connect(self) -> list[str]:
        """List the server's models, load missing adapters, check every chat template.
        Returns one line per model that cannot be served (also in `unavailable()`)."""
        served: dict[str, _Served] = {}
        local: set[str] = set()
        missing: dict[str, str] = {}
        try:
            names = self._server_models()
            self.connected = True
            if self.dialect.props:
                path, keep = self.dialect.props
                try:
                    self._props = keep(self._get(path))
                except BackendError as e:  # answers go on with the server's own defaults
                    log.warning("%s: %s; its defaults apply", path, e)
                else:
                    if not self._props:
                        log.warning("%s%s: no context size; llama-server's repeat_last_n "
                                    "default applies", self.url, path)
        except BackendError as e:
            names = None
            self.connected = False
            log.warning("%s", e)
            reason = str(e)
        for entry in self.registry.entries():
            name = self.dialect.served_name(self.registry, entry)
            if name is None:
                if self.local is not None:
                    local.add(entry.id)
                else:
                    what = ("a merged model" if entry.kind == "merged"
                            else "a model of another base")
                    missing[entry.id] = (f"a {self.dialect.name} server holds one base and its "
                                         f"adapters, not {what}; serve it in-process")
                continue
            if names is None:
                missing[entry.id] = reason
                continue
            try:
                if name not in names:
                    self._load_adapter(entry, name)
                info = _Served(name)
                if self.check_templates:
                    self._check_template(entry, name)
                if self.dialect.stop_token_ids:
                    tok = entry_tokenizer(self.registry, entry)
                    info.stop_ids, info.stop_strings = stop_token_ids(tok, entry.stop_tokens)
                served[entry.id] = info
            except (BackendError, OSError, ValueError) as e:
                missing[entry.id] = str(e)
        with self._lock:
            self._served, self._local_ids, self._unavailable = served, local, missing
        problems = [f"{model_id}: {why}" for model_id, why in missing.items()]
        for p in problems:
            log.warning("not served: %s", p)
        return problems

    def preload(self, ids=None) -> list[str]:
        """Check again (a refresh found new runs, or the server came back)."""
        return self.connect()

    def _get(self, path: str) -> Any:
        return self._call("GET", path)

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        import httpx

        try:
            r = self._http.request(method, self.url + path, json=body)
        except httpx.HTTPError as e:
            raise BackendError(f"the {self.dialect.name} server at {self.url} is unreachable "
                               f"({type(e).__name__}: {e}); start it (medchat vllm-command "
                               "--run) or check --backend-url") from None
        if r.status_code >= 400:
            raise BackendError(f"{self.url}{path} answered {r.status_code}: "
                               f"{_error_text(r.text)}")
        try:
            return r.json()
        except ValueError:
            return r.text

    def _server_models(self) -> set[str]:
        data = self._get("/v1/models")
        try:
            return {m["id"] for m in data["data"]}
        except (TypeError, KeyError) as e:
            raise BackendError(f"{self.url}/v1/models: not an OpenAI model list ({e})") from None

    def _load_adapter(self, entry: ModelEntry, name: str) -> None:
        if entry.kind != "adapter" or self.dialect.load_adapter_path is None:
            raise BackendError(f"the server at {self.url} does not serve {name!r}; "
                               + ("start it with `medchat vllm-command --run`" if
                                  self.dialect.name == "vllm" else "add it to its models"))
        try:
            self._call("POST", self.dialect.load_adapter_path,
                       {"lora_name": name, "lora_path": str(entry.path)})
        except BackendError as e:
            raise BackendError(f"adapter {name!r} is not on the server and loading it failed: "
                               f"{e} (the server needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                               "and the adapter folder on its disk)") from None
        log.info("loaded adapter %s into %s", name, self.url)

    def _check_template(self, entry: ModelEntry, name: str) -> None:
        messages = with_system(entry, PROBE)
        tok = entry_tokenizer(self.registry, entry)
        if self.dialect.tokenize_path:
            got = self._call("POST", self.dialect.tokenize_path,
                             {"model": name, "messages": messages,
                              "add_generation_prompt": True, "add_special_tokens": False})
            theirs = got.get("tokens") if isinstance(got, dict) else None
            ours = prompt_ids(tok, messages)
            if not isinstance(theirs, list):
                raise BackendError(f"{self.url}{self.dialect.tokenize_path}: no tokens")
            if theirs != ours:
                at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                          min(len(theirs), len(ours)))
                raise BackendError(
                    f"the server renders {name!r}'s prompts differently from the run's "
                    f"manifest: {len(theirs)} vs {len(ours)} tokens, first difference at token "
                    f"{at} (server {tok.decode(theirs[at:at + 8])!r}, run "
                    f"{tok.decode(ours[at:at + 8])!r}); start the server with the run's chat "
                    "template (vLLM: --chat-template)")
        elif self.dialect.template_path:
            got = self._call("POST", self.dialect.template_path, {"messages": messages})
            theirs = got.get("prompt") if isinstance(got, dict) else None
            ours = render(tok, messages, generation_prompt=True)
            if theirs != ours:
                raise BackendError(f"the server renders {name!r}'s prompts differently from the "
                                   "run's manifest; start it with the run's chat template")

    # -- the Backend interface -------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self.dialect.capabilities

    def unavailable(self) -> dict[str, str]:
        with self._lock:
            if not self.connected and not self._unavailable and not self._local_ids:
                return {e.id: f"not connected to {self.url} yet"
                        for e in self.registry.entries()}
            known = set(self._served) | self._local_ids | set(self._unavailable)
            out = dict(self._unavailable)
        for e in self.registry.entries():  # registered after the last check: refresh first
            if e.id not in known:
                out[e.id] = "registered after the server was checked; refresh the model list"
        return out

    def close(self) -> None:
        self._http.close()

    def _start(self, entry: ModelEntry, request: ChatRequest) -> Stream:
        with self._lock:
            served = self._served.get(entry.id)
            local = entry.id in self._local_ids
        if served is None:
            if local and self.local is not None:
                return self.local._start(entry, request)  # the slot is this backend's
            raise ModelUnavailableError(f"{entry.id} is not served by {self.url}")
        settings = request.settings
        if settings.temperature > 0 and settings.seed is None:  # reported back like in-process
            settings = replace(settings, seed=random.SystemRandom().randrange(2**31))
        system, history, message = request.parts()
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        messages = with_system(entry, messages + history + [{"role": "user",
                                                             "content": message}])
        body = {"model": served.name, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "n": 1,
                **self.dialect.sampling(settings, self._props)}
        if settings.temperature > 0:
            body["seed"] = settings.seed
        stop = list(dict.fromkeys(list(settings.stop) + served.stop_strings))
        if stop:
            body["stop"] = stop
        if served.stop_ids:
            body["stop_token_ids"] = served.stop_ids
        stream = Stream(entry.id, settings, request.owner)
        threading.Thread(target=self._pump, args=(stream, body), daemon=True,
                         name=f"medchat-remote-{stream.id}").start()
        return stream

    def _pump(self, stream: Stream, body: dict) -> None:
        """Read the server's events into `stream`; cancelling closes the connection."""
        import httpx

        finish = "stop"
        closer: list[Callable[[], None]] = []

        def watch() -> None:  # closes the connection as soon as the stream is cancelled
            # (the wait returns at once on cancel; its timeout only notices a finished stream,
            # rarely, so that the thread does not wake the CPU for every token)
            while not stream.done.is_set():
                if stream.cancel_event.wait(1.0):
                    for close in closer:
                        close()
                    return

        threading.Thread(target=watch, daemon=True).start()
        try:
            with self._http.stream("POST", self.url + "/v1/chat/completions",
                                   json=body) as r:
                closer.append(r.close)
                if r.status_code >= 400:
                    r.read()
                    raise BackendError(f"the server refused the request ({r.status_code}): "
                                       f"{_error_text(r.text)}")
                for line in r.iter_lines():
                    if stream.cancelled:
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise BackendError(f"the server failed: {_error_text(data)}")
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            stream.put(piece)
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
                    usage = event.get("usage")
                    if usage:
                        stream.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        stream.new_tokens = int(usage.get("completion_tokens") or 0)
            stream.finish("cancelled" if stream.cancelled else finish)
        except (httpx.HTTPError, OSError, RuntimeError) as e:
            if stream.cancelled:
                stream.finish("cancelled")
            elif isinstance(e, BackendError):
                stream.fail(e)
            else:
                stream.fail(BackendError(f"the connection to {self.url} failed: "
                                         f"{type(e).__name__}: {e}"))
        except Exception as e:  # malformed events: report, never leave the stream open
            stream.fail(BackendError(f"unexpected answer from {self.url}: "
                                     f"{type(e).__name__}: {e}"))


def _error_text(text: str) -> str:
    """The message of an OpenAI-shaped error body, else the body's start."""
    try:
        data = json.loads(text)
        err = data.get("error", data)
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or data.get("detail") or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]
