"""Dataset commands as users run them (XTuner's check-custom-dataset / log-dataset)."""

import json

from medchat.cli import main as medchat_main
from training.run import main as run_main


def test_check_dataset_reports_every_problem(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n{broken\n"
                 + json.dumps({"instruction": "", "output": "a"}) + "\n")
    assert medchat_main(["check-dataset", str(p)]) == 1
    out = capsys.readouterr().out
    assert f"{p} line 2: invalid JSON" in out and f"{p} line 3, field instruction: empty" in out
    assert "1 usable conversations, 2 problems" in out


def test_check_dataset_ok_on_tutorial_file(xtuner_dir, capsys):
    assert run_main(["check-dataset", str(xtuner_dir / "MedQA2019-structured-test.json")]) == 0
    assert "208 usable conversations, 0 problems" in capsys.readouterr().out


def test_log_dataset_marks_trained_tokens(tmp_path, tiny_model_dir, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"conversation": [{"system": "S", "input": "what dose", "output": "one tablet"}]}) + "\n")
    assert run_main(["log-dataset", str(p), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "[[one tablet<|im_end|>]]" in out
    assert "chat prompt == training prefix (token ids): True" in out


def test_training_rejects_missing_data(tmp_path, capsys):
    assert run_main(["--data", str(tmp_path / "none.xlsx"), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "none.xlsx: no such file" in err and not list(tmp_path.iterdir())
