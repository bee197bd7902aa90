"""An Ollama Modelfile for a run's GGUF export, with the run's chat template in Ollama's
Go-template form, its stop tokens, generation defaults and system prompt.

Ollama does not run Jinja: a model's TEMPLATE is a Go text/template over `.Messages` (each with
`.Role` and `.Content`). The Go template is derived, not hand-written: the run's own Jinja
template renders probe conversations whose message contents are unique markers, and the text
around the markers gives, for each role, what comes before and after a message's content, what
a conversation starts with when it has no system message, and the generation prompt. Those
pieces are then checked: the derived form must render a set of conversations (with and without
a system message, one to three turns, contents with newlines, quotes and braces) to exactly the
text the Jinja template renders. A template that is not of that shape (one that folds the system
prompt into the first user message, numbers turns, or changes a message depending on its
position) is refused with the conversation that differs.

Only the standard library is used; `render` is any function (messages, add_generation_prompt)
-> text, in medchat the run's tokenizer through medchat.chat_format.render.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from medchat.errors import UserError

Render = Callable[[list[dict[str, str]], bool], str]
ROLES = ("system", "user", "assistant")
# Message contents of the probe conversations: plain letters and digits, so that templates that
# trim or escape contents leave them alone, and unlikely to occur in any template's own text.
MARKERS = {"system": "Qx7SYSTEMzz0", "user1": "Qx7USERONEzz1", "assistant1": "Qx7ASSISTONEzz2",
           "user2": "Qx7USERTWOzz3", "assistant2": "Qx7ASSISTTWOzz4"}
# Contents the derived template is checked with (no leading/trailing whitespace: a template
# may trim contents, which Go templates cannot express; medchat sends questions stripped).
CHECK_TEXTS = [
    "What is aspirin used for?",
    'Is it safe with "ibuprofen"?\nI also take {{ vitamin D }} and 50% of a tablet.',
    "Thank you. Anything else I should know?",
    "Take it with food.\n\nSee a pharmacist if unsure.",
]
# Ollama's Modelfile PARAMETER names that come from a run's generation defaults.
PARAMETER_ORDER = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                   "num_predict")


class TemplateShapeError(UserError, ValueError):
    """The run's chat template cannot be written as an Ollama Go template; says why."""


