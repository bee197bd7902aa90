"""`medchat` console script: one entry, one subcommand per workflow.

    medchat train [--preset NAME] [--set k=v ...]   fine-tune (python -m training.run)
    medchat list-presets | copy-preset NAME FILE      presets
    medchat check-dataset FILE | log-dataset FILE     validate / show rendered samples
    medchat merge RUN                                 adapter -> merged/ (sharded safetensors)
    medchat evaluate RUN                              base vs fine-tuned on the held-out split
    medchat chat --model NAME                         terminal chat
    medchat app                                       the Gradio app (python launch.py)
    medchat push RUN REPO | pull REPO                 Hugging Face Hub
    medchat deploy-space REPO                         bundle and push the app as a Space
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, argv prefix); modules are imported only when used so that
# e.g. `medchat chat` does not pay for importing deepspeed.
COMMANDS: dict[str, tuple[str, str, list[str]]] = {
    "train": ("training.run", "main", []),
    "list-presets": ("training.run", "main", ["list-presets"]),
    "copy-preset": ("training.run", "main", ["copy-preset"]),
    "check-dataset": ("training.run", "main", ["check-dataset"]),
    "log-dataset": ("training.run", "main", ["log-dataset"]),
    "prepare-base": ("training.base_model", "main", []),
    "merge": ("training.merge", "main", []),
    "evaluate": ("training.evaluate", "main", []),
    "chat": ("medchat.terminal", "main", []),
    "app": ("launch", "main", []),
    "push": ("hub.push", "main", []),
    "pull": ("hub.pull", "main", []),
    "deploy-space": ("hub.space", "main", []),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"medchat: unknown command {cmd!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, prefix = COMMANDS[cmd]
    entry = getattr(importlib.import_module(module), func)
    return int(entry(prefix + rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
