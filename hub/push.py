"""Push a run's adapter (or its merged model) to a Hugging Face model repo, in one commit.

    medchat push RUN OWNER/NAME [--merged] [--private] [--dry-run] [--revision BRANCH]
                 [--commit-message TEXT] [--base-model ID] [--dataset ID] [--license ID]

RUN is a run folder or a run name under the runs root ($MEDCHAT_RUNS or ./runs). What goes up:
the weights, configs, tokenizer and chat template of adapter/ (or merged/ with --merged), a model
card (README.md, see hub/card.py), the manifest (medchat.json, local paths removed) and
eval.json. Checkpoints, optimizer/scheduler states, logs, .env files and anything that looks
like a token never do; a file whose text contains a Hugging Face token stops the push.

The token comes from HF_TOKEN or the stored login (`hf auth login`), through
huggingface_hub.get_token(); it is never printed, logged or written. HF_ENDPOINT selects another
Hub-compatible server. huggingface_hub already retries its upload and download calls (preupload,
LFS, tree, resolve) with backoff; the calls it does not retry (whoami, repo creation, the commit
itself, repo info) are retried here on 429/5xx and network errors.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from training.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest, runs_root

log = logging.getLogger(__name__)
T = TypeVar("T")

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

TRANSIENT_STATUS = {429, 500, 502, 503, 504}
RETRIES = 4  # attempts after the first, for the calls huggingface_hub does not retry itself
RETRY_BASE_WAIT = 1.0  # seconds; doubled each attempt (tests lower it)
# Requests huggingface_hub sends without its own backoff (whoami, create, commit, info, branch).
_NOT_RETRIED_BY_LIBRARY = re.compile(
    r"/api/(whoami-v2|repos/create|validate-yaml)$"
    r"|/api/(models|datasets|spaces)/[^/]+/[^/]+/(commit|branch)/"
    r"|/api/(models|datasets|spaces)/[^/]+/[^/]+(/revision/[^/]+)?$")


class HubError(RuntimeError):
    """A push/pull problem the user can act on; the message says what and what to do."""


@dataclass
class PlannedFile:
    path_in_repo: str
    size: int
    source: Path | None = None  # a file on disk, uploaded as is
    data: bytes | None = None  # generated content (card, cleaned manifest)
    note: str = ""

    def payload(self) -> Path | bytes:
        return self.source if self.source is not None else (self.data or b"")


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


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ---------------------------------------------------------------------------------------------
# What goes up


def resolve_run(run: str | os.PathLike) -> Path:
    p = Path(run).expanduser()
    if p.is_dir():
        return p
    candidate = runs_root() / str(run)
    if candidate.is_dir():
        return candidate
    raise HubError(f"run {str(run)!r}: no such folder, and no run of that name in {runs_root()}; "
                   "pass a run folder (runs/<name>) or a run name")


def deny_reason(rel: str) -> str | None:
    """Why a file inside adapter/ or merged/ must not be pushed (None: it may go up)."""
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
    """The medchat.json that goes up: base model by Hub id, no local paths, kind of the repo."""
    data = manifest.to_dict()
    base = dict(data["base_model"])
    base.update(name=base_model, hub_id=base_model, local_path=None)
    data["base_model"] = base
    data["kind"] = kind
    from hub.card import strip_local_paths

    data["dataset"] = strip_local_paths(data.get("dataset") or {})
    data["training"] = strip_local_paths(data.get("training") or {})
    data["merge"] = strip_local_paths(data.get("merge") or {})
    data["source"] = {"pushed_from_run": manifest.name, "hub_repo": repo_id}
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


def plan_push(run_dir: str | os.PathLike, repo_id: str, merged: bool = False,
              base_model: str | None = None, datasets: list[str] | None = None,
              license: str | None = None, token: str | None = None) -> PushPlan:  # noqa: A002
    """Decide every file of the commit (and its bytes, for generated ones) without any network."""
    from hub.card import CardError, base_model_id, build_card, looks_like_repo_id

    if not looks_like_repo_id(repo_id):
        raise HubError(f"repo id {repo_id!r}: expected OWNER/NAME (e.g. your-name/smollm2-medqa)")
    run = resolve_run(run_dir)
    try:
        manifest = load_manifest(run)
    except ManifestError as e:
        raise HubError(str(e)) from e
    kind = "merged" if merged else "adapter"
    folder = run / kind
    marker = "config.json" if merged else "adapter_config.json"
    if not (folder / marker).is_file():
        hint = (f"run `medchat merge {run}` first" if merged
                else "train it with `python -m training.run`, or push merged/ with --merged")
        raise HubError(f"{folder}: no {marker}; nothing to push ({hint})")
    if not any(folder.glob("*.safetensors")):
        raise HubError(f"{folder}: no *.safetensors weights; re-save the "
                       f"{'merged model' if merged else 'adapter'} with safe_serialization=True")
    eval_path = run / "eval.json"
    eval_data = None
    if eval_path.is_file():
        try:
            eval_data = json.loads(eval_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise HubError(f"{eval_path}: line {e.lineno}: invalid JSON ({e.msg}); fix or remove "
                           "it (`medchat evaluate RUN` rewrites it)") from e
    try:
        base = base_model_id(manifest, base_model)
        card = build_card(manifest, repo_id, kind, eval_data, base, datasets, license)
    except CardError as e:
        raise HubError(str(e)) from e

    files: list[PlannedFile] = []
    skipped: list[tuple[str, str]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        shown = f"{kind}/{rel}"
        reason = deny_reason(rel)
        if rel in ("README.md", MANIFEST_NAME, "eval.json"):
            reason = "replaced by the generated file"
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
    for name, data in ((MANIFEST_NAME, manifest_bytes), ("README.md", card_bytes)):
        if TOKEN_TEXT.search(data) or (token and token.encode() in data):
            raise HubError(f"{run / MANIFEST_NAME}: the manifest contains text that looks like a "
                           "Hugging Face token (hf_…); remove it before pushing")
    files.insert(0, PlannedFile("README.md", len(card_bytes), data=card_bytes,
                                note="model card, generated"))
    files.append(PlannedFile(MANIFEST_NAME, len(manifest_bytes), data=manifest_bytes,
                             note="manifest, local paths removed"))
    if eval_path.is_file():
        check_no_secrets(eval_path, str(eval_path), token)
        files.append(PlannedFile("eval.json", eval_path.stat().st_size, source=eval_path))
    for sub in ("checkpoints", "logs", "data"):
        if (run / sub).exists():
            skipped.append((f"{sub}/", "not part of a model repo"))
    return PushPlan(run, repo_id, kind, files, skipped)


# ---------------------------------------------------------------------------------------------
# Talking to the Hub


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None, required: bool = True) -> str | None:
    """The caller's token, else HF_TOKEN, else the stored login (never echoed anywhere)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if found is None and required:
        raise HubError("no Hugging Face token found: set HF_TOKEN to a token with write access "
                       "(https://huggingface.co/settings/tokens) or run `hf auth login`")
    return found


