"""The run folder: the one contract between every stage, and the only code that knows its layout.

    runs/<name>/
      medchat.json      the manifest (typed below): what inference needs to reproduce training
      adapter/          PEFT adapter (adapter_config.json, adapter_model.safetensors, tokenizer)
      merged/           optional merged model (sharded safetensors + index + tokenizer)
      gguf/             optional GGUF export for llama.cpp / Ollama
      eval.json         optional evaluation results (every answer); eval.md is its table
      README.md         the model card, for a run pulled from the Hub
      data/             the split: train.jsonl, test.jsonl, val.jsonl (XTuner conversation form)
      checkpoints/      resumable training state (never pushed)
      logs/             per-step loss (loss.jsonl) and TensorBoard events

Training creates a run (`Run.create`), every later stage opens one (`Run.open(name or path)`) and
asks it for paths, its split and its manifest; no other module joins a path inside a run.

The manifest has a schema version. Version 1 (the first release) kept the chat template, stop
tokens and metrics as loose top-level fields; it is read and converted on load, so runs and Hub
repos made by that release keep working. A manifest from a newer medchat is refused with a
message that says so. Only the standard library is imported here (plus chat_format), so a Space
or a chat-only install can read runs without training dependencies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from medchat.chat_format import Conversation
from medchat.errors import UserError

MANIFEST_NAME = "medchat.json"
SCHEMA_VERSION = 2
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medication information assistant. Answer the user's question about a "
    "medicine clearly and factually. You do not replace a doctor or pharmacist."
)
SPLIT_PARTS = ("train", "test", "val")
MODEL_KINDS = ("base", "adapter", "merged")


class ManifestError(UserError, ValueError):
    """A run folder or manifest that is missing or cannot be read; the message names the file."""


class RunNotFoundError(ManifestError):
    """No run of that name or path."""


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """Where run folders live: explicit argument, else $MEDCHAT_RUNS, else ./runs."""
    return Path(root or os.environ.get("MEDCHAT_RUNS") or "runs").expanduser()


# ---------------------------------------------------------------------------------------------
# The manifest, section by section


@dataclass
class BaseModelRef:
    """Which base model a run was trained on."""

    name: str  # Hub id (preferred) or local path as the user gave it
    revision: str | None = None  # Hub revision, when known
    local_path: str | None = None  # where it was loaded from on the training machine
    content_hash: str | None = None  # sha256 over the weight files, for local models
    hub_id: str | None = None  # the Hub id when `name` is a local path of a Hub model
    trust_remote_code: bool = False  # the model's code comes from its Hub repo (e.g. InternLM2)


@dataclass
class GenerationDefaults:
    """Sampling settings the chat app starts from for this run's models."""

    max_new_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.9
    repetition_penalty: float = 1.1


@dataclass
class ChatSpec:
    """How a conversation is rendered and where an answer ends: training and chat share it."""

    template: str  # Jinja chat template, exactly as training rendered samples with it
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    stop_tokens: list[str] = field(default_factory=list)  # end of an answer (end-of-turn first)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)


@dataclass
class DatasetRecord:
    """Where the training data came from and how it was split and encoded."""

    source: str | None = None  # file or dataset id as given
    sha256: str | None = None  # of the source file
    seed: int | None = None  # split seed
    test_size: float | None = None
    val_size: float | None = None
    stratify: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # train/test/val sample counts
    stats: dict[str, Any] = field(default_factory=dict)  # encoding: tokens, truncated, padding...


@dataclass
class TrainingRecord:
    """The full training config as trained, and what the run measured."""

    config: dict[str, Any] = field(default_factory=dict)  # training.config.TrainConfig.to_dict()
    stats: dict[str, Any] = field(default_factory=dict)  # steps, wall time, tokens/s, losses

    @property
    def max_length(self) -> int | None:
        """Tokens per training row (evaluation's test loss uses the same)."""
        value = (self.config.get("data") or {}).get("max_length")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def quantization(self) -> str:
        return str((self.config.get("model") or {}).get("quantization") or "none")


@dataclass
class ModelScores:
    """One model's numbers on the held-out split (None: not measured)."""

    loss: float | None = None  # mean cross-entropy per answer token
    perplexity: float | None = None
    rougeL: float | None = None  # ROUGE-L F1, 0-100
    bleu: float | None = None  # corpus BLEU, 0-100
    token_f1: float | None = None  # SQuAD token F1, 0-100
    answer_words: float | None = None  # mean answer length