@dataclass
class TemplateParts:
    """A chat template as text around each message: what `render` produces for messages
    m1..mn with a generation prompt is

        (preamble if m1 is not a system message) + sum(prefix[role] + content + suffix[role])
        + generation_prompt
    """

    prefix: dict[str, str]
    suffix: dict[str, str]
    preamble: str  # before the first message when the conversation has no system message
    generation_prompt: str

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the derived template gives for `messages` (generation prompt added)."""
        out = [self.preamble] if not messages or messages[0]["role"] != "system" else []
        for m in messages:
            out += [self.prefix[m["role"]], m["content"], self.suffix[m["role"]]]
        return "".join(out + [self.generation_prompt])


def _split(text: str, markers: list[str], what: str) -> list[str]:
    """The text between consecutive markers (len(markers) + 1 pieces); each marker must occur
    exactly once and in order."""
    pieces, rest = [], text
    for mk in markers:
        if text.count(mk) != 1:
            found = "not at all" if mk not in text else f"{text.count(mk)} times"
            raise TemplateShapeError(
                f"chat template: a message's content appears {found} in the rendering of {what} "
                "(expected exactly once, verbatim); it cannot be written as an Ollama template")
        head, _, rest = rest.partition(mk)
        pieces.append(head)
    return pieces + [rest]


def _strip(text: str, part: str, where: str, front: bool) -> str:
    ok = text.startswith(part) if front else text.endswith(part)
    if not ok:
        raise TemplateShapeError(
            f"chat template: the text around messages depends on their neighbours ({where}); it "
            "cannot be written as per-role prefixes and suffixes for an Ollama template")
    if not part:
        return text
    return text[len(part):] if front else text[:-len(part)]


def _call(render: Render, messages: list[dict[str, str]], gp: bool, what: str) -> str:
    try:
        return render(messages, gp)
    except Exception as e:  # noqa: BLE001 - a template may raise on any conversation shape
        raise TemplateShapeError(f"chat template: rendering {what} failed "
                                 f"({type(e).__name__}: {e})") from e


def derive_parts(render: Render) -> TemplateParts:
    """Per-role prefixes/suffixes, the no-system preamble and the generation prompt of the
    template behind `render`, found by rendering probe conversations (not yet checked)."""
    mk = MARKERS
    msg = lambda role, key: {"role": role, "content": mk[key]}  # noqa: E731
    full = [msg("system", "system"), msg("user", "user1"), msg("assistant", "assistant1"),
            msg("user", "user2"), msg("assistant", "assistant2")]
    t = _split(_call(render, full, False, "system/user/assistant/user/assistant"),
               [m["content"] for m in full], "a five-message conversation")
    su = full[:2]
    su_text = _call(render, su, False, "system/user")
    user_suffix = _split(su_text, [mk["system"], mk["user1"]], "system/user")[2]
    assistant_suffix = t[5]
    user_prefix = _strip(t[3], assistant_suffix, "user after assistant", front=True)
    assistant_prefix = _strip(t[2], user_suffix, "assistant after user", front=True)
    system_suffix = _strip(t[1], user_prefix, "user after system", front=False)
    no_sys = _call(render, full[1:3], False, "user/assistant (no system message)")
    before_user = _split(no_sys, [mk["user1"], mk["assistant1"]], "user/assistant")[0]
    preamble = _strip(before_user, user_prefix, "first user message without a system message",
                      front=False)
    with_prompt = _call(render, su, True, "system/user with a generation prompt")
    generation_prompt = _strip(with_prompt, su_text, "generation prompt", front=True)
    return TemplateParts(
        prefix={"system": t[0], "user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        preamble=preamble, generation_prompt=generation_prompt)


def check_conversations(system_prompt: str, questions: list[str] | None = None
                        ) -> list[list[dict[str, str]]]:
    """Conversations (each ending with a user message) the derived template must render like
    the Jinja one: with and without a system message, one to three turns."""
    texts = [q.strip() for q in (questions or []) if q.strip()] + CHECK_TEXTS
    q1, q2, q3 = texts[0], texts[1], texts[2]
    a1, a2 = CHECK_TEXTS[3], CHECK_TEXTS[0]
    sys_msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    user = lambda c: {"role": "user", "content": c}  # noqa: E731
    asst = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    turns = [[user(q1)], [user(q2), asst(a1), user(q3)],
             [user(q1), asst(a1), user(q2), asst(a2), user(q3)]]
    other_sys = [{"role": "system", "content": CHECK_TEXTS[1]}]
    out = [sys_msgs + t for t in turns] + turns + [other_sys + turns[1]]
    return [c for i, c in enumerate(out) if c not in out[:i]]


@dataclass
class DerivedTemplate:
    parts: TemplateParts
    checked: int  # conversations rendered identically by the derived and the Jinja template
    go_template: str = ""


def derive_template(render: Render, system_prompt: str,
                    questions: list[str] | None = None) -> DerivedTemplate:
    """Derive the template's parts and check them on `check_conversations`; the Go template
    is then built from the checked parts."""
    parts = derive_parts(render)
    convs = check_conversations(system_prompt, questions)
    for conv in convs:
        want = _call(render, conv, True, "a check conversation")
        got = parts.render(conv)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                      min(len(got), len(want)))
            roles = "/".join(m["role"] for m in conv)
            raise TemplateShapeError(
                f"chat template: the {roles} conversation renders differently from per-role "
                f"prefixes and suffixes (first difference at character {at}: "
                f"{want[max(0, at - 20):at + 20]!r} expected, {got[max(0, at - 20):at + 20]!r} "
                "derived); this template cannot be written as an Ollama Go template. Use the "
                "GGUF with llama.cpp (`llama-server --jinja`), which runs the template itself")
    return DerivedTemplate(parts, len(convs), go_template(parts))


# ---------------------------------------------------------------------------------------------
# Go template text


def go_string(text: str) -> str:
    """A Go interpreted string literal for `text` (printable ASCII escapes only, so the
    Modelfile parser, which drops non-printable characters, keeps every byte)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch.isascii() and ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out) + '"'


