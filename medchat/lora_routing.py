"""LoRA routing: many adapters attached to one base, each forward pass using the adapters its
caller asked for, per thread and per batch row.

    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="a1")
    model.load_adapter(other_dir, adapter_name="a2")
    lora_routing.install(model)            # once after attaching (again after attaching more)
    with lora_routing.use_adapter("a1"):   # this thread's forward passes use a1 for every row
        model(input_ids=...)
    with lora_routing.use_adapters(["a1", None, "a2"]):   # row 0: a1, row 1: the base, row 2: a2
        model(input_ids=batch_of_three)

Why not peft's own switches: `set_adapter` changes state shared by every thread, and peft's
mixed-batch inference (`adapter_names=[...]`) injects its argument with forward hooks that
`PeftModel.generate` adds and removes around each call on the shared modules, so two threads
at once would overwrite each other's routing. Here routing is installed once per LoRA layer and
reads the adapter names from a thread-local that `use_adapter`/`use_adapters` set.

For peft's plain `lora.Linear` (what training produces) the routed forward is peft's
single-adapter formula, base(x) + B(A(dropout(x))) * scaling, computed on the whole batch when
every row uses the same adapter (no gather/scatter; peft's mixed-batch path measured ~15% slower
decoding at batch size 1) and per adapter on its own rows otherwise, each row's result rounded
to the model's dtype exactly as the single-adapter formula rounds it (so a row gets the same
numbers whatever adapters its neighbours use). Other LoRA layer types (embeddings,
convolutions) and `modules_to_save` wrappers take peft's mixed-batch path through a forward
pre-hook that passes the adapter name of every row.

peft's own state is honoured where it decides what a layer computes: with adapters disabled
(`disable_adapter()`) every row gets the base; adapters merged into the base weights cannot be
routed (every row would carry the merged ones) and raise `RoutingError`. Only plain LoRA is
attached (medchat.adapter_support); a LoRA variant reaching a routed layer raises too rather
than being answered as something else.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from medchat.adapter_support import unsupported_reason

__all__ = ["BASE_ADAPTER", "RoutingError", "active_adapter", "install", "row_adapters",
           "unsupported_reason", "use_adapter", "use_adapters"]

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in mixed-batch inference

_route = threading.local()  # .adapter: one name for every row; .rows: one name per row (or None)
_installed: "weakref.WeakSet[Any]" = weakref.WeakSet()  # modules already routed


class RoutingError(RuntimeError):
    """A forward pass that cannot be routed as asked (merged adapters, a LoRA variant, a batch
    whose rows do not match the names given)."""


def active_adapter() -> str | None:
    """The adapter this thread's forward passes use for every row (None: the base, or per-row
    routing is on: see `row_adapters`)."""
    return getattr(_route, "adapter", None)


def row_adapters() -> list[str | None] | None:
    """The adapter of each batch row this thread's forward passes use, or None when one adapter
    (`active_adapter`) applies to every row."""
    return getattr(_route, "rows", None)


@contextmanager
def _routing(adapter: str | None, rows: list[str | None] | None) -> Iterator[None]:
    """This thread's routing within the block (restored after: blocks may nest)."""
    previous = active_adapter(), row_adapters()
    _route.adapter, _route.rows = adapter, rows
    try:
        yield
    finally:
        _route.adapter, _route.rows = previous


def use_adapter(name: str | None):
    """Within the block, forward passes on this thread use adapter `name` (None: none) for every
    row."""
    return _routing(name, None)


def use_adapters(names: Sequence[str | None]):
    """Within the block, row i of every batch this thread runs uses adapter `names[i]` (None:
    the base). One name for all rows takes the single-adapter path."""
    names = list(names)
    if len(set(names)) <= 1:
        return _routing(names[0] if names else None, None)
    return _routing(None, names)


def install(model: Any) -> int:
    """Route every LoRA layer of `model` (a PeftModel or the model peft injected layers into)
    by thread and row. Layers already routed are left alone, so call it again after attaching
    another adapter. Returns how many layers were newly routed."""
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


def _names_for(batch: int) -> list[str | None]:
    rows = row_adapters()
    if rows is None:
        return [active_adapter()] * batch
    if len(rows) != batch:
        raise RoutingError(f"per-row routing got {len(rows)} adapter names for a batch of "
                           f"{batch} rows")
    return rows


