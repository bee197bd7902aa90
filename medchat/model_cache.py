"""Models in memory: load a model folder once, keep a bounded LRU of them (the base pinned),
attach adapters to a loaded base, and guard each model with a shared/exclusive lock.

    cache = ModelCache(device="cpu", dtype=torch.float32, max_cached_models=2)
    base = cache.get(base_folder, pinned=True)        # never evicted
    name = cache.attach(base, "adapter:r0", adapter_dir, label="r0", trained_on="owner/base")
    with base.lock.shared():                          # generations, many at once
        base.model.generate(...)

  * Attaching an adapter changes the model's modules, so it takes the model's lock exclusively;
    generations hold it shared. Adapters are attached once and stay attached (switching between
    them is then free, see medchat.lora_routing); a changed adapter (retrained run) is loaded
    again under a new name and the old one deleted.
  * Besides pinned models (the base the app serves), at most `max_cached_models` models are kept
    (merged models, other bases that adapters were trained on), least recently used evicted
    first. Eviction drops the cache's reference only: a generation still running on an evicted
    model finishes normally.

Models load with `trust_remote_code=False` and safetensors only.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medchat import lora_routing
from medchat.chat_format import ensure_chat_template
from medchat.backend import BackendError

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer says


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda when available, else cpu; anything else as given."""
    # torch is imported in functions: importing the chat modules must stay cheap.
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: Any, device: str) -> Any:
    """'auto' -> bfloat16 on a GPU that has it, float16 on other GPUs, float32 on a CPU; a name
    ('float32') -> the torch dtype; a torch dtype as it is."""
    import torch

    if dtype == "auto":
        dtype = ("bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported()
                 else "float16" if device.startswith("cuda") else "float32")
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class SharedLock:
    """Many holders at once (`shared`: generations) or one (`exclusive`: attaching an adapter).
    Waiting exclusive holders go first so an attach is not starved by a stream of requests."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
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
    def exclusive(self) -> Iterator[None]:
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


@dataclass(frozen=True)
class AttachedAdapter:
    name: str  # the adapter's name inside the PeftModel (what lora_routing routes to)
    signature: tuple  # (file, mtime, size) of its weights: a changed adapter is loaded again


@dataclass
class LoadedModel:
    """One model in memory (a base, maybe with adapters attached, or a merged model)."""

    key: str  # resolved folder
    model: Any
    context: int  # prompt + answer tokens it can take
    lock: SharedLock = field(default_factory=SharedLock)
    peft: Any = None  # the PeftModel wrapping `model` once an adapter is attached
    adapters: dict[str, AttachedAdapter] = field(default_factory=dict)  # registry id -> adapter
    pinned: bool = False


class ModelCache:
    """Model folders loaded once on one device, at most `max_cached_models` unpinned ones."""

    def __init__(self, device: str, dtype: Any, max_cached_models: int = 2,
                 max_context: int | None = None):
        self.device = device
        self.dtype = dtype
        self.max_cached_models = max(0, int(max_cached_models))
        self.max_context = max_context
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # LRU order
        self._load_lock = threading.RLock()  # one model load at a time (memory, no duplicates)
        self._tokenizers: dict[tuple[str, str | None], Any] = {}
        self._tok_lock = threading.Lock()
        self._names = itertools.count(1)

    def get(self, folder: str | Path, *, pinned: bool = False) -> LoadedModel:
        """The model of `folder`, loaded now if it is not in memory; `pinned` keeps it there."""
        key = str(Path(folder).resolve())
        with self._load_lock:
            loaded = self._models.get(key)
            if loaded is None:
                loaded = self._load(key)
                self._models[key] = loaded
            loaded.pinned = loaded.pinned or pinned
            self._models.move_to_end(key)
            self._evict()
        return loaded

    def loaded(self) -> dict[str, list[str]]:
        """Folders in memory and the registry ids of the adapters attached to each."""
        return {k: sorted(m.adapters) for k, m in list(self._models.items())}

    def attach(self, loaded: LoadedModel, adapter_id: str, adapter_dir: str | Path, *,
               label: str, trained_on: str) -> str:
        """Attach an adapter to a loaded base (once; again only if its files changed) and
        return its name for lora_routing. `label` goes into that name, `trained_on` (the base
        its manifest names) into the error when it does not fit."""
        path = Path(adapter_dir)
        sig = _weights_signature(path)
        current = loaded.adapters.get(adapter_id)
        if current and current.signature == sig:
            return current.name
        check_adapter(path)
        with loaded.lock.exclusive():
            current = loaded.adapters.get(adapter_id)
            if current and current.signature == sig:
                return current.name
            name = f"a{next(self._names)}_{re.sub(r'[^0-9A-Za-z_]', '_', label or 'x')}"[:64]
            try:
                if loaded.peft is None:
                    from peft import PeftModel

                    # low_cpu_mem_usage: no random init of LoRA weights about to be overwritten
                    loaded.peft = PeftModel.from_pretrained(
                        loaded.model, str(path), adapter_name=name, is_trainable=False,
                        low_cpu_mem_usage=True)
                else:
                    loaded.peft.load_adapter(str(path), adapter_name=name, is_trainable=False,
                                             low_cpu_mem_usage=True)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise BackendError(
                    f"{path}: the adapter does not fit the base model {loaded.key} "
                    f"({type(e).__name__}: {_first_line(e)}); was it trained on this base? Its "
                    f"manifest names {trained_on}") from e
            if current:  # a retrained run: drop the old weights
                loaded.peft.delete_adapter(current.name)
            loaded.model.eval()
            lora_routing.install(loaded.model)
            loaded.adapters[adapter_id] = AttachedAdapter(name, sig)
            log.info("attached %s as %s", adapter_id, name)
            return name

    def tokenizer(self, folder: str | Path, template: str | None) -> Any:
        """The tokenizer of `folder` with `template` (a run's) as its chat template, cached."""
        from transformers import AutoTokenizer

        key = (str(folder), template)
        with self._tok_lock:
            tok = self._tokenizers.get(key)
            if tok is None:
                tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
                ensure_chat_template(tok, template)
                self._tokenizers[key] = tok
        return tok

    def _evict(self) -> None:
        unpinned = [k for k, m in self._models.items() if not m.pinned]
        while len(unpinned) > self.max_cached_models:
            key = unpinned.pop(0)
            del self._models[key]  # running generations keep their own reference
            log.info("evicted %s from the model cache", key)

    def _load(self, folder: str) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=self.dtype, trust_remote_code=False, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise BackendError(f"{folder}: cannot load the model ({type(e).__name__}: "
                              f"{_first_line(e)})") from e
        model.to(self.device).eval()
        ctx = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        if self.max_context:
            ctx = min(ctx, int(self.max_context))
        log.info("loaded %s in %.1f s (%s, %s)", folder, time.perf_counter() - t0,
                 self.device, self.dtype)
        return LoadedModel(key=folder, model=model, context=int(ctx))


def check_adapter(path: Path) -> None:
    """Refuse adapters that cannot be routed per request (see lora_routing.unsupported_reason)."""
    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BackendError(f"{cfg_path}: unreadable ({e}); re-save the adapter") from e
    reason = lora_routing.unsupported_reason(cfg if isinstance(cfg, dict) else {})
    if reason:
        raise BackendError(f"{cfg_path}: {reason}")


def _weights_signature(folder: Path) -> tuple:
    weights = sorted(folder.glob("*.safetensors"))
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in weights)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""
