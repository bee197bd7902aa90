"""Ollama's Modelfile grammar and the Go-template subset its chat templates use, in Python, so
that a test can read a Modelfile the way `ollama create` does and render its TEMPLATE the way
Ollama does for a chat request, without Ollama.

- `parse_modelfile` follows Ollama's parser (parser/parser.go): instructions are case-insensitive
  names then a value up to the end of the line; a value in "..." or \"\"\"...\"\"\" (which may span
  lines) is unquoted; lines starting with # are comments; characters that are not printable
  (Go's strconv.IsPrint) are dropped, except the spaces and newlines inside a value. Parameters
  are checked against Ollama's Options (api/types.go): names and value types.
- `GoTemplate` parses text/template source (text, {{ actions }}, trim markers, comments) and
  evaluates: range (with `$i, $m :=`), if / else if / else, end, field chains on `.`, `$` and
  variables, string/number/bool literals, parenthesised calls and the builtins and, or, not, eq,
  ne, len, index. Anything else is a parse error; so is a field that Ollama does not provide.
- `ollama_messages` is what Ollama hands the template for a chat: the Modelfile's SYSTEM first
  when the request has no system message, consecutive same-role messages joined by a blank line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

INSTRUCTIONS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                "parameter", "message", "requires"}
# api.Options / api.Runner json names -> value type
PARAMETERS = {"num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float,
              "min_p": float, "typical_p": float, "repeat_last_n": int, "temperature": float,
              "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float,
              "stop": list, "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int,
              "use_mmap": bool, "num_thread": int}
TOP_FIELDS = {"System", "Messages", "Tools", "Response", "Think", "IsThinkSet", "Query",
              "Document", "Instruction", "Prompt", "Suffix"}
MESSAGE_FIELDS = {"Role", "Content", "Thinking", "Images", "ToolCalls", "ToolName", "ToolCallID"}


class ModelfileError(ValueError):
    pass


def _go_isprint(ch: str) -> bool:
    return ch == " " or (ch.isprintable() and not ch.isspace())


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's ParseFile gives them ("model" for FROM, parameter
    names for PARAMETER)."""
    NIL, NAME, VALUE, PARAM, MESSAGE, COMMENT = range(6)
    commands: list[tuple[str, str]] = []
    state, buf, name, role, line = NIL, [], "", "", 1

    def transition(r: str) -> tuple[int, str | None]:
        if state == NIL:
            if r == "#":
                return COMMENT, None
            if r in " \t\r\n":
                return NIL, None
            return NAME, r
        if state == NAME:
            if r.isascii() and r.isalpha():
                return NAME, r
            if r in " \t":
                return VALUE, None
            raise ModelfileError(f"line {line}: invalid command")
        if state == VALUE:
            return (NIL, r) if r in " \t\r\n" else (VALUE, r)
        if state == PARAM:
            if (r.isascii() and r.isalnum()) or r == "_":
                return PARAM, r
            if r in " \t":
                return VALUE, None
            raise ModelfileError(f"line {line}: unexpected end of a parameter name")
        if state == MESSAGE:
            if r.isascii() and r.isalpha():
                return MESSAGE, r
            if r in " \t":
                return VALUE, None
            raise ModelfileError(f"line {line}: unexpected end of a message role")
        return (NIL, None) if r in "\r\n" else (COMMENT, None)

    for r in text:
        if r in "\r\n":
            line += 1
        nxt, out = transition(r)
        if nxt != state:
            s = "".join(buf)
            if state == NAME:
                if s.lower() not in INSTRUCTIONS:
                    raise ModelfileError(f"line {line}: unknown instruction {s!r}")
                low = s.lower()
                if low == "parameter":
                    nxt = PARAM
                elif low == "message":
                    nxt, name = MESSAGE, low
                else:
                    name = "model" if low == "from" else low
            elif state == PARAM:
                name = s
            elif state == MESSAGE:
                if s not in ("system", "user", "assistant"):
                    raise ModelfileError(f"line {line}: invalid message role {s!r}")
                role = s
            elif state == VALUE:
                value, ok = _unquote(s.strip())
                if not ok or r in " \t":
                    buf.append(r)
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf = []
            state = nxt
        if out is not None and _go_isprint(out):
            buf.append(out)
    if state == VALUE:
        value, ok = _unquote("".join(buf).strip())
        if not ok:
            raise ModelfileError("unexpected end of file inside a quoted value")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (NIL, COMMENT):
        raise ModelfileError("unexpected end of file")
    if not any(c == "model" for c, _ in commands):
        raise ModelfileError("no FROM line")
    return commands


