"""Adapters and run folders for the merge and evaluation tests, on the tiny model."""

from __future__ import annotations

from pathlib import Path

from medchat.chat_format import Conversation
from medchat.run_folder import BaseModelRef, ChatSpec, Manifest, Run, TrainingRecord

TEST_QA = [
    ("What is aspirin used for?", "Aspirin is used to reduce fever and relieve mild pain."),
    ("How should I take metformin?", "Take metformin with meals to reduce stomach upset."),
    ("Can I drink alcohol with ibuprofen?", "Alcohol can increase the risk of stomach bleeding."),
    ("What are the side effects of lisinopril?", "Cough, dizziness and headache are common."),
]
SYSTEM_PROMPT = "You are a tiny test assistant."


def make_adapter(base_dir: Path, out: Path, seed: int = 0, noise: float = 0.02, **lora) -> Path:
    """Save a peft adapter whose every trainable tensor (LoRA, modules_to_save, trainable
    tokens) is moved away from its initial value, so a merge that ignores any of them fails."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", "all-linear")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * noise)
    peft_model.save_pretrained(out)
    return out


def make_run(tiny_model_dir: Path, run_dir: Path, seed: int = 0, n_test: int = 4,
             max_length: int | None = 1024) -> Run:
    """A minimal run folder as training writes it: manifest, adapter, test split.
    `max_length=None` leaves the training config without data.max_length (as a pulled repo)."""
    from transformers import AutoTokenizer

    run = Run(run_dir)
    make_adapter(tiny_model_dir, run.adapter_dir, seed=seed)
    convs = [Conversation([{"role": "system", "content": SYSTEM_PROMPT},
                           {"role": "user", "content": q}, {"role": "assistant", "content": a}],
                          {"focus": q.split()[-1]})
             for q, a in TEST_QA[:n_test]]
    run.write_split("test", convs)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = {"model": {"quantization": "nf4"}}
    if max_length is not None:
        config["data"] = {"max_length": max_length}
    run.save_manifest(Manifest(
        name=run.name,
        base_model=BaseModelRef(name=str(tiny_model_dir), local_path=str(tiny_model_dir)),
        chat=ChatSpec(template=tok.chat_template, system_prompt=SYSTEM_PROMPT,
                      stop_tokens=["<|im_end|>"]),
        training=TrainingRecord(config=config)))
    return run
