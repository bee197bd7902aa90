"""Paired bootstrap intervals: right on constructed cases (a known difference with a known
spread, no difference, corpus BLEU and token-weighted loss), deterministic for a seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.eval_stats import (MIN_N_SIGNIFICANT, Interval, bleu_statistics, corpus_bleu,
                                 exp_ratio_of, mean_of, paired_bootstrap, ratio_of,
                                 resample_indices)
from training.report import format_interval, verdict


def constructed(n: int = 400, shift: float = 0.5, sd: float = 1.0, seed: int = 1):
    rng = np.random.default_rng(seed)
    base = rng.normal(10, 3, n)  # per-question spread that pairing must cancel
    return base, base + shift + rng.normal(0, sd, n)


def test_known_difference_matches_direct_computation_and_theory():
    base, tuned = constructed()
    iv = paired_bootstrap(mean_of, base, tuned, n_resamples=4000, seed=3)
    d = tuned - base
    assert iv.delta == pytest.approx(d.mean()) and iv.n == 400
    assert iv.base == pytest.approx(base.mean()) and iv.tuned == pytest.approx(tuned.mean())
    # the same resamples written out one by one
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 400, size=(4000, 400))
    direct = [tuned[r].mean() - base[r].mean() for r in rows]
    low, high = np.percentile(direct, [2.5, 97.5])
    assert (iv.low, iv.high) == (pytest.approx(low), pytest.approx(high))
    # and what theory says: mean +- 1.96 standard errors of the paired differences (the
    # per-question spread of 3 cancels; an unpaired interval would be about 4x wider)
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert iv.low == pytest.approx(d.mean() - 1.96 * se, abs=0.25 * se)
    assert iv.high == pytest.approx(d.mean() + 1.96 * se, abs=0.25 * se)
    assert iv.significant and verdict(iv.to_dict()) == "significantly better"
    assert verdict(iv.to_dict(), higher_is_better=False) == "significantly worse"


def test_no_difference_includes_zero():
    base, tuned = constructed(shift=0.0)
    iv = paired_bootstrap(mean_of, base, tuned, n_resamples=4000)
    assert iv.low < 0 < iv.high and not iv.significant
    assert verdict(iv.to_dict()) == "no significant change"
    same = paired_bootstrap(mean_of, base, base, n_resamples=500)
    assert (same.delta, same.low, same.high) == (0, 0, 0) and not same.significant


def test_deterministic_for_a_seed():
    base, tuned = constructed(n=50, shift=0.2, sd=2.0)
    a = paired_bootstrap(mean_of, base, tuned, n_resamples=2000, seed=7)
    b = paired_bootstrap(mean_of, base, tuned, n_resamples=2000, seed=7)
    c = paired_bootstrap(mean_of, base, tuned, n_resamples=2000, seed=8)
    assert a == b and (a.low, a.high) != (c.low, c.high)
    assert (resample_indices(5, 10, 1) == resample_indices(5, 10, 1)).all()


def test_too_few_questions_claims_nothing():
    iv = paired_bootstrap(mean_of, [0.0] * 5, [10.0, 11, 12, 13, 14], n_resamples=200)
    assert iv.low > 0 and iv.n == 5 < MIN_N_SIGNIFICANT and not iv.significant
    assert verdict(iv.to_dict()).startswith("too few")
    empty = paired_bootstrap(mean_of, [], [])
    assert empty == Interval(None, None, None, None, None, 0)
    assert format_interval(empty.to_dict()) == ""


def test_token_weighted_loss_and_perplexity():
    # per question: (loss summed over its answer tokens, answer tokens)
    base = np.array([[20.0, 10], [90.0, 30], [5.0, 5]] * 10)
    tuned = np.array([[18.0, 10], [60.0, 30], [5.0, 5]] * 10)
    iv = paired_bootstrap(ratio_of, base, tuned, n_resamples=2000)
    assert iv.base == pytest.approx(115 / 45) and iv.tuned == pytest.approx(83 / 45)
    assert iv.low <= iv.delta <= iv.high < 0 and iv.significant
    ppl = paired_bootstrap(exp_ratio_of, base, tuned, n_resamples=2000)
    assert ppl.delta == pytest.approx(math.exp(83 / 45) - math.exp(115 / 45))


def test_corpus_bleu_resamples_the_corpus():
    import sacrebleu

    refs = ["take the tablet with food every morning", "do not drink alcohol with this drug",
            "ask your doctor before you stop", "store it at room temperature away from light"] * 5
    base = ["take it with water", "alcohol is fine", "stop when you feel better",
            "keep it in the fridge"] * 5
    tuned = ["take the tablet with food", "do not drink alcohol", "ask your doctor first",
             "store at room temperature"] * 5
    sb, st = bleu_statistics(base, refs), bleu_statistics(tuned, refs)
    every = np.arange(len(refs))[None, :]
    assert corpus_bleu(st, every)[0] == pytest.approx(sacrebleu.corpus_bleu(tuned, [refs]).score)
    row = resample_indices(len(refs), 1, 5)
    resampled = sacrebleu.corpus_bleu([tuned[i] for i in row[0]], [[refs[i] for i in row[0]]])
    assert corpus_bleu(st, row)[0] == pytest.approx(resampled.score)
    iv = paired_bootstrap(corpus_bleu, sb, st, n_resamples=500)
    assert iv.delta == pytest.approx(sacrebleu.corpus_bleu(tuned, [refs]).score
                                     - sacrebleu.corpus_bleu(base, [refs]).score)
    assert iv.low > 0 and iv.significant


def test_formatting():
    from training import report

    assert report.MIN_N_SIGNIFICANT == MIN_N_SIGNIFICANT  # the report says what the stats do
    iv = Interval(1.0, 2.5, 1.5, 0.25, 2.75, 100)
    assert format_interval(iv.to_dict()) == "+1.50 [+0.25, +2.75]"
    assert format_interval(Interval(2.0, 1.0, -1.0, -1.5, 0.5, 30).to_dict()) == \
        "-1.00 [-1.50, +0.50]"
    assert iv.to_dict()["significant"] is True
