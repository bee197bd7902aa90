"""Pull a model repo from the Hugging Face Hub into the runs folder, so the chat app lists it.

    medchat pull OWNER/NAME [--revision REV] [--runs-dir DIR]

The repo lands in `runs/<owner>--<name>/` (written to a temporary folder, renamed when
complete): an adapter repo (it has adapter_config.json) goes to `adapter/`, a full model to
`merged/`, next to a `medchat.json` manifest: the repo's own (pushed by `medchat push`) or one
made from adapter_config.json / the tokenizer files. The manifest records where it came from
(source: hub_repo, revision, commit); pulling the same commit again downloads nothing.

Used by the app's "Add from Hub" control and by a Space's launch.py (space_config.json).
Public repos need no token; private ones use HF_TOKEN or the stored login.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hub.push import HubError, hub_call, hub_endpoint, resolve_token
from training.manifest import (DEFAULT_SYSTEM_PROMPT, MANIFEST_NAME, BaseModelRef, Manifest,
                               ManifestError, load_manifest, runs_root, save_manifest, staged_dir)

# What the chat engine can load: safetensors weights, configs, tokenizer, templates, card.
PULL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken",
                 "README.md"]
RUN_LEVEL_FILES = (MANIFEST_NAME, "eval.json", "README.md")


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


def build_manifest(run: Path, kind: str, repo_id: str, revision: str | None,
                   commit: str | None) -> Manifest:
    """The repo's own medchat.json (adjusted to this copy), else one made from its files."""
    from hub.card import looks_like_repo_id

    model_dir = run / kind
    manifest: Manifest | None = None
    if (run / MANIFEST_NAME).is_file():
        try:
            manifest = load_manifest(run)
        except ManifestError:
            manifest = None  # a broken pushed manifest: rebuild one from the model files
    if manifest is None:
        template = chat_template_of(model_dir)
        if kind == "adapter":
            base = str(_read_json(model_dir / "adapter_config.json")
                       .get("base_model_name_or_path") or "")
            ref = BaseModelRef(name=base, hub_id=base if looks_like_repo_id(base) else None)
        else:
            ref = BaseModelRef(name=repo_id, hub_id=repo_id, revision=commit)
            if template is None:
                # as training does for template-less bases (training.encode.ensure_chat_template)
                from training.encode import CHATML_TEMPLATE

                template = CHATML_TEMPLATE
        manifest = Manifest(name=run_folder_name(repo_id), base_model=ref,
                            chat_template=template or "", system_prompt=DEFAULT_SYSTEM_PROMPT,
                            eos_tokens=eos_tokens_of(model_dir))
    manifest.name = run.name if not run.name.startswith(".") else run_folder_name(repo_id)
    manifest.kind = kind
    if kind == "adapter" and manifest.base_model.hub_id:
        manifest.base_model.name = manifest.base_model.hub_id
        manifest.base_model.local_path = None
    if not manifest.chat_template:
        manifest.chat_template = chat_template_of(model_dir) or ""
    manifest.source = {"hub_repo": repo_id, "revision": revision or "main", "commit": commit}
    return manifest


def _up_to_date(target: Path, commit: str | None) -> bool:
    if commit is None or not (target / MANIFEST_NAME).is_file():
        return False
    try:
        m = load_manifest(target)
    except ManifestError:
        return False
    kind_dir = target / m.kind
    return m.source.get("commit") == commit and kind_dir.is_dir() and any(kind_dir.iterdir())


def pull(repo_id: str, revision: str | None = None, runs_dir=None,
         token: str | None = None) -> Path:
    """Download `repo_id` into runs/<owner>--<name>/ and return that run folder."""
    from huggingface_hub import HfApi, snapshot_download

    from hub.card import looks_like_repo_id

    repo_id = (repo_id or "").strip()
    revision = (revision or "").strip() or None
    if not looks_like_repo_id(repo_id):
        raise HubError(f"repo id {repo_id!r}: expected OWNER/NAME, e.g. "
                       "HuggingFaceTB/SmolLM2-135M-Instruct")
    target = runs_root(runs_dir) / run_folder_name(repo_id)
    tok = resolve_token(token, required=False)
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=tok)
    info = hub_call(f"look up '{repo_id}'", lambda: api.model_info(repo_id, revision=revision),
                    repo_id=repo_id)
    if _up_to_date(target, info.sha):
        return target
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
    with staged_dir(target, overwrite=True) as tmp:
        dl = tmp / kind
        # retried as a whole: downloads are idempotent and resume into the same folder
        hub_call(f"download '{repo_id}'", lambda: snapshot_download(
            repo_id, revision=info.sha, local_dir=dl, allow_patterns=wanted, token=tok,
            endpoint=endpoint), repo_id=repo_id, retry_all=True)
        shutil.rmtree(dl / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        for name in RUN_LEVEL_FILES:
            if (dl / name).is_file():
                os.replace(dl / name, tmp / name)
        manifest = build_manifest(tmp, kind, repo_id, revision, info.sha)
        manifest.name = target.name
        save_manifest(tmp, manifest)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="medchat pull", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", help="model repo id, OWNER/NAME")
    ap.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    ap.add_argument("--runs-dir", default=None, help="runs root (default $MEDCHAT_RUNS or ./runs)")
    args = ap.parse_args(argv)
    try:
        run = pull(args.repo, args.revision, args.runs_dir)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = load_manifest(run)
    print(f"{args.repo} ({m.kind}, commit {str(m.source.get('commit'))[:12]}) -> {run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
