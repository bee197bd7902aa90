"""Local paths in what is published: find them, take them out of text medchat wrote, and refuse
files that name one.

Runs record where things were on the training machine (the base model's folder, the data file,
the merge's output, an evaluation's sources); a Hub repo or a Space must not. Push and the Space
bundle pass every file through `public_file`: JSON that medchat or transformers/peft wrote
(configs, the manifest, eval.json) comes back with each local path replaced by its last part;
any other file that names one stops the upload, naming the file and the path.

What counts as a local path: an absolute POSIX path under a folder such as /home, /Users, /work,
/tmp, /mnt... (and any folder at / of this machine), a home-relative path (~/...), a Windows path
(C:\\...), a file:// URL, and this machine's own folders (run folder, working folder, home,
Python prefix) verbatim. URLs, relative paths (data/test.jsonl) and text like "mg/kg/day" are
not. Tokenizer vocabularies are only checked for this machine's own folders: a vocabulary may
hold tokens such as "/home/" that name nobody's files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from hub.client import HubError, PlannedFile

# First folders of absolute paths that name a machine's own files (home folders, scratch and
# data mounts, notebooks' working folders); the folders at / of this machine are added when
# scanning. Paths under other roots ("/kg/day" in a dose) are not taken for local paths.
LOCAL_ROOTS = {"home", "Users", "root", "tmp", "var", "private", "work", "workspace", "mnt",
               "media", "data", "opt", "srv", "scratch", "content", "kaggle", "gpfs", "lustre",
               "nfs", "net", "cluster", "usr", "etc", "run", "storage", "shared", "project",
               "projects", "Volumes"}
_SEG = r"[\w.@+\-]+"
# /root/seg/... (two segments at least; not inside a word, a URL or a relative path)
_POSIX_PATH = re.compile(rf"(?<![\w.~:/\\\-])/({_SEG})(?:/{_SEG})*/?(?![\w.@+\-])")
_OTHER_PATHS = re.compile(
    rf"(?<![\w~])~/{_SEG}(?:/{_SEG})*"  # a home-relative path
    rf"|(?<![\w])[A-Za-z]:(?:\\\\|\\|/)(?:{_SEG}(?:\\\\|\\|/))+{_SEG}"  # C:\x\y (or JSON's C:\\x)
    rf"|file:/+{_SEG}(?:/{_SEG})*")  # file:///x/y
# Model files whose text is a vocabulary (checked for this machine's folders only).
VOCAB_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
               "spiece.model", "sentencepiece.bpe.model"}
VOCAB_SUFFIXES = {".model", ".tiktoken"}
# JSON files written by medchat, transformers or peft: rewritten without their local paths
# (a config's _name_or_path, eval.json's sources from older releases, a merge's output folder).
SANITISED_JSON = {"config.json", "generation_config.json", "tokenizer_config.json",
                  "special_tokens_map.json", "adapter_config.json", "added_tokens.json",
                  "chat_template.json", "preprocessor_config.json", "processor_config.json",
                  "eval.json", "medchat.json", "space_config.json"}
TEXT_SUFFIXES = {".json", ".txt", ".jinja", ".md", ".model", ".tiktoken", ".py", ".yaml",
                 ".yml", ".toml", ".cfg", ".ini"}
SCAN_MAX_BYTES = 200 * 1024 * 1024  # larger text files are not model files anyone writes


def _roots() -> set[str]:
    try:
        here = {p.name for p in Path("/").iterdir() if p.is_dir()}
    except OSError:
        here = set()
    return LOCAL_ROOTS | here


def local_paths_in(text: str, machine: Iterable[str] = (), generic: bool = True) -> list[str]:
    """What in `text` looks like an absolute path of someone's machine (each once, in order):
    /home/..., /work/..., ~/..., C:\\..., file://... (`generic`), and any of the `machine`
    folders verbatim."""
    found: list[str] = []
    if generic:
        roots = _roots()
        found += [m.group(0) for m in _POSIX_PATH.finditer(text)
                  if m.group(1) in roots and "/" in m.group(0)[1:]]
        found += [m.group(0) for m in _OTHER_PATHS.finditer(text)]
    found += [p for p in machine if p and p in text]
    return list(dict.fromkeys(found))


def scrub_local_paths(text: str) -> str:
    """Each local-looking path inside `text` -> its last part ('/work/runs/x/adapter' ->
    'adapter'), for text medchat wrote itself (a report line that names a folder)."""
    def last(m: re.Match) -> str:
        return re.split(r"[\\/]+", m.group(0).rstrip("/\\"))[-1]

    roots = _roots()
    text = _POSIX_PATH.sub(lambda m: last(m) if m.group(1) in roots
                           and "/" in m.group(0)[1:] else m.group(0), text)
    return _OTHER_PATHS.sub(last, text)


def _scrub_json(value: Any, machine: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _scrub_json(v, machine) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v, machine) for v in value]
    if isinstance(value, str):
        value = scrub_local_paths(value)
        for p in sorted(machine, key=len, reverse=True):  # longest first: /a/b/c before /a/b
            value = value.replace(p, Path(p).name)
        return value
    return value


def machine_paths(*extra: str | Path | None) -> list[str]:
    """This machine's own folders (working folder, home, Python prefix, and `extra`: the run
    folder, the base model's folder...), those of two parts or more (not '/root' alone)."""
    out = []
    for p in (Path.cwd(), Path.home(), Path(sys.prefix), *extra):
        if not p:
            continue
        for q in {str(Path(p)), str(Path(p).expanduser().resolve())}:
            if q.startswith("/") and len(Path(q).parts) >= 3:
                out.append(q)
    return list(dict.fromkeys(out))