def _check_state(layer) -> None:
    if getattr(layer, "merged", False):
        raise RoutingError(
            f"{type(layer).__name__}: adapters {list(getattr(layer, 'merged_adapters', []))} are "
            "merged into the base weights, so no request could get the base or another adapter; "
            "unmerge them (peft's unmerge_adapter) before serving")


def _route_hook(module, args, kwargs):
    """Forward pre-hook for LoRA layers other than lora.Linear: peft's mixed-batch path with
    each row's adapter (peft itself returns the base when adapters are disabled)."""
    _check_state(module)
    batch = args[0].shape[0] if args and hasattr(args[0], "shape") else 1
    kwargs["adapter_names"] = [n or BASE_ADAPTER for n in _names_for(batch)]
    return args, kwargs


def _row_masks(names: list[str | None], like, scalings: dict[str, float]) -> dict[str, Any]:
    """Per adapter of the batch, its LoRA scaling on its own rows and 0.0 on the others, as a
    [rows, 1, ...] float32 tensor (built once per forward pass, shape and scaling, not once per
    layer)."""
    import torch

    cache = getattr(_route, "masks", None)
    if cache is None or cache[0] is not names:
        cache = _route.masks = (names, {})
    out = {}
    for name in dict.fromkeys(names):
        if name is None or name not in scalings:
            continue
        key = (name, scalings[name], like.device, like.dim())
        mask = cache[1].get(key)
        if mask is None:
            shape = (len(names),) + (1,) * (like.dim() - 1)
            mask = cache[1][key] = torch.tensor(
                [scalings[name] if n == name else 0.0 for n in names],
                dtype=torch.float32, device=like.device).view(shape)
        out[name] = mask
    return out


def _routed_linear(layer):
    """A forward for one peft lora.Linear that applies each row's adapter (or none)."""
    import torch
    import torch.nn.functional as F

    def plain(module) -> bool:  # an nn.Linear whose forward is F.linear and nothing else
        return (type(module) is torch.nn.Linear and not module._forward_hooks
                and not module._forward_pre_hooks)

    def lora_term(name: str, x):
        """This adapter's LoRA term before scaling, B(A(dropout(x))) (lora.Linear.forward);
        the two linear layers called as the F.linear their forward is (this runs for every
        adapted layer at every step: module-call overhead is most of a small layer's time)."""
        if name in layer.lora_variant:  # DoRA & co. are refused before attaching
            raise RoutingError(f"adapter {name} is a LoRA variant "
                               f"({type(layer.lora_variant[name]).__name__}); only plain LoRA "
                               "is routed")
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if x.dtype != lora_a.weight.dtype:  # LoRA weights may be kept in another dtype
            x = x.to(lora_a.weight.dtype)
        dropout = layer.lora_dropout[name]
        if dropout.training:  # identity when evaluating
            x = dropout(x)
        if plain(lora_a) and plain(lora_b):
            return F.linear(F.linear(x, lora_a.weight, lora_a.bias), lora_b.weight, lora_b.bias)
        return lora_b(lora_a(x))

    def forward(x, *args, **kwargs):
        kwargs.pop("adapter_names", None)
        _check_state(layer)
        if layer.disable_adapters:  # peft's disable_adapter(): the base for every row
            return layer.base_layer(x, *args, **kwargs)
        rows = row_adapters()
        if rows is None:
            name = active_adapter()
            if name is None or name not in layer.lora_A:  # the base, or not adapted here
                return layer.base_layer(x, *args, **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            return (result + lora_term(name, x) * layer.scaling[name]).to(result.dtype)
        names = _names_for(x.shape[0])
        result = layer.base_layer(x, *args, **kwargs)
        out = result
        for name, scaled_mask in _row_masks(names, x, layer.scaling).items():
            if name in layer.lora_A:
                # every row computes the (small) LoRA term; a row of another adapter adds an
                # exact zero, a row of this one exactly what the single-adapter formula adds
                # (term * scaling: the mask holds the same scaling, times 1)
                term = lora_term(name, x)
                out = out + term * scaled_mask.to(term.dtype)
        return out.to(result.dtype)

    return forward
