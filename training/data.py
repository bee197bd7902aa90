"""Data: spreadsheet or JSON/JSONL (XTuner, OpenAI messages, alpaca) -> conversations with
provenance -> XTuner-form JSONL on disk, and a deterministic, leakage-free split.

    medchat convert-dataset DATA -o OUT.jsonl     # like XTuner's xlsx2jsonl
    medchat split-dataset DATA -o OUTDIR          # train/test(/val) JSONL + sizes
    medchat check-dataset DATA [--preset P | --model M] [--max-length N]
                                                  # like xtuner check-custom-dataset, and
                                                  # which samples exceed max_length tokens

Every problem a user can cause is reported with the file and row/line and what to do.
JSON/JSONL is validated line by line here (so errors carry line numbers, which `datasets`'
JSON loader cannot give); encoding maps over a `datasets.Dataset`; CSV/Parquet/Arrow files and
Hub dataset ids go through `datasets.load_dataset`. A training run's own split is written and
read by the run folder (`Run.write_split`, `Run.test_split`).
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

from medchat.base_model import looks_like_repo_id, resolve_base_model
from medchat.chat_format import Conversation, ensure_chat_template, render
from medchat.command_line import Opt
from medchat.errors import UserError
from medchat.run_folder import DEFAULT_SYSTEM_PROMPT, atomic_write_text, sha256_file
from training.config import DEFAULT_COLUMNS, DEFAULT_PRESET, build_config

# openpyxl and datasets are imported in functions: `medchat --help` and the chat app need
# neither, and datasets alone takes about a second to import.

PROVENANCE_KEYS = ("focus", "question_type", "section", "url")
# Answers that say there is no answer (normalised as by `normalize_question`); MedicationQA has
# "No answers" (9 rows), "Unanswerable" and "n/a".
PLACEHOLDER_ANSWERS = {"no answer", "no answers", "unanswerable", "not answerable", "n a", "na",
                       "none", "unknown", "not available", "no information", "tbd", "todo",
                       "null", "nan"}


class DataError(UserError, ValueError):
    """Bad input data; `problems` lists every problem found (file, row/line, what, what to do)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:20]
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(shown[0] if len(shown) == 1 else
                         f"{len(self.problems)} problems:\n  " + "\n  ".join(shown) + more)


# ---------------------------------------------------------------------------------------------
# Readers


def normalize_question(text: str) -> str:
    """Key for duplicate detection: case, spacing and punctuation do not make a new question."""
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return re.sub(r"\s+", " ", text).strip()


