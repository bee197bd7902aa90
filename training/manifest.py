"""The run folder contract shared by every stage (see DESIGN.md).

    runs/<name>/
      medchat.json   manifest: what inference needs to reproduce training
      adapter/       PEFT adapter (adapter_config.json, adapter_model.safetensors)
      merged/        optional merged model (sharded safetensors + index + tokenizer)
      eval.json      optional evaluation results
      checkpoints/   resumable training state (never pushed)
      logs/          per-step loss (loss.jsonl) and TensorBoard events

Only the standard library is imported here so the chat app (and a Space) can read manifests
without pulling in training dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

MANIFEST_NAME = "medchat.json"
MANIFEST_VERSION = 1
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medication information assistant. Answer the user's question about a "
    "medicine clearly and factually. You do not replace a doctor or pharmacist."
)


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """Where run folders live: explicit argument, else $MEDCHAT_RUNS, else ./runs."""
    return Path(root or os.environ.get("MEDCHAT_RUNS") or "runs").expanduser()


@dataclass
class BaseModelRef:
    """Which base model a run was trained on."""

    name: str  # Hub id (preferred) or local path as the user gave it
    revision: str | None = None  # Hub revision, when known
    local_path: str | None = None  # where it was loaded from on the training machine
    content_hash: str | None = None  # sha256 over the weight files, for local models
    hub_id: str | None = None  # the Hub id when `name` is a local path of a Hub model


@dataclass
class Manifest:
    """medchat.json: written by training, read by merge, evaluation, chat and push."""

    name: str
    base_model: BaseModelRef
    chat_template: str
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    eos_tokens: list[str] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    merge: dict[str, Any] = field(default_factory=dict)
    kind: str = "adapter"  # adapter | merged (a pulled full model) | base
    source: dict[str, Any] = field(default_factory=dict)  # e.g. {"hub_repo": ..., "revision": ...}
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "medchat.json") -> "Manifest":
        missing = [k for k in ("name", "base_model", "chat_template") if k not in data]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}; "
                                "re-run training or fix the file")
        data = dict(data)
        base = data.pop("base_model")
        if isinstance(base, str):
            base = {"name": base}
        known = set(cls.__dataclass_fields__)
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        m = cls(base_model=BaseModelRef(**{k: v for k, v in base.items()
                                           if k in BaseModelRef.__dataclass_fields__}), **data)
        if extra:
            m.source.setdefault("extra_fields", extra)
        return m


class ManifestError(ValueError):
    """A manifest that is missing or malformed."""


def load_manifest(run_dir: str | os.PathLike) -> Manifest:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; is {run_dir} a medchat run folder? "
                            "Train one with `python -m training.run`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    return Manifest.from_dict(data, where=str(path))


def save_manifest(run_dir: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(run_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def update_manifest(run_dir: str | os.PathLike, **sections: dict[str, Any]) -> Manifest:
    """Merge dict sections (metrics, merge, ...) into an existing manifest and save it."""
    m = load_manifest(run_dir)
    for key, value in sections.items():
        current = getattr(m, key)
        if isinstance(current, dict):
            current.update(value)
        else:
            setattr(m, key, value)
    save_manifest(run_dir, m)
    return m


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target`, on error it is removed.

    Used for every folder-sized output (adapter/, merged/, pulled repos) so that an interrupted
    stage never leaves a half-written folder under the final name.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should look like any other
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
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


def list_runs(root: str | os.PathLike | None = None) -> list[Path]:
    """Run folders (those holding a manifest) under the runs root, sorted by name."""
    base = runs_root(root)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if (p / MANIFEST_NAME).is_file())
