"""Pull a model repo from the Hugging Face Hub into the runs folder, so the chat app lists it.

    medchat pull OWNER/NAME [--revision REV] [--runs-dir DIR] [--anonymous] [--max-bytes N]

The repo lands in the run `<owner>--<name>` under the runs root (written to a temporary folder,
renamed when complete): an adapter repo (it has adapter_config.json) becomes the run's adapter,
a full model its merged model, next to a manifest (medchat.json): the repo's own (pushed by
`medchat push`, any schema version this release reads) or one made from adapter_config.json and
the tokenizer files. The manifest records where it came from (source: hub_repo, revision,
commit); pulling the same commit again downloads nothing.

A repo's files are someone else's, so nothing in them points the machine at its own files: the
manifest's local paths are dropped, the base model must be a Hub id (OWNER/NAME) or the pull is
refused, and a `trust_remote_code` the repo asks for is kept but the run is marked as pulled
(source.hub_repo), which the chat engine refuses to run unless the operator allows it. A pull
only ever replaces a run it pulled from the same repo, never a run trained here or pulled from
another repo.

Used by `medchat pull`, the app's "Add from Hub" control and a Space's start-up
(space_config.json). Public repos need no token; private ones use HF_TOKEN or the stored login,
except for anonymous pulls (`anonymous=True`, what the app does for visitors), which never send a
token. `max_bytes` caps the download: checked against the repo's listed file sizes before any
download, and enforced while downloading.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

# snapshot_download is reached through huggingface_hub's lazy attributes: its HTTP stack loads on
# first use, so importing this module stays cheap for the CLI. transformers (for the end-of-turn
# token of a repo without a manifest) is imported in the one function that needs it.
import huggingface_hub

from hub.card import strip_local_paths
from hub.client import (HubError, hub_api, hub_call, hub_endpoint, human_size, require_repo_id,
                        resolve_token)
from medchat.base_model import looks_like_repo_id
from medchat.chat_format import CHATML_TEMPLATE, stop_tokens
from medchat.run_folder import (DEFAULT_SYSTEM_PROMPT, BaseModelRef, ChatSpec, Manifest,
                                ManifestError, Run, SourceRecord, staged_dir)

# What the chat engine can load: safetensors weights, configs, tokenizer, templates, card.
PULL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken",
                 "README.md"]
PULLED_KINDS = ("adapter", "merged")
# A branch, tag or commit: what the Hub allows in a ref name, nothing that could act as a path.
REVISION = re.compile(r"[\w][\w.\-/]{0,199}")


def run_folder_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
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


def stop_tokens_of(folder: Path, template: str | None) -> list[str]:
    """Stop tokens of a tokenizer folder: the end-of-turn token its chat template writes first
    (medchat.chat_format.stop_tokens), then eos; just eos when the tokenizer does not load."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))  # never with the repo's own code
        if template:
            tok.chat_template = template
        return stop_tokens(tok)
    except Exception:  # noqa: BLE001 - a tokenizer transformers cannot load without remote code
        return eos_tokens_of(folder)


def adapter_base_of(folder: Path) -> str:
    """The base model an adapter folder names (adapter_config.json), '' when none."""
    return str(_read_json(folder / "adapter_config.json").get("base_model_name_or_path") or "")


def _needs_remote_code(folder: Path) -> bool:
    """Whether a full model's config maps its classes to code in the repo (auto_map)."""
    return bool(_read_json(folder / "config.json").get("auto_map"))


