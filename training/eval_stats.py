"""Paired bootstrap confidence intervals for "did fine-tuning change this score?".

Both models answered the same questions, so the comparison is paired: each resample draws n
questions with replacement (the same draw for both models) and recomputes the score of each
model on it; the 2.5th and 97.5th percentiles of (fine-tuned - base) over the resamples are the
95% interval (the percentile method, as in Koehn 2004 for BLEU). A difference is called
significant when its interval excludes 0 and at least `MIN_N_SIGNIFICANT` questions stand
behind it (a bootstrap of a handful of questions has an interval of almost no width).

A score is a `statistic(data, idx)` that returns one value per row of a (resamples, n) index
array, so every resample of every score is one vectorised numpy call:

    mean_of      per-question scores averaged (ROUGE-L, token F1, answer length, judge scores)
    ratio_of     sum of numerators / sum of denominators (test loss: loss summed over each
                 question's answer tokens / its token count; perplexity: exp of that)
    corpus_bleu  sacrebleu's corpus BLEU from the resampled sums of each answer's n-gram
                 statistics (the whole corpus is resampled, not sentence BLEU averaged)

scipy's `bootstrap` resamples one statistic of paired samples; token-weighted loss and corpus
BLEU need resampled sums of per-question statistics, hence the few lines here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

N_RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
MIN_N_SIGNIFICANT = 10  # fewer questions: the interval is reported, no significance claimed

Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Interval:
    """A paired comparison: both scores, their difference and its bootstrap interval."""

    base: float | None
    tuned: float | None
    delta: float | None  # tuned - base on all questions
    low: float | None  # interval of the difference
    high: float | None
    n: int  # questions behind it

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (and enough questions stand behind it)."""
        if self.low is None or self.high is None or self.n < MIN_N_SIGNIFICANT:
            return False
        return self.low > 0 or self.high < 0

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        out: dict[str, Any] = {k: (round(v, digits) if isinstance(v, float) else v)
                               for k, v in asdict(self).items()}
        out["significant"] = self.significant
        return out


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, n) question indices drawn with replacement; the same for a seed and n."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_resamples, n))


def paired_bootstrap(statistic: Statistic, base: Any, tuned: Any, *,
                     n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL,
                     idx: np.ndarray | None = None) -> Interval:
    """The interval of statistic(tuned) - statistic(base) over paired resamples of questions.

    `base` and `tuned` are arrays with one row per question (same order); `idx` reuses a draw
    (so several scores share the same resamples)."""
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if base.shape[0] != tuned.shape[0]:
        raise ValueError(f"paired data of different lengths: {base.shape[0]} and {tuned.shape[0]}")
    n = base.shape[0]
    if n == 0:
        return Interval(None, None, None, None, None, 0)
    every = np.arange(n)[None, :]
    b, t = float(statistic(base, every)[0]), float(statistic(tuned, every)[0])
    if idx is None:
        idx = resample_indices(n, n_resamples, seed)
    diffs = statistic(tuned, idx) - statistic(base, idx)
    diffs = diffs[np.isfinite(diffs)]
    if not diffs.size:
        return Interval(b, t, t - b, None, None, n)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return Interval(b, t, t - b, float(low), float(high), n)


# -- statistics ----------------------------------------------------------------------------------

def mean_of(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean of per-question values (data: shape (n,))."""
    return data[idx].mean(axis=-1)


def ratio_of(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """sum(numerators) / sum(denominators) (data: shape (n, 2))."""
    sums = data[idx].sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return sums[..., 0] / sums[..., 1]


def exp_ratio_of(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """exp of `ratio_of` (perplexity from summed loss and token counts), capped like test_loss."""
    return np.exp(np.minimum(ratio_of(data, idx), 50))


def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """sacrebleu's sufficient statistics of each answer (hypothesis and reference lengths,
    matching and total n-grams): summed over any set of answers they give its corpus BLEU."""
    from sacrebleu.metrics.bleu import BLEU

    # sacrebleu's own significance tests resample these per-sentence statistics the same way.
    stats = BLEU()._extract_corpus_statistics(list(predictions), [list(references)])
    return np.asarray(stats, dtype=float).reshape(len(predictions), -1)


def corpus_bleu(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0-100) of each resample, from summed `bleu_statistics`."""
    from sacrebleu.metrics.bleu import BLEU

    scorer = BLEU()
    sums = data[idx].sum(axis=-2)
    return np.array([scorer._compute_score_from_stats([int(x) for x in row]).score
                     for row in sums.reshape(-1, data.shape[-1])]).reshape(sums.shape[:-1])
