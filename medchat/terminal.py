"""Terminal chat, like `xtuner chat`: the same engine, models and prompts as the app.

    medchat chat --list                                  # what can be chatted with
    medchat chat --model adapter:smollm2-medqa           # interactive; /reset, /exit
    medchat chat --model base --system "Be brief." --temperature 0 --max-new-tokens 128
    echo "What is metformin for?" | medchat chat --model adapter:smollm2-medqa

Answers stream to stdout; Ctrl-C stops the current answer, Ctrl-D (or /exit) quits.
"""

from __future__ import annotations

import argparse
import sys

from medchat.engine import GenerationSettings

COMMANDS = "/reset clears the conversation, /exit quits, Ctrl-C stops an answer"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from training.base_model import DEFAULT_BASE_MODEL

    ap = argparse.ArgumentParser(prog="medchat chat", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="registered model id (see --list); default: the first fine-tuned one")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--runs", help="runs folder (default: $MEDCHAT_RUNS or ./runs)")
    ap.add_argument("--base", default=DEFAULT_BASE_MODEL, help="base model id or folder")
    ap.add_argument("--system", help="system prompt (default: the model's own)")
    ap.add_argument("--device", default="auto")
    for f in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed"):
        kind = int if f in ("max_new_tokens", "seed") else float
        ap.add_argument("--" + f.replace("_", "-"), type=kind, default=None,
                        help=f"default: the run's manifest, else {getattr(GenerationSettings, f)}")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from medchat.engine import Engine, EngineError, SettingsError
    from medchat.registry import BASE_ID, Registry, UnknownModelError
    from training.base_model import BaseModelError, resolve_base_model

    try:
        resolved = resolve_base_model(args.base, progress=True)
    except BaseModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    registry = Registry(args.runs, base_name=args.base, base_path=resolved.path,
                        base_hub_id=resolved.hub_id)
    for p in registry.problems:
        print(f"warning: {p}", file=sys.stderr)
    if args.list:
        for e in registry.entries():
            print(f"{e.id:40s} {e.label}")
        return 0
    ids = registry.ids()
    model = args.model or next((i for i in ids if i != BASE_ID), BASE_ID)
    try:
        entry = registry.get(model)
        settings = GenerationSettings.from_defaults(
            entry.generation, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    except (UnknownModelError, SettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = Engine(registry, device=args.device)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"medchat: chatting with {entry.label}\n{COMMANDS}", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            message = input(">>> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        text = message.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            stream = engine.stream(model, message, history, args.system, settings)
        except (EngineError, SettingsError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        for notice in stream.notices:
            print(f"({notice})", file=sys.stderr)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
            stream.result()  # drain what was already generated
            print("\n(stopped)", file=sys.stderr)
        except EngineError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history += [{"role": "user", "content": message},
                    {"role": "assistant", "content": stream.text}]


if __name__ == "__main__":
    raise SystemExit(main())
