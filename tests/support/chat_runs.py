"""Run folders for the chat tests: a tiny base with two LoRA adapters that change its answers
(init_lora_weights=False), one of them also merged, plus a test split and recorded scores."""

from __future__ import annotations

import shutil
from pathlib import Path

from medchat.chat_format import Conversation, prompt_ids
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, ChatSpec, GenerationDefaults,
                                Manifest, ModelScores, Run)

QUESTIONS = ["What is aspirin used for?", "How should I take metformin?",
             "Can I drink alcohol with ibuprofen?", "What are the side effects of lisinopril?"]

_built: dict[str, dict] = {}


def make_adapter(base: Path, run_dir: Path, seed: int, r: int = 8, alpha: int = 64,
                 eos_tokens: tuple[str, ...] = ("<|im_end|>",), generation: dict | None = None,
                 use_dora: bool = False, base_name: str | None = None,
                 target_modules: str | list[str] = "all-linear") -> Path:
    """A random (non-zero) LoRA on every linear layer, saved as a run folder with a manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules,
                                                  init_lora_weights=False, use_dora=use_dora))
    run = Run(run_dir)
    peft_model.save_pretrained(run.adapter_dir)
    gen = generation or {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0,
                         "repetition_penalty": 1.0}
    run.save_manifest(Manifest(
        name=run_dir.name, base_model=BaseModelRef(name=base_name or str(base), local_path=str(base)),
        chat=ChatSpec(template=tok.chat_template, stop_tokens=list(eos_tokens),
                      generation=GenerationDefaults(**gen))))
    return run_dir


def merge_run(base: Path, run_dir: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Run(run_dir)
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, run.adapter_dir).merge_and_unload()
    merged.save_pretrained(run.merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(run.merged_dir)
    return run.merged_dir


def write_test_split(run_dir: Path) -> None:
    Run(run_dir).write_split("test", [
        Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": "See the label."}],
                     {"row": i}) for i, q in enumerate(QUESTIONS)])


def build_runs(root: Path, base: Path) -> dict:
    """root/runs/{r0 (adapter + merged + test split + eval.json), r1 (adapter)}; cached per base."""
    key = str(base)
    if key in _built and _built[key]["runs"].is_dir():
        return _built[key]
    runs = root / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    r0 = make_adapter(base, runs / "r0", seed=100)
    make_adapter(base, runs / "r1", seed=101)
    merge_run(base, r0)
    write_test_split(r0)
    Run(r0).record_scores({"adapter": ModelScores(rougeL=41.23, perplexity=7.5)})
    _built[key] = {"runs": runs, "base": base}
    return _built[key]


def reference_answer(model_dir: Path, question: str, adapter: Path | None = None,
                     max_new_tokens: int = 32, system: str | None = None) -> str:
    """Greedy answer straight from transformers/peft (what one client alone should get)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    messages = [{"role": "system", "content": system or DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": question}]
    ids = torch.tensor([prompt_ids(tok, messages)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
