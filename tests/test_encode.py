"""Chat-template encoding: label masking, prompt alignment with chat, packing without leakage."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medchat.chat_format import (Conversation, end_of_turn_token, prompt_ids, render,
                                 stop_token_ids, stop_tokens)
from training.encode import (IGNORE, PackedCollator, check_prompt_alignment, encode_all,
                             encode_conversation, pack, padding_share, render_marked)

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is aspirin used for?"},
    {"role": "assistant", "content": "Pain and fever."},
    {"role": "user", "content": "And the dose?"},
    {"role": "assistant", "content": "Ask your pharmacist."},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def internlm_tok():
    """InternLM2's layout: a ChatML template whose turns end with <|im_end|>, eos '</s>'."""
    from tests.support.tiny_model import build_tokenizer

    t = build_tokenizer()
    t.add_special_tokens({"eos_token": "</s>"})
    assert t.eos_token == "</s>" and "<|im_end|>" in t.chat_template
    return t


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_labels_only_answers_and_end_token(tok):
    enc = encode_conversation(tok, MULTI, max_length=4096)
    trained = tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])
    assert trained == "Pain and fever.<|im_end|>Ask your pharmacist.<|im_end|>"
    # everything else (system, user turns, role headers, newlines) is masked
    assert enc["labels"][: len(prompt_ids(tok, MULTI[:2]))] == [IGNORE] * len(prompt_ids(tok, MULTI[:2]))
    assert "[[Pain and fever.<|im_end|>]]" in render_marked(tok, MULTI)


def test_chat_prompt_equals_training_prefix_token_ids(tok, spreadsheet):
    from training.data import load_conversations

    for conv in load_conversations(spreadsheet)[:25] + [Conversation(MULTI)]:
        res = check_prompt_alignment(tok, conv.messages)
        assert res["ok"], res


def test_truncation_is_explicit_and_counted(tok):
    long = [MULTI[0], MULTI[1], {"role": "assistant", "content": "word " * 400}]
    short = encode_conversation(tok, long, max_length=64, truncation="truncate")
    assert len(short["input_ids"]) == 64 and short["truncated"]
    assert encode_conversation(tok, long, max_length=64, truncation="drop") is None
    fits = len(encode_conversation(tok, MULTI, 4096)["input_ids"])
    rows, stats = encode_all(tok, [Conversation(long), Conversation(MULTI)], fits, "drop")
    assert stats.dropped == 1 and len(rows) == 1
    rows, stats = encode_all(tok, [Conversation(long), Conversation(MULTI)], fits, "truncate")
    assert stats.truncated >= 1 and len(rows) == 2


def test_packing_fills_rows_and_reduces_padding():
    samples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (10, 50, 30, 60, 20, 90, 5)]
    rows = pack(samples, max_length=100, seed=0)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(s["input_ids"]) for s in samples)
    assert all(len(r["input_ids"]) <= 100 for r in rows)
    for r in rows:  # positions restart at 0 for every sample
        assert r["position_ids"][0] == 0 and len(r["position_ids"]) == len(r["input_ids"])
    lengths = [len(s["input_ids"]) for s in samples]
    assert padding_share([len(r["input_ids"]) for r in rows], batch_size=1) < padding_share(lengths, batch_size=4)
    assert pack(samples, 100, seed=0) == rows  # deterministic for a seed


def test_packed_samples_do_not_attend_to_each_other(tok, model):
    convs = [MULTI, MULTI[:3], [MULTI[0], {"role": "user", "content": "Storage?"},
                                {"role": "assistant", "content": "Keep it dry."}]]
    encs = [encode_conversation(tok, c, 4096) for c in convs]
    rows = pack(encs, max_length=4096, seed=3)
    assert len(rows) == 1  # all three share one row
    batch = PackedCollator(tok.pad_token_id, packed=True)(rows)
    assert "attention_mask" not in batch
    model.train()  # as in training (dropout is 0 in the tiny config, so outputs are deterministic)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    model.eval()
    with torch.no_grad():
        starts = [i for i, p in enumerate(rows[0]["position_ids"]) if p == 0] + [len(rows[0]["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            ids = torch.tensor([rows[0]["input_ids"][a:b]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed_logits[a:b], alone, atol=1e-5, rtol=1e-4)
    # and the check is meaningful: without position resets the later samples' logits differ
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"]).logits[0]
    a, b = starts[1], starts[2]
    assert not torch.allclose(leaky[a:b], packed_logits[a:b], atol=1e-4)


def test_unpacked_collator_masks_padding(tok):
    c = PackedCollator(tok.pad_token_id, packed=False)
    batch = c([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist()[1] == [5, IGNORE, IGNORE]


def test_end_of_turn_comes_from_the_template_not_eos(tok, internlm_tok):
    # ChatML with eos <|im_end|> (SmolLM2, the tiny model): unchanged
    assert end_of_turn_token(tok) == "<|im_end|>" and stop_tokens(tok) == ["<|im_end|>"]
    # ChatML with eos </s> (InternLM2): the turn still ends at <|im_end|>, eos stays a stop
    assert end_of_turn_token(internlm_tok) == "<|im_end|>"
    assert stop_tokens(internlm_tok) == ["<|im_end|>", "</s>"]
    ids, strings = stop_token_ids(internlm_tok, stop_tokens(internlm_tok))
    assert ids[0] == internlm_tok.convert_tokens_to_ids("<|im_end|>") and strings == []
    assert ids[1] == internlm_tok.convert_tokens_to_ids("</s>")


def test_end_of_turn_is_eos_when_the_template_closes_turns_with_it(internlm_tok):
    from tests.support.tiny_model import build_tokenizer

    llama2 = build_tokenizer()
    llama2.add_special_tokens({"eos_token": "</s>"})
    llama2.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
    assert end_of_turn_token(llama2) == "</s>" and stop_tokens(llama2) == ["</s>"]
    plain = build_tokenizer()  # a template that writes no token after the answer: eos
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_token(plain) == "<|im_end|>"


def test_training_masks_exactly_up_to_the_end_of_turn(internlm_tok):
    """InternLM2's layout: <|im_end|> is trained, the newline after it and eos are not."""
    enc = encode_conversation(internlm_tok, MULTI, max_length=4096)
    trained = internlm_tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"])
                                   if lab != IGNORE])
    assert trained == "Pain and fever.<|im_end|>Ask your pharmacist.<|im_end|>"
    assert "<|im_end|>\n" in render(internlm_tok, MULTI)  # the newline is there, untrained
    assert "[[Pain and fever.<|im_end|>]]\n" in render_marked(internlm_tok, MULTI)
    assert check_prompt_alignment(internlm_tok, MULTI)["ok"]
