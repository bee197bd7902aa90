"""Push a run's adapter (or its merged model) to a Hugging Face model repo, in one commit.

    medchat push RUN OWNER/NAME [--merged] [--private] [--dry-run] [--revision BRANCH]
                 [--commit-message TEXT] [--base-model ID] [--dataset ID] [--license ID]

This module decides what goes up; talking to the Hub (token, endpoint, retries, errors, the
commit) is hub.client. What goes up: the weights, configs, tokenizer and chat template of the
run's adapter (or merged model with --merged), a model card (README.md, see hub/card.py), the
manifest (medchat.json, local paths removed) and the run's evaluation results. Checkpoints,
optimizer/scheduler states, logs, .env files and anything that looks like a token never do; a
file whose text contains a Hugging Face token stops the push, and so does one that names a local
path, unless medchat can rewrite it without (hub/local_paths.py: configs, manifest, eval.json).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from hub.card import CardError, base_model_id, build_card, build_gguf_card, strip_local_paths
from hub.client import (HubError, PlannedFile, commit_files, connect, human_size,
                        require_repo_id, resolve_token)
from hub.local_paths import local_paths_in, machine_paths, public_file
from medchat.command_line import Opt
from medchat.run_folder import MANIFEST_NAME, Manifest, ManifestError, Run, SourceRecord

# What a model repo holds: weights, configs, tokenizer files and chat templates.
ALLOWED_SUFFIXES = {".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken"}
# Model files whose names would otherwise trip the token-looking-name check.
MODEL_FILE_NAMES = {"special_tokens_map.json", "added_tokens.json", "tokenizer.json",
                    "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                    "chat_template.json", "generation_config.json"}
# (glob on any path component or file name, reason) — checked before the allowlist.
DENIED = [
    ("checkpoints", "training checkpoint"), ("checkpoint-*", "training checkpoint"),
    ("global_step*", "DeepSpeed checkpoint"), ("logs", "training logs"),
    ("runs", "TensorBoard logs"),
    ("events.out.tfevents*", "TensorBoard logs"), ("optimizer*", "optimizer state"),
    ("scheduler*", "scheduler state"), ("rng_state*", "RNG state"),
    ("trainer_state.json", "trainer state"), ("training_args*", "trainer arguments"),
    ("zero_to_fp32.py", "DeepSpeed helper"), (".env*", "environment file (secrets)"),
    ("*.env", "environment file (secrets)"), (".git*", "git metadata"), (".cache", "cache"),
    ("__pycache__", "cache"), ("*.pem", "key material"), ("*.key", "key material"),
    ("id_rsa*", "key material"), ("id_ed25519*", "key material"), (".netrc", "credentials"),
    (".git-credentials", "credentials"), ("stored_tokens", "credentials"),
]
TOKEN_NAME = re.compile(r"(^|[._\-])(hf_?token|tokens?|secrets?|credentials?|passwords?|api_?key)"
                        r"($|[._\-])", re.I)
# User access tokens look like hf_ + 30-40 letters/digits; this also catches other hf_ secrets.
TOKEN_TEXT = re.compile(rb"hf_[A-Za-z0-9]{30,}")
SCAN_SUFFIXES = {".json", ".txt", ".jinja", ".md", ".model", ".tiktoken"}
SCAN_MAX_BYTES = 50 * 1024 * 1024
CARD_NAME = "README.md"  # the model card, at the top of the repo


@dataclass
class PushPlan:
    run_dir: Path
    repo_id: str
    kind: str  # adapter | merged
    files: list[PlannedFile]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        width = max([len(f.path_in_repo) for f in self.files] + [20])
        lines = [f"{'file':<{width}}  {'size':>10}"]
        for f in self.files:
            lines.append(f"{f.path_in_repo:<{width}}  {human_size(f.size):>10}"
                         + (f"  ({f.note})" if f.note else ""))
        lines.append(f"{len(self.files)} files, {human_size(self.total_bytes)} in total")
        if self.skipped:
            lines.append("not pushed:")
            lines += [f"  {p}  ({why})" for p, why in self.skipped]
        return "\n".join(lines)


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    commit_oid: str
    changed: bool  # False when every file was already on the Hub (no new commit)
    plan: PushPlan


# ---------------------------------------------------------------------------------------------
# What goes up


def deny_reason(rel: str) -> str | None:
    """Why a file inside the adapter or merged folder must not be pushed (None: it may go up)."""
    parts = Path(rel).parts
    name = parts[-1]
    for part in parts:
        for pattern, reason in DENIED:
            if fnmatch.fnmatch(part, pattern):
                return reason
    if name in MODEL_FILE_NAMES:
        return None
    if TOKEN_NAME.search(Path(name).stem) or TOKEN_NAME.search(name):
        return "looks like a token or secret"
    if Path(name).suffix.lower() not in ALLOWED_SUFFIXES:
        return f"not a model file type ({Path(name).suffix or 'no extension'})"
    return None


def check_no_secrets(path: Path, shown_as: str, token: str | None) -> None:
    """Refuse to push a text file that contains a token (the value is never echoed)."""
    if path.suffix.lower() not in SCAN_SUFFIXES or path.stat().st_size > SCAN_MAX_BYTES:
        return
    data = path.read_bytes()
    if TOKEN_TEXT.search(data) or (token and token.encode() in data):
        raise HubError(f"{shown_as}: contains text that looks like a Hugging Face token (hf_…); "
                       "remove it from the file before pushing (and revoke the token if it was "
                       "real)")


def public_manifest(manifest: Manifest, kind: str, base_model: str, repo_id: str) -> dict[str, Any]:
    """The medchat.json that goes up (schema 2): the base by Hub id, no local paths, the kind of
    the repo, and where it was pushed from."""
    base = dataclasses.replace(manifest.base_model, name=base_model, hub_id=base_model,
                               local_path=None)
    public = dataclasses.replace(manifest, base_model=base, kind=kind,
                                 source=SourceRecord(hub_repo=repo_id,
                                                     pushed_from_run=manifest.name))
    data = public.to_dict()
    for section in ("dataset", "training", "merge", "metrics"):
        data[section] = strip_local_paths(data[section])
    return data


def _adapter_config_for_hub(path: Path, base_model: str) -> PlannedFile:
    """adapter_config.json as is, unless it names the base by a local path: then by Hub id, so
    that AutoPeftModelForCausalLM.from_pretrained(repo) works on any machine."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HubError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); "
                       "re-save the adapter") from e
    if cfg.get("base_model_name_or_path") == base_model:
        return PlannedFile("adapter_config.json", path.stat().st_size, source=path)
    cfg["base_model_name_or_path"] = base_model
    data = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    return PlannedFile("adapter_config.json", len(data), data=data,
                       note="base_model_name_or_path set to the Hub id")


