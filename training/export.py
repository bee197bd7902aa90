"""Export a run for llama.cpp and Ollama: GGUF files made by llama.cpp's own converters, checked
against the run's manifest, with an Ollama Modelfile and the commands to run them.

    medchat export gguf RUN [--type f16|q8_0|f32] [--adapter-only] [--overwrite]

What is converted: the run's merged model (`runs/<name>/merged/` when `medchat merge` made one;
otherwise the adapter is merged on the fly into a temporary folder with training.merge, which is
removed afterwards), or with --adapter-only the LoRA adapter alone (for llama.cpp's `--lora` and
Ollama's ADAPTER) together with its base model, both as GGUF.

The converters are llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` with their
own gguf-py, from the source distribution of `llama-cpp-python` (version pinned below): looked
up in $MEDCHAT_LLAMA_CPP (a llama.cpp source tree), else the medchat cache
(~/.cache/medchat/llama.cpp/<version>/), else fetched once with pip into that cache. They run as
a subprocess with their gguf-py first on PYTHONPATH.

Before the export is declared done, every GGUF is read back with gguf.GGUFReader and compared
with the run: the embedded chat template, BOS/EOS/end-of-turn ids, the stop tokens (same ids,
same text, control tokens that end generation), whether llama.cpp adds a BOS token on its own
(medchat never does outside the template), the vocabulary, the file type and the sampling
defaults. What the converter set differently is rewritten with gguf-py's metadata copy and
checked again; what cannot be fixed stops the export. Nothing is written under the final name
until every check passes (the folder is staged). What was done and checked is recorded in the
export folder (`export.json`); the Modelfile and a README with the `ollama create` and
`llama-server` commands are written beside the GGUF files (training/modelfile.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medchat.base_model import cache_root, looks_like_repo_id, resolve_ref
from medchat.chat_format import ensure_chat_template, render, stop_token_ids
from medchat.errors import UserError
from medchat.run_folder import Manifest, Run, atomic_write_text, sha256_file, staged_dir
from training.merge import merge
from training.modelfile import (DerivedTemplate, ModelfileSpec, TemplateShapeError,
                                derive_template, ollama_parameters)

# torch/transformers (the run's tokenizer, the on-the-fly merge) and gguf (reading and fixing
# the written files) are imported in functions: the command line imports this module for the
# parser of `medchat export`.

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the sdist whose vendor/llama.cpp holds the converters
LLAMA_CPP_ENV = "MEDCHAT_LLAMA_CPP"  # a llama.cpp source tree to use instead of the cache
CONVERT_MODEL = "convert_hf_to_gguf.py"
CONVERT_LORA = "convert_lora_to_gguf.py"
GGUF_TYPES = ("f16", "q8_0", "f32")
# gguf.LlamaFileType values the converters write for each --outtype.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
RECORD_NAME = "export.json"
MODELFILE_NAME = "Modelfile"
README_NAME = "README.md"
TEMPLATE_NAME = "chat_template.jinja"
# What Ollama reads from a Hub GGUF repo (`ollama run hf.co/OWNER/NAME`) instead of a Modelfile:
# the Go template, the system prompt, and the parameters as JSON.
OLLAMA_HUB_FILES = ("template", "system", "params")
DEFAULT_CONTEXT = 4096  # when a model's config does not say its context length
# Python modules the converters import besides torch/numpy/transformers (pip package name).
CONVERTER_MODULES = {"sentencepiece": "sentencepiece", "yaml": "pyyaml", "tqdm": "tqdm",
                     "safetensors": "safetensors", "requests": "requests"}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # gguf.TokenType
# LoRA options convert_lora_to_gguf.py ignores or cannot express (llama.cpp scales by alpha/r).
LORA_REFUSED = {
    "use_rslora": "rank-stabilised scaling (alpha/sqrt(r)); llama.cpp scales by alpha/r",
    "use_dora": "DoRA magnitude vectors", "alpha_pattern": "per-module alphas",
    "rank_pattern": "per-module ranks", "modules_to_save": "fully trained modules",
    "trainable_token_indices": "trained token rows", "layer_replication": "layer replication",
}
NOT_MEDICAL_ADVICE = ("Not medical advice: this model can be wrong in ways that look confident; "
                      "ask a doctor or pharmacist.")


class ExportError(UserError, RuntimeError):
    """An export that cannot be made or checked; the message says what and what to do."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Finding llama.cpp's converters