def read_spreadsheet(path: str | os.PathLike, sheet: str = "DrugQA",
                     columns: dict[str, str] | None = None,
                     system_prompt: str | None = None) -> tuple[list[Conversation], list[str]]:
    """Read question/answer rows with openpyxl. Returns (conversations, problems)."""
    import openpyxl

    columns = columns or DEFAULT_COLUMNS
    path = Path(path)
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # zip errors, not an xlsx, ...
        raise DataError(f"{path}: cannot open as an .xlsx workbook ({type(e).__name__}: {e}); "
                        "save it as .xlsx or convert it to JSONL") from e
    try:
        if sheet not in wb.sheetnames:
            raise DataError(f"{path}: no sheet {sheet!r}; sheets are {wb.sheetnames}; "
                            "set data.sheet to one of them")
        rows = wb[sheet].iter_rows(values_only=True)
        header = next(rows, None)
        if header is None:
            raise DataError(f"{path} [{sheet}]: the sheet is empty")
        header_idx = {str(h).strip(): i for i, h in enumerate(header) if h is not None}
        idx: dict[str, int] = {}
        for key, col in columns.items():
            if col in header_idx:
                idx[key] = header_idx[col]
            elif key in ("question", "answer"):
                raise DataError(f"{path} [{sheet}] row 1: missing column {col!r} (for {key}); "
                                f"headers are {list(header_idx)}; set data.columns.{key}")
        problems: list[str] = []
        out: list[Conversation] = []
        system = system_prompt or DEFAULT_SYSTEM_PROMPT
        for rownum, row in enumerate(rows, start=2):
            if row is None or all(v is None or (isinstance(v, str) and not v.strip()) for v in row):
                continue  # blank rows in spreadsheets are common and harmless
            values: dict[str, Any] = {}
            for key, i in idx.items():
                v = row[i] if i < len(row) else None
                col = columns[key]
                if key in ("question", "answer"):
                    if v is None or (isinstance(v, str) and not v.strip()):
                        problems.append(f"{path} [{sheet}] row {rownum}, column {col!r}: empty "
                                        f"{key}; fill it in or delete the row")
                        continue
                    if not isinstance(v, str):
                        problems.append(f"{path} [{sheet}] row {rownum}, column {col!r}: "
                                        f"{type(v).__name__} cell ({v!r}), expected text; "
                                        "format the cell as text")
                        continue
                values[key] = v.strip() if isinstance(v, str) else (None if v is None else str(v))
            if "question" not in values or "answer" not in values:
                continue
            meta = {"source": path.name, "row": rownum}
            meta.update({k: values.get(k) for k in PROVENANCE_KEYS if k in idx})
            out.append(Conversation(
                [{"role": "system", "content": system},
                 {"role": "user", "content": values["question"]},
                 {"role": "assistant", "content": values["answer"]}], meta))
        return out, problems
    finally:
        wb.close()


def _detect_format(rec: dict[str, Any]) -> str | None:
    if "conversation" in rec:
        return "xtuner"
    if "messages" in rec:
        return "openai"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    return None


def record_to_conversation(rec: Any, fmt: str, where: str,
                           system_prompt: str | None = None
                           ) -> tuple[Conversation | None, list[str]]:
    """Turn one JSON record (XTuner, OpenAI or alpaca) into a Conversation, or list its problems."""
    if not isinstance(rec, dict):
        return None, [f"{where}: expected a JSON object, got {type(rec).__name__}"]
    if fmt == "auto":
        fmt = _detect_format(rec) or ""
        if not fmt:
            return None, [f"{where}: unknown format (keys {sorted(rec)}); expected 'conversation' "
                          "(XTuner), 'messages' (OpenAI) or 'instruction'/'output' (alpaca)"]
    problems: list[str] = []
    messages: list[dict[str, str]] = []

    def text(value: Any, fld: str, required: bool = True) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                problems.append(f"{where}, field {fld}: empty; give it text or drop the record")
            return None
        if not isinstance(value, str):
            problems.append(f"{where}, field {fld}: {type(value).__name__}, expected a string")
            return None
        return value.strip()

    if fmt == "xtuner":
        turns = rec.get("conversation")
        if not isinstance(turns, list) or not turns:
            return None, [f"{where}, field conversation: expected a non-empty list of turns"]
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                problems.append(f"{where}, field conversation[{i}]: expected an object")
                continue
            if i == 0 and turn.get("system"):
                s = text(turn.get("system"), f"conversation[{i}].system", required=False)
                if s:
                    messages.append({"role": "system", "content": s})
            q = text(turn.get("input"), f"conversation[{i}].input")
            a = text(turn.get("output"), f"conversation[{i}].output")
            if q and a:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    elif fmt == "openai":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return None, [f"{where}, field messages: expected a non-empty list"]
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                problems.append(f"{where}, field messages[{i}]: needs role system/user/assistant")
                continue
            c = text(m.get("content"), f"messages[{i}].content")
            if c:
                messages.append({"role": m["role"], "content": c})
        if messages and messages[-1]["role"] != "assistant":
            problems.append(f"{where}, field messages: must end with an assistant message")
    elif fmt == "alpaca":
        ins = text(rec.get("instruction"), "instruction")
        inp = text(rec.get("input"), "input", required=False)
        out = text(rec.get("output"), "output")
        if rec.get("system"):
            s = text(rec.get("system"), "system", required=False)
            if s:
                messages.append({"role": "system", "content": s})
        if ins and out:
            q = f"{ins}\n\n{inp}" if inp else ins
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": out}]
    else:
        return None, [f"{where}: unknown format {fmt!r}; use xtuner, openai or alpaca"]
    if problems:
        return None, problems
    if not any(m["role"] == "assistant" for m in messages):
        return None, [f"{where}: no question/answer pair"]
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt or DEFAULT_SYSTEM_PROMPT})
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    return Conversation(messages, dict(meta)), []