@dataclass
class Metrics:
    """Scores of base, adapter and merged under one schema, whoever measured them."""

    models: dict[str, ModelScores] = field(default_factory=dict)  # base | adapter | merged
    test_samples: int | None = None  # held-out samples behind the loss
    test_tokens: int | None = None  # answer tokens behind the loss
    evaluation: dict[str, Any] = field(default_factory=dict)  # how answers were generated/scored

    def scores(self, kind: str) -> ModelScores | None:
        """A model's scores; a merged model answers like its adapter, so those stand in."""
        found = self.models.get(kind)
        if found is None and kind == "merged":
            found = self.models.get("adapter")
        return found


@dataclass
class SourceRecord:
    """Where a run came from when it was not trained here."""

    hub_repo: str | None = None  # pulled from this Hub repo
    revision: str | None = None
    commit: str | None = None
    pushed_from_run: str | None = None  # the run name a pushed repo was made from


@dataclass
class Manifest:
    """medchat.json: written by training, read by merge, evaluation, chat, export and the Hub."""

    name: str
    base_model: BaseModelRef
    chat: ChatSpec
    kind: str = "adapter"  # adapter | merged (a pulled full model)
    dataset: DatasetRecord = field(default_factory=DatasetRecord)
    training: TrainingRecord = field(default_factory=TrainingRecord)
    metrics: Metrics = field(default_factory=Metrics)
    merge: dict[str, Any] = field(default_factory=dict)  # what `medchat merge` did (fidelity...)
    source: SourceRecord = field(default_factory=SourceRecord)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Read any schema version this release knows; errors name the file and the field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", data.get("version", 1))
        if not isinstance(version, int) or isinstance(version, bool):
            raise ManifestError(f"{where}: field schema_version: {version!r} is not a number")
        if version > SCHEMA_VERSION:
            raise ManifestError(f"{where}: schema version {version} was written by a newer "
                                f"medchat (this one reads up to {SCHEMA_VERSION}); upgrade medchat")
        if version < 2:
            data = _from_v1(data)
        missing = [k for k in ("name", "base_model", "chat") if k not in data]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}; "
                                "re-run training or fix the file")
        return _build(cls, {**data, "schema_version": SCHEMA_VERSION}, where, "")


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (loose top-level fields, metrics under several key names) -> schema 2."""
    out = {k: data[k] for k in ("name", "kind", "merge", "source") if k in data}
    base = data.get("base_model")
    out["base_model"] = {"name": base} if isinstance(base, str) else base
    if "chat_template" in data:
        out["chat"] = {"template": data["chat_template"],
                       "system_prompt": data.get("system_prompt", DEFAULT_SYSTEM_PROMPT),
                       "stop_tokens": data.get("eos_tokens") or [],
                       "generation": {k: v for k, v in (data.get("generation") or {}).items()
                                      if k in _field_names(GenerationDefaults)}}
    ds = dict(data.get("dataset") or {})
    ds.pop("files", None)  # split files now live where the run folder says
    out["dataset"] = {k: ds.pop(k) for k in list(ds) if k in _field_names(DatasetRecord)}
    out["dataset"]["stats"] = ds
    tr = dict(data.get("training") or {})
    out["training"] = {"config": tr.pop("config", {}), "stats": tr}
    m = dict(data.get("metrics") or {})
    models: dict[str, dict[str, Any]] = {}
    ev = m.get("eval") if isinstance(m.get("eval"), dict) else {}
    for kind, scores in (ev.get("models") or {}).items():
        if isinstance(scores, dict):
            models[kind] = {k: v for k, v in scores.items() if k in _field_names(ModelScores)}
    for v1_key, kind, key in (("test_loss_base", "base", "loss"), ("test_ppl_base", "base", "perplexity"),
                              ("test_loss_finetuned", "adapter", "loss"),
                              ("test_ppl_finetuned", "adapter", "perplexity")):
        if m.get(v1_key) is not None:
            models.setdefault(kind, {}).setdefault(key, m[v1_key])
    out["metrics"] = {"models": models, "test_samples": m.get("test_samples"),
                      "test_tokens": m.get("test_tokens"),
                      "evaluation": {k: v for k, v in ev.items() if k != "models"}}
    src = data.get("source") or {}
    out["source"] = {k: v for k, v in src.items() if k in _field_names(SourceRecord)}
    return out


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    """A dataclass from JSON data, checking each field's type (names the field when wrong).
    Unknown keys are ignored: a file may carry notes a later minor release added."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: field {path.rstrip('.') or 'manifest'}: expected an "
                            f"object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{where}: field {path}{f.name} is missing")
            continue
        kwargs[f.name] = _value(hints[f.name], data[f.name], where, f"{path}{f.name}")
    return cls(**kwargs)


