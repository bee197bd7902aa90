"""Encoding: the tokenizer's own chat template renders each conversation, labels keep only the
assistant answers (and their end-of-turn token), and samples are packed into rows of
`max_length` whose position ids restart per sample. With position ids that restart and no
2D attention mask, transformers builds a block-diagonal causal mask, so packed samples never
attend to each other (checked in tests: logits packed == logits alone).

How a conversation is rendered (the chat template, the prompt chat feeds the model, where an
answer ends) lives in medchat.chat_format, shared with the chat side; this module adds what
only training needs: answer masks, packing, the collator.

    medchat log-dataset FILE [-n 3]     # samples as rendered, trained tokens in [[ ]]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated, Any

from medchat.base_model import resolve_base_model
from medchat.chat_format import end_of_turn_token, ensure_chat_template, prompt_ids, render
from medchat.command_line import Opt
from medchat.errors import UserError
from training.config import DEFAULT_PRESET, build_config
from training.data import load_conversations, to_dataset

# torch and transformers are imported in functions: the command line imports this module for
# log-dataset's parser, and those libraries take seconds to import.

IGNORE = -100


class EncodingError(UserError, ValueError):
    """A chat template that training cannot mask answers with; the message says why."""


def answer_spans(tokenizer, messages: list[dict[str, str]],
                 eot: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return (text, [(start, end) char span of each trained answer]).

    An answer's span runs from the end of its prompt up to and including the template's
    end-of-turn token (`eot`, found from the template when not given); what the template writes
    after it (a newline, the next role marker) is not trained."""
    full = render(tokenizer, messages)
    eot = eot or end_of_turn_token(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1])
        if not full.startswith(prefix) or not full.startswith(upto):
            raise EncodingError("the chat template does not render conversations as prefixes of "
                                "each other; answers cannot be located for loss masking")
        turn = upto[len(prefix):]
        cut = turn.find(eot, max(0, turn.find(m["content"]) + len(m["content"])))
        end = len(prefix) + (cut + len(eot) if cut >= 0 else len(turn))
        spans.append((len(prefix), end))
    return full, spans


@dataclass
class EncodeStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_rows: list[Any] = field(default_factory=list)


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_length: int,
                        truncation: str = "truncate",
                        eot: str | None = None) -> dict[str, list[int]] | None:
    """input_ids + labels (IGNORE outside answers). None when the sample must be dropped."""
    text, spans = answer_spans(tokenizer, messages, eot)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for i, (s, e) in enumerate(offsets):
        if any(s >= a and e <= b and e > s for a, b in spans):
            labels[i] = ids[i]
    truncated = False
    if len(ids) > max_length:
        if truncation == "drop":
            return None
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    if all(label == IGNORE for label in labels):
        return None  # the prompt alone fills max_length: nothing left to learn from
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def encode_all(tokenizer, conversations, max_length: int, truncation: str = "truncate"):
    """Encode a list of Conversations through `datasets.Dataset.map`; returns (rows, stats)."""
    ds = to_dataset(conversations)
    eot = end_of_turn_token(tokenizer)  # one probe render for the whole dataset

    def fn(batch):
        out = {"input_ids": [], "labels": [], "status": []}
        for msgs in batch["messages"]:
            r = encode_conversation(tokenizer, msgs, max_length, truncation, eot)
            out["input_ids"].append(r["input_ids"] if r else [])
            out["labels"].append(r["labels"] if r else [])
            status = "dropped" if r is None else "truncated" if r["truncated"] else "ok"
            out["status"].append(status)
        return out

    ds = ds.map(fn, batched=True, remove_columns=["messages"], desc="Tokenizing",
                load_from_cache_file=False, keep_in_memory=True)
    stats = EncodeStats()
    rows = []
    for rec in ds:
        stats.samples += 1
        if rec["status"] == "dropped":
            stats.dropped += 1
            stats.dropped_rows.append(rec["meta"])
            continue
        stats.truncated += rec["status"] == "truncated"
        stats.tokens += len(rec["input_ids"])
        stats.trained_tokens += sum(1 for x in rec["labels"] if x != IGNORE)
        rows.append({"input_ids": rec["input_ids"], "labels": rec["labels"]})
    return rows, stats