def _check_eval_file(run: Run) -> None:
    """The run's evaluation results go up as they are; refuse a file that is not JSON."""
    try:
        json.loads(run.eval_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HubError(f"{run.eval_path}: line {e.lineno}: invalid JSON ({e.msg}); fix or remove "
                       "it (`medchat evaluate RUN` rewrites it)") from e


def _open_run(run_ref: str | os.PathLike | Run) -> tuple[Run, Manifest]:
    """The run to push and its manifest; a run that cannot be read is a HubError (the push
    commands report those)."""
    try:
        run = Run.open(run_ref)
        return run, run.manifest()
    except ManifestError as e:
        raise HubError(str(e)) from e


def plan_push(run_ref: str | os.PathLike | Run, repo_id: str, merged: bool = False,
              base_model: str | None = None, datasets: list[str] | None = None,
              license: str | None = None, token: str | None = None,  # noqa: A002
              gguf: bool = False) -> PushPlan:
    """Decide every file of the commit (and its bytes, for generated ones) without any network."""
    if gguf:
        if merged:
            raise HubError("--gguf pushes the GGUF export (made from the merged model); "
                           "leave out --merged")
        return plan_gguf_push(run_ref, repo_id, base_model, datasets, license, token)
    require_repo_id(repo_id)
    run, manifest = _open_run(run_ref)
    kind = "merged" if merged else "adapter"
    folder = run.model_dir(kind)
    marker = "config.json" if merged else "adapter_config.json"
    if not (folder / marker).is_file():
        hint = (f"run `medchat merge {run.path}` first" if merged
                else "train it with `medchat train`, or push the merged model with --merged")
        raise HubError(f"{folder}: no {marker}; nothing to push ({hint})")
    if not any(folder.glob("*.safetensors")):
        raise HubError(f"{folder}: no *.safetensors weights; re-save the "
                       f"{'merged model' if merged else 'adapter'} with safe_serialization=True")
    has_eval = run.eval_path.is_file()
    if has_eval:
        _check_eval_file(run)
    try:
        base = base_model_id(manifest, base_model)
        card = build_card(manifest, repo_id, kind, base, datasets, license,
                          eval_file=run.eval_path.name if has_eval else None)
    except CardError as e:
        raise HubError(str(e)) from e

    files: list[PlannedFile] = []
    skipped: list[tuple[str, str]] = []
    generated = {CARD_NAME, MANIFEST_NAME, run.eval_path.name}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        shown = f"{folder.name}/{rel}"
        reason = "replaced by the generated file" if rel in generated else deny_reason(rel)
        if reason:
            skipped.append((shown, reason))
            continue
        check_no_secrets(path, str(path), token)
        if rel == "adapter_config.json":
            files.append(_adapter_config_for_hub(path, base))
            continue
        files.append(PlannedFile(rel, path.stat().st_size, source=path))
    card_bytes = str(card).encode("utf-8")
    manifest_bytes = (json.dumps(public_manifest(manifest, kind, base, repo_id), indent=2,
                                 ensure_ascii=False) + "\n").encode("utf-8")
    for data in (manifest_bytes, card_bytes):
        if TOKEN_TEXT.search(data) or (token and token.encode() in data):
            raise HubError(f"{run.manifest_path}: the manifest contains text that looks like a "
                           "Hugging Face token (hf_…); remove it before pushing")
    files.insert(0, PlannedFile(CARD_NAME, len(card_bytes), data=card_bytes,
                                note="model card, generated"))
    files.append(PlannedFile(MANIFEST_NAME, len(manifest_bytes), data=manifest_bytes,
                             note="manifest, local paths removed"))
    if has_eval:
        check_no_secrets(run.eval_path, str(run.eval_path), token)
        files.append(PlannedFile(run.eval_path.name, run.eval_path.stat().st_size,
                                 source=run.eval_path))
    for sub in (run.checkpoints_dir, run.logs_dir, run.data_dir):
        if sub.exists():
            skipped.append((f"{sub.name}/", "not part of a model repo"))
    machine = machine_paths(run.path, run.path.parent, manifest.base_model.local_path)
    files = [public_file(f, machine) for f in files]  # no local path goes up
    return PushPlan(run.path, repo_id, kind, files, skipped)


# The export's files besides the GGUF weights (README.md is replaced by the card): the Ollama
# Modelfile, what Ollama reads from a Hub repo (template, system, params), the Jinja template and
# the export record. All written by `medchat export gguf` (training/export.py).
GGUF_RECORD = "export.json"
GGUF_SIDE_FILES = ("Modelfile", "template", "system", "params", "chat_template.jinja",
                   GGUF_RECORD)


def plan_gguf_push(run_ref: str | os.PathLike | Run, repo_id: str,
                   base_model: str | None = None, datasets: list[str] | None = None,
                   license: str | None = None, token: str | None = None  # noqa: A002
                   ) -> PushPlan:
    """The commit of a GGUF repo: the run's GGUF export (files as its export.json lists them,
    unchanged since), its Modelfile and Ollama files, and a card with library_name gguf."""
    require_repo_id(repo_id)
    run, manifest = _open_run(run_ref)
    folder, record_path = run.gguf_dir, run.gguf_dir / GGUF_RECORD
    if not record_path.is_file():
        raise HubError(f"{folder}: no GGUF export ({GGUF_RECORD} missing); run "
                       f"`medchat export gguf {run.path}` first")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HubError(f"{record_path}: line {e.lineno}: invalid JSON ({e.msg}); export again "
                       "with `medchat export gguf RUN --overwrite`") from e
    files: list[PlannedFile] = []
    for entry in record.get("files") or []:
        name = str(entry.get("name", ""))
        path = folder / name
        if Path(name).name != name or not name.endswith(".gguf") or not path.is_file():
            raise HubError(f"{record_path}: lists {name!r}, which is not a .gguf file in "
                           f"{folder}; export again with --overwrite")
        if path.stat().st_size != entry.get("bytes"):
            raise HubError(f"{path}: {path.stat().st_size} bytes, but the export wrote "
                           f"{entry.get('bytes')}; it changed since it was checked: export "
                           "again with --overwrite")
        files.append(PlannedFile(name, path.stat().st_size, source=path,
                                 note=f"GGUF {record.get('type')}, checked at export"))
    if not files:
        raise HubError(f"{record_path}: lists no GGUF file; export again with --overwrite")
    readme = folder / CARD_NAME
    usage = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    usage = usage.split("\n", 1)[-1] if usage.startswith("# ") else usage  # the card's title
    try:
        base = base_model_id(manifest, base_model)
        card = build_gguf_card(manifest, repo_id, record, usage, base, datasets, license)
    except CardError as e:
        raise HubError(str(e)) from e
    machine = machine_paths(run.path, run.path.parent, manifest.base_model.local_path)
    card_bytes = str(card).encode("utf-8")
    generated = [(PlannedFile(CARD_NAME, len(card_bytes), data=card_bytes,
                              note="model card, generated"), "the generated card")]
    for name in GGUF_SIDE_FILES:
        if (folder / name).is_file():
            generated.append((PlannedFile(name, (folder / name).stat().st_size,
                                          source=folder / name),
                              str(folder / name)))
    for f, shown in generated:
        data = f.data if f.data is not None else f.source.read_bytes()  # type: ignore[union-attr]
        if TOKEN_TEXT.search(data) or (token and token.encode() in data):
            raise HubError(f"{shown}: contains text that looks like a Hugging Face token (hf_…); "
                           "remove it before pushing")
        found = local_paths_in(data.decode("utf-8", "replace"), machine)
        if found:
            raise HubError(f"{shown}: names a local path ({found[0][:120]!r}); nothing "
                           "published may point at files of this machine. Export again")
    planned = {f.path_in_repo for f in files} | {f.path_in_repo for f, _ in generated}
    skipped = [(f"{folder.name}/{p.name}", "replaced by the generated card" if p.name == CARD_NAME
                else "not part of the export") for p in sorted(folder.iterdir())
               if p.name not in planned]
    return PushPlan(run.path, repo_id, "gguf", [generated[0][0]] + files
                    + [f for f, _ in generated[1:]], skipped)


# ---------------------------------------------------------------------------------------------
# Push


def push(run: str | os.PathLike | Run, repo_id: str, *, merged: bool = False,
         private: bool = False, revision: str | None = None, commit_message: str | None = None,
         base_model: str | None = None, datasets: list[str] | None = None,
         license: str | None = None, token: str | None = None,  # noqa: A002
         dry_run: bool = False, gguf: bool = False) -> PushResult | PushPlan:
    """Push a run; returns the PushPlan for dry runs, else a PushResult."""
    tok = None if dry_run else resolve_token(token)
    plan = plan_push(run, repo_id, merged, base_model, datasets, license, token=tok, gguf=gguf)
    if dry_run:
        return plan
    client, user = connect(tok)
    message = commit_message or f"medchat: upload {plan.kind} of run '{plan.run_dir.name}'"
    url, oid, changed = commit_files(client, repo_id, plan.files, private=private,
                                     revision=revision, commit_message=message, user=user)
    return PushResult(repo_id, url, oid, changed, plan)


def push_command(run: str, repo: str, *, merged: bool = False, private: bool = False,
                 dry_run: bool = False, revision: str | None = None,
                 commit_message: str | None = None, base_model: str | None = None,
                 dataset: Annotated[list[str], Opt(metavar="ID")] = (),  # type: ignore[assignment]
                 license: str | None = None, gguf: bool = False) -> int:  # noqa: A002
    """Push a run's adapter (or merged model) to a Hugging Face model repo, in one commit.

    What goes up: the weights, configs, tokenizer and chat template of the run's adapter (or its
    merged model with --merged), a generated model card (README.md), the manifest (medchat.json,
    local paths removed) and the evaluation results. Checkpoints, optimizer states, logs and
    secrets never do; a file holding a Hugging Face token stops the push. The token comes from
    HF_TOKEN or the stored login (`hf auth login`); HF_ENDPOINT selects another Hub. With --gguf
    the run's GGUF export goes up instead (`medchat export gguf RUN` first): its GGUF files, the
    Ollama Modelfile and template/system/params files, and a card with library_name gguf.

    Args:
        run: run folder or run name under the runs root
        repo: target model repo, OWNER/NAME
        merged: push the merged model instead of the adapter
        private: create the repo as private
        dry_run: list what would be pushed; no network
        revision: branch to push to (created if missing)
        commit_message: commit message (default: names the run)
        base_model: Hub id of the base model, when the run used a local folder
        dataset: Hub dataset id for the card; repeat for several (default: from the manifest)
        license: card license (default: the base model's)
        gguf: push the run's GGUF export (llama.cpp / Ollama) instead
    """
    out = push(run, repo, merged=merged, private=private, revision=revision,
               commit_message=commit_message, base_model=base_model,
               datasets=list(dataset) or None, license=license, dry_run=dry_run, gguf=gguf)
    if isinstance(out, PushPlan):
        print(f"dry run: would push the {out.kind} of run '{out.run_dir.name}' to "
              f"{out.repo_id} in one commit\n{out.describe()}")
        return 0
    state = "pushed" if out.changed else "already up to date (nothing changed)"
    print(f"{out.plan.kind} of run '{out.plan.run_dir.name}' {state}: {out.repo_id} "
          f"({len(out.plan.files)} files, {human_size(out.plan.total_bytes)})\n{out.commit_url}")
    return 0
