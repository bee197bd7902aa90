"""Evaluation: scores are right on known inputs, eval.json/eval.md are written, and the scores
follow the model (a different adapter gives different numbers; adapter == merged)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from test_merge import make_adapter, make_run  # noqa: E402
from training.evaluate import (EvalOptions, evaluate_run, generate_answers, main as eval_main,  # noqa: E402
                               score_answers, token_f1)
from training.manifest import load_manifest  # noqa: E402
from training.merge import merge  # noqa: E402

pytestmark = pytest.mark.timeout(300)
QUICK = dict(max_new_tokens=6, batch_size=3, progress=False)


def test_token_f1_follows_squad():
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)  # articles, punctuation dropped
    assert token_f1("Take it with food", "take it with food") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("", "something") == 0.0
    assert token_f1("aspirin", "ibuprofen") == 0.0


def test_scores_on_known_answers():
    refs = ["Aspirin is used to reduce fever and relieve mild pain.",
            "Take metformin with meals to reduce stomach upset."]
    same = score_answers(refs, refs)
    assert same["rougeL"] == pytest.approx(100) and same["token_f1"] == pytest.approx(100)
    assert same["bleu"] == pytest.approx(100)
    other = score_answers(["Ask your pharmacist.", "No."], refs)
    assert other["rougeL"] < 20 and other["token_f1"] < 20 and other["bleu"] < 5
    assert len(other["per_answer"]) == 2


@pytest.fixture
def run(tiny_model_dir, tmp_path):
    return make_run(tiny_model_dir, tmp_path / "runs" / "r1")


def test_evaluate_writes_results_and_scores_follow_the_model(tiny_model_dir, run):
    merge(tiny_model_dir, run / "adapter", run / "merged", progress=False)
    r1 = evaluate_run(run, EvalOptions(limit=3, **QUICK))
    assert set(r1["models"]) == {"base", "adapter", "merged"} and r1["questions"] == 3
    data = json.loads((run / "eval.json").read_text())
    assert data["models"] == r1["models"] and len(data["items"]) == 3
    item = data["items"][0]
    assert item["question"] == "What is aspirin used for?"
    assert set(item["answers"]) == {"base", "adapter", "merged"} and set(item["scores"]["adapter"]) == {"rougeL", "token_f1"}
    base, adapter, merged = (r1["models"][k] for k in ("base", "adapter", "merged"))
    assert base["loss"] != pytest.approx(adapter["loss"], rel=1e-3)  # the adapter changes the model
    assert merged["loss"] == pytest.approx(adapter["loss"], rel=1e-4)  # merged == base + adapter
    assert [i["answers"]["merged"] for i in data["items"]] == [i["answers"]["adapter"] for i in data["items"]]
    md = (run / "eval.md").read_text()
    assert "| test loss |" in md and "change (adapter - base)" in md and "| ROUGE-L F1 |" in md
    m = load_manifest(run)
    assert m.metrics["eval"]["models"]["adapter"]["loss"] == adapter["loss"]

    # another adapter -> other numbers; the base's are unchanged (the evaluation is deterministic)
    shutil.rmtree(run / "merged")
    shutil.rmtree(run / "adapter")
    # (LoRA on the head too: the tiny random model's logits barely move otherwise)
    make_adapter(tiny_model_dir, run / "adapter", seed=7, noise=0.1,
                 target_modules=["q_proj", "v_proj", "lm_head"])
    r2 = evaluate_run(run, EvalOptions(limit=3, **QUICK))
    assert set(r2["models"]) == {"base", "adapter"}
    assert r2["models"]["base"] == r1["models"]["base"]
    # scores are rounded to 4 decimals and the base's repeat exactly, so this is far above noise
    assert abs(r2["models"]["adapter"]["loss"] - adapter["loss"]) > 0.01
    assert r2["models"]["adapter"]["perplexity"] != r1["models"]["adapter"]["perplexity"]
    assert r2["models"]["adapter"] != r1["models"]["adapter"]


def test_left_padded_batches_give_the_same_answers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # spread the logits so greedy never hinges on a float32 near-tie
        model.lm_head.weight.mul_(40)
    prompts = [tok(q)["input_ids"] for q in ["What is aspirin used for?", "dose", "Can I drink alcohol with ibuprofen? Ask."]]
    eos = [tok.eos_token_id]
    one = generate_answers(model, tok, prompts, 8, 1, eos, progress=False)
    batched = generate_answers(model, tok, prompts, 8, 3, eos, progress=False)
    assert one == batched and any(one)


def test_cli(run, capsys):
    assert eval_main([str(run), "--limit", "2", "--models", "base", "--max-new-tokens", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| test loss |" in out and "2 held-out questions" in out
    assert eval_main([str(run), "--models", "merged", "--quiet"]) == 2
    assert "medchat merge" in capsys.readouterr().err
    (run / "data" / "test.jsonl").unlink()
    assert eval_main([str(run), "--quiet"]) == 2
    assert "held-out split" in capsys.readouterr().err


def test_packed_test_loss_equals_per_sample_loss(tiny_model_dir, run):
    """Packing must not leak attention between samples: the packed loss equals the
    token-weighted mean of each conversation scored alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data import read_jsonl
    from training.evaluate import test_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    convs = read_jsonl(run / "data" / "test.jsonl")
    packed = test_loss(model, tok, convs, max_length=1024, progress=False)
    alone = [test_loss(model, tok, [c], max_length=1024, progress=False) for c in convs]
    assert packed["tokens"] == sum(a["tokens"] for a in alone) and packed["samples"] == len(convs)
    mean = sum(a["loss"] * a["tokens"] for a in alone) / packed["tokens"]
    assert packed["loss"] == pytest.approx(mean, rel=1e-5)
