"""Start the medchat app: chat with the base model and every fine-tuned run in ./runs.

    python launch.py                       # http://127.0.0.1:7860, default base model
    python launch.py --runs runs --port 7861 --base HuggingFaceTB/SmolLM2-135M-Instruct
    python launch.py --share               # also a temporary public gradio.live link
    medchat app [same options]

On first start the default base model is prepared (downloaded, or converted from the offline
copy; see DESIGN.md "Models without network"), with progress on the terminal.

On a Hugging Face Space (SPACE_ID set) it binds 0.0.0.0:$PORT (7860), wraps generation with
`spaces.GPU` when the `spaces` package is present, and reads `space_config.json` next to this
file (or --space-config / $MEDCHAT_SPACE_CONFIG):

    {"base_model": "<hub id>", "models": ["owner/repo", ...]}

Each listed repo is pulled into the runs folder (hub.pull) at start and served like a local run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `python /path/to/launch.py` from another folder
    sys.path.insert(0, str(HERE))

log = logging.getLogger("medchat.launch")


@dataclass
class SpaceConfig:
    """space_config.json, written by the Space bundle (hub/space.py)."""

    base_model: str | None = None  # Hub id of the base model to keep in memory
    models: list[str] = field(default_factory=list)  # Hub repos to pull and serve


class ConfigError(ValueError):
    pass


def load_space_config(path: Path) -> SpaceConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object like "
                          '{"base_model": "owner/name", "models": ["owner/repo"]}')
    base, models = data.get("base_model"), data.get("models", [])
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise ConfigError(f"{path}: field base_model must be a Hub id string, got {base!r}")
    if not isinstance(models, list) or not all(isinstance(m, str) and m.count("/") == 1
                                               for m in models):
        raise ConfigError(f"{path}: field models must be a list of 'owner/repo' strings, "
                          f"got {models!r}")
    return SpaceConfig(base_model=base, models=list(models))


def find_space_config(explicit: str | None) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError(f"{p}: no such space config file")
        return p
    env = os.environ.get("MEDCHAT_SPACE_CONFIG")
    if env:
        if not Path(env).is_file():
            raise ConfigError(f"MEDCHAT_SPACE_CONFIG={env}: no such file")
        return Path(env)
    p = HERE / "space_config.json"
    return p if p.is_file() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from training.base_model import DEFAULT_BASE_MODEL

    space = bool(os.environ.get("SPACE_ID"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="0.0.0.0" if space else "127.0.0.1",
                    help="interface to bind (default 127.0.0.1; 0.0.0.0 on a Space)")
    ap.add_argument("--port", type=int,
                    default=int(os.environ.get("PORT") or 7860) if space else 7860)
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    ap.add_argument("--runs", help="runs folder (default: $MEDCHAT_RUNS or ./runs)")
    ap.add_argument("--base", default=None,
                    help=f"base model: Hub id or folder (default {DEFAULT_BASE_MODEL})")
    ap.add_argument("--revision", help="Hub revision of the base model")
    ap.add_argument("--model", help="model selected at start (default: the first fine-tuned one)")
    ap.add_argument("--space-config", help="space_config.json (default: next to launch.py)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    ap.add_argument("--max-cached-models", type=int, default=2,
                    help="merged models / other bases kept in memory besides the base (LRU)")
    ap.add_argument("--max-context", type=int, help="cap on prompt + answer tokens")
    ap.add_argument("--concurrency", type=int, default=4,
                    help="generations running at once; more wait in the queue")
    ap.add_argument("--hub-pull", action=argparse.BooleanOptionalAction, default=not space,
                    help="show the 'Add from Hub' control (default: on locally, off on a Space)")
    args = ap.parse_args(argv)
    args.space = space
    args.default_base = DEFAULT_BASE_MODEL
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("medchat").setLevel(logging.INFO)  # model loads, attaches, evictions
    gpu = None
    if args.space:
        try:  # ZeroGPU: spaces must be imported before anything initializes CUDA
            import spaces

            gpu = spaces.GPU
        except ImportError:
            pass

    from medchat.registry import Registry
    from training.base_model import BaseModelError, resolve_base_model
    from training.manifest import runs_root

    try:
        cfg_path = find_space_config(args.space_config)
        cfg = load_space_config(cfg_path) if cfg_path else SpaceConfig()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = args.base or cfg.base_model or args.default_base
    runs = runs_root(args.runs)

    t0 = time.perf_counter()
    print(f"medchat: preparing base model {base} ...", file=sys.stderr, flush=True)
    try:
        resolved = resolve_base_model(base, args.revision, progress=True)
    except BaseModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"medchat: base model ready at {resolved.path} ({resolved.source}, "
          f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    if cfg.models:
        try:
            from hub.pull import pull
        except ImportError:
            print(f"error: {cfg_path} lists models to pull but hub.pull is not available",
                  file=sys.stderr)
            return 2
        for repo in cfg.models:
            print(f"medchat: pulling {repo} into {runs} ...", file=sys.stderr, flush=True)
            try:
                pull(repo, revision=None, runs_dir=runs)
            except Exception as e:  # one bad repo should not take the whole Space down
                print(f"warning: could not pull {repo}: {type(e).__name__}: {e}", file=sys.stderr)

    from medchat.engine import Engine

    registry = Registry(runs, base_name=base, base_path=resolved.path,
                        base_hub_id=resolved.hub_id)
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if args.model and args.model not in registry.ids():
        print(f"error: --model {args.model!r} is not registered; choose one of: "
              f"{', '.join(registry.ids())}", file=sys.stderr)
        return 2
    engine = Engine(registry, device=args.device, max_cached_models=args.max_cached_models,
                    max_context=args.max_context)
    t1 = time.perf_counter()
    engine.load_base()
    for problem in engine.preload():
        print(f"warning: {problem}", file=sys.stderr)
    print(f"medchat: {len(registry.ids())} model(s) ready on {engine.device} in "
          f"{time.perf_counter() - t1:.1f} s: {', '.join(registry.ids())}",
          file=sys.stderr, flush=True)

    from medchat.app import build_app, serve

    demo = build_app(engine, registry, allow_pull=args.hub_pull, gpu=gpu,
                     default_model=args.model, concurrency=args.concurrency)
    serve(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