def _text_of(f: PlannedFile) -> str | None:
    """The text of a file to scan: text files whole, a safetensors file's JSON header; None for
    what holds no text."""
    name = Path(f.path_in_repo).name
    suffix = Path(name).suffix.lower()
    if suffix == ".safetensors":
        head = (f.source.open("rb").read(8) if f.source is not None else (f.data or b"")[:8])
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < size <= SCAN_MAX_BYTES:
            return None
        if f.source is not None:
            with f.source.open("rb") as fh:
                fh.seek(8)
                raw = fh.read(size)
        else:
            raw = (f.data or b"")[8:8 + size]
        return raw.decode("utf-8", "replace")
    if suffix not in TEXT_SUFFIXES and name not in VOCAB_FILES or f.size > SCAN_MAX_BYTES:
        return None
    raw = f.source.read_bytes() if f.source is not None else (f.data or b"")
    return raw.decode("utf-8", "replace")


def _found(name: str, text: str, machine: list[str], generic: bool) -> list[str]:
    if not generic:
        return local_paths_in(text, machine, generic=False)
    if name == "tokenizer.json":  # the vocabulary and merges: this machine's folders only
        try:
            data = json.loads(text)
            rest = json.dumps({k: v for k, v in data.items() if k != "model"}, ensure_ascii=False)
        except (ValueError, AttributeError):
            rest = ""
        return local_paths_in(rest, machine) + local_paths_in(text, machine, generic=False)
    if name in VOCAB_FILES or Path(name).suffix.lower() in VOCAB_SUFFIXES:
        return local_paths_in(text, machine, generic=False)
    return local_paths_in(text, machine)


def public_file(f: PlannedFile, machine: list[str], shown_as: str | None = None,
                generic: bool = True) -> PlannedFile:
    """`f` as it may be published: unchanged when it names no local path; JSON that medchat,
    transformers or peft wrote, rewritten without them; otherwise a HubError naming the file
    and what looked like a path. `generic=False` looks for this machine's folders only (source
    code, whose docstrings may show example paths)."""
    name = Path(f.path_in_repo).name
    text = _text_of(f)
    if text is None:
        return f
    found = _found(name, text, machine, generic)
    if not found:
        return f
    shown = shown_as or (str(f.source) if f.source is not None else f.path_in_repo)
    if name in SANITISED_JSON:
        try:
            clean = _scrub_json(json.loads(text), machine)
        except ValueError:
            clean = None
        if clean is not None:
            data = (json.dumps(clean, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            if not local_paths_in(data.decode("utf-8"), machine):
                note = "; ".join(x for x in (f.note, "local paths removed") if x)
                return PlannedFile(f.path_in_repo, len(data), data=data, note=note)
            found = local_paths_in(data.decode("utf-8"), machine)
    raise HubError(f"{shown}: names a local path ({found[0][:120]!r}"
                   + (f" and {len(found) - 1} more" if len(found) > 1 else "")
                   + "); nothing published may point at files of this machine. Remove it from "
                   "the file (or regenerate the file), then try again")
