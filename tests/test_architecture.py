"""The structure docs/ARCHITECTURE.md describes, checked on the code itself: which package may
import which (read from every import statement, also those inside functions), one owner of the
run folder's layout, no import-path edits, tests and bench apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medchat", "training", "hub")
FIRST_PARTY = PACKAGES + ("launch", "tests", "bench")
# The contract every stage shares; these import only each other.
SHARED = {"medchat.errors", "medchat.command_line", "medchat.chat_format", "medchat.run_folder",
          "medchat.base_model"}
# Composition roots: they wire stages together.
CLI, SERVER = "medchat.cli", "medchat.server"
UI = {"medchat.app", SERVER, CLI}
# First-party imports inside a function, each deferring a heavy third-party library.
DEFERRED_OK = {(SERVER, "medchat.app")}  # medchat.app imports gradio (~2.5 s) at its top
# Names a path inside a run folder is made of; only the run-folder module joins them.
RUN_PARTS = {"adapter", "merged", "gguf", "eval.json", "eval.md", "medchat.json", "checkpoints",
             "logs", "data", "test.jsonl", "train.jsonl", "val.jsonl", "loss.jsonl"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def source_files(*tops: str) -> list[Path]:
    files = []
    for top in tops:
        p = ROOT / top
        files += [p.with_suffix(".py")] if p.with_suffix(".py").is_file() else sorted(p.rglob("*.py"))
    return [f for f in files if ".venv" not in f.parts]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(first-party module imported, whether inside a function) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                # `from pkg import mod` imports the module; `from mod import name`, the module
                names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base
                         for a in child.names]
            for n in names:
                top = n.split(".")[0]
                if top in FIRST_PARTY and _is_module(n):
                    found.append((n, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(f): imports(f) for f in source_files(*FIRST_PARTY)}


def test_shared_modules_import_only_each_other():
    g = graph()
    for mod in SHARED:
        bad = {m for m, _ in g[mod] if m not in SHARED and m.split(".")[0] in FIRST_PARTY}
        assert not bad, f"{mod} imports {bad}"


def test_chat_does_not_import_training_or_hub():
    for mod, deps in graph().items():
        if not mod.startswith("medchat") or mod in (CLI, SERVER):
            continue
        bad = {m for m, _ in deps if m.startswith(("training", "hub"))}
        assert not bad, f"{mod} imports {bad}: chat code may use only medchat's shared modules"
    server = {m for m, _ in graph()[SERVER]}
    assert not {m for m in server if m.startswith("training")}, server


def test_hub_does_not_import_the_app_or_training():
    for mod, deps in graph().items():
        if mod.startswith("hub"):
            bad = {m for m, _ in deps if not (m.startswith("hub") or m in SHARED)}
            assert not bad, f"{mod} imports {bad}"


def test_training_does_not_import_hub_or_the_ui():
    for mod, deps in graph().items():
        if mod.startswith("training"):
            bad = {m for m, _ in deps if m.startswith("hub") or m in UI}
            assert not bad, f"{mod} imports {bad}"


def test_launch_only_starts_the_app():
    deps = {m for m, _ in graph()["launch"]}
    assert deps == {"medchat", SERVER} or deps == {SERVER}, deps
    assert len((ROOT / "launch.py").read_text().splitlines()) <= 15


def test_tests_and_bench_do_not_import_each_other():
    for mod, deps in graph().items():
        if mod.startswith("tests"):
            assert not [m for m, _ in deps if m.startswith("bench")], mod
        if mod.startswith("bench"):
            assert not [m for m, _ in deps if m.startswith("tests")], mod


def test_first_party_imports_sit_at_module_top():
    for mod, deps in graph().items():
        if mod.startswith("tests"):
            continue  # a test may import what it tests where it needs it
        inside = {m for m, in_fn in deps if in_fn and (mod, m) not in DEFERRED_OK}
        assert not inside, f"{mod} imports {inside} inside a function; import at module top"


def test_no_import_path_edits():
    for f in source_files("tests", "bench", "launch", *PACKAGES):
        if f == Path(__file__).resolve():
            continue  # this file names what it looks for
        text = f.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{f.relative_to(ROOT)} edits sys.path"


def _joins_run_part(node: ast.AST) -> str | None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
            and isinstance(node.right, ast.Constant) and node.right.value in RUN_PARTS:
        return node.right.value
    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("joinpath", "join"):
        for a in node.args:
            if isinstance(a, ast.Constant) and a.value in RUN_PARTS:
                return a.value
    return None


def test_only_the_run_folder_module_knows_the_layout():
    for f in source_files(*PACKAGES):
        if module_name(f) == "medchat.run_folder":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            part = _joins_run_part(node)
            assert part is None, (f"{f.relative_to(ROOT)}:{node.lineno} joins {part!r} by hand; "
                                  "ask medchat.run_folder.Run for the path")


@pytest.mark.parametrize("pattern", [r"\bissue\s*#?\d", r"DESIGN\.md"])
def test_comments_describe_the_code_not_the_tracker(pattern):
    for f in source_files(*FIRST_PARTY):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            assert not re.search(pattern, line, re.I), f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
