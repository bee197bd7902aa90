"""`medchat`: one command line, one subcommand per workflow step.

Each subcommand is a typed function in the module of its stage; its parser (flags, help,
choices) is built from the function's signature and docstring (medchat.command_line). To add a
command, write the function and add one line to COMMANDS. `medchat CMD --help` shows only that
command's flags.

Every command module is imported here, so this table is the composition root: the only module
that reaches every stage. The modules keep their heavy libraries (torch, transformers, peft,
gradio, deepspeed) inside functions, so importing them all costs a fraction of a second.
"""

from __future__ import annotations

import sys
from typing import Callable

from hub.card import card_command
from hub.pull import pull_command
from hub.push import push_command
from hub.space import deploy_space_command
from medchat.base_model import prepare_base_command
from medchat.command_line import call, parse_doc
from medchat.registry import models_command
from medchat.server import app_command
from medchat.terminal import chat_command
from medchat.vllm import vllm_command_command, vllm_setup_command
from training.config import (copy_preset_command, fields_command, list_presets_command,
                             show_config_command)
from training.data import check_dataset_command, convert_dataset_command, split_dataset_command
from training.encode import log_dataset_command
from training.evaluate import evaluate_command
from training.export import export_command
from training.merge import merge_command
from training.run import train_command

# In workflow order: data, training, results, chat, publishing.
COMMANDS: dict[str, Callable[..., int | None]] = {
    "check-dataset": check_dataset_command,
    "convert-dataset": convert_dataset_command,
    "split-dataset": split_dataset_command,
    "log-dataset": log_dataset_command,
    "list-presets": list_presets_command,
    "copy-preset": copy_preset_command,
    "show-config": show_config_command,
    "fields": fields_command,
    "prepare-base": prepare_base_command,
    "train": train_command,
    "merge": merge_command,
    "evaluate": evaluate_command,
    "models": models_command,
    "chat": chat_command,
    "app": app_command,
    "vllm-setup": vllm_setup_command,
    "vllm-command": vllm_command_command,
    "export": export_command,
    "card": card_command,
    "push": push_command,
    "pull": pull_command,
    "deploy-space": deploy_space_command,
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: medchat COMMAND [options]   (medchat COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {parse_doc(fn).summary}" for name, fn in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"medchat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return call(COMMANDS[name], rest, prog=f"medchat {name}")


if __name__ == "__main__":
    raise SystemExit(main())