def _has_token() -> bool:
    try:
        return resolve_token(required=False) is not None
    except Exception:  # noqa: BLE001 - e.g. a failing OIDC exchange: treat as no token
        return False


def token_source() -> str:
    return "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the stored login (`hf auth login`)"


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx2 as httpx  # huggingface_hub >= 2
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        import httpx  # type: ignore[no-redef]
    return (httpx.TransportError,)


def _root_cause(exc: BaseException) -> BaseException:
    """The HTTP or network error behind wrappers like 'Error while uploading X to the Hub'."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = exc
    while seen is not None:
        if isinstance(seen, (HfHubHTTPError, *_transport_errors())):
            return seen
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return exc


def _request_path(err: BaseException) -> str:
    """URL path of the request behind an HTTP/network error ('' when unknown)."""
    for get in (lambda: err.response.request.url.path,  # type: ignore[attr-defined]
                lambda: err.request.url.path):  # type: ignore[attr-defined]
        try:
            return str(get())
        except Exception:  # noqa: BLE001 - httpx raises RuntimeError for an unset .request
            continue
    return ""


def explain(err: BaseException, what: str, repo_id: str | None = None,
            user: str | None = None) -> HubError:
    """A HubError that says what went wrong, where, and what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = hub_endpoint()
    cause = _root_cause(err)
    if isinstance(cause, OfflineModeIsEnabled) or isinstance(err, OfflineModeIsEnabled):
        return HubError(f"cannot {what}: HF_HUB_OFFLINE is set; unset it (or set it to 0) to "
                        "reach the Hub")
    if isinstance(cause, _transport_errors()):
        return HubError(f"cannot reach the Hub at {endpoint} to {what} "
                        f"({type(cause).__name__}); check your network connection, proxy "
                        "settings and HF_ENDPOINT, then retry")
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        status = cause.response.status_code
        server = (cause.server_message or "").strip().splitlines()
        detail = f": {server[0]}" if server else ""
        if status == 401 and not _has_token():
            return HubError(f"'{repo_id}' on {endpoint} needs a token (401 Unauthorized) to "
                            f"{what}: it is private, gated or does not exist. Check the repo id, "
                            "or set HF_TOKEN / run `hf auth login` with access to it")
        if status == 401:
            return HubError(f"the Hub at {endpoint} rejected the token from {token_source()} "
                            f"(401 Unauthorized) when trying to {what}. Create a token with write "
                            "access at https://huggingface.co/settings/tokens and set HF_TOKEN, or "
                            "run `hf auth login --force`")
        if status == 403:
            ns = repo_id.split("/")[0] if repo_id else "that namespace"
            name = repo_id.split("/")[-1] if repo_id else "NAME"
            who = f"the token of '{user}'" if user else "this token"
            alt = f" Push to '{user}/{name}' instead, or" if user and user != ns else ""
            return HubError(f"{who} has no write access to '{repo_id}' (403 Forbidden) when "
                            f"trying to {what}{detail}. The namespace '{ns}' belongs to someone "
                            f"else or the token is read-only.{alt} use a token with write "
                            f"access to '{ns}'")
        if status == 404:
            return HubError(f"'{repo_id}' was not found on {endpoint} (404) when trying to "
                            f"{what}{detail}; check the repo id (and the revision), and that the "
                            "token can see it if it is private")
        if status in TRANSIENT_STATUS:
            return HubError(f"the Hub at {endpoint} kept answering {status} when trying to "
                            f"{what}, also after retrying with backoff; it is probably having "
                            "trouble, try again later")
        return HubError(f"the Hub at {endpoint} answered {status} when trying to {what}{detail}")
    first = str(err).splitlines()[0] if str(err) else ""
    return HubError(f"could not {what}: {type(err).__name__}: {first}")


