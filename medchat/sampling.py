"""Choosing each batch row's next token, and turning a row's tokens into text as they come.

    sampler = RowSampler(settings, device)        # one per request
    token = sampler.next_token(logits_row, history)   # history: prompt + answer ids so far
    detok = Detokenizer(tokenizer)
    piece = detok.add(token)                       # "" while a character is incomplete

Sampling applies transformers' own logits processors in the order `generate` applies them
(repetition penalty, temperature, top-p), then draws with the request's own `torch.Generator`,
never torch's global RNG: a seeded request gives the same text whatever runs beside it, and the
same text as transformers' `generate` with those processors and a sampler drawing from the same
generator. Temperature 0 is greedy (argmax after the penalty).

The detokenizer decodes a sliding window of tokens (the offsets technique of text-generation-
inference and vLLM), so a piece is emitted per token as soon as it forms whole characters, never
half a UTF-8 sequence, and the concatenated pieces equal decoding all tokens at once.
"""

from __future__ import annotations

from typing import Any, Sequence

from medchat.backend import GenerationSettings

__all__ = ["Detokenizer", "RowSampler", "StopText"]


class RowSampler:
    """The next token of one row from its logits (see the module docstring)."""

    def __init__(self, settings: GenerationSettings, device: Any = "cpu"):
        # torch and transformers are imported in functions: importing the engine stays cheap.
        import torch
        from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopPLogitsWarper)

        self.greedy = settings.temperature <= 0
        self.penalty = (RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)
                        if settings.repetition_penalty != 1.0 else None)
        self.warpers = []
        self.generator = None
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(settings.top_p))
            self.generator = torch.Generator(device=device).manual_seed(int(settings.seed or 0))

    @property
    def needs_history(self) -> bool:
        """Whether `next_token` reads the tokens so far (the repetition penalty does)."""
        return self.penalty is not None

    def next_token(self, logits, history=None) -> int:
        """`logits`: this row's float32 scores over the vocabulary (1-D); `history`: a 1-D long
        tensor of the prompt and answer ids so far (needed with a repetition penalty)."""
        import torch

        scores = logits.unsqueeze(0)
        if self.penalty is not None:
            scores = self.penalty(history.unsqueeze(0), scores)
        if self.greedy:
            return int(torch.argmax(scores, dim=-1))
        for warper in self.warpers:
            scores = warper(None, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Detokenizer:
    """Text of one row's answer, one token at a time (see the module docstring)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens before this are already returned as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append a token; return the new text it completes ("" while a character is cut)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever text the last tokens make, even an incomplete character (the answer ended)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""


class StopText:
    """Holds back text that may be the start of a stop string; finds the first stop string.

    `feed(piece)` returns (text safe to show, whether a stop string was reached); the stop
    string itself is never shown. `rest()` returns what was held back when the answer ends
    another way."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already returned
        self.hit = False  # a stop string was reached

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stop:
            self.text += piece
            self.sent = len(self.text)
            return piece, False
        self.text += piece
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent:end]
            self.sent = len(self.text)
            self.hit = True
            return out, True
        held = 0
        for s in self.stop:  # the longest tail of the text that a stop string starts with
            for k in range(min(len(s) - 1, len(self.text) - self.sent), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        end = len(self.text) - held
        out = self.text[self.sent:end]
        self.sent = end
        return out, False

    def rest(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