def pack(samples: list[dict[str, list[int]]], max_length: int, seed: int = 0,
         shuffle: bool = True) -> list[dict[str, list[int]]]:
    """Shuffle, then first-fit samples into rows of at most max_length tokens (none split).

    Each row carries position_ids restarting at 0 for each sample, which is what keeps
    attention (and RoPE positions) from leaking between samples.
    """
    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    rows: list[dict[str, list[int]]] = []
    free: list[int] = []
    for i in order:
        s = samples[i]
        n = len(s["input_ids"])
        slot = next((r for r, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            free.append(max_length)
            slot = len(rows) - 1
        row = rows[slot]
        row["input_ids"] += s["input_ids"]
        row["labels"] += s["labels"]
        row["position_ids"] += list(range(n))
        free[slot] -= n
    return rows


def padding_share(lengths: list[int], row_len: int | None = None, batch_size: int = 1) -> float:
    """Share of pad tokens when rows are padded to `row_len`, or to the longest in each batch."""
    if not lengths:
        return 0.0
    total, real = 0, 0
    for b in range(0, len(lengths), batch_size):
        chunk = lengths[b:b + batch_size]
        width = row_len or max(chunk)
        total += width * len(chunk)
        real += sum(chunk)
    return 1 - real / total


@dataclass
class PackedCollator:
    """Pads rows to the longest in the batch. Packed rows get no attention_mask (the block mask
    comes from position_ids); unpacked rows get a normal padding mask."""

    pad_token_id: int
    packed: bool = True

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, pos, mask = [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE] * pad)
            p = list(f.get("position_ids") or range(n))
            pos.append(p + list(range(pad)))  # the pad tail is its own "sample"
            mask.append([1] * n + [0] * pad)
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if self.packed:
            batch["position_ids"] = torch.tensor(pos)
            # transformers only derives the block-diagonal mask when no KV cache is in play;
            # with a cache it silently falls back to plain causal attention across samples.
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor(mask)
        return batch


def check_prompt_alignment(tokenizer, messages: list[dict[str, str]]) -> dict[str, Any]:
    """Token-level proof that the chat prompt equals the training prefix for every answer."""
    text, spans = answer_spans(tokenizer, messages)
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    enc = encode_conversation(tokenizer, messages, max_length=10 ** 9)
    results = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        p = prompt_ids(tokenizer, messages[:i])
        first_label = next((j for j in range(len(p), len(full))
                            if enc and enc["labels"][j] != IGNORE), None)
        results.append({"turn": i, "prompt_len": len(p), "prefix_equal": full[:len(p)] == p,
                        "labels_start_at_prompt_end": first_label == len(p)})
    ok = all(r["prefix_equal"] and r["labels_start_at_prompt_end"] for r in results)
    return {"ok": ok, "turns": results}


def render_marked(tokenizer, messages: list[dict[str, str]], max_length: int = 10 ** 9) -> str:
    """The sample as the model sees it, with trained tokens wrapped in [[...]] (log-dataset)."""
    enc = encode_conversation(tokenizer, messages, max_length)
    if enc is None:
        return "(dropped: no trainable tokens within max_length)"
    out, in_span = [], False
    for tid, lab in zip(enc["input_ids"], enc["labels"]):
        trained = lab != IGNORE
        if trained and not in_span:
            out.append("[[")
        if not trained and in_span:
            out.append("]]")
        in_span = trained
        out.append(tokenizer.decode([tid]))
    if in_span:
        out.append("]]")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Command


def log_dataset_command(file: str, *, n: Annotated[int, Opt("-n")] = 3, model: str | None = None,
                        preset: Annotated[str, Opt("--preset", "--config")] = DEFAULT_PRESET,
                        ) -> int:
    """Show dataset samples as the model is trained on them, trained tokens in [[ ]].

    Each sample is rendered with the tokenizer's chat template and cut at the preset's
    data.max_length, then checked token by token: the prompt chat builds must equal the
    training prefix of every answer.

    Args:
        file: dataset file (any format check-dataset reads)
        n: samples to show
        model: tokenizer of this model (Hub id or folder; default: the preset's base model)
        preset: preset whose base model and data.max_length to use
    """
    from transformers import AutoTokenizer

    cfg = build_config(preset)
    convs = load_conversations(file)
    tok = AutoTokenizer.from_pretrained(resolve_base_model(model or cfg.model.name).path)
    ensure_chat_template(tok)
    for c in convs[:n]:
        print(f"--- {c.meta.get('source')} row {c.meta.get('row')} "
              f"({c.meta.get('question_type', '')}) --- trained tokens in [[ ]]")
        print(render_marked(tok, c.messages, cfg.data.max_length))
        align = check_prompt_alignment(tok, c.messages)
        print(f"--- chat prompt == training prefix (token ids): {align['ok']}")
    return 0
