"""Chat formatting shared by training and chat: how a conversation becomes tokens, and where an
answer ends. Training renders samples with these functions and chat renders prompts with the
same ones, so the prompt a model sees at chat time is the prefix it was trained on.

Nothing here imports a model library; functions take a transformers tokenizer as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# For base models whose tokenizer has no template: ChatML, the format SmolLM2/Qwen use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One sample: chat messages (role/content, system first if any) + provenance (`meta`)."""

    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")

    def to_xtuner(self) -> dict[str, Any]:
        """XTuner conversation form: [{system?, input, output}, ...] with provenance beside it."""
        turns, system = [], None
        for m in self.messages:
            if m["role"] == "system":
                system = m["content"]
            elif m["role"] == "user":
                turn: dict[str, str] = {"system": system} if system is not None and not turns else {}
                turn["input"] = m["content"]
                turns.append(turn)
            elif m["role"] == "assistant" and turns:
                turns[-1]["output"] = m["content"]
        return {"conversation": turns, "meta": self.meta}

    @classmethod
    def from_xtuner(cls, record: Any) -> "Conversation":
        """The inverse of `to_xtuner` (ValueError naming the field when the record is not one)."""
        if not isinstance(record, dict) or not isinstance(record.get("conversation"), list):
            raise ValueError("expected an object with a 'conversation' list")
        messages: list[dict[str, str]] = []
        for i, turn in enumerate(record["conversation"]):
            if not isinstance(turn, dict):
                raise ValueError(f"conversation[{i}]: expected an object")
            if i == 0 and isinstance(turn.get("system"), str):
                messages.append({"role": "system", "content": turn["system"]})
            for key, role in (("input", "user"), ("output", "assistant")):
                if key in turn:
                    if not isinstance(turn[key], str):
                        raise ValueError(f"conversation[{i}].{key}: expected a string")
                    messages.append({"role": role, "content": turn[key]})
        meta = record.get("meta")
        return cls(messages, dict(meta) if isinstance(meta, dict) else {})


# ---------------------------------------------------------------------------------------------
# Templates


def ensure_chat_template(tokenizer, template: str | None = None) -> str:
    """Set the template training and chat share: `template` (a run's), else the tokenizer's own,
    else ChatML. Also gives the tokenizer a pad token (its end token) when it has none."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.chat_template


def render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """The conversation as text, by the tokenizer's chat template. A tokenizer marked with
    `sandbox_templates` (a pulled run's: its template is someone else's program) renders in
    medchat.template_sandbox's worker process instead, with a memory cap and a deadline."""
    sandbox = getattr(tokenizer, "medchat_sandbox", None)
    if sandbox is not None:
        runner, folder, template = sandbox
        return runner.render(folder, template, messages, generation_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def sandbox_templates(tokenizer, runner, folder, template: str | None) -> None:
    """Render `tokenizer`'s chat template (`template`, or the one in `folder`'s tokenizer files
    when None) with `runner` (a medchat.template_sandbox.TemplateSandbox) from now on."""
    tokenizer.medchat_sandbox = (runner, str(folder), template)


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """What the model is fed to write the next answer (the same template as training)."""
    return tokenizer(render(tokenizer, messages, generation_prompt=True),
                     add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Where an answer ends


# A conversation rendered only to see what the template writes after an answer.
_PROBE = [{"role": "user", "content": "medchat probe question"},
          {"role": "assistant", "content": "medchat probe answer"}]


def _special_strings(tokenizer) -> list[str]:
    """The tokenizer's special and added tokens, longest first (so '<|im_end|>' wins over '<')."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    try:
        found |= set(tokenizer.get_added_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without added tokens
        pass
    return sorted((t for t in found if isinstance(t, str) and t.strip()), key=len, reverse=True)


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn, as the chat template writes it.

    A probe conversation is rendered and the first special token after the answer is taken:
    `<|im_end|>` for ChatML (also for InternLM2, whose eos is `</s>`), `<|eot_id|>` for Llama 3,
    `<end_of_turn>` for Gemma, `</s>` for templates that close a turn with eos. A template that
    writes no special token there (or cannot render the probe) falls back to eos."""
    fallback = tokenizer.eos_token or "<|im_end|>"
    try:
        text = render(tokenizer, _PROBE)
    except Exception:  # noqa: BLE001 - templates may insist on roles the probe lacks
        return fallback
    answer = _PROBE[-1]["content"]
    at = text.rfind(answer)
    if at < 0:
        return fallback
    tail = text[at + len(answer):].lstrip()
    return next((t for t in _special_strings(tokenizer) if tail.startswith(t)), fallback)


def stop_tokens(tokenizer) -> list[str]:
    """Stop tokens to record for a run: end of turn first, then the tokenizer's eos if different."""
    out = [end_of_turn_token(tokenizer)]
    if tokenizer.eos_token and tokenizer.eos_token not in out:
        out.append(tokenizer.eos_token)
    return out


def stop_token_ids(tokenizer, tokens: list[str] | tuple[str, ...]) -> tuple[list[int], list[str]]:
    """Token ids for `tokens` (plus the tokenizer's eos); strings that are not one token are
    returned separately, to be matched on the generated text instead."""
    ids: list[int] = []
    strings: list[str] = []
    for t in list(tokens) + [tokenizer.eos_token]:
        if not t:
            continue
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            if i not in ids:
                ids.append(i)
        elif t not in strings:
            strings.append(t)
    return ids, strings
