"""LoRA routing against peft itself: a routed model gives, per thread, exactly the logits of a
PeftModel with that adapter active (or of the base when routed to none)."""

import threading

import pytest

from medchat import lora_routing
from medchat.run_folder import Run
from tests.support.chat_runs import make_adapter

# torch, transformers and peft are imported in the functions: collecting the suite stays quick.
pytestmark = pytest.mark.timeout(180)
TEXT = "How should I take metformin with food?"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters on every linear layer, one on the embeddings + q_proj."""
    root = tmp_path_factory.mktemp("routing")
    make_adapter(tiny_model_dir, root / "r0", seed=100)
    make_adapter(tiny_model_dir, root / "r1", seed=101)
    make_adapter(tiny_model_dir, root / "emb", seed=31, target_modules=["embed_tokens", "q_proj"])
    return {name: Run(root / name).adapter_dir for name in ("r0", "r1", "emb")}


def _ids(model_dir):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor([tok(TEXT)["input_ids"]])


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapters):
    """Logits of the base and of a fresh PeftModel per adapter (peft's own forward)."""
    from peft import PeftModel

    ids = _ids(tiny_model_dir)
    out = {None: _logits(_base(tiny_model_dir), ids)}
    for name, path in adapters.items():
        out[name] = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), path).eval(), ids)
    return ids, out


@pytest.fixture(scope="module")
def routed(tiny_model_dir, adapters):
    """One base with every adapter attached, routed by thread."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(_base(tiny_model_dir), adapters[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    assert lora_routing.install(model) > 0
    return model


def test_routed_logits_equal_peft_with_that_adapter_and_the_base_when_none(routed, reference):
    import torch

    ids, want = reference
    assert not torch.equal(want["r0"], want["r1"]) and not torch.equal(want["r0"], want[None])
    for name in ["r0", None, "r1", "emb", "r0"]:
        with lora_routing.use_adapter(name):
            assert lora_routing.active_adapter() == name
            assert torch.equal(_logits(routed, ids), want[name]), name
    assert lora_routing.active_adapter() is None  # restored after the block


def test_routing_ignores_peft_active_adapter_and_install_is_idempotent(routed, reference):
    import torch

    ids, want = reference
    routed.set_adapter("r0")  # shared state: must not decide what a routed thread gets
    try:
        assert lora_routing.install(routed) == 0  # every LoRA layer already routed
        with lora_routing.use_adapter("r1"):
            assert torch.equal(_logits(routed, ids), want["r1"])
        with lora_routing.use_adapter(None):
            assert torch.equal(_logits(routed, ids), want[None])
        with lora_routing.use_adapter("r0"), lora_routing.use_adapter("emb"):  # nested: inner
            assert torch.equal(_logits(routed, ids), want["emb"])
    finally:
        routed.set_adapter("r0")


def test_threads_routed_to_different_adapters_at_once_get_their_own_results(routed, reference):
    import torch

    ids, want = reference
    names = ["r0", "r1", None, "emb"]
    start = threading.Barrier(len(names))
    mismatches: list = []
    errors: list = []

    def work(name):
        try:
            with lora_routing.use_adapter(name):
                start.wait()
                for _ in range(8):
                    if not torch.equal(_logits(routed, ids), want[name]):
                        mismatches.append(name)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []


def test_unsupported_adapters_are_named():
    assert lora_routing.unsupported_reason({"peft_type": "LORA", "r": 8}) is None
    assert "DoRA" in lora_routing.unsupported_reason({"peft_type": "LORA", "use_dora": True})
    assert "peft_type IA3" in lora_routing.unsupported_reason({"peft_type": "IA3"})
    assert "peft_type ?" in lora_routing.unsupported_reason({})


def test_rows_of_one_batch_each_get_their_own_adapter(routed, reference):
    """Per-row routing (what batched decoding uses): every row equals its adapter alone."""
    import torch

    ids, want = reference
    names = ["r0", None, "r1", "emb", "r0"]
    with lora_routing.use_adapters(names):
        assert lora_routing.row_adapters() == names
        got = _logits(routed, ids.repeat(len(names), 1))
    for i, name in enumerate(names):
        assert torch.equal(got[i:i + 1], want[name]), (i, name)
    assert lora_routing.row_adapters() is None
    with lora_routing.use_adapters(["r1", "r1"]):  # one adapter for all: the single path
        assert lora_routing.active_adapter() == "r1" and lora_routing.row_adapters() is None
    with lora_routing.use_adapters(["r0", "r1"]), pytest.raises(lora_routing.RoutingError,
                                                                 match="2 adapter names"):
        _logits(routed, ids.repeat(3, 1))


def test_peft_disable_and_merge_states_are_honoured_or_refused(tiny_model_dir, adapters,
                                                              reference):
    import torch
    from peft import PeftModel

    ids, want = reference
    model = PeftModel.from_pretrained(_base(tiny_model_dir), adapters["r0"], adapter_name="r0")
    model.eval()
    lora_routing.install(model)
    with model.disable_adapter(), lora_routing.use_adapter("r0"):  # peft's switch: the base
        assert torch.equal(_logits(model, ids), want[None])
    model.merge_adapter()
    with lora_routing.use_adapter(None), pytest.raises(lora_routing.RoutingError,
                                                       match="merged into the base weights"):
        _logits(model, ids)
    model.unmerge_adapter()
    with lora_routing.use_adapter("r0"):
        torch.testing.assert_close(_logits(model, ids), want["r0"])


def test_the_unsupported_list_covers_every_lora_variant_peft_declares():
    """A peft upgrade that adds a LoRA variant must be added to medchat.adapter_support."""
    import dataclasses

    from peft import LoraConfig

    from medchat import adapter_support

    for f in dataclasses.fields(LoraConfig):
        if f.metadata.get("is_lora_variant"):
            assert f.name in adapter_support.UNSUPPORTED_OPTIONS, f.name
        for init in f.metadata.get("lora_variants", []):
            assert init in adapter_support.VARIANT_INITS, init
            assert adapter_support.unsupported_reason({"peft_type": "LORA", f.name: init})
    for option in adapter_support.UNSUPPORTED_OPTIONS:
        assert option in adapter_support.unsupported_reason({"peft_type": "LORA", option: True})
