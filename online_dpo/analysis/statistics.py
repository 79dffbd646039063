"""Uncertainty for every number that gets compared: intervals, paired differences, detectable sizes.

Pure numpy; every bootstrap is seeded, so the same data gives the same interval.

Per-prompt values. The unit of resampling is the prompt: samples of one prompt are correlated (same
question, same policy), so they are resampled together. A "group" list holds, per prompt, either one
number or a list of the numbers of its samples (None entries, e.g. a failed judgment, are dropped;
a prompt left with none is dropped). The mean of groups is the mean over all their samples (sum of
values / number of values), the same number as the plain mean of the flat list, so an interval is
always centred on the metric it belongs to.

Percentile bootstrap: resample prompts with replacement `resamples` times (default 2000), take the
statistic each time, and report the 2.5th and 97.5th percentiles. With few prompts (under ~20) a
percentile interval is too narrow; `min_detectable_difference` says how large a difference the
held-out set can resolve at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
Z_975 = NormalDist().inv_cdf(0.975)  # 1.95996: two-sided alpha 0.05
Z_80 = NormalDist().inv_cdf(0.8)  # 0.84162: power 0.8


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval. `ci` is [lo, hi], as written into the JSON files."""

    value: float
    lo: float
    hi: float

    @property
    def ci(self) -> list[float]:
        return [self.lo, self.hi]

    def above(self, x: float) -> bool:
        """The whole interval lies above x: significantly greater."""
        return self.lo > x

    def below(self, x: float) -> bool:
        return self.hi < x

    def excludes(self, x: float) -> bool:
        return self.above(x) or self.below(x)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: float, n: float, confidence: float = CONFIDENCE) -> Interval | None:
    """Wilson score interval for a proportion p = successes / n; None when n is 0.

    With z = 1.96 (95%), p = x / n:
        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    e.g. 8/10: centre = (0.8 + 0.19207) / 1.38415 = 0.71674, half = 1.41600 * 0.16001 = 0.22658,
    so [0.490, 0.943]. `value` is p itself (not the centre).

    Half-counts: a win rate counts a tie as half a win, so x = wins + ties / 2 and n = wins + losses
    + ties (failed judgments are not in n). The formula takes a non-integer x as it is. A tie has
    variance 0 where a win/loss coin has p(1 - p), so with many ties the interval is conservative
    (a little too wide). It treats comparisons as independent: with several samples per prompt the
    per-prompt bootstrap (`bootstrap_mean` of per-prompt win scores) is the one to compare runs with.
    """
    if n <= 0:
        return None
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def _sums_counts(groups: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt (sum, count) of the non-None values; prompts with no value keep count 0."""
    sums, counts = np.zeros(len(groups)), np.zeros(len(groups))
    for i, g in enumerate(groups):
        values = [v for v in (g if isinstance(g, (list, tuple, np.ndarray)) else [g]) if v is not None]
        sums[i], counts[i] = float(sum(values)), len(values)
    return sums, counts


def prompt_means(groups: Sequence) -> np.ndarray:
    """Each prompt's mean value, prompts without a value left out."""
    sums, counts = _sums_counts(groups)
    keep = counts > 0
    return sums[keep] / counts[keep]


def group_mean(groups: Sequence) -> float | None:
    sums, counts = _sums_counts(groups)
    return float(sums.sum() / counts.sum()) if counts.sum() else None


def _indices(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    return rng.integers(0, n, size=(resamples, n))


def _ratio(sums: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The mean over resampled prompts, one per row of idx (no row can be empty: counts > 0)."""
    return sums[idx].sum(axis=1) / counts[idx].sum(axis=1)


def _interval(value: float, draws: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    # Percentiles interpolate: constant draws must give exactly the constant, not 1 ulp off.
    return Interval(float(value), float(min(lo, value)), float(max(hi, value)))


def _nonempty(groups: Sequence) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = _sums_counts(groups)
    keep = counts > 0
    return sums[keep], counts[keep]


def bootstrap_mean(groups: Sequence, *, resamples: int = RESAMPLES, seed: int = 0,
                   confidence: float = CONFIDENCE) -> Interval | None:
    """Percentile bootstrap over prompts of the mean of per-prompt values; None without values."""
    sums, counts = _nonempty(groups)
    if not len(sums):
        return None
    rng = np.random.default_rng(seed)
    draws = _ratio(sums, counts, _indices(rng, len(sums), resamples))
    return _interval(sums.sum() / counts.sum(), draws, confidence)


def paired_bootstrap_diff(a: Sequence, b: Sequence, *, resamples: int = RESAMPLES, seed: int = 0,
                          confidence: float = CONFIDENCE) -> Interval | None:
    """mean(a) - mean(b) when a[i] and b[i] answer the same prompt i: prompts are resampled once for
    both, so what the prompts share (an easy prompt is easy for both policies) cancels. Prompts
    where either side has no value are left out of both; None when none is left."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same prompts: {len(a)} vs {len(b)}")
    sa, ca = _sums_counts(a)
    sb, cb = _sums_counts(b)
    keep = (ca > 0) & (cb > 0)
    if not keep.any():
        return None
    sa, ca, sb, cb = sa[keep], ca[keep], sb[keep], cb[keep]
    idx = _indices(np.random.default_rng(seed), len(sa), resamples)
    draws = _ratio(sa, ca, idx) - _ratio(sb, cb, idx)
    return _interval(sa.sum() / ca.sum() - sb.sum() / cb.sum(), draws, confidence)


def unpaired_bootstrap_diff(a: Sequence, b: Sequence, *, resamples: int = RESAMPLES, seed: int = 0,
                            confidence: float = CONFIDENCE) -> Interval | None:
    """mean(a) - mean(b) over different prompts: each side is resampled on its own."""
    sa, ca = _nonempty(a)
    sb, cb = _nonempty(b)
    if not len(sa) or not len(sb):
        return None
    rng = np.random.default_rng(seed)
    draws = _ratio(sa, ca, _indices(rng, len(sa), resamples)) - _ratio(sb, cb, _indices(rng, len(sb), resamples))
    return _interval(sa.sum() / ca.sum() - sb.sum() / cb.sum(), draws, confidence)


def two_level_bootstrap(runs: Sequence[Sequence], *, resamples: int = RESAMPLES, seed: int = 0,
                        confidence: float = CONFIDENCE) -> Interval | None:
    """An arm's mean across seeds: the mean of each seed's (run's) mean, with an interval from
    resampling seeds, then prompts within each drawn seed (a seed drawn twice gets two independent
    prompt resamples). Seeds without values are left out; None when none is left.

    With 2-3 seeds the seed level resamples very few values and the interval is optimistic; it
    says what these seeds show, not what a fresh seed would do."""
    found = _two_level_draws(runs, np.random.default_rng(seed), resamples)
    return _interval(*found, confidence) if found else None


def two_level_diff(runs_a: Sequence[Sequence], runs_b: Sequence[Sequence], *, resamples: int = RESAMPLES,
                   seed: int = 0, confidence: float = CONFIDENCE) -> Interval | None:
    """Arm A's mean across seeds minus arm B's, each resampled on its own (seeds, then prompts)."""
    rng = np.random.default_rng(seed)
    a, b = _two_level_draws(runs_a, rng, resamples), _two_level_draws(runs_b, rng, resamples)
    return _interval(a[0] - b[0], a[1] - b[1], confidence) if a and b else None


def _two_level_draws(runs: Sequence[Sequence], rng: np.random.Generator, resamples: int):
    kept = [_nonempty(groups) for groups in runs]
    kept = [(s, c) for s, c in kept if len(s)]
    if not kept:
        return None
    n_seeds = len(kept)
    # means[s, b, j]: seed s's mean under its own prompt resample, for replicate b, draw slot j.
    means = np.stack([_ratio(s, c, _indices(rng, len(s), resamples * n_seeds)).reshape(resamples, n_seeds)
                      for s, c in kept])
    chosen = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    draws = means[chosen, np.arange(resamples)[:, None], np.arange(n_seeds)[None, :]].mean(axis=1)
    return float(np.mean([s.sum() / c.sum() for s, c in kept])), draws


def min_detectable_difference(a: Sequence, b: Sequence | None = None, *, paired: bool = True,
                              alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest true difference a two-sided test at `alpha` detects with probability `power`
    at this number of prompts: (z_{1-alpha/2} + z_{power}) * SE of the difference
    (= 2.80 * SE at 0.05 / 0.8), SE from the observed per-prompt variance (per-prompt means):
    - paired (b given, same prompts): SE = sd(a_i - b_i) / sqrt(n);
    - unpaired: SE = sqrt(var(a) / n_a + var(b) / n_b);
    - b None: a already holds per-prompt differences, SE = sd(a) / sqrt(n).
    None with fewer than 2 prompts (no variance to estimate)."""
    factor = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    if b is None:
        d = prompt_means(a)
        return factor * float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) >= 2 else None
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired values need the same prompts: {len(a)} vs {len(b)}")
        sa, ca = _sums_counts(a)
        sb, cb = _sums_counts(b)
        keep = (ca > 0) & (cb > 0)
        d = sa[keep] / ca[keep] - sb[keep] / cb[keep]
        return factor * float(np.std(d, ddof=1)) / math.sqrt(len(d)) if len(d) >= 2 else None
    ma, mb = prompt_means(a), prompt_means(b)
    if len(ma) < 2 or len(mb) < 2:
        return None
    return factor * math.sqrt(np.var(ma, ddof=1) / len(ma) + np.var(mb, ddof=1) / len(mb))
