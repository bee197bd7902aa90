"""The one command line: every command has its own --help with only its own flags, and the
dataset commands behave as users run them (XTuner's check-custom-dataset / log-dataset)."""

import inspect
import json
import re
import subprocess
import sys
import typing

import pytest

from medchat.cli import COMMANDS, main as medchat_main
from medchat.command_line import Opt, build_parser, parse_doc
from training.run import main as run_main


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def _signature_flags(fn) -> set[str]:
    """The flags a command function declares, read from its signature (not from its parser)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out = set()
    for p in inspect.signature(fn).parameters.values():
        if p.kind != p.KEYWORD_ONLY:
            continue
        meta = typing.get_args(hints[p.name])[1:] if typing.get_origin(hints[p.name]) is \
            typing.Annotated else ()
        renamed = [f for m in meta if isinstance(m, Opt) for f in m.flags]
        names = renamed or ["--" + p.name.replace("_", "-")]
        out.update(names)
        if hints[p.name] in (bool, bool | None) and p.default is not False:
            out.update("--no-" + n[2:] for n in names)
    return out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_shows_only_its_own_flags(name, capsys):
    fn = COMMANDS[name]
    with pytest.raises(SystemExit) as e:
        medchat_main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: medchat {name}")
    assert parse_doc(fn).summary.split(".")[0] in " ".join(out.split())
    shown = _flags(out) - {"--help"}
    assert shown == {f for f in _signature_flags(fn) if f.startswith("--")}, name
    for other_name, other in COMMANDS.items():  # e.g. log-dataset must not show training's
        if other is not fn and parse_doc(other).summary != parse_doc(fn).summary:
            assert parse_doc(other).summary not in " ".join(out.split()), (name, other_name)


def test_every_command_documents_every_parameter():
    for name, fn in COMMANDS.items():
        doc = parse_doc(fn)
        assert doc.summary, f"{name}: no one-line summary"
        parser = build_parser(fn, name)
        undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
        assert not undocumented, f"medchat {name}: no help for {undocumented}"


def test_top_level_help_lists_every_command(capsys):
    assert medchat_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out
    assert medchat_main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_python_m_training_run_is_the_train_command():
    out = subprocess.run([sys.executable, "-m", "training.run", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("usage: python -m training.run")
    assert _flags(out) == {f for f in _flags(medchat_help("train"))}


def medchat_help(name: str) -> str:
    return subprocess.run([sys.executable, "-m", "medchat", name, "--help"], capture_output=True,
                          text=True, check=True).stdout


def test_importing_the_command_line_stays_light():
    """Every command module is imported by the table; heavy libraries must stay deferred."""
    code = ("import sys, medchat.cli; heavy = [m for m in ('torch', 'transformers', 'peft', "
            "'gradio', 'deepspeed', 'datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_check_dataset_reports_every_problem(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n{broken\n"
                 + json.dumps({"instruction": "", "output": "a"}) + "\n")
    assert medchat_main(["check-dataset", str(p)]) == 1
    out = capsys.readouterr().out
    assert f"{p} line 2: invalid JSON" in out and f"{p} line 3, field instruction: empty" in out
    assert "1 usable conversations, 2 problems" in out


def test_check_dataset_ok_on_tutorial_file(xtuner_dir, capsys):
    assert medchat_main(["check-dataset", str(xtuner_dir / "MedQA2019-structured-test.json")]) == 0
    assert "208 usable conversations, 0 problems" in capsys.readouterr().out


def test_log_dataset_marks_trained_tokens(tmp_path, tiny_model_dir, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"conversation": [{"system": "S", "input": "what dose", "output": "one tablet"}]}) + "\n")
    assert medchat_main(["log-dataset", str(p), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "[[one tablet<|im_end|>]]" in out
    assert "chat prompt == training prefix (token ids): True" in out


def test_training_rejects_missing_data(tmp_path, capsys):
    assert run_main(["--data", str(tmp_path / "none.xlsx"), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "none.xlsx: no such file" in err and not list(tmp_path.iterdir())
