"""Models in memory: load a model folder once, keep a bounded LRU of them (the base pinned),
attach adapters to a loaded base, and give each model its decode loop (medchat.scheduler).

    cache = ModelCache(device="cpu", dtype=torch.float32, max_cached_models=2)
    base = cache.get(base_folder, pinned=True)        # never evicted
    name = cache.attach(base, "adapter:r0", adapter_dir, label="r0", trained_on="owner/base")
    base.loop.submit(job)                             # generation (see medchat.scheduler)

Nothing here makes one request wait on another model:
  * Loads take a lock per folder: loading a merged model blocks only the requests for that
    folder (and a second load of it), never the base's loop or requests for loaded models,
    which find their model under a short dictionary lock.
  * Attaching an adapter never stops the model's running generations for more than a step.
    When every layer the adapter adapts is already a LoRA layer (the base has an adapter of the
    same shape: the usual case), peft's `load_adapter` only adds the new adapter's weights
    next to the others, so it runs beside the loop: nothing routes to the new name until the
    attach returns. The first adapter, or one that adapts new layers, changes the model's
    modules: that attach runs in the model's loop between two decode steps. Loads and attaches
    beside the loops run with a short GIL switch interval, so decoding keeps its fair share of
    the interpreter while peft or from_pretrained walk their modules.
  * Adapters are loaded exactly as trained: peft's default loading, not `low_cpu_mem_usage`
    (which rounds fp32 LoRA weights through a bf16 base's dtype), so the engine's logits equal
    `PeftModel.from_pretrained`'s in every dtype.
  * Besides pinned models (the base the app serves), at most `max_cached_models` models are kept
    (merged models, other bases that adapters were trained on), least recently used evicted
    first. Eviction drops the cache's reference only: generations running on an evicted model
    finish normally, and its loop thread then ends.

Models load with safetensors only, from files inside their folder (a checkpoint index naming
files elsewhere is refused); `trust_remote_code` only when the caller says so (the engine
decides from the run's manifest and the operator's settings).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from medchat import lora_routing, template_sandbox
from medchat.adapter_support import unsupported_reason
from medchat.backend import BackendError
from medchat.chat_format import ensure_chat_template, sandbox_templates
from medchat.scheduler import GiveWay, ModelLoop, SchedulerConfig, wait_for_a_quiet_moment

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # when neither the config nor the tokenizer says
# What a tokenizer is made of (two folders with the same files have the same tokenizer).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                   "merges*", "*.model", "*.tiktoken", "chat_template*")
# Python's GIL switch interval while a load or attach runs beside the decode loops (see
# `_in_the_background`); the default is 5 ms.
BACKGROUND_SWITCH_INTERVAL = 0.0001
# Keys of LoRA weights in a saved adapter: <module path>.<one of these>.weight (or .bias)
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(?:lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B)(?:\.weight|\.bias)?$")
# ... of a plain lora.Linear's two matrices: (module path, lora_A or lora_B)
_LORA_PART = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight$")


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
    loop: ModelLoop  # batches the decode steps of every request on this model
    peft: Any = None  # the PeftModel wrapping `model` once an adapter is attached
    adapters: dict[str, AttachedAdapter] = field(default_factory=dict)  # registry id -> adapter
    pinned: bool = False
    attach_lock: threading.Lock = field(default_factory=threading.Lock)  # one attach at a time


class ModelCache:
    """Model folders loaded once on one device, at most `max_cached_models` unpinned ones."""

    def __init__(self, device: str, dtype: Any, max_cached_models: int = 2,
                 max_context: int | None = None, scheduler: SchedulerConfig | None = None):
        self.device = device
        self.dtype = dtype
        self.max_cached_models = max(0, int(max_cached_models))
        self.max_context = max_context
        self.scheduler = scheduler or SchedulerConfig()
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # LRU order
        self._lock = threading.Lock()  # the dictionaries only; never held during a load
        self._folder_locks: dict[str, threading.Lock] = {}  # one load of a folder at a time
        # (files digest, template, rendered in the template sandbox) -> tokenizer
        self._tokenizers: dict[tuple[str, str | None, bool], Any] = {}
        self._tok_loaded: dict[str, Any] = {}  # files digest -> as loaded (its own template)
        self._tok_digests: dict[tuple, str] = {}  # tokenizer files (path, mtime, size) -> digest
        self._tok_lock = threading.Lock()
        self._names = itertools.count(1)

    def get(self, folder: str | Path, *, pinned: bool = False,
            trust_remote_code: bool | Callable[[], bool] = False) -> LoadedModel:
        """The model of `folder`, loaded now if it is not in memory; `pinned` keeps it there.
        `trust_remote_code` (or a function deciding it, called only when a load is needed)."""
        key = str(Path(folder).resolve())
        loaded = self._lookup(key, pinned)
        if loaded is not None:
            return loaded
        with self._lock:
            folder_lock = self._folder_locks.setdefault(key, threading.Lock())
        with folder_lock:  # only requests for this folder wait here
            loaded = self._lookup(key, pinned)
            if loaded is not None:
                return loaded
            with _in_the_background():
                loaded = self._load(key, _decide(trust_remote_code))
            with self._lock:
                loaded.pinned = pinned
                self._models[key] = loaded
                evicted = self._evict()
        for old in evicted:
            old.loop.retire()
        return loaded

    def _lookup(self, key: str, pinned: bool) -> LoadedModel | None:
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                loaded.pinned = loaded.pinned or pinned
                self._models.move_to_end(key)
            return loaded

    def loaded(self) -> dict[str, list[str]]:
        """Folders in memory and the registry ids of the adapters attached to each."""
        with self._lock:
            models = list(self._models.items())
        return {k: sorted(m.adapters) for k, m in models}

    def models(self) -> list[LoadedModel]:
        """The models in memory (for status displays and tests)."""
        with self._lock:
            return list(self._models.values())

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
        config = check_adapter(path)
        read_ahead(sorted(path.glob("*.safetensors")))
        with loaded.attach_lock:  # attaches of one model one at a time; generations go on
            current = loaded.adapters.get(adapter_id)
            if current and current.signature == sig:
                return current.name
            name = f"a{next(self._names)}_{re.sub(r'[^0-9A-Za-z_]', '_', label or 'x')}"[:64]

            def load() -> None:
                try:
                    if loaded.peft is None:
                        from peft import PeftModel

                        loaded.peft = PeftModel.from_pretrained(
                            loaded.model, str(path), adapter_name=name, is_trainable=False)
                    elif adds_only and _add_lora_weights(loaded, path, name, self.device):
                        return  # its new modules are set for inference; nothing to route anew
                    else:
                        loaded.peft.load_adapter(str(path), adapter_name=name,
                                                 is_trainable=False)
                except (OSError, ValueError, RuntimeError, KeyError) as e:
                    raise BackendError(
                        f"{path}: the adapter does not fit the base model {loaded.key} "
                        f"({type(e).__name__}: {_first_line(e)}); was it trained on this base? "
                        f"Its manifest names {trained_on}") from e
                loaded.model.eval()
                lora_routing.install(loaded.model)

            t0 = time.perf_counter()
            adds_only = _adds_only(loaded, path, config)
            if adds_only:
                with _in_the_background():
                    load()  # beside the loop: only new entries, nothing routes to them yet
                where = "beside running generations"
            else:
                loaded.loop.call(load)  # changes modules: between two decode steps
                where = "between decode steps"
            loaded.adapters[adapter_id] = AttachedAdapter(name, sig)
            if current:  # a retrained run: drop the old weights once nothing uses them
                loaded.loop.delete_adapter_when_unused(
                    current.name, lambda old=current.name: _delete_adapter(loaded, old))
            log.info("attached %s as %s in %.2f s (%s)", adapter_id, name,
                     time.perf_counter() - t0, where)
            return name

    def tokenizer(self, folder: str | Path, template: str | None,
                  trust_remote_code: bool | Callable[[], bool] = False,
                  sandboxed: bool = False) -> Any:
        """The tokenizer of `folder` with `template` (a run's) as its chat template, cached;
        folders whose tokenizer files are identical (a merged model and its base, say) share
        one load, whatever chat template each run puts on top (a shallow copy per template,
        sharing the parsed vocabulary): loading one holds the interpreter for 0.1-0.4 s here
        (the tokenizers library and a JSON parse of tokenizer.json, neither releasing the GIL),
        which would stall every decode loop. `sandboxed`: the chat template is someone
        else's (a pulled run's): it renders in medchat.template_sandbox's worker process."""
        import copy

        from transformers import AutoTokenizer

        files = self._tokenizer_files(Path(folder))
        key = (files, template, sandboxed)
        with self._tok_lock:
            tok = self._tokenizers.get(key)
            loaded = self._tok_loaded.get(files)
        if tok is not None:
            return tok
        if loaded is None:
            remote = _decide(trust_remote_code)
            wait_for_a_quiet_moment(self.device)
            try:
                loaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=remote)
            except Exception as e:  # a pulled folder's files can make it raise anything
                raise BackendError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                                   f"{_first_line(e)})") from e
            if loaded.pad_token is None:  # as ensure_chat_template would, once for all copies
                loaded.pad_token = loaded.eos_token
            with self._tok_lock:
                loaded = self._tok_loaded.setdefault(files, loaded)
        tok = copy.copy(loaded)  # its own chat template; the vocabulary and settings shared
        ensure_chat_template(tok, template)
        if sandboxed:
            runner = template_sandbox.shared()
            runner.warm()  # a process start: its imports run beside this one
            sandbox_templates(tok, runner, folder, template)
        with self._tok_lock:
            return self._tokenizers.setdefault(key, tok)

    def _tokenizer_files(self, folder: Path) -> str:
        """A digest of the folder's tokenizer files (the folder itself when it has none)."""
        files = sorted(f for pattern in TOKENIZER_FILES for f in folder.glob(pattern)
                       if f.is_file())
        if not files:
            return str(folder)
        stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        with self._tok_lock:
            digest = self._tok_digests.get(stamp)
        if digest is None:
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + b"\0")
                h.update(f.read_bytes())
            digest = h.hexdigest()
            with self._tok_lock:
                self._tok_digests[stamp] = digest
        return digest

    def _evict(self) -> list[LoadedModel]:  # with self._lock held
        unpinned = [k for k, m in self._models.items() if not m.pinned]
        evicted = []
        while len(unpinned) > self.max_cached_models:
            key = unpinned.pop(0)
            evicted.append(self._models.pop(key))  # running generations keep their reference
            log.info("evicted %s from the model cache", key)
        return evicted

    def _load(self, folder: str, trust_remote_code: bool = False) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        check_weight_files(Path(folder))
        check_model_size(Path(folder), self.dtype, self.device, trust_remote_code)
        read_ahead(sorted(Path(folder).glob("*.safetensors")))
        wait_for_a_quiet_moment(self.device)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=self.dtype, trust_remote_code=trust_remote_code,
                use_safetensors=True)
        except Exception as e:  # a pulled folder's config can make it raise anything
            raise BackendError(f"{folder}: cannot load the model ({type(e).__name__}: "
                              f"{_first_line(e)})") from e
        model.to(self.device).eval()
        ctx = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        if self.max_context:
            ctx = min(ctx, int(self.max_context))
        log.info("loaded %s in %.1f s (%s, %s)", folder, time.perf_counter() - t0,
                 self.device, self.dtype)
        loop = ModelLoop(model, self.device, name=Path(folder).name, config=self.scheduler)
        return LoadedModel(key=folder, model=model, context=int(ctx), loop=loop)


