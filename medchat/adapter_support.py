"""Which PEFT adapters medchat can serve side by side and merge: plain LoRA only.

Chat routes every request through peft's plain LoRA formula, base(x) + B(A(x)) * scaling, and
the streaming merge writes W + scaling * B @ A; an adapter whose config asks for anything else
(a LoRA variant such as DoRA or aLoRA, another PEFT method, an initialisation that also rewrote
the base weights) would be answered or merged as something it is not. Both stages refuse such
adapters with the reasons below, read from adapter_config.json without importing peft.

    reason = unsupported_reason(json.loads(cfg_path.read_text()))
    if reason: refuse(f"{cfg_path}: {reason}")

`tests/test_lora_routing.py` checks this list against the variants the installed peft declares,
so a peft upgrade that adds one cannot slip through.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BASE_CHANGING_INITS", "UNSUPPORTED_OPTIONS", "VARIANT_INITS", "unsupported_reason"]

# adapter_config.json options that make an adapter more than W + scaling * B @ A: refused when
# set (truthy). The LoRA variants first (peft marks them `is_lora_variant`), then options that
# change which weights exist or how they are stored.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each column by a learned magnitude",
    "alora_invocation_tokens": "activated LoRA (aLoRA) only applies after its invocation tokens",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "use_bdlora": "the block-diagonal LoRA variant",
    "arrow_config": "the Arrow routing variant",
    "kasa_config": "the KaSA variant",
    "target_parameters": "LoRA on raw nn.Parameters (MoE experts)",
    "layer_replication": "layer replication changes the model's layer list",
    "use_qalora": "QA-LoRA merges into group-quantised weights",
    "megatron_config": "Megatron tensor-parallel LoRA layers",
}
# init_lora_weights values that select a LoRA variant (peft's `lora_variants` metadata).
VARIANT_INITS = {"mica": "the MiCA variant"}
# Initialisations that also rewrite the base weights (residual init): the saved adapter only
# matches the original base after peft's `path_initial_model_for_weight_conversion`.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def unsupported_reason(adapter_config: dict[str, Any]) -> str | None:
    """Why an adapter (its adapter_config.json as a dict) is not plain LoRA, or None.

    The reason names the option and what it does; the caller adds where and what to do."""
    if not isinstance(adapter_config, dict):
        return "adapter_config.json is not a JSON object"
    kind = str(adapter_config.get("peft_type") or "").split(".")[-1].upper()
    if kind != "LORA":
        return f"peft_type {kind or '?'} is not LoRA; only LoRA adapters are supported"
    for option, what in UNSUPPORTED_OPTIONS.items():
        if adapter_config.get(option):
            return f"{option} is set ({what}); only plain LoRA is supported"
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str):
        if init.lower() in VARIANT_INITS:
            return (f"init_lora_weights={init!r} ({VARIANT_INITS[init.lower()]}); only plain LoRA "
                    "is supported")
        if init.lower().startswith(BASE_CHANGING_INITS):
            return (f"init_lora_weights={init!r} also changed the base weights during training, "
                    "so this adapter does not apply to the original base; re-save it with "
                    "peft's path_initial_model_for_weight_conversion")
    return None
