"""Per-thread LoRA routing: many adapters attached to one base, each forward pass using the
adapter its own thread asked for.

    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="a1")
    model.load_adapter(other_dir, adapter_name="a2")
    lora_routing.install(model)            # once after attaching (again after attaching more)
    with lora_routing.use_adapter("a1"):   # this thread's forward passes use a1
        model.generate(...)
    with lora_routing.use_adapter(None):   # the base alone
        model.generate(...)

Why not peft's own switches: `set_adapter` changes state shared by every thread, and peft's
mixed-batch inference (`adapter_names=[...]`) injects its argument with forward hooks that
`PeftModel.generate` adds and removes around each call on the shared modules, so two threads
generating at once would overwrite each other's routing. Here routing is installed once per
LoRA layer and reads the adapter name from a thread-local that `use_adapter` sets.

Each thread runs one sequence, so a layer applies one adapter (or none) per call. For peft's
plain `lora.Linear` (what training produces) the routed forward is peft's single-adapter
formula, base(x) + B(A(dropout(x))) * scaling; peft's mixed-batch path (which gathers and
scatters sub-batches) measured ~15% slower decoding at batch size 1. Other LoRA layer types
(embeddings, convolutions) and `modules_to_save` wrappers take peft's mixed-batch path through
a forward pre-hook that passes this thread's adapter name.

Only LoRA without a variant (DoRA & co.) is routed; `unsupported_reason` says what is refused.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in mixed-batch inference

_route = threading.local()  # .adapter: the adapter name the forward passes of this thread use
_installed: "weakref.WeakSet[Any]" = weakref.WeakSet()  # modules already routed


def active_adapter() -> str | None:
    """The adapter this thread's forward passes use (None: the base)."""
    return getattr(_route, "adapter", None)


@contextmanager
def use_adapter(name: str | None) -> Iterator[None]:
    """Within the block, forward passes on this thread use adapter `name` (None: none)."""
    previous = active_adapter()
    _route.adapter = name
    try:
        yield
    finally:
        _route.adapter = previous


def install(model: Any) -> int:
    """Route every LoRA layer of `model` (a PeftModel or the model peft injected layers into)
    by thread. Layers already routed are left alone, so call it again after attaching another
    adapter. Returns how many layers were newly routed."""
    # peft is imported in functions: this module is imported by the app before any model loads.
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper

    count = 0
    for module in model.modules():
        if module in _installed:
            continue
        if type(module) is LoraLinear:
            module.forward = _routed_linear(module)  # instance attribute: shadows the class's
        elif isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            module.register_forward_pre_hook(_route_hook, with_kwargs=True)
        else:
            continue
        _installed.add(module)
        count += 1
    return count


def unsupported_reason(adapter_config: dict[str, Any]) -> str | None:
    """Why an adapter (its adapter_config.json) cannot be routed per request, or None."""
    kind = str(adapter_config.get("peft_type", "")).upper()
    if kind != "LORA":
        return (f"peft_type {kind or '?'}; only LoRA adapters can be served side by side "
                "(merge it with `medchat merge` and chat with the merged model)")
    if adapter_config.get("use_dora"):
        return ("DoRA adapters cannot be routed per request; merge it (`medchat merge`) and "
                "chat with the merged model")
    return None


def _route_hook(module, args, kwargs):
    """Forward pre-hook for LoRA layers other than lora.Linear: peft's mixed-batch path,
    with this thread's adapter for every row."""
    batch = args[0].shape[0] if args and hasattr(args[0], "shape") else 1
    kwargs["adapter_names"] = [active_adapter() or BASE_ADAPTER] * batch
    return args, kwargs


def _routed_linear(layer):
    """A forward for one peft lora.Linear that applies this thread's adapter (or none)."""
    peft_forward = layer.forward  # the class's own, bound

    def forward(x, *args, **kwargs):
        kwargs.pop("adapter_names", None)
        name = active_adapter()
        if name is None or name not in layer.lora_A:  # the base, or not adapted in this layer
            return layer.base_layer(x, *args, **kwargs)
        if name in layer.lora_variant:  # DoRA & co. (refused before attaching): peft's path
            return peft_forward(x, *args, adapter_names=[name] * x.shape[0], **kwargs)
        # peft's vanilla LoRA formula for one active adapter (lora.Linear.forward)
        result = layer.base_layer(x, *args, **kwargs)
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if x.dtype != lora_a.weight.dtype:  # LoRA weights may be kept in another dtype
            x = x.to(lora_a.weight.dtype)
        out = result + lora_b(lora_a(layer.lora_dropout[name](x))) * layer.scaling[name]
        return out.to(result.dtype)

    return forward
