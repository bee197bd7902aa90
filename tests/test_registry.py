"""Registry: what the app offers, read from run folders; unknown names refused."""

import shutil

import pytest

from medchat.registry import (Registry, UnknownModelError, base_score, models_command,
                              score_text, summarize_metrics)
from medchat.run_folder import (BaseModelRef, ChatSpec, Manifest, Metrics, ModelScores, Run,
                                SourceRecord)
from tests.support.chat_runs import build_runs, make_adapter


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("reg"), tiny_model_dir)


def test_lists_base_adapters_and_merged_with_labels(runs, tiny_model_dir):
    reg = Registry(runs["runs"], base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    assert reg.ids() == ["base", "adapter:r0", "adapter:r1", "merged:r0"]
    labels = dict((v, k) for k, v in reg.choices())
    assert labels["adapter:r0"].startswith("adapter · r0 (base model)")
    assert "ROUGE-L 41.2" in labels["adapter:r0"] and "ppl 7.50" in labels["adapter:r0"]
    assert "ROUGE-L 41.2" in labels["merged:r0"]
    assert labels["merged:r0"].startswith("merged · r0")
    assert labels["base"] == "base · model"
    e = reg.get("adapter:r1")
    assert e.kind == "adapter" and e.path == runs["runs"] / "r1" / "adapter"
    assert e.stop_tokens == ("<|im_end|>",) and "im_start" in e.chat_template
    assert reg.same_base(e.base)
    assert reg.problems == []


@pytest.mark.parametrize("name", ["/etc/passwd", "../runs/r0/adapter", "HuggingFaceTB/SmolLM2-135M",
                                  "adapter:nope", "r0", "", None, 3])
def test_unregistered_names_are_refused(runs, tiny_model_dir, name):
    reg = Registry(runs["runs"], base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    with pytest.raises(UnknownModelError, match="not registered"):
        reg.get(name)


def test_refresh_picks_up_new_runs_and_reports_broken_ones(runs, tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs["runs"], root)
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    assert "adapter:new" not in reg.ids()
    make_adapter(tiny_model_dir, root / "new", seed=7)
    (root / "broken").mkdir()
    (root / "broken" / "medchat.json").write_text("{not json")
    (root / "pickle").mkdir()
    shutil.copytree(root / "r1", root / "pickle", dirs_exist_ok=True)
    (root / "pickle" / "adapter" / "adapter_model.safetensors").rename(
        root / "pickle" / "adapter" / "adapter_model.bin")
    reg.refresh()
    assert "adapter:new" in reg.ids()
    assert not {"adapter:broken", "adapter:pickle"} & set(reg.ids())
    problems = "\n".join(reg.problems)
    assert "broken" in problems and "invalid JSON" in problems and "line 1" in problems
    assert "pickle" in problems and "safetensors" in problems
    shutil.rmtree(root / "new")
    reg.refresh()
    assert "adapter:new" not in reg.ids()


def test_examples_come_from_the_test_split(runs, tiny_model_dir):
    reg = Registry(runs["runs"], base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    assert reg.examples(limit=2) == ["What is aspirin used for?", "How should I take metformin?"]
    assert reg.examples(model_id="adapter:r1")[0] == "What is aspirin used for?"  # r1 has none


def test_pulled_full_model_appears_as_merged(tiny_model_dir, tmp_path):
    """A repo pulled from the Hub may be a merged model only: merged/ without adapter/."""
    run = Run(tmp_path / "runs" / "owner--repo")
    shutil.copytree(tiny_model_dir, run.merged_dir)
    run.save_manifest(Manifest(name="owner/repo", base_model=BaseModelRef(name="owner/base"),
                               chat=ChatSpec(template="x"), kind="merged",
                               source=SourceRecord(hub_repo="owner/repo", revision="abc")))
    reg = Registry(tmp_path / "runs", base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    e = reg.get("merged:owner--repo")
    assert e.source == "owner/repo" and e.kind == "merged" and not reg.same_base(e.base)


def test_label_scores_come_from_the_typed_metrics():
    assert score_text(ModelScores(loss=1.23456)) == "loss 1.23"
    assert score_text(ModelScores(perplexity=3.0, bleu=12.34)) == "BLEU 12.3 · ppl 3.00"
    assert score_text(ModelScores(token_f1=55.55)) == "F1 55.5"
    evaluated = Metrics(models={"base": ModelScores(rougeL=10.0, perplexity=20.0),
                                "adapter": ModelScores(rougeL=23.456, perplexity=9.87, loss=2.3)})
    assert summarize_metrics(evaluated, "adapter") == "ROUGE-L 23.5 · ppl 9.87"
    assert summarize_metrics(evaluated, "merged") == "ROUGE-L 23.5 · ppl 9.87"  # adapter's
    own = Metrics(models={"adapter": ModelScores(rougeL=23.4), "merged": ModelScores(rougeL=30.0)})
    assert summarize_metrics(own, "merged") == "ROUGE-L 30.0"
    assert base_score(evaluated) == "ROUGE-L 10.0 · ppl 20.0"
    assert summarize_metrics(Metrics(), "adapter") is None and base_score(Metrics()) is None
    assert score_text(ModelScores()) is None and score_text(None) is None


def test_label_scores_of_a_previous_release_manifest():
    """Schema 1 kept the test loss/perplexity flat (test_ppl_base, test_ppl_finetuned...): the
    adapter shows its own perplexity, the base its own, never the fine-tuned one's."""
    def v1(metrics):
        return Manifest.from_dict({"name": "old", "base_model": "owner/base",
                                   "chat_template": "x", "metrics": metrics}).metrics

    training = v1({"test_loss_base": 2.9, "test_loss_finetuned": 2.1, "test_ppl_base": 18.2,
                   "test_ppl_finetuned": 8.17})
    assert summarize_metrics(training, "adapter") == "ppl 8.17"
    assert summarize_metrics(v1({"test_ppl_base": 18.2}), "adapter") is None
    assert base_score(training) == "ppl 18.2"
    assert base_score(v1({"test_ppl_finetuned": 3})) is None
    assert summarize_metrics(v1({"note": "x", "ok": True}), "adapter") is None


def test_base_label_shows_the_base_score_of_a_run_on_the_same_base(runs, tiny_model_dir,
                                                                     tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs["runs"], root)
    Run(root / "r1").record_scores({"base": ModelScores(rougeL=12.5, perplexity=30.0),
                                    "adapter": ModelScores(rougeL=20.0)})
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    labels = dict((v, k) for k, v in reg.choices())
    assert labels["base"] == "base · model · ROUGE-L 12.5 · ppl 30.0"
    assert labels["adapter:r1"].endswith("· ROUGE-L 20.0")


def test_models_command_lists_what_the_app_offers(runs, tiny_model_dir, capsys):
    assert models_command(runs=str(runs["runs"]), base=str(tiny_model_dir)) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["base", "adapter:r0", "adapter:r1", "merged:r0"]
    assert "ROUGE-L 41.2" in out[1]
