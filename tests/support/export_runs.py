"""A run on the real SmolLM2-135M-Instruct base with a random LoRA adapter, for the GGUF export
tests: llama.cpp's converter refuses the tiny test tokenizer (an unknown BPE pre-tokenizer), so
these tests use the default base (prepared offline by medchat.base_model on first use)."""

from __future__ import annotations

from pathlib import Path

from medchat.base_model import DEFAULT_BASE_MODEL, resolve_base_model
from medchat.chat_format import Conversation
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, ChatSpec, GenerationDefaults,
                                Manifest, Run)

# Held-out questions in the style of MedicationQA (none of them is in the adapter's training).
HELD_OUT = [
    "How should I store insulin pens?",
    "Can I take ibuprofen with food?",
    "What is metformin used for?",
    "Is it safe to drink alcohol while taking amoxicillin?",
    "What are the side effects of lisinopril?",
]


def smollm2_base() -> Path:
    return resolve_base_model(DEFAULT_BASE_MODEL, progress=False).path


def make_mild_adapter(base: Path, out: Path, seed: int = 0, noise: float = 0.01) -> Path:
    """A LoRA adapter (r 4, alpha 8, q/v/up projections) that changes the model a little, as
    a short fine-tune does: peft's usual init (B = 0) with B then moved by `noise`. The answers
    differ from the base's yet stay fluent, so they end where the chat template ends a turn."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * noise)
    peft_model.save_pretrained(out)
    return out


def make_smollm2_run(run_dir: Path, seed: int = 0, noise: float = 0.01,
                     template: str | None = None, stop_tokens: list[str] | None = None) -> Run:
    """A run folder as training writes it: manifest (the base's own chat template unless
    `template`), a mild random LoRA adapter, and a test split of HELD_OUT."""
    from transformers import AutoTokenizer

    base = smollm2_base()
    run = Run(run_dir)
    make_mild_adapter(base, run.adapter_dir, seed=seed, noise=noise)
    tok = AutoTokenizer.from_pretrained(base)
    run.write_split("test", [Conversation([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                           {"role": "user", "content": q},
                                           {"role": "assistant", "content": "..."}])
                             for q in HELD_OUT])
    run.save_manifest(Manifest(
        name=run.name,
        base_model=BaseModelRef(name=DEFAULT_BASE_MODEL, hub_id=DEFAULT_BASE_MODEL,
                                local_path=str(base)),
        chat=ChatSpec(template=template or tok.chat_template,
                      system_prompt=DEFAULT_SYSTEM_PROMPT,
                      stop_tokens=stop_tokens or ["<|im_end|>"],
                      generation=GenerationDefaults(max_new_tokens=200, temperature=0.2,
                                                    top_p=0.9, repetition_penalty=1.1))))
    return run
