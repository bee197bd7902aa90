"""Evaluation on the held-out split (test loss / perplexity; generation metrics are added by the
evaluation issue)."""

from __future__ import annotations

import math
from typing import Any

from training.encode import IGNORE, PackedCollator, encode_all, pack


def test_loss(model, tokenizer, conversations, max_length: int = 1024,
              progress: bool = True, desc: str = "Test loss") -> dict[str, Any]:
    """Mean cross-entropy per answer token over `conversations` (packed rows, no leakage)."""
    import torch
    from tqdm.auto import tqdm

    rows, stats = encode_all(tokenizer, conversations, max_length)
    packed = pack(rows, max_length, shuffle=False)
    collate = PackedCollator(tokenizer.pad_token_id, packed=True)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for row in tqdm(packed, desc=desc, disable=not progress, leave=False):
                batch = collate([row])
                dev = next(model.parameters()).device
                logits = model(input_ids=batch["input_ids"].to(dev),
                               position_ids=batch["position_ids"].to(dev),
                               use_cache=False).logits.float()  # no cache: packed mask applies
                labels = batch["labels"].to(dev)
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                    ignore_index=IGNORE, reduction="sum")
                total += loss.item()
                count += int((shift_labels != IGNORE).sum())
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count,
            "samples": stats.samples - stats.dropped}