def _iter_json_records(path: Path) -> tuple[list[tuple[str, Any]], list[str]]:
    """Read a JSON array or JSON Lines file; returns ([(where, record)], problems)."""
    try:
        # utf-8-sig: Windows tools (Notepad, Excel's "CSV UTF-8", PowerShell) start files with a
        # byte-order mark; CRLF line ends are split by splitlines and are JSON whitespace anyway
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    stripped = raw.lstrip()
    if stripped.startswith("["):  # a JSON array, as the XTuner tutorial writes despite '.jsonl'
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: invalid JSON array ({e.msg})") from e
        return [(f"{path} item {i}", rec) for i, rec in enumerate(data)], []
    records, problems = [], []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one complete JSON object")
    return records, problems


def collect(path: str | os.PathLike, fmt: str = "auto", sheet: str = "DrugQA",
            columns: dict[str, str] | None = None,
            system_prompt: str | None = None) -> tuple[list[Conversation], list[str]]:
    """Read any supported source; return (conversations, problems) without raising on row errors."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        if looks_like_repo_id(str(path)):
            return _collect_hub(str(path), fmt, system_prompt, columns)
        raise DataError(f"{path}: no such file; pass --data with a .xlsx, .json or .jsonl file "
                        "(MedicationQA: github.com/abachaa/Medication_QA_MedInfo2019)")
    if p.is_dir():
        raise DataError(f"{p}: is a folder; pass one data file")
    if fmt == "xlsx" or (fmt == "auto" and p.suffix.lower() in (".xlsx", ".xlsm")):
        return read_spreadsheet(p, sheet, columns, system_prompt)
    if p.suffix.lower() in DATASETS_BUILDERS:
        return _collect_hub(str(p), fmt, system_prompt, columns, data_file=p)
    if p.suffix.lower() not in (".json", ".jsonl") and fmt == "auto":
        raise DataError(f"{p}: unknown file type {p.suffix!r}; use .xlsx, .json, .jsonl, .csv "
                        "or .parquet (or set data.format)")
    records, problems = _iter_json_records(p)
    convs = []
    for where, rec in records:
        c, probs = record_to_conversation(rec, fmt, where, system_prompt)
        problems += probs
        if c is not None:
            c.meta.setdefault("source", p.name)
            c.meta.setdefault("row", where.rsplit(" ", 1)[-1])
            convs.append(c)
    return convs, problems


# File types `datasets` reads by builder name (beyond the JSON forms handled line by line above).
DATASETS_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _collect_hub(name: str, fmt: str, system_prompt: str | None,
                 columns: dict[str, str] | None = None,
                 data_file: Path | None = None) -> tuple[list[Conversation], list[str]]:
    """Anything `datasets.load_dataset` reads: a Hub/cached dataset id, or a csv/parquet/arrow
    file."""
    import datasets

    try:
        if data_file is not None:
            kw = {"delimiter": "\t"} if data_file.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(DATASETS_BUILDERS[data_file.suffix.lower()],
                                       data_files=str(data_file), split="train", **kw)
        else:
            ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataError(f"{name}: {'cannot read' if data_file else 'no such file, and'} "
                        f"`datasets.load_dataset` failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
    columns = columns or DEFAULT_COLUMNS
    qcol, acol = columns["question"], columns["answer"]
    convs, problems = [], []
    for i, rec in enumerate(ds):
        where = f"{name} row {i + 2 if data_file else i}"
        if fmt in ("auto", "xlsx") and isinstance(rec, dict) and qcol in rec and acol in rec:
            # a table of questions and answers, read like the spreadsheet
            rec = {"instruction": rec[qcol], "output": rec[acol],
                   "meta": {k: rec.get(columns[k]) for k in PROVENANCE_KEYS
                            if columns.get(k) in rec}}
            c, probs = record_to_conversation(rec, "alpaca", where, system_prompt)
            probs = [x.replace("field instruction", f"column {qcol!r}")
                     .replace("field output", f"column {acol!r}") for x in probs]
        else:
            c, probs = record_to_conversation(rec, fmt, where, system_prompt)
        problems += probs
        if c is not None:
            c.meta.setdefault("source", name)
            c.meta.setdefault("row", i + 2 if data_file else i)
            convs.append(c)
    return convs, problems


def load_conversations(path: str | os.PathLike, fmt: str = "auto", sheet: str = "DrugQA",
                       columns: dict[str, str] | None = None,
                       system_prompt: str | None = None) -> list[Conversation]:
    """Read a source; raise DataError listing every problem, or if nothing usable is left."""
    convs, problems = collect(path, fmt, sheet, columns, system_prompt)
    if problems:
        raise DataError(problems)
    if not convs:
        raise DataError(f"{path}: the dataset is empty (no question/answer pairs found)")
    return convs


def to_dataset(convs: list[Conversation]):
    """A `datasets.Dataset` with columns messages + meta (for .map-based encoding)."""
    import datasets

    return datasets.Dataset.from_list(
        [{"messages": c.messages, "meta": json.dumps(c.meta, ensure_ascii=False)} for c in convs])


def write_jsonl(convs: Iterable[Conversation], path: str | os.PathLike) -> Path:
    """XTuner-form JSONL, one object per line, written atomically (convert/split commands;
    a run's split goes through `Run.write_split`)."""
    lines = [json.dumps(c.to_xtuner(), ensure_ascii=False) for c in convs]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Split


@dataclass
class Split:
    train: list[Conversation]
    test: list[Conversation]
    val: list[Conversation] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "test": len(self.test), "val": len(self.val)}


