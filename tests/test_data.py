"""Data readers, provenance, the leakage-free split, and every bad-input error."""

import collections
import json

import openpyxl
import pytest

from medchat.command_line import call
from training.data import (DataError, answer_of, check_dataset_command, collect,
                           convert_dataset_command, load_conversations, normalize_question,
                           split_conversations, split_dataset_command, write_jsonl)


def _xlsx(path, rows, sheet="DrugQA", header=("Question", "Focus (Drug)", "Question Type",
                                               "Answer", "Section Title", "URL")):
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = sheet
    ws.append(list(header))
    for r in rows:
        ws.append(list(r))
    wb.save(path)
    return path


GOOD = ("what is aspirin for", "aspirin", "Indication", "pain and fever", "Uses", "http://x/a")


def test_spreadsheet_loads_with_provenance(spreadsheet):
    convs = load_conversations(spreadsheet)
    assert len(convs) == 690
    c = convs[0]
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant"]
    assert c.meta["row"] == 2 and c.meta["focus"] == "rivastigmine"
    assert c.meta["question_type"] == "Interaction"
    assert c.meta["url"].startswith("https://medlineplus.gov/")


def test_split_is_stable_leak_free_and_stratified(spreadsheet):
    convs = load_conversations(spreadsheet)
    a = split_conversations(convs, test_size=0.3, seed=7)
    b = split_conversations(convs, test_size=0.3, seed=7)
    c = split_conversations(convs, test_size=0.3, seed=8)
    key = lambda s: [x.meta["row"] for x in s.test]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    assert len(a.train) + len(a.test) == 690
    assert abs(len(a.test) / 690 - 0.3) < 0.02
    train_q = {normalize_question(x.question) for x in a.train}
    test_q = {normalize_question(x.question) for x in a.test}
    assert not train_q & test_q
    # the spreadsheet really has repeated questions, so the grouping matters
    assert len(convs) - len({x.question for x in convs}) == 39  # exact repeats
    # normalising case/spacing/punctuation finds more near-repeats, all kept on one side
    assert len(convs) - len({normalize_question(x.question) for x in convs}) > 39
    # stratified: every question type with >= 10 samples is ~30% test
    by_type = collections.Counter(x.meta["question_type"] for x in convs)
    test_type = collections.Counter(x.meta["question_type"] for x in a.test)
    for qt, n in by_type.items():
        if n >= 10:
            assert 0.15 <= test_type[qt] / n <= 0.45, qt