def check_parameters(commands: list[tuple[str, str]]) -> dict[str, Any]:
    """PARAMETER values typed as Ollama's FormatParams would (stop collects a list)."""
    out: dict[str, Any] = {}
    for name, value in commands:
        if name in INSTRUCTIONS or name == "model":
            continue
        kind = PARAMETERS.get(name)
        if kind is None:
            raise ModelfileError(f"unknown parameter {name!r}")
        if kind is list:
            out.setdefault(name, []).append(value)
        elif kind is bool:
            if value not in ("true", "false"):
                raise ModelfileError(f"{name}: {value!r} is not a bool")
            out[name] = value == "true"
        else:
            try:
                out[name] = kind(value)
            except ValueError:
                raise ModelfileError(f"{name}: {value!r} is not {kind.__name__}") from None
            if kind is int and not re.fullmatch(r"-?\d+", value):
                raise ModelfileError(f"{name}: {value!r} is not an integer")
    return out


def ollama_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The messages Ollama's chat handler renders: SYSTEM prepended when the request does not
    start with a system message; consecutive messages of one role merged with a blank line."""
    msgs = list(messages)
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    out: list[dict[str, str]] = []
    for m in msgs:
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


# ---------------------------------------------------------------------------------------------
# Go text/template subset


class GoTemplateError(ValueError):
    pass


@dataclass
class Node:
    kind: str  # text | action | if | range
    value: Any = None  # text, or the expression
    branches: list | None = None  # if: [(cond, body), ...] + else body; range: body
    else_body: list | None = None
    names: tuple[str, ...] = ()  # range variables


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", '"': '"', "'": "'"}


def go_unquote(lit: str) -> str:
    """A Go interpreted string literal's value (the escapes Go accepts)."""
    if lit.startswith("`"):
        return lit[1:-1]
    body, out, i = lit[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            if ch == "\n":
                raise GoTemplateError("newline in a string literal")
            out.append(ch)
            i += 1
            continue
        e = body[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            code = int(body[i + 2:i + 2 + n], 16)
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                raise GoTemplateError(f"invalid Unicode escape \\{e}{body[i + 2:i + 2 + n]}")
            out.append(chr(code))
            i += 2 + n
        elif e in "01234567":
            out.append(chr(int(body[i + 1:i + 4], 8)))
            i += 4
        else:
            raise GoTemplateError(f"unknown escape \\{e}")
    return "".join(out)


_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\\n]|\\.)*"|`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)'
                    r"|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)"
                    r"|(?P<open>\()|(?P<close>\))(?P<after>(?:\.\w+)*)|(?P<word>[A-Za-z_]\w*)"
                    r"|(?P<pipe>\|))")
FUNCS = {"and", "or", "not", "eq", "ne", "len", "index"}


