"""What the training tests train on: eight questions a tiny model can learn, a tiny model wide
enough to learn them, and the environment of a `python -m training.run` child."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.support.tiny_model import build_tiny_model

QA = [
    ("What is aspirin used for?", "Aspirin relieves pain and fever."),
    ("How should I take metformin?", "Take metformin with meals."),
    ("Can I drink alcohol with ibuprofen?", "Alcohol raises the risk of stomach bleeding."),
    ("What are side effects of lisinopril?", "Cough and dizziness are common."),
    ("Is acetaminophen safe in pregnancy?", "Ask your doctor or pharmacist first."),
    ("How do I store insulin?", "Keep unopened insulin in the fridge."),
    ("What does a tablet dose mean?", "It is the amount in one tablet."),
    ("When should I take a daily dose?", "Take it at the same time each day."),
]


def write_qa(path: Path) -> Path:
    """QA as alpaca-form JSONL at `path`."""
    path.write_text("\n".join(json.dumps({"instruction": q, "output": a}) for q, a in QA) + "\n")
    return path


def learnable_model(folder: Path) -> Path:
    """Tiny model with a wider init: with std 0.02 a 64-wide tied head caps logits so low that
    no LoRA update can fit even 8 answers; std 0.2 makes memorisation a fair test."""
    return build_tiny_model(folder, init_std=0.2)


def training_env(runs: Path, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a training child writing under `runs`: offline, one
    thread, no distributed settings inherited (and `drop` removed too)."""
    env = dict(os.environ)
    env.update({"MEDCHAT_RUNS": str(runs), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *drop):
        env.pop(k, None)
    return env