def hub_call(what: str, fn: Callable[..., T], *args: Any, repo_id: str | None = None,
             user: str | None = None, retry_all: bool = False, **kwargs: Any) -> T:
    """Call huggingface_hub; retry what it does not retry itself (everything transient when
    `retry_all`, for idempotent calls like a whole download); turn failures into HubError."""
    from huggingface_hub.errors import HfHubHTTPError

    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except HubError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an explained HubError
            cause = _root_cause(e)
            transient = (isinstance(cause, _transport_errors()) or (
                isinstance(cause, HfHubHTTPError) and cause.response is not None
                and cause.response.status_code in TRANSIENT_STATUS))
            ours = retry_all or bool(_NOT_RETRIED_BY_LIBRARY.search(_request_path(cause)))
            if transient and ours and attempt < RETRIES:
                wait = RETRY_BASE_WAIT * 2 ** attempt
                attempt += 1
                status = getattr(getattr(cause, "response", None), "status_code", None)
                log.warning("%s: %s; retrying in %.1fs (%d/%d)", what,
                            f"HTTP {status}" if status else type(cause).__name__, wait, attempt,
                            RETRIES)
                time.sleep(wait)
                continue
            raise explain(e, what, repo_id, user) from None


def connect(token: str | None = None):
    """(HfApi, user name) for an authenticated session; clear errors for missing/bad tokens."""
    from huggingface_hub import HfApi

    tok = resolve_token(token)
    api = HfApi(endpoint=hub_endpoint(), token=tok)
    who = hub_call("check the token (whoami)", api.whoami)
    return api, who.get("name")


