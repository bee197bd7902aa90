"""Pull a model repo from the Hugging Face Hub into the runs folder, so the chat app lists it.

    medchat pull OWNER/NAME [--revision REV] [--runs-dir DIR]

The repo lands in the run `<owner>--<name>` under the runs root (written to a temporary folder,
renamed when complete): an adapter repo (it has adapter_config.json) becomes the run's adapter,
a full model its merged model, next to a manifest (medchat.json): the repo's own (pushed by
`medchat push`, any schema version this release reads) or one made from adapter_config.json and
the tokenizer files. The manifest records where it came from (source: hub_repo, revision,
commit); pulling the same commit again downloads nothing.

Used by `medchat pull`, the app's "Add from Hub" control and a Space's start-up
(space_config.json). Public repos need no token; private ones use HF_TOKEN or the stored login.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any

# snapshot_download is reached through huggingface_hub's lazy attributes: its HTTP stack loads on
# first use, so importing this module stays cheap for the CLI.
import huggingface_hub

from hub.client import HubError, hub_api, hub_call, hub_endpoint, require_repo_id, resolve_token
from medchat.base_model import looks_like_repo_id
from medchat.chat_format import CHATML_TEMPLATE
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, ChatSpec, Manifest,
                                ManifestError, Run, SourceRecord, staged_dir)

# What the chat engine can load: safetensors weights, configs, tokenizer, templates, card.
PULL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken",
                 "README.md"]
PULLED_KINDS = ("adapter", "merged")


def run_folder_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def chat_template_of(folder: Path) -> str | None:
    """The chat template shipped with a tokenizer folder (chat_template.jinja or the config)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    return tmpl if isinstance(tmpl, str) and tmpl else None


def eos_tokens_of(folder: Path) -> list[str]:
    eos = _read_json(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return [eos] if isinstance(eos, str) and eos else []


def adapter_base_of(folder: Path) -> str:
    """The base model an adapter folder names (adapter_config.json), '' when none."""
    return str(_read_json(folder / "adapter_config.json").get("base_model_name_or_path") or "")


def build_manifest(run: Run, kind: str, name: str, repo_id: str, revision: str | None,
                   commit: str | None) -> Manifest:
    """The repo's own manifest (adjusted to this copy), else one made from its files."""
    model_dir = run.model_dir(kind)
    manifest: Manifest | None = None
    if run.exists():
        try:
            manifest = run.manifest()
        except ManifestError:
            manifest = None  # a broken pushed manifest: rebuild one from the model files
    if manifest is None:
        template = chat_template_of(model_dir)
        if kind == "adapter":
            base = adapter_base_of(model_dir)
            ref = BaseModelRef(name=base, hub_id=base if looks_like_repo_id(base) else None)
        else:
            ref = BaseModelRef(name=repo_id, hub_id=repo_id, revision=commit)
            # as training does for template-less bases (chat_format.ensure_chat_template)
            template = template or CHATML_TEMPLATE
        manifest = Manifest(name=name, base_model=ref,
                            chat=ChatSpec(template=template or "",
                                          system_prompt=DEFAULT_SYSTEM_PROMPT,
                                          stop_tokens=eos_tokens_of(model_dir)))
    manifest.name = name
    manifest.kind = kind
    if kind == "adapter":
        base = manifest.base_model
        if not base.hub_id and looks_like_repo_id(adapter_base_of(model_dir)):
            # a manifest that names its base by a local folder only (e.g. one copied from a
            # training machine): the adapter's own config says which Hub model it is
            base.hub_id = adapter_base_of(model_dir)
        if base.hub_id:
            base.name = base.hub_id
            base.local_path = None
    if not manifest.chat.template:
        manifest.chat.template = chat_template_of(model_dir) or ""
    if not manifest.chat.stop_tokens:
        manifest.chat.stop_tokens = eos_tokens_of(model_dir)
    manifest.source = SourceRecord(hub_repo=repo_id, revision=revision or "main", commit=commit)
    return manifest


def _up_to_date(run: Run, commit: str | None) -> bool:
    if commit is None or not run.exists():
        return False
    try:
        m = run.manifest()
    except ManifestError:
        return False
    if m.kind not in PULLED_KINDS:
        return False
    folder = run.model_dir(m.kind)
    return m.source.commit == commit and folder.is_dir() and any(folder.iterdir())


def pull(repo_id: str, revision: str | None = None, runs_dir: str | os.PathLike | None = None,
         token: str | None = None) -> Path:
    """Download `repo_id` into the run `<owner>--<name>` under the runs root; its folder."""
    repo_id = (repo_id or "").strip()
    revision = (revision or "").strip() or None
    require_repo_id(repo_id, example="HuggingFaceTB/SmolLM2-135M-Instruct")
    target = Run.create(run_folder_name(repo_id), runs_dir)
    tok = resolve_token(token, required=False)
    endpoint = hub_endpoint()
    client = hub_api(tok)
    info = hub_call(f"look up '{repo_id}'", lambda: client.model_info(repo_id, revision=revision),
                    repo_id=repo_id)
    if _up_to_date(target, info.sha):
        return target.path
    files = {s.rfilename for s in (info.siblings or [])}
    if "adapter_config.json" in files:
        kind = "adapter"
    elif "config.json" in files:
        kind = "merged"
    else:
        raise HubError(f"'{repo_id}' has neither adapter_config.json (a PEFT adapter) nor "
                       "config.json (a transformers model); it is not a model medchat can load")
    if not any(f.endswith(".safetensors") for f in files):
        raise HubError(f"'{repo_id}' has no *.safetensors weights (medchat does not load pickled "
                       ".bin files); ask its owner for safetensors or convert it")
    # top-level files only: what from_pretrained reads (not checkpoints in subfolders)
    wanted = sorted(glob.escape(f) for f in files if "/" not in f
                    and any(fnmatch.fnmatchcase(f, p) for p in PULL_PATTERNS))
    with staged_dir(target.path, overwrite=True) as tmp:
        staged = Run(tmp)
        download = staged.model_dir(kind)
        # retried as a whole: downloads are idempotent and resume into the same folder
        hub_call(f"download '{repo_id}'", lambda: huggingface_hub.snapshot_download(
            repo_id, revision=info.sha, local_dir=download, allow_patterns=wanted, token=tok,
            endpoint=endpoint), repo_id=repo_id, retry_all=True)
        shutil.rmtree(download / ".cache", ignore_errors=True)  # huggingface_hub's metadata
        # files about the repo as a whole sit at the top of the run, not inside the model
        for dest in (staged.manifest_path, staged.eval_path, staged.card_path):
            if (download / dest.name).is_file():
                os.replace(download / dest.name, dest)
        staged.save_manifest(build_manifest(staged, kind, target.name, repo_id, revision,
                                            info.sha))
    return target.path


def pull_command(repo: str, *, revision: str | None = None, runs_dir: str | None = None) -> int:
    """Pull a model repo from the Hugging Face Hub into the runs folder.

    The repo becomes the run <owner>--<name>: an adapter repo its adapter, a full model its
    merged model, with a manifest (the repo's own, or one made from its files). Pulling the
    same commit again downloads nothing. Public repos need no token; private ones use HF_TOKEN
    or the stored login.

    Args:
        repo: model repo id, OWNER/NAME
        revision: branch, tag or commit (default: main)
        runs_dir: runs root (default: $MEDCHAT_RUNS or ./runs)
    """
    run = Run(pull(repo, revision, runs_dir))
    m = run.manifest()
    print(f"{repo} ({m.kind}, commit {str(m.source.commit)[:12]}) -> {run.path}")
    return 0
