"""The app's start-up: everything between `python launch.py` (or `medchat app`) and a served page.

    python launch.py                       # http://127.0.0.1:7860, default base model
    python launch.py --runs runs --port 7861 --base HuggingFaceTB/SmolLM2-135M-Instruct
    python launch.py --share               # also a temporary public gradio.live link
    medchat app [same options]
    medchat app --backend openai --backend-url http://127.0.0.1:8000   # generation by vLLM

In order: read the Space config, prepare the base model (downloaded, or converted from the
offline copy on first start, with progress on the terminal), pull the Space's models, build the
registry and the backend (the in-process engine: load the base and attach the adapters; or an
OpenAI-compatible server: check what it serves), build the app and serve it, with the
OpenAI-compatible API under /v1 on the same port.

The operator's limits (`medchat app --help`): message and history size, one answer-length cap
for the UI and the API, generations at once (Compare counts two) and the waiting line behind
them; a request beyond the line is told "busy, retry" (HTTP 429 on /v1).

"Add from Hub" follows --hub-pull/--no-hub-pull; without either it is on only when the app listens
on loopback without --share (the visitor is then the operator), off beyond loopback, with --share
and always on a Space; a visitor's pull is anonymous (the operator's Hub token only with
--hub-pull-token) and capped in size.

On a Hugging Face Space (SPACE_ID set) it binds 0.0.0.0:$PORT (7860), hides "Add from Hub",
wraps generation with `spaces.GPU` when the `spaces` package is present, and reads
`space_config.json` next to launch.py (or --space-config / $MEDCHAT_SPACE_CONFIG):

    {"base_model": "<hub id>", "models": ["owner/repo", ...]}

Each listed repo is pulled into the runs folder (hub.pull) at start and served like a local run.
This module is the app's composition root: the one chat module that imports hub.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hub.pull import pull
from medchat.backend import Backend, Limits
from medchat.base_model import DEFAULT_BASE_MODEL, looks_like_repo_id, resolve_base_model
from medchat.command_line import call
from medchat.engine import Engine
from medchat.errors import UserError
from medchat.registry import Registry
from medchat.remote_backend import RemoteBackend
from medchat.run_folder import runs_root

log = logging.getLogger(__name__)

APP_ROOT = Path(__file__).resolve().parents[1]  # where launch.py (and a Space's config) live
SPACE_CONFIG_NAME = "space_config.json"


def on_space() -> bool:
    """Whether this process runs on a Hugging Face Space."""
    return bool(os.environ.get("SPACE_ID"))


@dataclass
class SpaceConfig:
    """space_config.json, written by the Space bundle (hub/space.py)."""

    base_model: str | None = None  # Hub id of the base model to keep in memory
    models: list[str] = field(default_factory=list)  # Hub repos to pull and serve


class SpaceConfigError(UserError, ValueError):
    """A space config that is missing or malformed; the message names the file and field."""


def load_space_config(path: Path) -> SpaceConfig:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpaceConfigError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict):
        raise SpaceConfigError(f"{path}: expected an object like "
                               '{"base_model": "owner/name", "models": ["owner/repo"]}')
    base, models = data.get("base_model"), data.get("models", [])
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise SpaceConfigError(f"{path}: field base_model must be a Hub id string, "
                               f"got {base!r}")
    if not isinstance(models, list) or not all(isinstance(m, str) and looks_like_repo_id(m)
                                               for m in models):
        raise SpaceConfigError(f"{path}: field models must be a list of 'owner/repo' strings, "
                               f"got {models!r}")
    return SpaceConfig(base_model=base, models=list(models))


def find_space_config(explicit: str | None) -> Path | None:
    """--space-config, else $MEDCHAT_SPACE_CONFIG, else space_config.json next to launch.py."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise SpaceConfigError(f"{p}: no such space config file")
        return p
    env = os.environ.get("MEDCHAT_SPACE_CONFIG")
    if env:
        if not Path(env).is_file():
            raise SpaceConfigError(f"MEDCHAT_SPACE_CONFIG={env}: no such file")
        return Path(env)
    p = APP_ROOT / SPACE_CONFIG_NAME
    return p if p.is_file() else None


def _say(text: str) -> None:
    print(f"medchat: {text}", file=sys.stderr, flush=True)