def test_validation_part(spreadsheet):
    s = split_conversations(load_conversations(spreadsheet), test_size=0.2, val_size=0.1, seed=1)
    assert abs(len(s.val) / 690 - 0.1) < 0.02
    parts = [{normalize_question(x.question) for x in p} for p in (s.train, s.test, s.val)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_tutorial_json_arrays_load(xtuner_dir):
    train = load_conversations(xtuner_dir / "MedQA2019-structured-train.json")
    test = load_conversations(xtuner_dir / "MedQA2019-structured-test.json")
    assert len(train) + len(test) == 690
    assert train[0].messages[0]["content"].startswith("You are a professional")


def test_jsonl_forms(tmp_path):
    p = tmp_path / "mixed.jsonl"
    recs = [
        {"conversation": [{"system": "S", "input": "q1", "output": "a1"},
                          {"input": "q2", "output": "a2"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"instruction": "Explain", "input": "dose", "output": "take one"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    convs = load_conversations(p)
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[1].messages[0]["role"] == "system"  # default system prompt added
    assert convs[2].messages[1]["content"] == "Explain\n\ndose"


def test_write_jsonl_roundtrip_keeps_provenance(tmp_path):
    x = _xlsx(tmp_path / "a.xlsx", [GOOD])
    convs = load_conversations(x)
    out = write_jsonl(convs, tmp_path / "o.jsonl")
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["conversation"][0]["input"] == "what is aspirin for"
    assert rec["meta"]["row"] == 2 and rec["meta"]["url"] == "http://x/a"
    assert load_conversations(out)[0].messages == convs[0].messages


@pytest.mark.parametrize("case,needle", [
    ("missing_file", "no such file"),
    ("wrong_sheet", "no sheet 'DrugQA'"),
    ("missing_column", "missing column 'Answer'"),
    ("empty_question", "row 3, column 'Question': empty question"),
    ("empty_answer", "row 2, column 'Answer': empty answer"),
    ("non_text", "row 2, column 'Answer': int cell"),
    ("broken_json", "line 2: invalid JSON"),
    ("unknown_format", "line 1: unknown format"),
    ("empty_dataset", "the dataset is empty"),
])
def test_bad_inputs_name_file_and_row(tmp_path, case, needle):
    if case == "missing_file":
        path = tmp_path / "nope.xlsx"
    elif case == "wrong_sheet":
        path = _xlsx(tmp_path / "a.xlsx", [GOOD], sheet="Sheet1")
    elif case == "missing_column":
        path = _xlsx(tmp_path / "a.xlsx", [GOOD[:3]], header=("Question", "Focus (Drug)", "Question Type"))
    elif case == "empty_question":
        path = _xlsx(tmp_path / "a.xlsx", [GOOD, ("  ",) + GOOD[1:]])
    elif case == "empty_answer":
        path = _xlsx(tmp_path / "a.xlsx", [GOOD[:3] + ("",) + GOOD[4:]])
    elif case == "non_text":
        path = _xlsx(tmp_path / "a.xlsx", [GOOD[:3] + (42,) + GOOD[4:]])
    elif case == "broken_json":
        path = tmp_path / "a.jsonl"
        path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n')
    elif case == "unknown_format":
        path = tmp_path / "a.jsonl"
        path.write_text('{"q": "a", "a": "b"}\n')
    else:
        path = tmp_path / "a.jsonl"
        path.write_text("\n\n")
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert needle in str(e.value)
    if case not in ("missing_file", "empty_dataset"):
        assert str(path) in str(e.value)


def test_check_lists_every_problem(tmp_path, capsys):
    path = _xlsx(tmp_path / "a.xlsx", [GOOD, ("",) + GOOD[1:], GOOD[:3] + (3.5,) + GOOD[4:]])
    convs, problems = collect(path)
    assert len(convs) == 1 and len(problems) == 2
    assert call(check_dataset_command, [str(path)], "check-dataset") == 1
    out = capsys.readouterr().out
    assert "row 3" in out and "row 4" in out and "1 usable" in out


def test_failed_convert_leaves_no_output(tmp_path):
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    out = tmp_path / "out.jsonl"
    assert call(convert_dataset_command, [str(bad), "-o", str(out)], "convert-dataset") == 2
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_convert_and_split_commands(tmp_path, capsys):
    x = _xlsx(tmp_path / "a.xlsx", [GOOD] + [(f"question {i}",) + GOOD[1:3] + (f"answer {i}",)
                                            + GOOD[4:] for i in range(9)])
    out = tmp_path / "all.jsonl"
    assert call(convert_dataset_command, [str(x), "--output", str(out)], "convert-dataset") == 0
    assert f"wrote 10 conversations to {out}" in capsys.readouterr().out
    assert len(load_conversations(out)) == 10
    parts = tmp_path / "parts"
    assert call(split_dataset_command, [str(out), "-o", str(parts), "--test-size", "0.2",
                                        "--seed", "3"], "split-dataset") == 0
    sizes = json.loads(capsys.readouterr().out)
    assert sizes == {"train": 8, "test": 2, "val": 0}
    assert len(load_conversations(parts / "test.jsonl")) == 2 and not (parts / "val.jsonl").exists()


def test_csv_through_datasets_with_column_mapping(tmp_path):
    import csv

    p = tmp_path / "qa.csv"
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Q", "A", "Type"])
        w.writerow(["what is aspirin for", "pain", "Indication"])
        w.writerow(["how to store insulin", "", "Storage"])
    convs, problems = collect(p, columns={"question": "Q", "answer": "A", "question_type": "Type"})
    assert len(convs) == 1 and convs[0].meta["question_type"] == "Indication"
    assert problems == [f"{p} row 3, column 'A': empty; give it text or drop the record"]


def test_windows_files_with_bom_and_crlf_load(tmp_path):
    """What Notepad, PowerShell and Excel write: a UTF-8 byte-order mark and CRLF line ends."""
    recs = [{"instruction": "what is aspirin for", "output": "pain and fever"},
            {"messages": [{"role": "user", "content": "dose?"},
                          {"role": "assistant", "content": "one tablet\r\ndaily"}]}]
    jsonl = tmp_path / "win.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in recs).encode()
                      + b"\r\n")
    array = tmp_path / "win.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, indent=2).replace("\n", "\r\n")
                      .encode())
    for path in (jsonl, array):
        convs = load_conversations(path)
        assert [c.question for c in convs] == ["what is aspirin for", "dose?"], path
        assert answer_of(convs[1]) == "one tablet\r\ndaily"  # the text itself is kept as is


def _answers_xlsx(tmp_path):
    rows = [(f"question {i}", "drug", "Usage", f"answer number {i}", "S", "u") for i in range(20)]
    rows += [("what is the dose of x", "x", "Dose", "No answers", "S", "u"),
             ("how do I store y", "y", "Storage", "No answers", "S", "u"),
             ("is z safe", "z", "Usage", "Ask your pharmacist about z.", "S", "u"),
             ("can I take z with food", "z", "Usage", "Ask your pharmacist about z!", "S", "u")]
    return _xlsx(tmp_path / "answers.xlsx", rows)


def test_placeholder_and_shared_answers_are_reported_and_kept_on_one_side(tmp_path, capsys):
    path = _answers_xlsx(tmp_path)
    assert call(check_dataset_command, [str(path)], "check-dataset") == 0  # warnings only
    out = capsys.readouterr().out
    assert "placeholder answer 'No answers' in 2 row(s) (22, 23)" in out
    assert "the same answer is given to 2 different questions (rows 24, 25)" in out
    convs = load_conversations(path)
    for seed in range(30):
        sp = split_conversations(convs, test_size=0.3, seed=seed, stratify=None)
        train = {normalize_question(answer_of(c)) for c in sp.train}
        assert not any(normalize_question(answer_of(c)) in train for c in sp.test), seed


def test_default_split_of_the_spreadsheet_shares_no_answer(spreadsheet):
    """Before answers were grouped, 16 of the 207 test answers of the default split (seed 42,
    30%, stratified by question type) were in the training split word for word."""
    convs = load_conversations(spreadsheet)
    sp = split_conversations(convs, test_size=0.3, seed=42)
    assert sp.sizes() == {"train": 483, "test": 207, "val": 0}
    train_exact = {answer_of(c) for c in sp.train}
    train_norm = {normalize_question(answer_of(c)) for c in sp.train}
    assert sum(answer_of(c) in train_exact for c in sp.test) == 0
    assert sum(normalize_question(answer_of(c)) in train_norm for c in sp.test) == 0
    # and the grouping had something to do: 9 "No answers" rows, answers shared by questions
    assert sum(normalize_question(answer_of(c)) == "no answers" for c in convs) == 9


def test_check_dataset_counts_samples_over_max_length_with_the_tokenizer_only(
        tmp_path, capsys, monkeypatch, tiny_model_dir):
    import transformers

    def no_model(*a, **k):
        raise AssertionError("check-dataset loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    data = tmp_path / "qa.jsonl"
    recs = [{"instruction": f"question {i}",
             "output": f"answer {i}: " + "dose " * (5 if i % 3 else 60)} for i in range(9)]
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    argv = [str(data), "--model", str(tiny_model_dir), "--max-length", "170"]
    assert call(check_dataset_command, argv, "check-dataset") == 0
    out = capsys.readouterr().out
    assert "3 of 9 samples exceed max_length=170 tokens with the tokenizer of" in out
    assert [line.split(":")[0].strip() for line in out.splitlines()
            if line.startswith("  row")] == ["row 1", "row 4", "row 7"]
    # a preset gives the tokenizer and max_length (here a copy naming the tiny model)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"# tiny\nmodel:\n  name: {tiny_model_dir}\ndata:\n  max_length: 2048\n")
    assert call(check_dataset_command, [str(data), "--preset", str(preset)], "check-dataset") == 0
    assert "0 of 9 samples exceed max_length=2048 tokens" in capsys.readouterr().out
