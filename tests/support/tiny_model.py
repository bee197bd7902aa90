"""Tiny models for tests and CPU smoke runs: a BPE tokenizer trained in a second on a few
sentences, with SmolLM2's ChatML chat template, and a random 2-layer Llama (hidden 64)."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "What is aspirin used for? Aspirin is used to reduce fever and relieve mild pain.",
    "How should I take metformin? Take metformin with meals to reduce stomach upset.",
    "Can I drink alcohol with ibuprofen? Alcohol can increase the risk of stomach bleeding.",
    "What are the side effects of lisinopril? Cough, dizziness and headache are common.",
    "Is it safe to take acetaminophen during pregnancy? Ask your doctor or pharmacist first.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 mg ml tablet dose daily",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-/%",
]


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(folder: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2,
                     tie_word_embeddings: bool = True, init_std: float = 0.02) -> Path:
    """Write a random tiny Llama + tokenizer to `folder`; returns the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=init_std)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def remote_code_model(model_dir: str | Path, folder: str | Path) -> Path:
    """A copy of a tiny model whose classes live in its own folder, like InternLM2 on the Hub:
    transformers loads it only with trust_remote_code=True (same tensors and module names)."""
    import json
    import shutil

    folder = Path(folder)
    shutil.copytree(model_dir, folder)
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n"
        "    model_type = 'tiny_remote'\n")
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n"
        "\n\nclass TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="tiny_remote", architectures=["TinyForCausalLM"],
               auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                         "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"))