def pull_models(repos: list[str], runs: Path) -> None:
    """Pull each repo into the runs folder; one that fails is reported and skipped."""
    for repo in repos:
        _say(f"pulling {repo} into {runs} ...")
        try:
            pull(repo, revision=None, runs_dir=runs)
        except Exception as e:  # one bad repo should not take the whole Space down
            print(f"warning: could not pull {repo}: {type(e).__name__}: {e}", file=sys.stderr)


def is_loopback(host: str) -> bool:
    """Whether `host` (an interface to bind) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hub_pull_allowed(asked: bool | None, host: str, share: bool, space: bool) -> bool:
    """Whether visitors get "Add from Hub": as asked, else only on loopback without a public
    link, and never on a Space."""
    if asked is not None:
        return asked and not space
    return not space and not share and is_loopback(host)


def ui_pull(token: bool, max_gb: float):
    """hub.pull.pull as a visitor may use it: anonymous unless the operator lends the token,
    and capped in size."""
    return functools.partial(pull, anonymous=not token, max_bytes=int(max_gb * 1e9))


def read_key(var: str | None, flag: str) -> str | None:
    """The secret in environment variable `var` (never printed); None when no variable named."""
    if not var:
        return None
    key = os.environ.get(var, "").strip()
    if not key:
        raise UserError(f"{flag} {var}: that environment variable is empty or not set; "
                        f"export {var}=<key> first")
    return key


def app_command(*, host: str | None = None, port: int | None = None, share: bool = False,
                runs: str | None = None, base: str | None = None, revision: str | None = None,
                model: str | None = None, space_config: str | None = None,
                device: str = "auto", max_cached_models: int = 2,
                max_context: int | None = None, concurrency: int = 8, queue_size: int = 16,
                max_message_chars: int = 8000, max_history_chars: int = 64000,
                max_new_tokens: int = 2048,
                backend: Literal["in-process", "openai"] = "in-process",
                backend_url: str | None = None,
                dialect: Literal["vllm", "llama-server", "medchat"] = "vllm",
                backend_key_env: str | None = None, api_key_env: str | None = None,
                openai_api: bool = True, hub_pull: bool | None = None,
                hub_pull_token: bool = False, hub_pull_max_gb: float = 5.0,
                allow_remote_code: bool = False) -> int:
    """Serve the chat app: the base model and every run's adapter and merged model.

    Chat with streaming answers, compare two models side by side, and (locally) add models
    from the Hugging Face Hub; the same models answer OpenAI clients under /v1 on the same port.
    On first start the base model is prepared with progress on the terminal. On a Space
    (SPACE_ID set) it binds 0.0.0.0:$PORT and pulls the models listed in space_config.json.
    With --backend openai the answers come from an OpenAI-compatible server (vLLM: see
    `medchat vllm-command`); models it cannot serve are answered in-process.

    Args:
        host: interface to bind (default 127.0.0.1; 0.0.0.0 on a Space)
        port: port to listen on (default 7860; $PORT on a Space)
        share: also open a public gradio.live link
        runs: runs folder (default: $MEDCHAT_RUNS or ./runs)
        base: base model: Hub id or folder (default: the space config's, else
            HuggingFaceTB/SmolLM2-135M-Instruct)
        revision: Hub revision of the base model
        model: model selected at start (default: the first fine-tuned one)
        space_config: space_config.json (default: next to launch.py)
        device: cpu, cuda, cuda:1 ... (auto: cuda when available)
        max_cached_models: merged models / other bases kept in memory besides the base (LRU)
        max_context: cap on prompt + answer tokens
        concurrency: generations running at once, UI and API together (Compare counts two)
        queue_size: requests waiting for a generation; one more is told "busy, retry"
            (HTTP 429 on /v1)
        max_message_chars: longest user message, in characters
        max_history_chars: longest earlier conversation sent with a message, in characters
        max_new_tokens: longest answer in tokens, for the UI (its slider's end) and the API
        backend: who generates: in-process (this process's engine) or openai (an
            OpenAI-compatible server at --backend-url)
        backend_url: the server's URL for --backend openai, e.g. http://127.0.0.1:8000
        dialect: the server behind --backend openai: vllm, llama-server or medchat
        backend_key_env: environment variable holding the server's API key (--backend openai)
        api_key_env: environment variable holding the key /v1 clients must send as
            'Authorization: Bearer KEY' (default: /v1 is open like the UI)
        openai_api: serve the OpenAI-compatible API under /v1
        hub_pull: show the 'Add from Hub' control (default: only when listening on loopback
            without --share, and never on a Space)
        hub_pull_token: pull from the UI, and fetch the bases of pulled runs, with the operator's
            Hub token (default: anonymously, so visitors reach public repos only)
        hub_pull_max_gb: largest repo the UI may pull, and largest base a pulled run may make
            the server download, in GB
        allow_remote_code: let runs pulled from the Hub whose manifest asks for
            trust_remote_code load their model with it (their code then runs on this server)
    """
    space = on_space()
    if host is None:
        host = "0.0.0.0" if space else "127.0.0.1"
    if port is None:
        port = int(os.environ.get("PORT") or 7860) if space else 7860
    hub_pull = hub_pull_allowed(hub_pull, host, share, space)
    if backend == "openai" and not backend_url:
        raise UserError("--backend openai needs --backend-url, e.g. http://127.0.0.1:8000 "
                        "(start vLLM with `medchat vllm-command --run`)")
    limits = Limits(max_message_chars=max_message_chars, max_history_chars=max_history_chars,
                    max_new_tokens=max_new_tokens, max_active=concurrency,
                    max_waiting=queue_size)
    api_key = read_key(api_key_env, "--api-key-env")
    server_key = read_key(backend_key_env, "--backend-key-env")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("medchat").setLevel(logging.INFO)  # model loads, attaches, evictions
    gpu = None
    if space:
        try:  # ZeroGPU: spaces must be imported before anything initializes CUDA
            import spaces

            gpu = spaces.GPU
        except ImportError:
            pass

    cfg_path = find_space_config(space_config)
    cfg = load_space_config(cfg_path) if cfg_path else SpaceConfig()
    base = base or cfg.base_model or DEFAULT_BASE_MODEL
    runs_dir = runs_root(runs)

    t0 = time.perf_counter()
    _say(f"preparing base model {base} ...")
    resolved = resolve_base_model(base, revision, progress=True)
    _say(f"base model ready at {resolved.path} ({resolved.source}, "
         f"{time.perf_counter() - t0:.1f} s)")
    pull_models(cfg.models, runs_dir)

    registry = Registry(runs_dir, base_name=base, base_path=resolved.path,
                        base_hub_id=resolved.hub_id)
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if model and model not in registry.ids():
        raise UserError(f"--model {model!r} is not registered; choose one of: "
                        f"{', '.join(registry.ids())}")
    engine = Engine(registry, device=device, max_cached_models=max_cached_models,
                    max_context=max_context, limits=limits, allow_remote_code=allow_remote_code,
                    # a pulled run's base: fetched as the visitor's pull was (anonymously unless
                    # --hub-pull-token) and within the same size cap
                    pulled_base_token=None if hub_pull_token else False,
                    pulled_base_max_bytes=int(hub_pull_max_gb * 1e9))
    t1 = time.perf_counter()
    chosen: Backend
    if backend == "openai":
        # the engine loads nothing unless asked for a model the server does not hold
        chosen = RemoteBackend(registry, backend_url, dialect=dialect, api_key=server_key,
                               limits=limits, local=engine)
        _say(f"checking the {dialect} server at {backend_url} ...")
        problems = chosen.connect()
        where = f"{backend_url} ({dialect})"
    else:
        chosen = engine
        engine.load_base()
        problems = engine.preload()
        where = engine.device
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    ready = [m.id for m in chosen.models()]
    _say(f"{len(ready)} model(s) ready on {where} in {time.perf_counter() - t1:.1f} s: "
         f"{', '.join(ready)}")

    # imported here: gradio takes seconds to import, and every `medchat` command imports this
    from medchat import app

    visitor_pull = ui_pull(hub_pull_token, hub_pull_max_gb) if hub_pull else None
    demo = app.build_app(chosen, registry, pull=visitor_pull, gpu=gpu, default_model=model,
                         openai_api=openai_api, api_key=api_key)
    if openai_api:
        # (the URL is printed by Gradio once it listens; scripts wait for that line)
        _say("OpenAI-compatible API under /v1 on the app's port"
             + (" (bearer key required)" if api_key else ""))
    app.serve(demo, host=host, port=port, share=share)
    return 0


def main(argv: list[str] | None = None) -> int:
    return call(app_command, argv, "python launch.py")


if __name__ == "__main__":
    raise SystemExit(main())