def answer_of(conv: Conversation) -> str:
    """The sample's (last) answer."""
    return next((m["content"] for m in reversed(conv.messages) if m["role"] == "assistant"), "")


def sample_groups(convs: list[Conversation]) -> dict[str, list[int]]:
    """Samples that must stay on one side of a split: those linked by an equal normalised
    question or an equal normalised answer (transitively). Keyed by the group's smallest
    normalised question, so a dataset without shared answers groups by question alone."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for c in convs:
        q = "q:" + normalize_question(c.question)
        a = normalize_question(answer_of(c))
        find(q)
        if a:
            parent[find("a:" + a)] = find(q)
    members: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(convs):
        members[find("q:" + normalize_question(c.question))].append(i)
    return {min(normalize_question(convs[i].question) for i in idx): idx
            for idx in members.values()}


def split_conversations(convs: list[Conversation], test_size: float = 0.3, val_size: float = 0.0,
                        seed: int = 42, stratify: str | None = "question_type") -> Split:
    """Deterministic split by sample group, stratified by a provenance field.

    Samples whose normalised questions are equal, or whose normalised answers are equal
    (placeholders like "No answers", one answer given to several questions), form one group
    and always land on the same side, so no test question or answer was seen in training.
    Within each stratum, groups are shuffled with `seed` and assigned to test/val until each
    part holds its share of samples.
    """
    groups = sample_groups(convs)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        label = str(convs[members[0]].meta.get(stratify)) if stratify else ""
        strata[label].append(key)
    rng = random.Random(seed)
    parts: dict[str, list[int]] = {"train": [], "test": [], "val": []}
    carry = {"test": 0.0, "val": 0.0}  # fractional shares carried across small strata
    for label in sorted(strata):
        keys = sorted(strata[label])
        rng.shuffle(keys)
        n = sum(len(groups[k]) for k in keys)
        want = {"test": n * test_size + carry["test"], "val": n * val_size + carry["val"]}
        got = {"test": 0, "val": 0}
        for k in keys:
            size = len(groups[k])
            target = next((p for p in ("test", "val") if got[p] + size / 2 <= want[p]), "train")
            if target != "train":
                got[target] += size
            parts[target] += groups[k]
        carry = {p: want[p] - got[p] for p in carry}
    pick = {p: [convs[i] for i in sorted(idx)] for p, idx in parts.items()}
    return Split(pick["train"], pick["test"], pick["val"])


def dataset_info(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(str(path))
    return {"source": str(path), "sha256": sha256_file(p) if p.is_file() else None}


# ---------------------------------------------------------------------------------------------
# Commands

DataFormat = Literal["auto", "xlsx", "xtuner", "openai", "alpaca"]


def _where(c: Conversation) -> str:
    return f"row {c.meta.get('row', '?')}"


def _rows(items: list[Conversation], limit: int = 12) -> str:
    shown = ", ".join(str(c.meta.get("row", "?")) for c in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def answer_findings(convs: list[Conversation]) -> list[str]:
    """Placeholder answers and one answer given to different questions: not errors (training
    can use the data), but worth a look; the split keeps each such group on one side."""
    out: list[str] = []
    by_answer: dict[str, list[Conversation]] = defaultdict(list)
    for c in convs:
        by_answer[normalize_question(answer_of(c))].append(c)
    for key, items in by_answer.items():
        shown = " ".join(answer_of(items[0]).split())  # one line, no-break spaces as spaces
        shown = f"'{shown}'" if len(shown) <= 60 else f"'{shown[:57]}...'"
        if key in PLACEHOLDER_ANSWERS:
            out.append(f"placeholder answer {shown} in {len(items)} row(s) ({_rows(items)}): "
                       "it teaches the model to give no answer; fill in the answers or delete "
                       "the rows")
            continue
        questions = {normalize_question(c.question) for c in items}
        if len(questions) > 1:
            out.append(f"the same answer is given to {len(questions)} different questions "
                       f"(rows {_rows(items)}): {shown}; the split keeps them on one side")
    return out


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """A base model's tokenizer alone, no weights: its folder, else the Hub or its cache, else the
    folder `resolve_base_model` prepares (the offline copy of the default model)."""
    from transformers import AutoTokenizer

    folder = Path(model).expanduser()
    if folder.exists():
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(model, revision=revision,
                                             trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - offline and not cached: the prepared copy, if any
        resolved = resolve_base_model(model, revision, progress=False)
        return AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)


def token_lengths(tokenizer, convs: list[Conversation]) -> list[int]:
    """Tokens of each sample as training encodes it (its chat template, no extra specials)."""
    ensure_chat_template(tokenizer)
    texts = [render(tokenizer, c.messages) for c in convs]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def check_dataset_command(file: str, *, format: DataFormat = "auto", sheet: str = "DrugQA",
                          system_prompt: str | None = None, preset: str | None = None,
                          model: str | None = None, max_length: int | None = None) -> int:
    """Check a dataset file and list every problem with its file and row or line.

    Also reports placeholder answers ("No answers") and answers given to different questions,
    and, with --preset, --model or --max-length, how many samples are longer than max_length
    tokens with the model's tokenizer (and which rows): training truncates or drops those.
    Only the tokenizer is loaded, never the model. Exits with 0 when every record is usable,
    1 when there are problems (or no records).

    Args:
        file: spreadsheet (.xlsx), JSON/JSONL, CSV/Parquet file or Hub dataset id
        format: record format (auto detects it per record)
        sheet: spreadsheet sheet name
        system_prompt: system prompt for records without one (default: medchat's)
        preset: count samples over this preset's data.max_length with its base model's tokenizer
        model: tokenizer of this model instead (Hub id or folder)
        max_length: token limit instead of the preset's data.max_length
    """
    convs, problems = collect(file, format, sheet, None, system_prompt)
    for p in problems:
        print(p)
    print(f"{file}: {len(convs)} usable conversations, {len(problems)} problems")
    if not convs and not problems:
        print(f"{file}: the dataset is empty")
        return 1
    for finding in answer_findings(convs):
        print(f"warning: {file}: {finding}")
    if convs and (preset or model or max_length):
        cfg = build_config(preset or DEFAULT_PRESET)
        if max_length is not None and max_length < 1:
            raise DataError(f"--max-length {max_length}: must be a positive number of tokens")
        limit = max_length or cfg.data.max_length
        name = model or cfg.model.name
        tok = load_tokenizer(name, None if model else cfg.model.revision,
                             cfg.model.trust_remote_code and not model)
        lengths = token_lengths(tok, convs)
        over = [(c, n) for c, n in zip(convs, lengths) if n > limit]
        print(f"{file}: {len(over)} of {len(convs)} samples exceed max_length={limit} tokens "
              f"with the tokenizer of {name} (longest {max(lengths)}); training "
              + ("drops them" if cfg.data.truncation == "drop" else "cuts their answers' ends")
              + (" (raise data.max_length to keep them whole)" if over else ""))
        for c, n in over[:50]:
            print(f"  {_where(c)}: {n} tokens")
        if len(over) > 50:
            print(f"  ... and {len(over) - 50} more")
    return 1 if problems else 0


def convert_dataset_command(file: str, *, output: Annotated[str, Opt("-o", "--output")],
                            format: DataFormat = "auto", sheet: str = "DrugQA",
                            system_prompt: str | None = None) -> int:
    """Convert a dataset to XTuner-form JSONL (one conversation per line, with provenance).

    Nothing is written when the dataset has a problem (run check-dataset to list them all).

    Args:
        file: spreadsheet (.xlsx), JSON/JSONL, CSV/Parquet file or Hub dataset id
        output: JSONL file to write
        format: record format (auto detects it per record)
        sheet: spreadsheet sheet name
        system_prompt: system prompt for records without one (default: medchat's)
    """
    convs = load_conversations(file, format, sheet, None, system_prompt)
    write_jsonl(convs, output)
    print(f"wrote {len(convs)} conversations to {output}")
    return 0


def split_dataset_command(file: str, *, output_dir: Annotated[str, Opt("-o", "--output-dir")],
                          test_size: float = 0.3, val_size: float = 0.0, seed: int = 42,
                          format: DataFormat = "auto", sheet: str = "DrugQA",
                          system_prompt: str | None = None) -> int:
    """Split a dataset into train/test(/val) JSONL files, no question on two sides.

    The split is the one training makes: grouped by normalised question, stratified by
    question type, deterministic for a seed. Prints the sizes as JSON.

    Args:
        file: spreadsheet (.xlsx), JSON/JSONL, CSV/Parquet file or Hub dataset id
        output_dir: folder for train.jsonl, test.jsonl (and val.jsonl)
        test_size: share of questions held out for testing
        val_size: share of questions for a validation part (0 = none)
        seed: split seed (same seed, same split)
        format: record format (auto detects it per record)
        sheet: spreadsheet sheet name
        system_prompt: system prompt for records without one (default: medchat's)
    """
    convs = load_conversations(file, format, sheet, None, system_prompt)
    sp = split_conversations(convs, test_size, val_size, seed)
    out = Path(output_dir)
    for part, items in (("train", sp.train), ("test", sp.test), ("val", sp.val)):
        if items:
            write_jsonl(items, out / f"{part}.jsonl")
    print(json.dumps(sp.sizes()))
    return 0
