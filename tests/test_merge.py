"""Merge: merged model == base + adapter (peft, unmerged), shards/index valid, bad input refused
with nothing left behind. Everything runs on the tiny random Llama of tests/support/tiny_model.py.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from medchat.command_line import call  # noqa: E402
from medchat.run_folder import Run  # noqa: E402
from tests.support.merge_runs import make_adapter, make_run  # noqa: E402
from training.merge import INDEX_NAME, MergeError, merge, merge_command, merge_run  # noqa: E402

pytestmark = pytest.mark.timeout(300)

PROMPTS = [[3, 5, 7, 3, 100, 200, 11], [40, 41, 42, 43, 300, 5]]  # include trainable-token ids


def peft_logits(base_dir: Path, adapter_dir: Path | None) -> list:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]


def model_logits(folder: Path) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0] for p in PROMPTS]


def max_diff(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def assert_merge_equals_peft(base_dir: Path, adapter_dir: Path, out: Path, **kw):
    result = merge(base_dir, adapter_dir, out, progress=False, **kw)
    ref, merged, base = peft_logits(base_dir, adapter_dir), model_logits(out), peft_logits(base_dir, None)
    scale = max(x.abs().max().item() for x in ref)
    assert max_diff(ref, base) > 1e-3 * scale, "the adapter must change the model for the test to mean anything"
    assert max_diff(ref, merged) <= 2e-5 * max(scale, 1.0)
    return result


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and "partial" in p.name]


# ---------------------------------------------------------------------------------------------
# Equality with base + adapter


def test_all_linear_adapter_on_tied_model(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    r = assert_merge_equals_peft(tiny_model_dir, adapter, tmp_path / "merged")
    assert r.untied == []  # nothing touched the embeddings: keep them tied
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    index = json.loads((tmp_path / "merged" / INDEX_NAME).read_text())
    assert "lm_head.weight" not in index["weight_map"]
    # loadable with nothing else: tokenizer and chat template came along
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("variant", ["embedding_lora", "lm_head_lora", "lm_head_saved", "embed_saved"])
def test_tied_embeddings_changed_by_the_adapter_are_untied(tiny_model_dir, tmp_path, variant):
    lora = {
        "embedding_lora": dict(target_modules=["q_proj", "embed_tokens"]),
        "lm_head_lora": dict(target_modules=["v_proj", "lm_head"]),
        "lm_head_saved": dict(target_modules=["v_proj"], modules_to_save=["lm_head", "norm"]),
        "embed_saved": dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"]),
    }[variant]
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", **lora)
    r = assert_merge_equals_peft(tiny_model_dir, adapter, tmp_path / "merged")
    assert r.untied == ["lm_head.weight"]
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    index = json.loads((tmp_path / "merged" / INDEX_NAME).read_text())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(index["weight_map"])


def test_tied_trainable_tokens_keep_the_tie(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", target_modules=["q_proj"],
                           trainable_token_indices=[3, 5])
    r = assert_merge_equals_peft(tiny_model_dir, adapter, tmp_path / "merged")
    assert r.untied == [] and r.adapter["trainable_token_tensors"] == 1


def test_untied_model_with_rslora_and_patterns(tmp_path):
    from tests.support.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path / "base", seed=1, tie_word_embeddings=False)
    a1 = make_adapter(base, tmp_path / "rslora", r=8, lora_alpha=4, use_rslora=True)
    assert_merge_equals_peft(base, a1, tmp_path / "m1")
    a2 = make_adapter(base, tmp_path / "patterns", r=4, lora_alpha=8,
                      rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 32})
    assert_merge_equals_peft(base, a2, tmp_path / "m2")


def test_lora_bias_and_trained_biases(tmp_path):
    """Layers with biases: lora_bias (B's bias * scaling) and bias='all' (full replacement)."""
    from tests.support.tiny_model import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                      tie_word_embeddings=False)
    torch.manual_seed(2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    a1 = make_adapter(tmp_path / "base", tmp_path / "lb", target_modules=["q_proj", "v_proj"], lora_bias=True)
    r = assert_merge_equals_peft(tmp_path / "base", a1, tmp_path / "m1")
    assert r.adapter["lora_biases"] == 2
    a2 = make_adapter(tmp_path / "base", tmp_path / "ball", target_modules=["q_proj"], bias="all")
    r = assert_merge_equals_peft(tmp_path / "base", a2, tmp_path / "m2")
    assert r.adapter["full_tensors"] >= 3  # q, k, v biases


def test_bfloat16_output_is_equal_within_rounding(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    merge(tiny_model_dir, adapter, tmp_path / "merged", dtype="bfloat16", progress=False)
    from safetensors import safe_open

    shard = next((tmp_path / "merged").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    ref, merged = peft_logits(tiny_model_dir, adapter), model_logits(tmp_path / "merged")
    scale = max(x.abs().max().item() for x in ref)
    assert max_diff(ref, merged) < 0.05 * scale  # bf16 keeps ~3 significant digits


# ---------------------------------------------------------------------------------------------
# Shards and index


def test_shards_honour_max_shard_size_and_index_is_valid(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    limit = 40_000  # the tiny model is ~200 KB: several shards; the 128 KB embedding alone
    r = merge(tiny_model_dir, adapter, tmp_path / "merged", max_shard_size=limit, progress=False)
    out = tmp_path / "merged"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert r.shards == len(shards) > 2
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    total = 0
    for p in shards:
        with safe_open(str(p), "pt") as f:
            keys = list(f.keys())
            sizes = [f.get_tensor(k).nbytes for k in keys]
        assert all(index["weight_map"][k] == p.name for k in keys)
        assert sum(sizes) <= limit or len(keys) == 1  # one oversized tensor gets its own shard
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert not list(out.glob("model.safetensors"))
    # every base tensor is there exactly once
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(index["weight_map"])


# ---------------------------------------------------------------------------------------------
# Bad input: clear error, nothing left behind


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ad") / "adapter")


def test_mismatched_base_shapes(adapter_dir, tmp_path):
    from tests.support.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "wide", hidden=32)
    with pytest.raises(MergeError, match=r"does not match the base.*shape"):
        merge(other, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_mismatched_base_names(adapter_dir, tmp_path):
    from tests.support.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "short", layers=1)
    with pytest.raises(MergeError, match=r"model\.layers\.1\..*which the base does not have"):
        merge(other, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors",
                                     "base/config.json", "base/model.safetensors"])
def test_missing_files(tiny_model_dir, adapter_dir, tmp_path, missing):
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    adapter = Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))
    target = base / missing.split("/", 1)[1] if missing.startswith("base/") else adapter / missing
    target.unlink()
    with pytest.raises(MergeError, match=Path(missing).name.replace(".", r"\.") + "|safetensors"):
        merge(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_existing_target_needs_overwrite(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        merge(tiny_model_dir, adapter_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    merge(tiny_model_dir, adapter_dir, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / INDEX_NAME).is_file()
    assert not no_leftovers(tmp_path)


def test_too_little_disk(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    import training.merge as m

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(m.shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12 - 1000, 1000))
    with pytest.raises(MergeError, match=r"GB free but the merged model needs"):
        merge(tiny_model_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_failure_while_writing_leaves_nothing(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    import safetensors.torch

    calls = []
    real = safetensors.torch.save_file

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk went away"):
        merge(tiny_model_dir, adapter_dir, tmp_path / "out", max_shard_size=40_000, progress=False)
    assert len(calls) == 2 and Path(calls[0]).name.startswith("model-")  # one shard was written
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_unsupported_variants_and_quantised_base(tiny_model_dir, tmp_path):
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(MergeError, match="use_dora"):
        merge(tiny_model_dir, dora, tmp_path / "out", progress=False)
    plain = make_adapter(tiny_model_dir, tmp_path / "plain", target_modules=["q_proj"])
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base4bit"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="quantised.*unquantised"):
        merge(base, plain, tmp_path / "out", progress=False)
    cfg_file = plain / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(MergeError, match="peft_type is IA3; only LoRA"):
        merge(tiny_model_dir, plain, tmp_path / "out", progress=False)
    cfg_file.write_text("{not json")
    with pytest.raises(MergeError, match=r"adapter_config\.json: line 1: invalid JSON"):
        merge(tiny_model_dir, plain, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# A run folder: fidelity recorded in the manifest


def merge_main(argv: list[str]) -> int:
    return call(merge_command, argv, "medchat merge")


def test_cli_merges_a_run_and_records_fidelity(tiny_model_dir, tmp_path, capsys):
    run = make_run(tiny_model_dir, tmp_path / "runs" / "r1")
    assert merge_main([str(run.path), "--quiet", "--max-shard-size", "100KB"]) == 0
    out = capsys.readouterr().out
    assert "fidelity on 3 prompt(s)" in out and "agree on 3/3" in out and "nf4" in out
    m = run.manifest()
    f = m.merge["fidelity"]
    assert f["prompts"] == 3 and f["greedy_agree"] is True and f["max_abs_logit_diff"] < 1e-3
    assert m.merge["shards"] >= 2 and "note" in m.merge
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run.merged_dir).chat_template == m.chat.template
    # a second merge without --overwrite is refused with exit code 2, the first output intact
    assert merge_main([str(run.path), "--quiet", "--check-prompts", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run.merged_dir / INDEX_NAME).is_file() and not no_leftovers(run.path)


def test_merge_run_records_fidelity_in_the_typed_manifest(tiny_model_dir, tmp_path, monkeypatch):
    """merge_run by run name: base from the manifest, the run's split for the prompts, the
    manifest's stop tokens in the merged generation config, the record in `merge`."""
    made = make_run(tiny_model_dir, tmp_path / "runs" / "r2", n_test=2)
    chat = made.manifest().chat
    chat.stop_tokens = ["<|im_end|>", "<|im_start|>"]  # a second stop token, not the eos
    made.update_manifest(chat=chat)
    monkeypatch.setenv("MEDCHAT_RUNS", str(tmp_path / "runs"))
    result = merge_run("r2", check_prompts=5, check_tokens=4, progress=False)
    run = Run.open("r2")
    assert Path(result.output) == run.merged_dir and run.has_merged()
    assert result.base == str(tiny_model_dir) and "nf4" in result.note
    m = run.manifest()
    assert m.schema_version == 2
    # two test questions exist, so two prompts (the fixed fallbacks only stand in for none)
    assert m.merge["fidelity"] == result.fidelity and result.fidelity["prompts"] == 2
    assert result.fidelity["greedy_tokens"] == 4 and result.fidelity["greedy_agree"] is True
    assert m.merge["base"] == str(tiny_model_dir) and m.merge["note"] == result.note
    assert m.merge["output"] == str(run.merged_dir) and m.merge["created"]
    gen = json.loads((run.merged_dir / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    # the rest of the manifest is untouched
    assert m.chat.stop_tokens == ["<|im_end|>", "<|im_start|>"]
    assert m.training.quantization == "nf4" and m.training.max_length == 1024
    # a second merge (no check) replaces the record: no stale fidelity from the first
    merge_run(run, overwrite=True, check_prompts=0, progress=False)
    assert run.manifest().merge["fidelity"] == {}


def test_cli_usage_errors(capsys, tmp_path):
    assert merge_main(["--base", "x"]) == 2
    assert "nothing to merge" in capsys.readouterr().err
    assert merge_main([str(tmp_path / "nope")]) == 2
    assert "no such folder, and no run of that name" in capsys.readouterr().err


def test_merge_honours_the_runs_trust_remote_code(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_model import remote_code_model

    base = remote_code_model(tiny_model_dir, tmp_path / "remote-base")
    with pytest.raises(ValueError, match="trust_remote_code"):  # the model is what it claims
        AutoModelForCausalLM.from_pretrained(base)
    run = make_run(tiny_model_dir, tmp_path / "runs" / "remote")  # same tensor names
    m = run.manifest()
    m.base_model.name = m.base_model.local_path = str(base)
    m.base_model.trust_remote_code = True  # what training records for such a base
    run.save_manifest(m)
    result = merge_run(run, progress=False, check_prompts=2)
    assert result.fidelity["greedy_agree"] and result.fidelity["max_abs_logit_diff"] < 1e-4
    assert (run.merged_dir / "modeling_tiny.py").is_file()
    assert type(AutoModelForCausalLM.from_pretrained(run.merged_dir, trust_remote_code=True)) \
        .__name__ == "TinyForCausalLM"

    # a pulled run that asks for remote code: only with the operator's say-so
    m.source.hub_repo, m.source.commit = "someone/remote-adapter", "0" * 40
    run.save_manifest(m)
    with pytest.raises(MergeError, match=r"pulled from 'someone/remote-adapter' .* pass "
                                         r"--trust-remote-code"):
        merge_run(run, progress=False, overwrite=True, check_prompts=0)
    assert merge_main([str(run.path), "--overwrite", "--check-prompts", "0",
                       "--trust-remote-code", "--quiet"]) == 0
