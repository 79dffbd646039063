"""online_dpo.analysis.statistics against exact or analytic values."""

import math

import numpy as np
import pytest

from online_dpo.analysis.statistics import (
    Z_80,
    Z_975,
    bootstrap_mean,
    group_mean,
    min_detectable_difference,
    paired_bootstrap_diff,
    two_level_bootstrap,
    two_level_diff,
    unpaired_bootstrap_diff,
    wilson,
)


def wilson_by_hand(x, n, z=1.959963984540054):
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_known_binomial():
    iv = wilson(8, 10)
    assert iv.value == 0.8
    assert iv.lo == pytest.approx(0.4902, abs=5e-4) and iv.hi == pytest.approx(0.9433, abs=5e-4)
    assert (iv.lo, iv.hi) == pytest.approx(wilson_by_hand(8, 10), abs=1e-12)
    assert wilson(0, 0) is None
    zero = wilson(0, 20)
    assert zero.lo == 0.0 and zero.hi == pytest.approx(wilson_by_hand(0, 20)[1])


def test_wilson_takes_half_counts_as_they_are():
    # 3 wins, 2 ties, 5 losses: x = 4, n = 10, the same interval as 4/10.
    assert wilson(3 + 2 / 2, 10).ci == pytest.approx(list(wilson_by_hand(4, 10)))


def test_bootstrap_of_constant_data_has_zero_width():
    iv = bootstrap_mean([0.7] * 25)
    assert iv.value == iv.lo == iv.hi == pytest.approx(0.7)
    # Per-prompt lists (several samples each), failures (None) dropped.
    iv = bootstrap_mean([[1.0, 1.0], [1.0, None], [None]])
    assert iv.ci == [1.0, 1.0]
    assert bootstrap_mean([None, [None]]) is None


def test_bootstrap_of_a_large_bernoulli_sample_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(4000) < 0.3).astype(float)
    iv = bootstrap_mean(list(x), seed=3)
    p, se = x.mean(), math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert iv.value == pytest.approx(p)
    assert iv.lo == pytest.approx(p - Z_975 * se, abs=0.15 * Z_975 * se)
    assert iv.hi == pytest.approx(p + Z_975 * se, abs=0.15 * Z_975 * se)


def test_bootstrap_is_seeded_and_centred_on_the_sample_mean():
    groups = [[1.0, 2.0], [3.0], [4.0, None, 5.0]]
    assert group_mean(groups) == bootstrap_mean(groups).value == 3.0
    assert bootstrap_mean(groups, seed=5) == bootstrap_mean(groups, seed=5)


def test_paired_bootstrap_of_identical_policies_is_centred_on_zero():
    rng = np.random.default_rng(0)
    a = list(rng.normal(size=200))
    iv = paired_bootstrap_diff(a, a)
    assert iv.value == 0.0 and iv.ci == [0.0, 0.0]
    # A common prompt effect cancels when paired, not when unpaired.
    prompt = rng.normal(scale=5.0, size=200)
    noise = rng.normal(scale=0.1, size=(2, 200))
    a, b = list(prompt + noise[0] + 0.1), list(prompt + noise[1])
    paired, unpaired = paired_bootstrap_diff(a, b), unpaired_bootstrap_diff(a, b)
    assert paired.above(0) and not unpaired.excludes(0)
    assert paired.value == pytest.approx(unpaired.value)
    assert paired.hi - paired.lo < (unpaired.hi - unpaired.lo) / 10
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap_diff([1.0], [1.0, 2.0])


def test_paired_bootstrap_drops_prompts_missing_on_either_side():
    iv = paired_bootstrap_diff([1.0, None, 3.0], [0.0, 5.0, None])
    assert iv.value == 1.0 and iv.ci == [1.0, 1.0]


def test_two_level_bootstrap_across_seeds():
    # Equal seeds, constant prompts: no width. One seed: the prompt bootstrap.
    assert two_level_bootstrap([[1.0] * 5, [1.0] * 7]).ci == [1.0, 1.0]
    rng = np.random.default_rng(2)
    one = list(rng.normal(size=50))
    assert two_level_bootstrap([one]).value == pytest.approx(np.mean(one))
    single = two_level_bootstrap([one], seed=4)
    plain = bootstrap_mean(one, seed=4)
    assert single.hi - single.lo == pytest.approx(plain.hi - plain.lo, rel=0.15)
    # The mean of seed means; seeds that disagree widen the interval beyond the prompt noise.
    seeds = [[v + shift for v in one] for shift in (0.0, 1.0, 2.0)]
    iv = two_level_bootstrap(seeds)
    assert iv.value == pytest.approx(np.mean(one) + 1.0)
    assert iv.hi - iv.lo > 2 * (plain.hi - plain.lo)
    assert two_level_bootstrap([[None], []]) is None


def test_min_detectable_difference_matches_the_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=60), rng.normal(size=60)
    factor = Z_975 + Z_80
    assert factor == pytest.approx(2.8016, abs=1e-4)
    d = a - b
    assert min_detectable_difference(list(a), list(b)) == pytest.approx(
        factor * d.std(ddof=1) / math.sqrt(60))
    assert min_detectable_difference(list(d)) == pytest.approx(factor * d.std(ddof=1) / math.sqrt(60))
    assert min_detectable_difference(list(a), list(b[:40]), paired=False) == pytest.approx(
        factor * math.sqrt(a.var(ddof=1) / 60 + b[:40].var(ddof=1) / 40))
    # Per-prompt lists enter as their means.
    assert min_detectable_difference([[0.0, 1.0], [1.0, 1.0], [0.0]]) == pytest.approx(
        factor * np.std([0.5, 1.0, 0.0], ddof=1) / math.sqrt(3))
    assert min_detectable_difference([1.0]) is None


def test_two_level_difference_between_arms():
    rng = np.random.default_rng(5)
    arm_a = [list(rng.normal(1.0, 0.1, size=40)) for _ in range(3)]
    arm_b = [list(rng.normal(0.0, 0.1, size=40)) for _ in range(3)]
    diff = two_level_diff(arm_a, arm_b)
    assert diff.value == pytest.approx(np.mean([np.mean(s) for s in arm_a]) - np.mean([np.mean(s) for s in arm_b]))
    assert diff.above(0.9) and diff.below(1.1)
    same = two_level_diff(arm_a, arm_a)
    assert same.value == 0.0 and same.excludes(0) is False
    assert two_level_diff(arm_a, [[None]]) is None