def fetch_command(target: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    return (f"{sys.executable} -m pip download --no-deps --no-binary :all: "
            f"llama-cpp-python=={version} -d {target}")


def _is_tree(p: Path) -> bool:
    return ((p / CONVERT_MODEL).is_file() and (p / CONVERT_LORA).is_file()
            and (p / "gguf-py/gguf/__init__.py").is_file())


def llama_cpp_cache(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / "llama.cpp" / version


def find_llama_cpp(fetch: bool = True, version: str = LLAMA_CPP_PYTHON_VERSION,
                   progress: bool = True) -> Path:
    """The llama.cpp source tree holding the converters: $MEDCHAT_LLAMA_CPP, else the cache,
    else (when `fetch`) the llama-cpp-python sdist fetched with pip and unpacked into the cache."""
    explicit = os.environ.get(LLAMA_CPP_ENV)
    if explicit:
        tree = Path(explicit).expanduser()
        if not _is_tree(tree):
            raise ExportError(f"${LLAMA_CPP_ENV}={explicit}: not a llama.cpp source tree (needs "
                              f"{CONVERT_MODEL}, {CONVERT_LORA} and gguf-py/); unset it to use "
                              "the medchat cache")
        return tree
    tree = llama_cpp_cache(version)
    if _is_tree(tree):
        return tree
    if not fetch:
        raise ExportError(f"llama.cpp's converters are not in {tree}; fetch them with "
                          f"`{fetch_command(tree.parent)}` and unpack vendor/llama.cpp to {tree}, "
                          f"or point ${LLAMA_CPP_ENV} at a llama.cpp checkout")
    if progress:
        log(f"fetching llama.cpp's converters (llama-cpp-python=={version} source, ~77 MB, "
            f"once) into {tree}")
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(
                f"could not fetch llama.cpp's converters with pip ({last[0]}). On a connected "
                f"machine run `{fetch_command(tree.parent)}`, then unpack its vendor/llama.cpp "
                f"folder to {tree} (or set ${LLAMA_CPP_ENV} to a llama.cpp checkout)")
        _unpack_vendor(archives[0], tree, version)
    return tree


def _unpack_vendor(archive: Path, tree: Path, version: str) -> None:
    """vendor/llama.cpp of the sdist -> `tree`, staged (an interrupted unpack leaves nothing)."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar, staged_dir(tree, overwrite=True) as tmp:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        if not members:
            raise ExportError(f"{archive.name}: has no vendor/llama.cpp folder; "
                              f"expected the llama-cpp-python {version} source distribution")
        tar.extractall(tmp, members=members, filter="data")
        if not _is_tree(tmp):
            raise ExportError(f"{archive.name}: vendor/llama.cpp lacks the converters")


def llama_server(build: bool = True, version: str = LLAMA_CPP_PYTHON_VERSION,
                 progress: bool = True) -> Path:
    """llama.cpp's `llama-server`, built once (CPU, Release) from the same source as the
    converters into the medchat cache: $MEDCHAT_LLAMA_SERVER, else the cached build, else (when
    `build`) cmake now (20-45 minutes on 2 cores). For testing and benchmarking exports."""
    explicit = os.environ.get("MEDCHAT_LLAMA_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ExportError(f"$MEDCHAT_LLAMA_SERVER={explicit}: not an executable")
        return Path(explicit)
    build_dir = llama_cpp_cache(version).with_name(f"{version}-server-build")
    binary = build_dir / "bin" / "llama-server"
    if binary.is_file() or not build:
        if not binary.is_file():
            raise ExportError(f"{binary}: llama-server is not built; build it with `make "
                              "llama-server` (cmake and a C++ compiler needed)")
        return binary
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise ExportError(f"building llama-server needs {' and '.join(missing)}; install them "
                          "(e.g. apt-get install cmake g++) or set $MEDCHAT_LLAMA_SERVER")
    tree = find_llama_cpp(progress=progress)
    if progress:
        log(f"building llama.cpp's llama-server into {build_dir} (once; 20-45 min on 2 cores)")
    steps = [["cmake", "-S", str(tree), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
             + (["-G", "Ninja"] if shutil.which("ninja") else []),
             ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j",
              str(os.cpu_count() or 2)]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n  ".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise ExportError(f"building llama-server failed ({' '.join(cmd[:2])}):\n  {tail}")
    return binary


def check_converter_modules() -> None:
    missing = [pkg for mod, pkg in CONVERTER_MODULES.items()
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ExportError(f"llama.cpp's converters need {', '.join(missing)}: "
                          f"`pip install {' '.join(missing)}` (or `pip install 'medchat[export]'`)")


def run_converter(tree: Path, script: str, args: list[str], what: str) -> float:
    """Run one of llama.cpp's converters with its own gguf-py; seconds taken."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "gguf-py")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(tree / script), *args], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr + done.stdout).strip().splitlines()
        tail = "\n  ".join(line for line in lines[-12:] if "Writing:" not in line)
        hint = ""
        if "ModuleNotFoundError" in tail:
            hint = " (a Python module the converter needs is missing: install it into this " \
                   "environment)"
        elif "pre-tokenizer" in tail:
            hint = " (llama.cpp does not know this tokenizer's pre-tokenizer)"
        raise ExportError(f"llama.cpp's {script} failed converting {what}{hint}:\n  {tail}")
    return round(time.perf_counter() - t0, 2)


# ---------------------------------------------------------------------------------------------
# What the GGUF must say


@dataclass
class Expected:
    """The run's side of the comparison, from its manifest and tokenizer."""

    chat_template: str
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    stop_ids: list[int]  # every stop token that is one token
    stop_strings: list[str]  # stop tokens that are not one token (enforced as stop strings)
    tokens: list[str]  # the vocabulary, by id
    sampling: dict[str, float | int]
    file_type: int
    eom_id: int | None = None  # a third single-token stop, when there is one


@dataclass
class Check:
    name: str
    ok: bool
    expected: Any = None
    found: Any = None
    fixed: bool = False  # found different, rewritten, and equal on the re-check
    note: str = ""


def run_tokenizer(folder: Path, template: str | None, trust_remote_code: bool = False):
    """The run's tokenizer: `folder`'s (merged model, adapter or base) with the run's template
    (`trust_remote_code`: the tokenizer's own code, when the run's base ships one)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ExportError(f"{folder}: tokenizer cannot be loaded ({type(e).__name__}: {e})") from e
    ensure_chat_template(tok, template or None)
    return tok


def context_length(model_dir: Path) -> int:
    """The model's context (config.json), the window llama.cpp's repetition penalty looks back
    over: llama.cpp has no "whole context" value (a negative window turns the penalty off)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cfg = {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    return DEFAULT_CONTEXT


def gguf_sampling(manifest: Manifest, window: int) -> dict[str, float | int]:
    """llama.cpp's default-sampling metadata (general.sampling.*) for the run's generation
    defaults: the Modelfile's values, with the repetition penalty window as a token count."""
    p = ollama_parameters(dataclasses.asdict(manifest.chat.generation), window)
    return {"general.sampling.temp": p["temperature"], "general.sampling.top_p": p["top_p"],
            "general.sampling.top_k": p["top_k"], "general.sampling.min_p": p["min_p"],
            "general.sampling.penalty_repeat": p["repeat_penalty"],
            "general.sampling.penalty_last_n": p["repeat_last_n"]}


def expected_for(manifest: Manifest, tok, gguf_type: str, window: int) -> Expected:
    ids, strings = stop_token_ids(tok, manifest.chat.stop_tokens)
    first = tok.convert_tokens_to_ids(manifest.chat.stop_tokens[0]) \
        if manifest.chat.stop_tokens else tok.eos_token_id
    eot = first if isinstance(first, int) and first != tok.unk_token_id else tok.eos_token_id
    extra = [i for i in ids if i not in (eot, tok.eos_token_id)]
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    return Expected(chat_template=tok.chat_template, bos_id=tok.bos_token_id,
                    eos_id=tok.eos_token_id, eot_id=eot, stop_ids=ids, stop_strings=strings,
                    tokens=vocab, sampling=gguf_sampling(manifest, window),
                    file_type=FILE_TYPES[gguf_type], eom_id=extra[0] if len(extra) == 1 else None)


def read_fields(path: Path) -> tuple[dict[str, Any], int]:
    """Every metadata value of a GGUF file (arrays as lists) and its tensor count."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))  # parsing the vocabulary's fields takes seconds: read once
    fields = fields_of(reader)
    count = len(reader.tensors)
    del reader  # releases the memory map before the file is moved or rewritten
    return fields, count


def fields_of(reader) -> dict[str, Any]:
    return {name: f.contents() for name, f in reader.fields.items()
            if not name.startswith("GGUF.")}


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-6
    return a == b


def check_model(fields: dict[str, Any], exp: Expected) -> list[Check]:
    """Compare a model GGUF's metadata with the run (every check, passed or not)."""
    tok = "tokenizer.ggml."
    checks = [Check("chat template", fields.get("tokenizer.chat_template") == exp.chat_template,
                    "the run's template", "same" if fields.get("tokenizer.chat_template")
                    == exp.chat_template else _short(fields.get("tokenizer.chat_template")))]
    for key, want in (("bos_token_id", exp.bos_id), ("eos_token_id", exp.eos_id),
                      ("eot_token_id", exp.eot_id), ("eom_token_id", exp.eom_id)):
        found = fields.get(tok + key)
        # an end of turn that is the eos token already ends generation in llama.cpp
        same_as_eos = key == "eot_token_id" and found is None and want == exp.eos_id
        if want is not None:
            checks.append(Check(key.replace("_", " "), found == want or same_as_eos, want,
                                found, note="the eos token" if same_as_eos else ""))
    checks.append(Check("add bos token", fields.get(tok + "add_bos_token") is False, False,
                        fields.get(tok + "add_bos_token"),
                        note="medchat renders BOS only where the template writes it"))
    if tok + "add_eos_token" in fields:
        checks.append(Check("add eos token", fields[tok + "add_eos_token"] is False, False,
                            fields[tok + "add_eos_token"]))
    tokens = fields.get(tok + "tokens") or []
    types = fields.get(tok + "token_type") or []
    for i in exp.stop_ids:
        text = tokens[i] if i < len(tokens) else None
        kind = types[i] if i < len(types) else None
        checks.append(Check(f"stop token {exp.tokens[i]!r}",
                            text == exp.tokens[i] and kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED),
                            f"id {i}, control token", f"{text!r}, type {kind}"))
    n = len(exp.tokens)
    wrong = [i for i in range(min(n, len(tokens))) if tokens[i] != exp.tokens[i]]
    checks.append(Check("vocabulary", len(tokens) >= n and not wrong, f"{n} tokens as the run's",
                        f"{len(tokens)} tokens" + (f", {len(wrong)} differ (first id {wrong[0]})"
                                                   if wrong else "")))
    checks.append(Check("file type", fields.get("general.file_type") == exp.file_type,
                        exp.file_type, fields.get("general.file_type")))
    here = [p for p in (str(Path.home()), os.getcwd()) if len(p) > 1]
    local = [k for k, v in fields.items() if isinstance(v, str) and not k.startswith("tokenizer.")
             and (os.path.isabs(v) or any(p in v for p in here))]
    checks.append(Check("no local paths", not local, "no metadata naming a local folder",
                        local or "none"))
    wrong_sampling = {k: fields.get(k) for k, v in exp.sampling.items()
                      if not _close(fields.get(k), v)}
    checks.append(Check("sampling defaults", not wrong_sampling, exp.sampling,
                        wrong_sampling or "same"))
    return checks


def check_lora(fields: dict[str, Any], tensors: int, alpha: float, pairs: int) -> list[Check]:
    return [Check("adapter type", (fields.get("general.type"), fields.get("adapter.type"))
                  == ("adapter", "lora"), "adapter/lora",
                  f"{fields.get('general.type')}/{fields.get('adapter.type')}"),
            Check("lora alpha", _close(fields.get("adapter.lora.alpha"), float(alpha)), alpha,
                  fields.get("adapter.lora.alpha")),
            Check("lora tensors", tensors == 2 * pairs, 2 * pairs, tensors,
                  note="an A and a B matrix per adapted weight")]


def _short(v: Any) -> Any:
    return v if not isinstance(v, str) or len(v) < 80 else v[:77] + "..."


def fix_metadata(path: Path, exp: Expected, failed: list[Check], reader=None) -> list[str]:
    """Rewrite the fixable metadata of `path` (open in `reader`, if given) to the run's values
    with gguf-py's metadata copy; the names of what was rewritten. Vocabulary, token types and
    file type are not fixable."""
    import gguf
    import gguf.scripts.gguf_new_metadata as gnm
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    T = gguf.GGUFValueType
    tk = "tokenizer.ggml."
    ids = {"bos token id": (tk + "bos_token_id", exp.bos_id),
           "eos token id": (tk + "eos_token_id", exp.eos_id),
           "eot token id": (tk + "eot_token_id", exp.eot_id),
           "eom token id": (tk + "eom_token_id", exp.eom_id)}
    new: dict[str, Any] = {}
    done: list[str] = []
    for c in failed:
        if c.name == "chat template":
            new[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = MetadataDetails(T.STRING, exp.chat_template)
        elif c.name in ids:
            new[ids[c.name][0]] = MetadataDetails(T.UINT32, ids[c.name][1])
        elif c.name in ("add bos token", "add eos token"):
            new[tk + c.name.replace(" ", "_")] = MetadataDetails(T.BOOL, False)
        elif c.name == "sampling defaults":
            for k, v in exp.sampling.items():
                new[k] = MetadataDetails(T.INT32 if isinstance(v, int) else T.FLOAT32, v)
        else:
            continue
        done.append(c.name)
    if not new:
        return []
    reader = reader or gguf.GGUFReader(str(path))
    out = path.with_name(path.name + ".fixed")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    bar = gnm.tqdm
    gnm.tqdm = functools.partial(bar, disable=True)  # the copy's progress bar: not for users
    try:
        copy_with_new_metadata(reader, writer, new, [])
    finally:
        gnm.tqdm = bar
    del reader
    os.replace(out, path)
    return done


# ---------------------------------------------------------------------------------------------
# The export


@dataclass
class ExportedFile:
    name: str
    role: str  # model | lora | base
    bytes: int
    sha256: str


@dataclass
class ExportResult:
    folder: Path
    gguf_type: str
    adapter_only: bool
    files: list[ExportedFile]
    seconds: dict[str, float]
    checks: dict[str, list[Check]]  # file name -> checks
    source: str
    template: DerivedTemplate | None
    record: dict[str, Any] = field(default_factory=dict)


def _base_id(manifest: Manifest) -> str:
    """The base model by Hub id; a local folder by its name only (exports name no local path)."""
    ref = manifest.base_model
    if ref.hub_id or looks_like_repo_id(ref.name):
        return ref.hub_id or ref.name
    return Path(ref.name).name


def _license_text(manifest: Manifest, base_dir: Path | None) -> str:
    """The base model's license id when its folder's README says it, and where to read it."""
    base = _base_id(manifest)
    lic = None
    readme = base_dir / "README.md" if base_dir else None
    if readme and readme.is_file():
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines()[:40]:
            if line.startswith("license:"):
                lic = line.split(":", 1)[1].strip()
                break
    where = f"https://huggingface.co/{base}" if looks_like_repo_id(base) else "its model card"
    return (f"{lic or 'The license of the base model'} (inherited from the base model {base}; "
            f"see {where}). Fine-tuned by medchat run '{manifest.name}'. {NOT_MEDICAL_ADVICE}")


def _metadata_override(manifest: Manifest, path: Path, window: int) -> Path:
    """The converter's --metadata file: name, base model and llama.cpp's sampling defaults."""
    data: dict[str, Any] = {"general.name": manifest.name, **gguf_sampling(manifest, window)}
    base = _base_id(manifest)
    if looks_like_repo_id(base):
        data["general.base_models"] = [{"name": base.split("/")[-1], "organization":
                                        base.split("/")[0],
                                        "repo_url": f"https://huggingface.co/{base}"}]
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def _convert_checked(path: Path, exp: Expected, progress: bool) -> list[Check]:
    """Check a converted model GGUF, fix what is fixable, check again; refuse what is left."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    checks = check_model(fields_of(reader), exp)
    failed = [c for c in checks if not c.ok]
    fixed: list[str] = []
    if failed:
        fixed = fix_metadata(path, exp, failed, reader)
    del reader
    if failed:
        if fixed and progress:
            log(f"  {path.name}: the converter set {', '.join(fixed)} differently from the run; "
                "rewritten with gguf-py")
        fields, _ = read_fields(path)
        checks = check_model(fields, exp)
        for c in checks:
            c.fixed = c.ok and c.name in fixed
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = "; ".join(f"{c.name}: expected {c.expected}, found {c.found}" for c in bad)
        raise ExportError(f"{path.name}: does not match the run after conversion ({lines}); "
                          "nothing was exported. The tokenizer the converter read differs from "
                          "the run's: re-run `medchat merge RUN --overwrite` and export again")
    return checks


def _check_lora_config(adapter_dir: Path) -> dict[str, Any]:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json + adapter_model.safetensors; "
                          "nothing to export with --adapter-only (train the run first)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key, what in LORA_REFUSED.items():
        if cfg.get(key):
            raise ExportError(f"{cfg_path}: {key} is set ({what}); llama.cpp's LoRA format "
                              "cannot express it. Export the merged model instead (drop "
                              "--adapter-only)")
    if str(cfg.get("peft_type", "LORA")).split(".")[-1].upper() != "LORA":
        raise ExportError(f"{cfg_path}: not a LoRA adapter; export the merged model instead")
    return cfg


def _lora_pairs(adapter_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(1 for k in f.keys() if ".lora_A." in k or ".lora_embedding_A" in k)


def _file_entry(path: Path, role: str) -> ExportedFile:
    return ExportedFile(path.name, role, path.stat().st_size, sha256_file(path))


def export_gguf(run: Run | str, gguf_type: str = "f16", *, adapter_only: bool = False,
                overwrite: bool = False, progress: bool = True,
                fetch: bool = True, allow_remote_code: bool = False) -> ExportResult:
    """Export a run as GGUF into its gguf folder (see the module docstring); returns what was
    written and every check made. A base whose manifest says it needs trust_remote_code is
    loaded with it (as training loaded it); for a run pulled from the Hub only when
    `allow_remote_code` (the repo's code would run here), as `medchat merge` decides."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--type {gguf_type!r}: one of {', '.join(GGUF_TYPES)}")
    run = run if isinstance(run, Run) else Run.open(run)
    manifest = run.manifest()
    trust = bool(manifest.base_model.trust_remote_code)
    if trust and manifest.source.hub_repo and not allow_remote_code:
        raise ExportError(f"run {manifest.name} was pulled from {manifest.source.hub_repo} and its "
                          "base model runs its own code (trust_remote_code); pass "
                          "--trust-remote-code if you trust that repo")
    if run.gguf_dir.exists() and not overwrite:
        raise ExportError(f"{run.gguf_dir} already exists; pass --overwrite to replace it")
    if not adapter_only and not run.has_merged() and not run.has_adapter():
        raise ExportError(f"{run.path}: has neither a merged model nor an adapter; train it first")
    if adapter_only:
        lora_cfg = _check_lora_config(run.adapter_dir)
    check_converter_modules()
    tree = find_llama_cpp(fetch=fetch, progress=progress)
    seconds: dict[str, float] = {}
    checks: dict[str, list[Check]] = {}
    files: list[ExportedFile] = []
    base_dir: Path | None = None
    t_all = time.perf_counter()
    try:
        with staged_dir(run.gguf_dir, overwrite=overwrite) as out, \
                tempfile.TemporaryDirectory(dir=run.path, prefix=".export-") as work:
            work_dir = Path(work)
            if adapter_only:
                base_dir = resolve_ref(manifest.base_model, progress=progress).path
                src, source = base_dir, "the run's base model, with the LoRA adapter beside it"
            elif run.has_merged():
                src, source = run.merged_dir, "the run's merged model (medchat merge)"
                base_dir = None
            else:
                base_dir = resolve_ref(manifest.base_model, progress=progress).path
                if progress:
                    log(f"no merged model in {run.merged_dir}: merging the adapter into "
                        f"{_base_id(manifest)} in a temporary folder (run `medchat merge` to "
                        "keep one)")
                t0 = time.perf_counter()
                src = work_dir / "merged-model"
                merge(base_dir, run.adapter_dir, src, dtype="float32" if gguf_type == "f32"
                      else "auto", chat_template=manifest.chat.template,
                      stop_tokens=manifest.chat.stop_tokens, progress=False,
                      trust_remote_code=trust)
                seconds["merge"] = round(time.perf_counter() - t0, 2)
                source = "the run's adapter merged on the fly into its base (training.merge)"
            tok_dir = (run.adapter_dir if adapter_only and any(run.adapter_dir.glob("tokenizer*"))
                       else src)
            tok = run_tokenizer(tok_dir, manifest.chat.template, trust)
            window = context_length(src)
            exp = expected_for(manifest, tok, gguf_type, window)
            meta = _metadata_override(manifest, work_dir / "metadata.json", window)
            derived = ollama_template(run, manifest, tok)  # refused before converting anything
            model_name = (f"{_base_id(manifest).split('/')[-1]}-base-{gguf_type}.gguf"
                          if adapter_only else f"{manifest.name}-{gguf_type}.gguf")
            if progress:
                log(f"converting {source} to GGUF {gguf_type} with llama.cpp's {CONVERT_MODEL} "
                    f"(llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) ...")
            seconds["convert_model"] = run_converter(
                tree, CONVERT_MODEL, [str(src), "--outtype", gguf_type, "--outfile",
                                      str(out / model_name), "--model-name",
                                      _base_id(manifest) if adapter_only else manifest.name,
                                      "--metadata", str(meta)], f"{src.name}/")
            checks[model_name] = _convert_checked(out / model_name, exp, progress)
            files.append(_file_entry(out / model_name, "base" if adapter_only else "model"))
            lora_name = None
            if adapter_only:
                lora_name = f"{manifest.name}-lora-{gguf_type}.gguf"
                if progress:
                    log(f"converting the LoRA adapter with llama.cpp's {CONVERT_LORA} ...")
                seconds["convert_lora"] = run_converter(
                    tree, CONVERT_LORA, [str(run.adapter_dir), "--base", str(base_dir),
                                         "--outtype", gguf_type, "--outfile",
                                         str(out / lora_name)], "the adapter")
                fields, n_tensors = read_fields(out / lora_name)
                lora_checks = check_lora(fields, n_tensors, lora_cfg["lora_alpha"],
                                         _lora_pairs(run.adapter_dir))
                bad = [c for c in lora_checks if not c.ok]
                if bad:
                    raise ExportError(f"{lora_name}: " + "; ".join(
                        f"{c.name}: expected {c.expected}, found {c.found}" for c in bad))
                checks[lora_name] = lora_checks
                files.append(_file_entry(out / lora_name, "lora"))
            _write_side_files(out, manifest, tok, derived, model_name, lora_name,
                              base_dir if adapter_only else None, window)
            seconds["total"] = round(time.perf_counter() - t_all, 2)
            result = ExportResult(run.gguf_dir, gguf_type, adapter_only, files, seconds, checks,
                                  source, derived)
            result.record = export_record(result, manifest)
            atomic_write_text(out / RECORD_NAME, json.dumps(result.record, indent=2,
                                                            ensure_ascii=False) + "\n")
            for p in out.iterdir():
                p.chmod(0o644)
    except FileExistsError as e:  # another export created the folder meanwhile
        raise ExportError(f"{e}") from e
    return result


def ollama_template(run: Run, manifest: Manifest, tok) -> DerivedTemplate:
    """The run's template in Ollama's form, checked on conversations with its held-out
    questions (training/modelfile.py); a template that has none stops the export."""
    try:
        return derive_template(lambda m, g: render(tok, m, g), manifest.chat.system_prompt,
                               run.split_questions("test")[:2])
    except TemplateShapeError as e:
        raise ExportError(f"{e}. Nothing was exported") from e


def _write_side_files(out: Path, manifest: Manifest, tok, derived: DerivedTemplate,
                      model_name: str, lora_name: str | None, base_dir: Path | None,
                      window: int) -> None:
    """Modelfile, Ollama's template/system/params, chat_template.jinja and README.md."""
    spec = modelfile_spec(manifest, derived, model_name, lora_name, base_dir, window)
    atomic_write_text(out / MODELFILE_NAME, spec.text())
    atomic_write_text(out / "template", spec.template)
    if spec.system:
        atomic_write_text(out / "system", spec.system)
    params = {"stop": spec.stop, **spec.parameters}
    atomic_write_text(out / "params", json.dumps(params, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / TEMPLATE_NAME, tok.chat_template)
    atomic_write_text(out / README_NAME, readme_text(manifest, spec, model_name, lora_name,
                                                     window))


def modelfile_spec(manifest: Manifest, derived: DerivedTemplate, model_name: str,
                   lora_name: str | None, base_dir: Path | None, window: int) -> ModelfileSpec:
    stops = list(dict.fromkeys(manifest.chat.stop_tokens))
    return ModelfileSpec(
        model=f"./{model_name}", adapter=f"./{lora_name}" if lora_name else None,
        template=derived.go_template, stop=stops,
        parameters=ollama_parameters(dataclasses.asdict(manifest.chat.generation), window),
        system=manifest.chat.system_prompt or None,
        license=_license_text(manifest, base_dir),
        comments=[f"Ollama Modelfile for medchat run '{manifest.name}' "
                  f"(base model {_base_id(manifest)}), made by `medchat export gguf`.",
                  NOT_MEDICAL_ADVICE,
                  "TEMPLATE is the run's chat template in Go-template form (checked to render "
                  "like the original);",
                  "the parameters are the run's generation defaults, with no top-k/min-p "
                  "filter and the repetition",
                  "penalty over the whole conversation (the model's context), as medchat "
                  "samples."])


def llama_server_flags(manifest: Manifest, window: int) -> list[str]:
    """llama-server/llama-cli sampling flags equal to the run's defaults (llama.cpp's own
    defaults differ: repeat penalty window 64, top-k 40, min-p 0.05)."""
    p = ollama_parameters(dataclasses.asdict(manifest.chat.generation), window)
    return ["--temp", str(p["temperature"]), "--top-p", str(p["top_p"]), "--top-k", "0",
            "--min-p", "0", "--repeat-penalty", str(p["repeat_penalty"]), "--repeat-last-n",
            str(p["repeat_last_n"]), "-n", str(p["num_predict"])]


def readme_text(manifest: Manifest, spec: ModelfileSpec, model_name: str,
                lora_name: str | None, window: int) -> str:
    name = manifest.name.lower()
    flags = " ".join(llama_server_flags(manifest, window))
    model = f"-m {model_name}" + (f" --lora {lora_name}" if lora_name else "")
    stops = ", ".join(json.dumps(s) for s in spec.stop)
    return f"""# {manifest.name}: GGUF for llama.cpp and Ollama

{NOT_MEDICAL_ADVICE}

Made by `medchat export gguf` with llama.cpp's own converters. The GGUF embeds the run's chat
template, its stop tokens as end-of-generation tokens and its sampling defaults; `Modelfile`
carries the same for Ollama (`template`, `system` and `params` too, for a Hub repo),
`{TEMPLATE_NAME}` is the template as a file.

## Ollama

```bash
ollama create {name} -f Modelfile
ollama run {name}
```

## llama.cpp

```bash
llama-server {model} --jinja {flags}
# the template as a file instead of the embedded one:
llama-server {model} --jinja --chat-template-file {TEMPLATE_NAME} {flags}
```

Then chat through its OpenAI-compatible endpoint (`http://127.0.0.1:8080/v1/chat/completions`).
Send the system prompt below as the first message, and `"stop": [{stops}]` with every sampling
setting explicit (llama.cpp's defaults differ from the run's).

System prompt:

```text
{manifest.chat.system_prompt}
```
"""


def export_record(result: ExportResult, manifest: Manifest) -> dict[str, Any]:
    """export.json: what was exported, from what, with which converter, and every check."""
    return {
        "format": "gguf", "type": result.gguf_type, "adapter_only": result.adapter_only,
        "run": manifest.name, "base_model": _base_id(manifest), "source": result.source,
        "files": [dataclasses.asdict(f) for f in result.files],
        "modelfile": MODELFILE_NAME, "readme": README_NAME, "chat_template_file": TEMPLATE_NAME,
        "converter": {"package": f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                      "scripts": [CONVERT_MODEL] + ([CONVERT_LORA] if result.adapter_only
                                                    else [])},
        "seconds": result.seconds,
        "stop_tokens": manifest.chat.stop_tokens,
        "generation": dataclasses.asdict(manifest.chat.generation),
        "checks": {name: [dataclasses.asdict(c) for c in cs] for name, cs in
                   result.checks.items()},
        "ollama_template": {"conversations_checked": result.template.checked
                            if result.template else 0},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------
# Command


def human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def export_command(format: Literal["gguf"], run: str, *,  # noqa: A002
                   type: Literal["f16", "q8_0", "f32"] = "f16",  # noqa: A002
                   adapter_only: bool = False, overwrite: bool = False,
                   trust_remote_code: bool = False, quiet: bool = False) -> int:
    """Export a run for llama.cpp and Ollama: GGUF files, an Ollama Modelfile, run commands.

    The merged model (the run's merged/ if `medchat merge` made it, else merged on the fly in a
    temporary folder) or, with --adapter-only, the LoRA adapter and its base model are converted
    with llama.cpp's own converters (llama-cpp-python 0.3.36 source, fetched once into the
    medchat cache, or $MEDCHAT_LLAMA_CPP). Each GGUF is read back and checked against the run's
    manifest (chat template, BOS/EOS/end-of-turn ids, stop tokens, vocabulary, sampling
    defaults) before the export folder runs/<name>/gguf/ is written.

    Args:
        format: export format (gguf)
        run: run name or folder
        type: GGUF weight type: f16, q8_0 (8-bit) or f32
        adapter_only: export the LoRA adapter (for llama.cpp lora / Ollama ADAPTER) and its base
        overwrite: replace an existing gguf/ folder
        trust_remote_code: allow a pulled run's base model code from its Hub repo
        quiet: no progress messages
    """
    result = export_gguf(run, type, adapter_only=adapter_only, overwrite=overwrite,
                         progress=not quiet, allow_remote_code=trust_remote_code)
    print(f"exported run '{Run.open(run).name}' as GGUF {result.gguf_type} -> {result.folder}")
    for f in result.files:
        print(f"  {f.name}  {human(f.bytes)}  ({f.role})")
    for name in (MODELFILE_NAME, *OLLAMA_HUB_FILES, TEMPLATE_NAME, README_NAME, RECORD_NAME):
        if (result.folder / name).is_file():
            print(f"  {name}  {human((result.folder / name).stat().st_size)}")
    n = sum(len(c) for c in result.checks.values())
    fixed = [f"{c.name} ({fname})" for fname, cs in result.checks.items() for c in cs if c.fixed]
    print(f"  checks: {n} passed" + (f"; rewritten to the run's values: {', '.join(fixed)}"
                                     if fixed else "")
          + f"; Ollama template checked on {result.template.checked} conversations")
    print(f"  took {result.seconds['total']:.1f} s; see {result.folder / README_NAME} for the "
          "ollama and llama-server commands")
    return 0