def commit_files(api, repo_id: str, files: list[PlannedFile], *, repo_type: str = "model",
                 private: bool = False, revision: str | None = None, commit_message: str,
                 user: str | None = None, space_sdk: str | None = None) -> tuple[str, str, bool]:
    """Create the repo if needed and upload `files` in one commit: (url, oid, changed)."""
    from huggingface_hub import CommitOperationAdd

    def call(what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        # repo_id goes to the client positionally; hub_call's own repo_id is for messages
        return hub_call(what, lambda: fn(repo_id, **kwargs), repo_id=repo_id, user=user)

    create: dict[str, Any] = {"repo_type": repo_type, "private": private, "exist_ok": True}
    if space_sdk:
        create["space_sdk"] = space_sdk
    call(f"create the {repo_type} repo '{repo_id}'", api.create_repo, **create)
    if revision and revision != "main":
        call(f"create the branch '{revision}' of '{repo_id}'", api.create_branch,
             branch=revision, repo_type=repo_type, exist_ok=True)
    before = call(f"read '{repo_id}'", api.repo_info, repo_type=repo_type, revision=revision).sha
    ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.payload())
           for f in files]
    info = call(f"upload {len(files)} files to '{repo_id}'", api.create_commit, operations=ops,
                commit_message=commit_message, repo_type=repo_type, revision=revision)
    return info.commit_url, info.oid, info.oid != before


def push(run: str | os.PathLike, repo_id: str, *, merged: bool = False, private: bool = False,
         revision: str | None = None, commit_message: str | None = None,
         base_model: str | None = None, datasets: list[str] | None = None,
         license: str | None = None, token: str | None = None,  # noqa: A002
         dry_run: bool = False) -> PushResult | PushPlan:
    """Push a run; returns the PushPlan for dry runs, else a PushResult."""
    tok = None if dry_run else resolve_token(token)
    plan = plan_push(run, repo_id, merged, base_model, datasets, license, token=tok)
    if dry_run:
        return plan
    api, user = connect(tok)
    message = commit_message or f"medchat: upload {plan.kind} of run '{plan.run_dir.name}'"
    url, oid, changed = commit_files(api, repo_id, plan.files, private=private, revision=revision,
                                     commit_message=message, user=user)
    return PushResult(repo_id, url, oid, changed, plan)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="medchat push", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder or run name under the runs root")
    ap.add_argument("repo", help="target model repo, OWNER/NAME")
    ap.add_argument("--merged", action="store_true", help="push merged/ instead of adapter/")
    ap.add_argument("--private", action="store_true", help="create the repo as private")
    ap.add_argument("--dry-run", action="store_true", help="list what would be pushed; no network")
    ap.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    ap.add_argument("--commit-message", default=None)
    ap.add_argument("--base-model", default=None,
                    help="Hub id of the base model, when the run used a local folder")
    ap.add_argument("--dataset", action="append", default=None, metavar="ID",
                    help="Hub dataset id(s) for the card (default: from the manifest)")
    ap.add_argument("--license", default=None, help="card license (default: the base model's)")
    args = ap.parse_args(argv)
    try:
        out = push(args.run, args.repo, merged=args.merged, private=args.private,
                   revision=args.revision, commit_message=args.commit_message,
                   base_model=args.base_model, datasets=args.dataset, license=args.license,
                   dry_run=args.dry_run)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(out, PushPlan):
        print(f"dry run: would push the {out.kind} of run '{out.run_dir.name}' to "
              f"{out.repo_id} in one commit\n{out.describe()}")
        return 0
    state = "pushed" if out.changed else "already up to date (nothing changed)"
    print(f"{out.plan.kind} of run '{out.plan.run_dir.name}' {state}: {out.repo_id} "
          f"({len(out.plan.files)} files, {human_size(out.plan.total_bytes)})\n{out.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