def read_ahead(files: Iterable[Path], chunk: int = 8 << 20) -> None:
    """Read weight files once with plain reads into one small buffer, so that the pages are in
    the OS cache when the loader copies the tensors out of its memory map. Plain reads release
    the GIL; the page faults of a memory-mapped copy happen with the GIL held, and every decode
    loop of the process then waits for the disk (measured: a 2-token base request took 644 ms
    while a merged model loaded from a cold cache, 216 ms when its files were cached; 206 ms
    idle). Best effort: a file it cannot read is left to the loader to report."""
    view = memoryview(bytearray(chunk))
    for path in files:
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
        except OSError:
            continue


def check_weight_files(folder: Path) -> None:
    """Refuse a sharded checkpoint whose index names weight files outside `folder`:
    transformers joins each file name of the index's weight_map to the folder as it is, so
    '../x.safetensors' or an absolute path would load weights from anywhere on this machine
    (and a pulled repo's index is someone else's)."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BackendError(f"{index}: unreadable ({type(e).__name__}); re-save the model") \
                from e
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise BackendError(f"{index}: no weight_map; re-save the model")
        for name in sorted(set(map(str, weight_map.values()))):
            if name != Path(name).name or name in ("", ".", "..") or "\\" in name:
                raise BackendError(f"{index}: names the weight file {name!r:.120}, which is not "
                                   "a file of the model's own folder; only weights inside it "
                                   "are loaded")


def check_model_size(folder: Path, dtype: Any, device: str = "cpu",
                     trust_remote_code: bool = False) -> int:
    """Refuse, before anything is allocated, a model whose config.json describes more
    parameters than its weight files hold (the rest would be random weights, and a pulled
    repo's few-kB config can describe a model that fills this machine's memory: the server
    would be killed for it) or more than the device has free. The model is built on the meta
    device (no memory; ~30 ms for SmolLM2-135M) to count its parameters; the files' tensor
    sizes come from their headers. Returns the parameter count."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        params = sum(p.numel() for p in model.parameters())
    except Exception as e:  # a pulled folder's config can make it raise anything
        raise BackendError(f"{folder}: cannot load the model ({type(e).__name__}: "
                           f"{_first_line(e)})") from e
    held = 0
    try:
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    held += math.prod(f.get_slice(key).get_shape())
    except Exception as e:  # noqa: BLE001 - a broken file: the loader reports it
        log.debug("%s: tensor sizes unread (%s)", folder, e)
        held = None
    quantized = getattr(config, "quantization_config", None) is not None  # packed: fewer
    if held is not None and not quantized and held < params * 0.99:
        raise BackendError(f"{folder}: cannot load the model: its config.json describes "
                           f"{params:,} parameters but its weight files hold {held:,}; "
                           "re-save the model (config and weights together)")
    need = params * torch.empty((), dtype=dtype).element_size()
    free = _free_memory(device)
    if free is not None and need > free:
        raise BackendError(f"{folder}: cannot load the model: it needs {need / 2**30:.1f} GiB "
                           f"and {device} has {free / 2**30:.1f} GiB free; free memory (fewer "
                           "cached models: --max-cached-models) or use a smaller model")
    return params


