"""Evaluation: scores are right on known inputs, eval.json/eval.md are written, and the scores
follow the model (a different adapter gives different numbers; adapter == merged)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from medchat.command_line import call  # noqa: E402
from tests.support.merge_runs import make_adapter, make_run  # noqa: E402
from training.evaluate import (EvalOptions, evaluate_command, evaluate_run,  # noqa: E402
                               generate_answers, score_answers, token_f1)
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


def eval_main(argv: list[str]) -> int:
    return call(evaluate_command, argv, "medchat evaluate")


def test_evaluate_writes_results_and_scores_follow_the_model(tiny_model_dir, run):
    merge(tiny_model_dir, run.adapter_dir, run.merged_dir, progress=False)
    r1 = evaluate_run(run, EvalOptions(limit=3, **QUICK))
    assert set(r1["models"]) == {"base", "adapter", "merged"} and r1["questions"] == 3
    data = json.loads(run.eval_path.read_text())
    assert data["models"] == r1["models"] and len(data["items"]) == 3
    item = data["items"][0]
    assert item["question"] == "What is aspirin used for?"
    assert set(item["answers"]) == {"base", "adapter", "merged"} and set(item["scores"]["adapter"]) == {"rougeL", "token_f1"}
    base, adapter, merged = (r1["models"][k] for k in ("base", "adapter", "merged"))
    assert base["loss"] != pytest.approx(adapter["loss"], rel=1e-3)  # the adapter changes the model
    assert merged["loss"] == pytest.approx(adapter["loss"], rel=1e-4)  # merged == base + adapter
    assert [i["answers"]["merged"] for i in data["items"]] == [i["answers"]["adapter"] for i in data["items"]]
    md = run.eval_report_path.read_text()
    assert "| test loss |" in md and "change (adapter - base)" in md and "| ROUGE-L F1 |" in md
    m = run.manifest()
    assert m.metrics.models["adapter"].loss == adapter["loss"]
    assert m.metrics.evaluation == {"questions": 3, "max_new_tokens": 6, "generation": "greedy"}
    # the training config gives the test loss its row length, and eval.json says so
    assert data["test_loss_max_length"] == 1024
    assert data["test_loss_max_length_source"] == "training config (data.max_length)"
    # no local path in what may be published: the base by folder name, the run's own parts
    for text in data["sources"].values():
        assert str(tiny_model_dir) not in text and str(run.path) not in text
    assert data["sources"]["base"] == f"{tiny_model_dir.name} (unquantised)"
    assert data["test_file"] == "data/test.jsonl"

    # another adapter -> other numbers; the base's are unchanged (the evaluation is deterministic)
    shutil.rmtree(run.merged_dir)
    shutil.rmtree(run.adapter_dir)
    # (LoRA on the head too: the tiny random model's logits barely move otherwise)
    make_adapter(tiny_model_dir, run.adapter_dir, seed=7, noise=0.1,
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
    assert eval_main([str(run.path), "--limit", "2", "--models", "base", "--max-new-tokens", "4",
                      "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| test loss |" in out and "2 held-out questions" in out
    assert eval_main([str(run.path), "--models", "merged", "--quiet"]) == 2
    assert "medchat merge" in capsys.readouterr().err
    run.split_path("test").unlink()
    assert eval_main([str(run.path), "--quiet"]) == 2
    assert "held-out split" in capsys.readouterr().err


def test_manifest_without_max_length_says_so_and_records_it(tiny_model_dir, tmp_path, capsys):
    """A manifest without training's max_length (a pulled repo): 1024 with a note on stderr and
    the choice in eval.json; --max-length is taken as given and recorded as such."""
    run = make_run(tiny_model_dir, tmp_path / "runs" / "pulled", n_test=2, max_length=None)
    assert run.manifest().training.max_length is None
    quick = ["--models", "base", "--max-new-tokens", "2", "--quiet"]
    assert eval_main([str(run.path)] + quick) == 0
    err = capsys.readouterr().err
    assert "records no training max_length" in err and "1024" in err and "--max-length" in err
    data = json.loads(run.eval_path.read_text())
    assert data["test_loss_max_length"] == 1024
    assert data["test_loss_max_length_source"].startswith("default 1024")
    assert eval_main([str(run.path), "--max-length", "64"] + quick) == 0
    assert "max_length" not in capsys.readouterr().err
    data = json.loads(run.eval_path.read_text())
    assert data["test_loss_max_length"] == 64
    assert data["test_loss_max_length_source"] == "--max-length"


def test_packed_test_loss_equals_per_sample_loss(tiny_model_dir, run):
    """Packing must not leak attention between samples: the packed loss equals the
    token-weighted mean of each conversation scored alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluate import test_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run.adapter_dir)
    convs = run.test_split()
    packed = test_loss(model, tok, convs, max_length=1024, progress=False)
    alone = [test_loss(model, tok, [c], max_length=1024, progress=False) for c in convs]
    assert packed["tokens"] == sum(a["tokens"] for a in alone) and packed["samples"] == len(convs)
    mean = sum(a["loss"] * a["tokens"] for a in alone) / packed["tokens"]
    assert packed["loss"] == pytest.approx(mean, rel=1e-5)