def _tokens(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    src = src.rstrip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot parse {src[pos:]!r}")
        if m.group("open"):
            out.append(("paren", "("))
        elif m.group("close"):
            out.append(("paren", ")"))
            if m.group("after"):
                out.append(("chain", m.group("after")))
        else:
            kind = m.lastgroup
            out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _parse_expr(toks: list[tuple[str, str]]) -> Any:
    """A command: operand, or a function applied to operands; () groups a sub-command."""
    def operand(i: int) -> tuple[Any, int]:
        kind, text = toks[i]
        if kind == "paren" and text == "(":
            depth, j = 1, i + 1
            while depth:
                if toks[j] == ("paren", "("):
                    depth += 1
                elif toks[j] == ("paren", ")"):
                    depth -= 1
                j += 1
            inner = _parse_expr(toks[i + 1:j - 1])
            if j < len(toks) and toks[j][0] == "chain":
                return ("chain", inner, toks[j][1].strip(".").split(".")), j + 1
            return inner, j
        if kind == "str":
            return ("lit", go_unquote(text)), i + 1
        if kind == "num":
            return ("lit", float(text) if "." in text else int(text)), i + 1
        if kind == "word" and text in ("true", "false"):
            return ("lit", text == "true"), i + 1
        if kind == "field":
            return ("field", "." if text == "." else text.strip(".").split(".")), i + 1
        if kind == "var":
            name, _, rest = text.partition(".")
            return ("var", name, rest.split(".") if rest else []), i + 1
        raise GoTemplateError(f"unexpected {text!r}")

    if not toks:
        raise GoTemplateError("empty command")
    if toks[0][0] == "word" and toks[0][1] not in ("true", "false"):
        fn = toks[0][1]
        if fn not in FUNCS:
            raise GoTemplateError(f"function {fn!r} is not one of {sorted(FUNCS)}")
        args, i = [], 1
        while i < len(toks):
            a, i = operand(i)
            args.append(a)
        return ("call", fn, args)
    value, i = operand(0)
    if i != len(toks):
        raise GoTemplateError("more than one operand without a function")
    return value


class GoTemplate:
    """A parsed Go template; `execute(data)` renders it."""

    def __init__(self, source: str):
        self.fields: set[str] = set()
        self.body = self._parse(source)

    def _lex(self, src: str) -> list[tuple[str, str]]:
        items, pos = [], 0
        while pos < len(src):
            start = src.find("{{", pos)
            if start < 0:
                items.append(("text", src[pos:]))
                break
            end = _action_end(src, start + 2)
            text, inner = src[pos:start], src[start + 2:end]
            if inner.startswith("- "):
                text, inner = text.rstrip(" \t\r\n"), inner[2:]
            trim_after = inner.endswith(" -")
            if trim_after:
                inner = inner[:-2]
            items.append(("text", text))
            if not inner.strip().startswith("/*"):
                items.append(("action", inner.strip()))
            pos = end + 2
            if trim_after:
                while pos < len(src) and src[pos] in " \t\r\n":
                    pos += 1
        return [i for i in items if i != ("text", "")]

    def _parse(self, src: str) -> list[Node]:
        items = self._lex(src)
        stack: list[tuple[Node, list[Node]]] = []
        body: list[Node] = []
        for kind, text in items:
            if kind == "text":
                body.append(Node("text", text))
                continue
            word = text.split(None, 1)[0] if text else ""
            rest = text[len(word):].strip()
            if word == "range":
                names: tuple[str, ...] = ()
                m = re.match(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.*)$", rest) or \
                    re.match(r"(\$\w+)\s*:=\s*(.*)$", rest)
                if m:
                    names, rest = tuple(m.groups()[:-1]), m.groups()[-1]
                node = Node("range", self._expr(rest), names=names)
                stack.append((node, body))
                body = []
                node.branches = body
            elif word == "if":
                node = Node("if", None, branches=[(self._expr(rest), [])])
                stack.append((node, body))
                body = node.branches[0][1]
            elif word == "else":
                if not stack or stack[-1][0].kind != "if":
                    raise GoTemplateError("else outside if")
                node = stack[-1][0]
                if rest.startswith("if "):
                    node.branches.append((self._expr(rest[3:]), []))
                    body = node.branches[-1][1]
                elif rest:
                    raise GoTemplateError(f"unsupported else form {text!r}")
                else:
                    node.else_body = []
                    body = node.else_body
            elif word == "end":
                if not stack:
                    raise GoTemplateError("end without a block")
                node, body = stack.pop()
                body.append(node)
            elif word in ("with", "define", "template", "block", "break", "continue"):
                raise GoTemplateError(f"{word!r} is outside the supported subset")
            else:
                body.append(Node("action", self._expr(text)))
        if stack:
            raise GoTemplateError("missing {{ end }}")
        return body

    def _expr(self, text: str) -> Any:
        toks = _tokens(text)
        if any(kind == "pipe" for kind, _ in toks):
            raise GoTemplateError("pipelines are outside the supported subset")
        expr = _parse_expr(toks)
        self._collect(expr)
        return expr

    def _collect(self, e: Any) -> None:
        if e[0] == "field" and e[1] != ".":
            self.fields.add(e[1][0])
        elif e[0] == "call":
            for a in e[2]:
                self._collect(a)
        elif e[0] == "chain":
            self._collect(e[1])

    # -- evaluation ------------------------------------------------------------------------------

    def execute(self, data: dict[str, Any]) -> str:
        unknown = self.fields - TOP_FIELDS
        if unknown:
            raise GoTemplateError(f"fields Ollama does not provide: {sorted(unknown)}")
        out: list[str] = []
        self._run(self.body, data, {"$": data}, out)
        return "".join(out)

    def _run(self, body: list[Node], dot: Any, env: dict[str, Any], out: list[str]) -> None:
        for node in body:
            if node.kind == "text":
                out.append(node.value)
            elif node.kind == "action":
                out.append(_print(self._eval(node.value, dot, env)))
            elif node.kind == "if":
                for cond, branch in node.branches:
                    if _truth(self._eval(cond, dot, env)):
                        self._run(branch, dot, env, out)
                        break
                else:
                    if node.else_body is not None:
                        self._run(node.else_body, dot, env, out)
            elif node.kind == "range":
                seq = self._eval(node.value, dot, env) or []
                for i, item in enumerate(seq):
                    scope = dict(env)
                    if len(node.names) == 2:
                        scope[node.names[0]], scope[node.names[1]] = i, item
                    elif len(node.names) == 1:
                        scope[node.names[0]] = item
                    self._run(node.branches, item, scope, out)

    def _eval(self, e: Any, dot: Any, env: dict[str, Any]) -> Any:
        kind = e[0]
        if kind == "lit":
            return e[1]
        if kind == "field":
            return dot if e[1] == "." else _chain(dot, e[1])
        if kind == "var":
            if e[1] not in env:
                raise GoTemplateError(f"undefined variable {e[1]}")
            return _chain(env[e[1]], e[2])
        if kind == "chain":
            return _chain(self._eval(e[1], dot, env), e[2])
        fn, args = e[1], e[2]
        if fn == "and":  # Go >= 1.18: stops at the first false argument
            v = True
            for a in args:
                v = self._eval(a, dot, env)
                if not _truth(v):
                    return v
            return v
        if fn == "or":
            v = False
            for a in args:
                v = self._eval(a, dot, env)
                if _truth(v):
                    return v
            return v
        vals = [self._eval(a, dot, env) for a in args]
        if fn == "not":
            return not _truth(vals[0])
        if fn == "eq":
            return any(vals[0] == v for v in vals[1:])
        if fn == "ne":
            return vals[0] != vals[1]
        if fn == "len":
            return len(vals[0])
        if fn == "index":
            v = vals[0]
            for i in vals[1:]:
                if isinstance(v, list) and not 0 <= i < len(v):
                    raise GoTemplateError(f"index out of range: {i}")
                v = v[i]
            return v
        raise GoTemplateError(f"unknown function {fn}")


def _action_end(src: str, pos: int) -> int:
    """Where the action opened before `pos` closes ("}}" outside string literals)."""
    while pos < len(src):
        ch = src[pos]
        if ch == '"':
            m = re.compile(r'"(?:[^"\\\n]|\\.)*"').match(src, pos)
            if not m:
                raise GoTemplateError("unterminated string in an action")
            pos = m.end()
        elif ch == "`":
            close = src.find("`", pos + 1)
            if close < 0:
                raise GoTemplateError("unterminated raw string in an action")
            pos = close + 1
        elif src.startswith("}}", pos):
            return pos
        else:
            pos += 1
    raise GoTemplateError("unclosed action")


def _chain(value: Any, names: list[str]) -> Any:
    for n in names:
        if isinstance(value, dict) and "Role" in value and n not in MESSAGE_FIELDS:
            raise GoTemplateError(f"a message has no field {n!r}")
        if not isinstance(value, dict):
            raise GoTemplateError(f"cannot take field {n!r} of {type(value).__name__}")
        value = value.get(n)
    return value


def _truth(v: Any) -> bool:
    return bool(v) if v is not None else False


def _print(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "<no value>"
    return str(v)


def render_ollama_chat(template: str, messages: list[dict[str, str]],
                       system: str | None) -> str:
    """The prompt Ollama builds for a chat request with `messages` to a model whose Modelfile
    has this TEMPLATE and SYSTEM."""
    msgs = ollama_messages(messages, system)
    data = {"System": "\n\n".join(m["content"] for m in msgs if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in msgs],
            "Tools": None, "Response": "", "Think": False, "IsThinkSet": False}
    return GoTemplate(template).execute(data)
