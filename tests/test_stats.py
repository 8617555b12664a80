"""Statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from benchlib.errors import ConfigError
from benchlib.harness.stats import bootstrap_median_ci, percentile, summarize

ONE_TO_TEN = [float(v) for v in range(1, 11)]


def test_summary_of_one_to_ten_matches_hand_computation() -> None:
    s = summarize(ONE_TO_TEN)
    assert s.n == 10
    assert s.median == 5.5
    assert s.mean == 5.5
    assert s.min == 1.0 and s.max == 10.0
    # ddof=1: sum((x - 5.5)^2) = 82.5, / 9
    assert s.std == pytest.approx(math.sqrt(82.5 / 9), rel=1e-12)
    # type-7 percentiles: position = q * (n - 1)
    assert s.q1 == pytest.approx(3.25)  # 0.25 * 9 = 2.25 -> 3 + 0.25
    assert s.q3 == pytest.approx(7.75)
    assert s.iqr == pytest.approx(4.5)
    assert s.p90 == pytest.approx(9.1)  # 0.9 * 9 = 8.1 -> 9 + 0.1
    assert s.p99 == pytest.approx(9.91)
    # |x - 5.5| = 4.5, 3.5, ..., 0.5, 0.5, ..., 4.5 -> median 2.5
    assert s.mad == pytest.approx(2.5)
    assert s.cv == pytest.approx(math.sqrt(82.5 / 9) / 5.5)


def test_bootstrap_ci_is_deterministic_and_brackets_the_median() -> None:
    samples = [0.010, 0.011, 0.012, 0.010, 0.013, 0.011, 0.050, 0.012, 0.011, 0.010]
    low, high = bootstrap_median_ci(samples, seed=3)
    assert (low, high) == bootstrap_median_ci(samples, seed=3)
    assert low <= summarize(samples).median <= high
    assert min(samples) <= low and high <= max(samples)


def test_constant_samples_have_zero_spread_and_point_interval() -> None:
    s = summarize([0.002] * 7)
    assert (s.std, s.iqr, s.mad, s.cv) == (0.0, 0.0, 0.0, 0.0)
    assert (s.ci_low, s.ci_high) == (0.002, 0.002)


def test_single_sample() -> None:
    s = summarize([0.5])
    assert (s.n, s.median, s.std, s.ci_low, s.ci_high) == (1, 0.5, 0.0, 0.5, 0.5)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0], 50) == 1.5


def test_empty_samples_is_an_error() -> None:
    with pytest.raises(ConfigError, match="empty"):
        summarize([])


def test_verdict_flags_spread_and_too_few_samples() -> None:
    from benchlib.harness.stats import verdict

    steady = [1.0, 1.01, 0.99, 1.0, 1.005]
    assert verdict(steady, "cpu") == ("valid", ())
    assert verdict(steady, "cuda") == ("valid", ())
    noisy = [1.0, 1.3, 0.8, 1.0, 1.1]
    # std = sqrt(0.132 / 4) = 0.1817, mean 1.04: CV 17.5%
    # Q1 = 1.0, Q3 = 1.1, outer fences 0.7 and 1.4: nothing is far out
    assert verdict(noisy, "cpu") == ("suspect", ("CV 17.5% over 10%",))
    assert verdict([1.0, 1.05, 1.0, 1.01, 0.99], "cuda")[0] == "suspect"
    assert verdict([1.0, 1.0], "cpu") == ("suspect", ("only 2 samples",))
    assert verdict(steady, "cpu", ("gpu throttled",)) == ("suspect", ("gpu throttled",))


def test_tukey_outliers() -> None:
    from benchlib.harness.stats import tukey_outliers, verdict

    # Q1 = 1.0, Q3 = 1.0 for these: anything off 1.0 is outside both fences
    samples = [1.0] * 16 + [1.0001, 1.05, 1.0002, 1.01]
    assert tukey_outliers(samples) == 4
    # Q1 1.15, Q3 1.45, IQR 0.3: 2.2 is past the inner fence 1.9, not the outer 2.35
    assert tukey_outliers([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 2.2], fence=1.5) == 1
    assert tukey_outliers([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 2.2]) == 0
    assert verdict(samples, "cpu")[1] == ("4 of 20 samples are far-out outliers (Tukey)",)


def test_bootstrap_interval_is_pinned_for_a_fixed_seed() -> None:
    samples = [0.010, 0.011, 0.012, 0.010, 0.013, 0.011, 0.050, 0.012, 0.011, 0.010]
    assert bootstrap_median_ci(samples, seed=0) == pytest.approx((0.010, 0.0125))
