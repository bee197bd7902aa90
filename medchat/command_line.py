"""Command-line parsers built from typed functions, so a command is written once: as a function.

    def merge(run: str, *, max_shard_size: str = "2GB", overwrite: bool = False) -> int:
        '''Merge a run's adapter into its base.

        Args:
            run: run name or folder
            max_shard_size: largest shard, e.g. 2GB
            overwrite: replace an existing merged/
        '''

becomes `medchat merge RUN [--max-shard-size MAX_SHARD_SIZE] [--overwrite]` with that help.
Rules: parameters before `*` are positionals (optional when they have a default, several when
typed as a list); keyword-only parameters are flags (`--max-shard-size`); `bool` flags default
to off (`--overwrite`) or, when their default is True or None (decided by the command), come
with a `--no-...` form; a `list`
flag may be repeated; `Literal[...]` gives the choices; `Annotated[T, Opt(...)]` renames a flag
or sets its metavar. The first docstring paragraph is the one-line summary, the text up to
`Args:` the description, and each `name: help` line under `Args:` the help of that parameter.
A command returns its exit code (None means 0); a `UserError` is printed as `error: ...` and
exits with 2.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from medchat.errors import UserError


@dataclass(frozen=True)
class Opt:
    """Command-line details for one parameter, as `Annotated` metadata."""

    flags: tuple[str, ...] = ()  # e.g. ("--set",) instead of the default --overrides
    metavar: str | None = None

    def __init__(self, *flags: str, metavar: str | None = None):
        object.__setattr__(self, "flags", tuple(flags))
        object.__setattr__(self, "metavar", metavar)


@dataclass
class Doc:
    summary: str
    description: str
    params: dict[str, str]


def parse_doc(func: Callable) -> Doc:
    """Summary, description (up to `Args:`) and per-parameter help of a Google-style docstring."""
    text = inspect.cleandoc(func.__doc__ or "")
    head, _, args = text.partition("\nArgs:\n")
    params: dict[str, str] = {}
    current = None
    for line in args.splitlines():
        m = re.match(r"^\s{2,8}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 8):
            current = m.group(1)
            params[current] = m.group(2).strip()
        elif current and line.strip():
            params[current] += " " + line.strip()
        elif not line.strip():
            current = None
    summary = head.split("\n\n", 1)[0].replace("\n", " ").strip()
    return Doc(summary, head.strip(), params)


def _unwrap(hint: Any) -> tuple[Any, Opt | None, bool]:
    """(inner type, Opt metadata, whether None is allowed)."""
    opt = None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *meta = typing.get_args(hint)
        opt = next((m for m in meta if isinstance(m, Opt)), None)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else str
    return hint, opt, optional


def _scalar(hint: Any) -> tuple[Callable[[str], Any], list | None]:
    """argparse `type` and `choices` for a scalar hint."""
    if typing.get_origin(hint) is typing.Literal:
        choices = list(typing.get_args(hint))
        return type(choices[0]), choices
    if hint in (int, float, Path):
        return hint, None
    return str, None


def build_parser(func: Callable, prog: str) -> argparse.ArgumentParser:
    """An argparse parser for `func` (see the module docstring for the rules)."""
    doc = parse_doc(func)
    parser = argparse.ArgumentParser(prog=prog, description=doc.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(func, include_extras=True)
    for p in inspect.signature(func).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint, opt, optional = _unwrap(hints.get(p.name, str))
        has_default = p.default is not inspect.Parameter.empty
        default = p.default if has_default else None
        help_ = doc.params.get(p.name, "")
        is_list = typing.get_origin(hint) in (list, tuple)
        inner = typing.get_args(hint)[0] if is_list and typing.get_args(hint) else str
        conv, choices = _scalar(inner if is_list else hint)
        kw: dict[str, Any] = {"help": help_ or None}
        if opt and opt.metavar:
            kw["metavar"] = opt.metavar
        if p.kind == p.KEYWORD_ONLY:
            flags = list(opt.flags) if opt and opt.flags else ["--" + p.name.replace("_", "-")]
            if hint is bool:
                # off by default: --flag; on (or decided later when None): --flag/--no-flag
                kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
                kw["default"] = default
            elif is_list:
                kw.update(action="append", type=conv, choices=choices, default=None)
            else:
                kw.update(type=conv, choices=choices, default=default,
                          required=not has_default)
            if kw.get("help") and has_default and default not in (None, False, (), []) \
                    and hint is not bool:
                kw["help"] += f" (default: {default})"
            parser.add_argument(*flags, dest=p.name, **kw)
        else:
            kw["metavar"] = kw.get("metavar") or p.name.upper()
            if is_list:
                kw.update(nargs="*" if has_default else "+", type=conv, choices=choices)
            else:
                kw.update(type=conv, choices=choices)
                if has_default or optional:
                    kw.update(nargs="?", default=default)
            parser.add_argument(p.name, **kw)
    return parser


def call(func: Callable, argv: list[str] | None, prog: str) -> int:
    """Parse `argv` for `func`, call it, and turn a UserError into `error: ...` and exit code 2."""
    parser = build_parser(func, prog)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    sig = inspect.signature(func)
    for name, value in list(args.items()):
        default = sig.parameters[name].default
        if value is None and isinstance(default, (list, tuple)):
            args[name] = list(default)  # a list flag given no times keeps its default
    positional = [args.pop(p.name) for p in sig.parameters.values()
                  if p.kind == p.POSITIONAL_OR_KEYWORD]
    try:
        result = func(*positional, **args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)