def _value(hint: Any, value: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, path + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value, where, path) if len(inner) == 1 else value
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: field {path}: expected a list, got {value!r:.60}")
        return [_value(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: field {path}: expected an object, got {value!r:.60}")
        return {str(k): _value(args[1], v, where, f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ManifestError(f"{where}: field {path}: expected {hint.__name__}, got {value!r:.60}")
    return value


# ---------------------------------------------------------------------------------------------
# The folder


class Run:
    """One run folder. `Run.open` finds an existing run (by folder, or by name under the runs
    root); `Run.create` makes one for training. Paths inside the run come only from here."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and self.path.resolve() == other.path.resolve()

    def __hash__(self) -> int:
        return hash(self.path.resolve())

    @property
    def name(self) -> str:
        return self.path.name

    # -- finding and making runs -----------------------------------------------------------------

    @classmethod
    def open(cls, ref: "str | os.PathLike | Run", runs_dir: str | os.PathLike | None = None) -> "Run":
        """A run with a manifest: `ref` is a run folder, or a run name under the runs root."""
        if isinstance(ref, Run):
            ref = ref.path
        direct = Path(ref).expanduser()
        if (direct / MANIFEST_NAME).is_file():
            return cls(direct)
        by_name = runs_root(runs_dir) / str(ref)
        if _plain_name(str(ref)) and (by_name / MANIFEST_NAME).is_file():
            return cls(by_name)
        hint = (f"{direct} has no {MANIFEST_NAME}" if direct.is_dir()
                else f"no such folder, and no run of that name in {runs_root(runs_dir)}")
        raise RunNotFoundError(f"run {str(ref)!r}: {hint}; pass a run folder (runs/<name>) or a "
                               "run name, or train one with `medchat train`")

    @classmethod
    def create(cls, name: str, runs_dir: str | os.PathLike | None = None) -> "Run":
        """The folder for a new (or resumed) training run; made on first write."""
        if not _plain_name(name):
            raise ManifestError(f"run name {name!r}: must be a plain folder name "
                                "(letters, digits, '.', '-', '_'; not starting with '.')")
        return cls(runs_root(runs_dir) / name)

    @classmethod
    def all(cls, runs_dir: str | os.PathLike | None = None) -> list["Run"]:
        """Run folders (those holding a manifest) under the runs root, sorted by name."""
        base = runs_root(runs_dir)
        if not base.is_dir():
            return []
        # hidden folders are never runs: a pull being written (or one a kill interrupted) is a
        # `.name.*.partial` folder that may already hold a manifest
        return [cls(p) for p in sorted(base.iterdir())
                if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()]

    # -- paths -----------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.path / "gguf"

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_report_path(self) -> Path:
        return self.path / "eval.md"

    @property
    def card_path(self) -> Path:
        """README.md: the model card a pulled repo came with."""
        return self.path / "README.md"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def loss_log_path(self) -> Path:
        return self.logs_dir / "loss.jsonl"

    def split_path(self, part: str) -> Path:
        if part not in SPLIT_PARTS:
            raise ValueError(f"split part {part!r}: one of {', '.join(SPLIT_PARTS)}")
        return self.data_dir / f"{part}.jsonl"

    def model_dir(self, kind: str) -> Path:
        """The folder of this run's adapter or merged model."""
        if kind == "adapter":
            return self.adapter_dir
        if kind == "merged":
            return self.merged_dir
        raise ValueError(f"model kind {kind!r}: adapter or merged")

    # -- what the run holds ----------------------------------------------------------------------

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    def has_merged(self) -> bool:
        return (self.merged_dir / "config.json").is_file()

    def model_kinds(self) -> list[str]:
        """Which models this run can answer with: always the base, then adapter/merged."""
        return ["base"] + [k for k, ok in (("adapter", self.has_adapter()),
                                           ("merged", self.has_merged())) if ok]

    def checkpoints(self) -> list[Path]:
        """Training checkpoints (checkpoint-<step>/), oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob("checkpoint-*")
                 if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    # -- manifest --------------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The manifest as it is on disk now (a clear error when missing or unreadable)."""
        path = self.manifest_path
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest; is {self.path} a medchat run folder? "
                                "Train one with `medchat train`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); restore the file "
                                "or re-run training") from e
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); restore the "
                                "file or re-run training") from e
        return Manifest.from_dict(data, where=str(path))

    def save_manifest(self, manifest: Manifest) -> Path:
        atomic_write_text(self.manifest_path,
                          json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return self.manifest_path

    def update_manifest(self, **sections: Any) -> Manifest:
        """Replace whole sections (merge=..., metrics=...) of the manifest and save it."""
        m = self.manifest()
        for key, value in sections.items():
            if key not in _field_names(Manifest):
                raise AttributeError(f"manifest has no section {key!r}")
            setattr(m, key, value)
        self.save_manifest(m)
        return m

    def record_scores(self, scores: dict[str, ModelScores], *, test_samples: int | None = None,
                      test_tokens: int | None = None,
                      evaluation: dict[str, Any] | None = None) -> Manifest:
        """Merge newly measured scores into the manifest's metrics (other models' stay)."""
        m = self.manifest()
        for kind, new in scores.items():
            old = m.metrics.models.get(kind) or ModelScores()
            updates = {k: v for k, v in dataclasses.asdict(new).items() if v is not None}
            m.metrics.models[kind] = dataclasses.replace(old, **updates)
        if test_samples is not None:
            m.metrics.test_samples = test_samples
        if test_tokens is not None:
            m.metrics.test_tokens = test_tokens
        if evaluation is not None:
            m.metrics.evaluation = evaluation
        self.save_manifest(m)
        return m

    @property
    def base_model(self) -> BaseModelRef:
        return self.manifest().base_model

    # -- split -----------------------------------------------------------------------------------

    def write_split(self, part: str, conversations: Iterable[Conversation]) -> Path:
        """One split part as XTuner-form JSONL (one conversation per line), written atomically."""
        lines = [json.dumps(c.to_xtuner(), ensure_ascii=False) for c in conversations]
        path = self.split_path(part)
        atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
        return path

    def has_split(self, part: str) -> bool:
        return self.split_path(part).is_file()

    def read_split(self, part: str) -> list[Conversation]:
        """A split part as written by training; errors name the file and line."""
        path = self.split_path(part)
        if not path.is_file():
            raise ManifestError(f"{path}: the run has no {part} split"
                                + ("; train with data.test_size > 0" if part == "test" else ""))
        out = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(Conversation.from_xtuner(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as e:
                raise ManifestError(f"{path} line {lineno}: {e}; the split was changed by hand "
                                    "or cut short, re-run training to rewrite it") from e
        return out

    def test_split(self) -> list[Conversation]:
        return self.read_split("test")

    def split_questions(self, part: str = "test") -> list[str]:
        """The distinct questions of a split part, in file order (empty when it has none)."""
        if not self.has_split(part):
            return []
        questions = (c.question.strip() for c in self.read_split(part))
        return list(dict.fromkeys(q for q in questions if q))

    # -- writing stage outputs -------------------------------------------------------------------

    def staged(self, target: Path, overwrite: bool = False):
        """A temporary sibling of `target` (a folder of this run) that replaces it on success."""
        return staged_dir(target, overwrite=overwrite)


def _plain_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}", name)) and ".." not in name


# ---------------------------------------------------------------------------------------------
# Writing files safely


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _host() -> str:
    """This machine's name as it can stand in a folder name."""
    host = re.sub(r"[^0-9A-Za-z-]", "-", os.uname().nodename if hasattr(os, "uname") else "")
    return host or "host"


def _writer_tag() -> str:
    """Who writes a staged folder: this host and process, in the folder's name."""
    return f"{_host()}-{os.getpid()}"


def _replaced(target: Path) -> Path:
    """Where `staged_dir` moves the folder it replaces, until the new one is in place."""
    return target.with_name(f".{target.name}.old")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def clear_stale_stages(target: str | os.PathLike) -> list[str]:
    """Remove what killed writers of `target` left beside it: `.name.<host>-<pid>.*.partial`
    folders of this host whose process is gone (a live writer's are kept), and the `.name.old`
    of a replace that was interrupted (put back when `target` itself is missing, since the new
    folder was then never checked complete). Returns what it did, one line each."""
    target = Path(target)
    done: list[str] = []
    if not target.parent.is_dir():
        return done
    host = _host()
    pattern = re.compile(re.escape(f".{target.name}.") + r"(.+)-(\d+)\.[^.]*\.partial$")
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and m.group(1) == host and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by process {m.group(2)} (killed while "
                        f"writing {target.name})")
    old = _replaced(target)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}, left by an interrupted replace")
        else:
            os.replace(old, target)
            done.append(f"put {target.name} back from {old.name} (a replace was interrupted "
                        "before the new folder took its place)")
    return done


@contextmanager
def staged_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`, on error it is removed.

    Used for every folder-sized output (adapter/, merged/, pulled repos) so that an interrupted
    stage never leaves a half-written folder under the final name. What a process killed
    mid-stage (SIGKILL, power loss) left is cleared the next time the same target is staged
    (`clear_stale_stages`): the hidden partial folder names its host and process for that.
    """
    target = Path(target)
    for line in clear_stale_stages(target):
        print(f"{target.parent}: {line}", file=sys.stderr)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_writer_tag()}.", suffix=".partial",
                                dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should look like any other
    try:
        yield tmp
        if target.exists():
            old = _replaced(target)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_weights(folder: str | os.PathLike) -> str:
    """sha256 over the weight files of a model folder (names and bytes), for local base models."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
