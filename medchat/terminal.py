"""Terminal chat, like `xtuner chat`: the same engine, models and prompts as the app.

    medchat chat --list                                  # what can be chatted with
    medchat chat --model adapter:smollm2-medqa           # interactive; /reset, /exit
    medchat chat --model base --system "Be brief." --temperature 0 --max-new-tokens 128
    echo "What is metformin for?" | medchat chat --model adapter:smollm2-medqa
    medchat chat --backend openai --backend-url http://127.0.0.1:8000   # answers from vLLM

Answers stream to stdout; Ctrl-C stops the current answer, Ctrl-D (or /exit) quits.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Literal

from medchat.backend import Backend, BackendError, GenerationSettings, SettingsError
from medchat.base_model import DEFAULT_BASE_MODEL, resolve_base_model
from medchat.command_line import Opt, call
from medchat.engine import Engine
from medchat.errors import UserError
from medchat.registry import BASE_ID, Registry
from medchat.remote_backend import RemoteBackend

COMMANDS = "/reset clears the conversation, /exit quits, Ctrl-C stops an answer"


def chat_command(*, model: str | None = None,
                 list_models: Annotated[bool, Opt("--list")] = False, runs: str | None = None,
                 base: str = DEFAULT_BASE_MODEL, system: str | None = None, device: str = "auto",
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None,
                 backend: Literal["in-process", "openai"] = "in-process",
                 backend_url: str | None = None,
                 dialect: Literal["vllm", "llama-server", "medchat"] = "vllm",
                 backend_key_env: str | None = None) -> int:
    """Chat in the terminal with the base model or a fine-tuned one, answers streaming.

    Reads one message per line (from the keyboard, or piped in); /reset clears the
    conversation, /exit or Ctrl-D quits, Ctrl-C stops the current answer. Settings not given
    come from the run's manifest.

    Args:
        model: registered model id, as --list shows (default: the first fine-tuned one)
        list_models: list the models and exit
        runs: runs folder (default: $MEDCHAT_RUNS or ./runs)
        base: base model: Hub id or folder
        system: system prompt (default: the model's own)
        device: cpu, cuda, cuda:1 ... (auto: cuda when available)
        max_new_tokens: longest answer in tokens (default: the run's manifest, else 256)
        temperature: 0 = greedy (default: the run's manifest, else 0.7)
        top_p: nucleus sampling mass (default: the run's manifest, else 0.9)
        repetition_penalty: >1 discourages repeats (default: the run's manifest, else 1.1)
        seed: sampling seed (default: a fresh one per answer)
        backend: who generates: in-process, or openai (an OpenAI-compatible server)
        backend_url: the server's URL for the openai backend, e.g. http://127.0.0.1:8000
        dialect: the server behind the openai backend: vllm, llama-server or medchat
        backend_key_env: environment variable holding the server's API key
    """
    resolved = resolve_base_model(base, progress=True)
    registry = Registry(runs, base_name=base, base_path=resolved.path,
                        base_hub_id=resolved.hub_id)
    for p in registry.problems:
        print(f"warning: {p}", file=sys.stderr)
    if list_models:
        for e in registry.entries():
            print(f"{e.id:40s} {e.label}")
        return 0
    model = model or next((i for i in registry.ids() if i != BASE_ID), BASE_ID)
    entry = registry.get(model)  # an unknown id is refused here, before loading anything
    settings = GenerationSettings.from_defaults(
        entry.generation, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed)
    engine: Backend = Engine(registry, device=device)
    if backend == "openai":
        if not backend_url:
            raise UserError("the openai backend needs --backend-url, e.g. http://127.0.0.1:8000")
        key = os.environ.get(backend_key_env, "").strip() or None if backend_key_env else None
        engine = RemoteBackend(registry, backend_url, dialect=dialect, api_key=key, local=engine)
        for problem in engine.connect():
            print(f"warning: {problem}", file=sys.stderr)
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
        answer = _answer(engine, model, message, history, system, settings)
        if answer is not None:
            history += [{"role": "user", "content": message},
                        {"role": "assistant", "content": answer}]


def _answer(engine: Backend, model: str, message: str, history: list[dict[str, str]],
            system: str | None, settings: GenerationSettings) -> str | None:
    """Stream one answer to stdout; its text, or None when it failed (reported on stderr)."""
    try:
        stream = engine.stream_turn(model, message, history, system, settings)
    except (BackendError, SettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
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
    except BackendError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.text


def main(argv: list[str] | None = None) -> int:
    return call(chat_command, argv, "medchat chat")


if __name__ == "__main__":
    raise SystemExit(main())
