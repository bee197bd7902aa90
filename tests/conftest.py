import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) with a ChatML tokenizer, tied embeddings."""
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def spreadsheet() -> Path:
    p = SHARED_DATA / "MedInfo2019-QA-Medications.xlsx"
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="session")
def xtuner_dir() -> Path:
    p = SHARED_DATA / "xtuner-tutorial"
    if not p.is_dir():  # like the spreadsheet: the project's data sits beside the checkout
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hub-compatible server on loopback (tests/support/fake_hub.py), huggingface_hub
    pointed at it."""
    import hub.client as hub_client
    from tests.support.fake_hub import FakeHub, use_fake_hub

    with FakeHub(tmp_path / "hub-storage") as hub:
        use_fake_hub(monkeypatch, hub, home=tmp_path / "hf-home")
        monkeypatch.setattr(hub_client, "RETRY_BASE_WAIT", 0.01)  # retries without real waits
        yield hub
        assert not hub.errors, hub.errors[0]