def _free_memory(device: str) -> int | None:
    """Bytes free on `device` for a new model (None: unknown)."""
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - unknown: do not refuse on a guess
        return None


def check_adapter(path: Path) -> dict[str, Any]:
    """The adapter's config; adapters that cannot be routed per request are refused (the list
    shared with merge: medchat.adapter_support)."""
    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BackendError(f"{cfg_path}: unreadable ({e}); re-save the adapter") from e
    reason = unsupported_reason(cfg)
    if reason:
        raise BackendError(f"{cfg_path}: {reason}. This adapter cannot be served beside others; "
                           "merge it with peft's merge_and_unload() and serve the merged model")
    return cfg


def _adds_only(loaded: LoadedModel, path: Path, config: dict[str, Any]) -> bool:
    """Whether attaching only adds weights to existing LoRA layers (no module is replaced):
    every module the adapter's weights adapt is already a LoRA layer of the model."""
    if loaded.peft is None or config.get("modules_to_save") or \
            config.get("trainable_token_indices"):
        return False
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    keys: list[str] = []
    try:
        for weights in sorted(path.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as f:
                keys += list(f.keys())
    except (OSError, ValueError, RuntimeError):
        return False  # let peft's own loading report it
    modules = set()
    for key in keys:
        match = _LORA_KEY.match(key)
        if not match:
            return False
        modules.add(match.group(1))
    for name in modules:
        try:
            module = loaded.model.get_submodule(name)
        except AttributeError:
            return False
        if not isinstance(module, LoraLayer):
            return False
    return bool(modules)


def _add_lora_weights(loaded: LoadedModel, path: Path, name: str,
                      device: str = "cpu") -> bool:
    """Attach the adapter in `path` as `name` to LoRA layers the model already has, layer by
    layer with peft's own `update_layer`, the weights copied in as peft's loader copies them.
    peft's `load_adapter` walks every module of the model several times (target matching,
    trainability, dtype casts: ~0.5 s of Python for SmolLM2's 210 layers, growing with each
    adapter attached), and all that time the decode loops of the process share the interpreter
    with it; this does the same work in a fraction of it (the whole attach measured 0.46 ->
    0.13-0.36 s, bench/stall.py). False, with nothing changed,
    when this peft or this adapter needs peft's full loading (rank or alpha patterns, biases,
    layers that are not plain lora.Linear)."""
    import dataclasses
    import inspect

    import torch
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from safetensors.torch import load_file

    if "config" not in inspect.signature(LoraLinear.update_layer).parameters:
        return False  # an older peft: its own loader
    try:
        config = LoraConfig.from_pretrained(str(path))
        weights: dict[str, Any] = {}
        for file in sorted(path.glob("*.safetensors")):
            weights.update(load_file(str(file)))
    except (OSError, ValueError, TypeError):
        return False  # peft's loader reports it
    if (config.rank_pattern or config.alpha_pattern or config.use_dora or config.lora_bias
            or config.modules_to_save or getattr(config, "layer_replication", None)):
        return False
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        match = _LORA_PART.match(key)
        if not match:
            return False
        parts.setdefault(match.group(1), {})[match.group(2)] = tensor
    layers = []
    for module_name, found in parts.items():
        try:
            layer = loaded.model.get_submodule(module_name)
        except AttributeError:
            return False
        a, b = found.get("lora_A"), found.get("lora_B")
        if (type(layer) is not LoraLinear or len(found) != 2 or a is None or b is None
                or tuple(a.shape) != (config.r, layer.in_features)
                or tuple(b.shape) != (layer.out_features, config.r) or not layer.lora_A):
            return False  # peft's loader explains what does not fit
        layers.append((layer, a, b))
    settings = dataclasses.replace(config, init_lora_weights=False, inference_mode=True)
    give_way = GiveWay(device)
    give_way.start()  # a short request in flight goes first
    done = []
    try:  # beside the loops: only new entries, nothing routes to them yet
        for layer, a, b in layers:
            give_way.between()  # and one that arrives meanwhile (a layer: well under 1 ms)
            # the dtype peft's loader gave the adapters already here (it keeps LoRA weights in
            # float32 beside a bf16 base: rounding them through bf16 would serve another adapter)
            dtype = next(iter(layer.lora_A.values())).weight.dtype
            layer.update_layer(name, config.r, config.lora_alpha, config=settings)
            done.append(layer)
            for modules, tensor in ((layer.lora_A, a), (layer.lora_B, b)):
                weight = modules[name].to(dtype).weight
                with torch.no_grad():
                    weight.copy_(tensor)
                weight.requires_grad_(False)
            for modules in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                modules[name].eval()
    except Exception:
        for layer in done:  # take it out again
            layer.delete_adapter(name)
        raise
    loaded.peft.peft_config[name] = config
    return True


def _delete_adapter(loaded: LoadedModel, name: str) -> bool:
    """Delete an adapter's weights (in the model's loop, once nothing routes to it); False
    while an attach is changing the same modules."""
    if not loaded.attach_lock.acquire(blocking=False):
        return False
    try:
        loaded.peft.delete_adapter(name)
        log.info("deleted the old weights %s", name)
        return True
    finally:
        loaded.attach_lock.release()


_background = 0  # loads and attaches running now
_background_lock = threading.Lock()
_saved_interval = 0.005


@contextmanager
def _in_the_background() -> Iterator[None]:
    """A shorter GIL switch interval while Python-heavy model work (peft walking every module,
    from_pretrained building one) runs beside the decode loops: with the default 5 ms, each
    small torch operation of a loop's forward pass can wait up to 5 ms for the interpreter to
    come back, and decoding slows several-fold (measured: to a standstill during an attach)
    instead of sharing the interpreter."""
    global _background, _saved_interval
    with _background_lock:
        if _background == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, BACKGROUND_SWITCH_INTERVAL))
        _background += 1
    try:
        yield
    finally:
        with _background_lock:
            _background -= 1
            if _background == 0:
                sys.setswitchinterval(_saved_interval)


def _decide(flag: bool | Callable[[], bool]) -> bool:
    return bool(flag() if callable(flag) else flag)


def _weights_signature(folder: Path) -> tuple:
    weights = sorted(folder.glob("*.safetensors"))
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in weights)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""
