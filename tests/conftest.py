import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) with a ChatML tokenizer, tied embeddings."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def spreadsheet() -> Path:
    p = SHARED_DATA / "MedInfo2019-QA-Medications.xlsx"
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="session")
def xtuner_dir() -> Path:
    return SHARED_DATA / "xtuner-tutorial"