def _hub_base(repo_id: str, kind: str, manifest: Manifest | None, model_dir: Path) -> str:
    """The Hub id of the pulled run's base model; a HubError when the repo names none.

    A repo's manifest may name its base by a folder of the machine it was trained on; the
    adapter's own config then usually names the Hub model. Nothing else is taken: a base given
    only as a path would make this machine load one of its own folders."""
    candidates: list[str | None] = []
    if manifest is not None:
        candidates += [manifest.base_model.hub_id, manifest.base_model.name]
    if kind == "adapter":
        candidates.append(adapter_base_of(model_dir))
    else:
        candidates.append(repo_id)  # a full model is its own base
    for c in candidates:
        if isinstance(c, str) and looks_like_repo_id(c):
            return c
    named = next((c for c in candidates if c), "")
    raise HubError(f"'{repo_id}': its base model {named!r:.80} is not a Hub id (OWNER/NAME); "
                   "medchat loads the base of a pulled run only from the Hub, never from a "
                   "folder a repo names. Ask its owner to push it with `medchat push RUN REPO "
                   "--base-model OWNER/NAME`, or set base_model_name_or_path in its "
                   "adapter_config.json")


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
    base = _hub_base(repo_id, kind, manifest, model_dir)
    if manifest is None:
        template = chat_template_of(model_dir)
        if kind == "merged":
            # as training does for template-less bases (chat_format.ensure_chat_template)
            template = template or CHATML_TEMPLATE
        ref = BaseModelRef(name=base, hub_id=base, revision=commit if base == repo_id else None)
        manifest = Manifest(name=name, base_model=ref,
                            chat=ChatSpec(template=template or "",
                                          system_prompt=DEFAULT_SYSTEM_PROMPT))
    manifest.name = name
    manifest.kind = kind
    ref = manifest.base_model
    ref.name = ref.hub_id = base
    ref.local_path = None  # never a folder of this machine, whatever the repo says
    if kind == "merged" and _needs_remote_code(model_dir):
        ref.trust_remote_code = True  # recorded; the engine asks the operator (source.hub_repo)
    # what a repo says about its training machine (data files, output folders) stays there
    manifest.dataset.source = strip_local_paths(manifest.dataset.source)
    manifest.training.config = strip_local_paths(manifest.training.config)
    manifest.merge = strip_local_paths(manifest.merge)
    if not manifest.chat.template:
        manifest.chat.template = chat_template_of(model_dir) or ""
    if not manifest.chat.stop_tokens:
        manifest.chat.stop_tokens = stop_tokens_of(model_dir, manifest.chat.template)
    manifest.source = SourceRecord(hub_repo=repo_id, revision=revision or "main", commit=commit)
    return manifest


def pulled_from(run: Run) -> str | None:
    """The repo a run folder was pulled from (None: trained or made here, or no run at all)."""
    if not run.exists():
        return None
    try:
        m = run.manifest()
    except ManifestError:
        return None
    src = m.source
    return src.hub_repo if src.hub_repo and src.commit and m.kind in PULLED_KINDS else None


def _check_target(target: Run, repo_id: str) -> None:
    """Refuse to replace a run folder this pull did not make (a local run named owner--name, a
    run pulled from another repo, a folder that is not a run)."""
    if not target.path.exists() or pulled_from(target) == repo_id:
        return
    origin = pulled_from(target)
    what = (f"was pulled from '{origin}'" if origin
            else "was trained or made here" if target.exists() else "is not a pulled run")
    raise HubError(f"the run '{target.name}' already exists in the runs folder and {what}; a "
                   f"pull replaces only a run it pulled from '{repo_id}'. Rename or move that "
                   "run folder, then pull again")