def _modelfile_safe(text: str) -> bool:
    """Whether `text` survives inside a Modelfile \"\"\"...\"\"\" block unchanged: Ollama's
    parser ends the block at a triple quote and drops characters that are not printable."""
    return '"""' not in text and all(ch.isprintable() or ch in "\n\t" for ch in text)


def go_literal(text: str) -> str:
    """`text` as Go template source: as is where it is plain text, else a string constant
    (text with "{{" would start an action; a trailing "{" would merge with the next one)."""
    if not text:
        return ""
    if "{{" in text or text.endswith("{") or not _modelfile_safe(text) or "\r" in text:
        return "{{ " + go_string(text) + " }}"
    return text


def go_template(parts: TemplateParts) -> str:
    """The Go template (Ollama's TEMPLATE) for `parts`: a loop over .Messages with one branch
    per role, the preamble before a first message that is not a system message, then the
    generation prompt. No whitespace-trimming markers are used, so every character is literal."""
    out = ["{{ range $i, $m := .Messages }}"]
    if parts.preamble:
        out.append('{{ if and (eq $i 0) (ne $m.Role "system") }}'
                   f"{go_literal(parts.preamble)}{{{{ end }}}}")
    for n, role in enumerate(ROLES):
        out.append(("{{ if " if n == 0 else "{{ else if ") + f'eq $m.Role "{role}" }}}}'
                   f"{go_literal(parts.prefix[role])}{{{{ $m.Content }}}}"
                   f"{go_literal(parts.suffix[role])}")
    out.append("{{ end }}{{ end }}")
    out.append(go_literal(parts.generation_prompt))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# The Modelfile


@dataclass
class ModelfileSpec:
    """What a Modelfile says; `text()` writes it in Ollama's syntax."""

    model: str  # FROM: ./file.gguf
    template: str  # Go template
    stop: list[str]
    parameters: dict[str, float | int]  # PARAMETER name value (besides stop)
    system: str | None
    license: str
    adapter: str | None = None  # ADAPTER: ./lora.gguf
    comments: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"# {c}" if c else "#" for c in self.comments]
        lines.append(f"FROM {self.model}")
        if self.adapter:
            lines.append(f"ADAPTER {self.adapter}")
        lines.append(f"TEMPLATE {triple_quoted(self.template, 'TEMPLATE')}")
        if self.system:
            lines.append(f"SYSTEM {triple_quoted(self.system, 'SYSTEM')}")
        for s in self.stop:
            lines.append(f"PARAMETER stop {quote_value(s, 'a stop token')}")
        for name in PARAMETER_ORDER:
            if name in self.parameters:
                lines.append(f"PARAMETER {name} {_number(self.parameters[name])}")
        lines.append(f"LICENSE {triple_quoted(self.license, 'LICENSE')}")
        return "\n".join(lines) + "\n"


def _number(v: float | int) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


def triple_quoted(text: str, what: str) -> str:
    if not _modelfile_safe(text) or "\r" in text:
        raise TemplateShapeError(f"Modelfile {what}: contains a triple quote or a character "
                                 "Ollama's Modelfile parser drops; cannot be written as is")
    return f'"""{text}"""'


def quote_value(text: str, what: str) -> str:
    """A one-line Modelfile value: bare when plain, else in quotes (Ollama strips one pair)."""
    if not text or "\n" in text or "\r" in text or not _modelfile_safe(text):
        raise TemplateShapeError(f"Modelfile: {what} {text!r} cannot be written on one line")
    plain = not any(c.isspace() for c in text) and not text.startswith('"')
    return text if plain else f'"{text}"'


def ollama_parameters(generation: dict[str, float | int], window: int) -> dict[str, float | int]:
    """Sampling PARAMETERs equal to medchat's: temperature and top_p as the run says, no top-k
    and no min-p filter (medchat applies neither; Ollama's defaults are 40 and 0), the repetition
    penalty over the whole conversation like transformers (`window` = the model's context, as a
    count: llama.cpp takes no -1 for it; Ollama's default looks back 64 tokens), and the
    answer length."""
    return {"temperature": float(generation["temperature"]), "top_p": float(generation["top_p"]),
            "top_k": 0, "min_p": 0.0, "repeat_penalty": float(generation["repetition_penalty"]),
            "repeat_last_n": int(window), "num_predict": int(generation["max_new_tokens"])}