def _up_to_date(run: Run, repo_id: str, commit: str | None) -> bool:
    if commit is None or pulled_from(run) != repo_id:
        return False
    m = run.manifest()
    folder = run.model_dir(m.kind)
    return m.source.commit == commit and folder.is_dir() and any(folder.iterdir())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _capped_progress(limit: int, repo_id: str) -> type:
    """A progress-bar class for snapshot_download that stops the download once more than
    `limit` bytes have arrived (the repo listed smaller sizes than it sends)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Capped(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            # byte counters (the file counter is not); noted here because a disabled tqdm
            # (no terminal, HF_HUB_DISABLE_PROGRESS_BARS) keeps none of its arguments
            self.counts_bytes, self.seen = kwargs.get("unit") == "B", 0
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts_bytes:
                self.seen += n or 0
                if self.seen > limit:
                    raise HubError(f"'{repo_id}' sent more than the limit of "
                                   f"{human_size(limit)}; the download was stopped")
            return super().update(n)

    return Capped


def pull(repo_id: str, revision: str | None = None, runs_dir: str | os.PathLike | None = None,
         token: str | None = None, *, anonymous: bool = False,
         max_bytes: int | None = None) -> Path:
    """Download `repo_id` into the run `<owner>--<name>` under the runs root; its folder.

    `anonymous` sends no token at all (not the caller's, HF_TOKEN or the stored login), so only
    public repos can be pulled; `max_bytes` refuses a repo whose files medchat would download
    are larger, and stops a download that turns out larger than listed."""
    repo_id = (repo_id or "").strip()
    revision = (revision or "").strip() or None
    require_repo_id(repo_id, example="HuggingFaceTB/SmolLM2-135M-Instruct")
    if revision is not None and (not REVISION.fullmatch(revision) or ".." in revision):
        raise HubError(f"revision {revision!r:.80}: expected a branch, tag or commit id")
    if anonymous and token:
        raise HubError("an anonymous pull takes no token")
    if max_bytes is not None and max_bytes <= 0:
        raise HubError(f"max_bytes {max_bytes}: must be a positive number of bytes")
    target = Run.create(run_folder_name(repo_id), runs_dir)
    _check_target(target, repo_id)
    tok: str | bool | None = False if anonymous else resolve_token(token, required=False)
    endpoint = hub_endpoint()
    client = hub_api(tok)
    info = hub_call(f"look up '{repo_id}'", lambda: client.model_info(
        repo_id, revision=revision, files_metadata=True), repo_id=repo_id, anonymous=anonymous)
    if _up_to_date(target, repo_id, info.sha):
        return target.path
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    files = set(siblings)
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
    names = sorted(f for f in files if "/" not in f
                   and any(fnmatch.fnmatchcase(f, p) for p in PULL_PATTERNS))
    listed = sum(siblings[f].size or 0 for f in names)
    if max_bytes is not None and listed > max_bytes:
        raise HubError(f"'{repo_id}' is {human_size(listed)} ({len(names)} files to download), "
                       f"over the limit of {human_size(max_bytes)}; pick a smaller model"
                       " (or the operator raises the limit)")
    wanted = [glob.escape(f) for f in names]
    progress = _capped_progress(max_bytes, repo_id) if max_bytes is not None else None
    with staged_dir(target.path, overwrite=True) as tmp:
        staged = Run(tmp)
        download = staged.model_dir(kind)
        # retried as a whole: downloads are idempotent and resume into the same folder
        hub_call(f"download '{repo_id}'", lambda: huggingface_hub.snapshot_download(
            repo_id, revision=info.sha, local_dir=download, allow_patterns=wanted, token=tok,
            endpoint=endpoint, tqdm_class=progress), repo_id=repo_id, retry_all=True,
            anonymous=anonymous)
        shutil.rmtree(download / ".cache", ignore_errors=True)  # huggingface_hub's metadata
        got = _folder_bytes(download)
        if max_bytes is not None and got > max_bytes:  # whatever the progress bars saw
            raise HubError(f"'{repo_id}' sent {human_size(got)}, over the limit of "
                           f"{human_size(max_bytes)}; nothing was kept")
        # files about the repo as a whole sit at the top of the run, not inside the model
        for dest in (staged.manifest_path, staged.eval_path, staged.card_path):
            if (download / dest.name).is_file():
                os.replace(download / dest.name, dest)
        staged.save_manifest(build_manifest(staged, kind, target.name, repo_id, revision,
                                            info.sha))
    return target.path


def pull_command(repo: str, *, revision: str | None = None, runs_dir: str | None = None,
                 anonymous: bool = False, max_bytes: int | None = None) -> int:
    """Pull a model repo from the Hugging Face Hub into the runs folder.

    The repo becomes the run <owner>--<name>: an adapter repo its adapter, a full model its
    merged model, with a manifest (the repo's own, or one made from its files). Pulling the
    same commit again downloads nothing; a run of that name that was not pulled from this repo
    is never replaced. The base model of a pulled run must be a Hub id. Public repos need no
    token; private ones use HF_TOKEN or the stored login.

    Args:
        repo: model repo id, OWNER/NAME
        revision: branch, tag or commit (default: main)
        runs_dir: runs root (default: $MEDCHAT_RUNS or ./runs)
        anonymous: send no token (only public repos)
        max_bytes: refuse a repo whose files are larger than this many bytes
    """
    run = Run(pull(repo, revision, runs_dir, anonymous=anonymous, max_bytes=max_bytes))
    m = run.manifest()
    print(f"{repo} ({m.kind}, commit {str(m.source.commit)[:12]}) -> {run.path}")
    return 0
