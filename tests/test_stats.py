"""qklib.core.stats: the bootstrap's coverage on cases with a known answer, and the decision rule's three outcomes."""

import math

import numpy as np
import pytest

from qklib.core import stats


def test_the_bootstrap_interval_covers_a_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    trials, covered = 300, 0
    for trial in range(trials):
        sample = rng.exponential(2.0, size=60)  # skewed, mean 2
        interval = stats.bootstrap(sample, resamples=800, seed=trial)
        covered += interval.low <= 2.0 <= interval.high
    # The percentile bootstrap undercovers a little on skewed data at n = 60; a broken interval (too narrow,
    # shifted, or the wrong tails) lands far outside this range.
    assert 0.88 <= covered / trials <= 0.98


def test_the_interval_is_seeded_and_its_estimate_is_the_plain_mean():
    values = np.arange(10.0)
    first, again = stats.bootstrap(values, seed=3), stats.bootstrap(values, seed=3)
    assert first == again
    assert first.estimate == pytest.approx(4.5)
    assert first.low < 4.5 < first.high and first.units == 10
    assert stats.Interval.from_dict(first.as_dict()) == first


def test_rows_are_units_and_nan_units_are_left_out():
    values = np.array([[1.0, 3.0], [2.0, 2.0], [np.nan, np.nan], [4.0, 0.0]])
    interval = stats.bootstrap(values)
    assert interval.estimate == pytest.approx(2.0) and interval.units == 3


def test_the_slope_of_the_mean_curve_is_the_least_squares_slope():
    rng = np.random.default_rng(0)
    curves = 0.05 * np.arange(8) + rng.normal(0, 0.01, size=(40, 8))
    interval = stats.bootstrap_slope(curves)
    assert interval.estimate == pytest.approx(np.polyfit(np.arange(8), curves.mean(0), 1)[0])
    assert 0.045 < interval.low < interval.high < 0.055


@pytest.mark.parametrize("low, high, expected", [(0.2, 0.4, stats.AGREES), (-0.4, -0.1, stats.DISAGREES),
                                                 (-0.1, 0.3, stats.BORDERLINE), (0.0, 0.3, stats.BORDERLINE)])
def test_decide_has_three_outcomes(low, high, expected):
    assert stats.decide(stats.Interval(0.5 * (low + high), low, high, 10), 0.0) == expected
    flipped = {stats.AGREES: stats.DISAGREES, stats.DISAGREES: stats.AGREES}.get(expected, expected)
    assert stats.decide(stats.Interval(0.5 * (low + high), low, high, 10), 0.0, holds_above=False) == flipped


@pytest.mark.parametrize("low, high, expected", [(-0.05, 0.08, stats.AGREES), (0.12, 0.3, stats.DISAGREES),
                                                 (0.05, 0.2, stats.BORDERLINE), (-0.3, -0.2, stats.DISAGREES)])
def test_decide_within_a_band(low, high, expected):
    assert stats.decide_within(stats.Interval(0.5 * (low + high), low, high, 6), 0.1) == expected


def test_an_interval_that_cannot_be_computed_is_borderline():
    assert stats.decide(stats.Interval(math.nan, math.nan, math.nan, 0), 0.0) == stats.BORDERLINE


def test_combine_needs_every_part():
    assert stats.combine([stats.AGREES, stats.AGREES]) == stats.AGREES
    assert stats.combine([stats.AGREES, stats.BORDERLINE]) == stats.BORDERLINE
    assert stats.combine([stats.BORDERLINE, stats.DISAGREES]) == stats.DISAGREES


@pytest.mark.parametrize("call", [lambda: stats.bootstrap([]), lambda: stats.bootstrap([1.0], resamples=0),
                                  lambda: stats.bootstrap(3.0), lambda: stats.bootstrap_slope([[1.0]])])
def test_bad_input_is_refused_with_a_reason(call):
    with pytest.raises(ValueError):
        call()


def test_the_stratified_curve_bootstrap_resamples_units_within_each_layer():
    rng = np.random.default_rng(2)
    per_head = np.stack([rng.normal(0.5, 0.05, 6), rng.normal(0.2, 0.05, 6), rng.normal(0.2, 0.05, 6)])
    drop = stats.bootstrap_curve(per_head, lambda c: c[:, 0] - c[:, 1:].mean(axis=1))
    assert drop.estimate == pytest.approx(per_head[0].mean() - per_head[1:].mean())
    assert 0.2 < drop.low < drop.estimate < drop.high < 0.4
    same = stats.bootstrap_curve(np.full((3, 6), 0.3), lambda c: c[:, 0])
    assert same.low == same.high == pytest.approx(0.3)  # no spread between units: no width


def test_rank_correlation_is_spearmans_with_an_interval_over_units():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(4)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    rho = stats.rank_correlation(x, y, resamples=500, seed=1)
    assert rho.estimate == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert rho.low < rho.estimate < rho.high and rho.units == 60
    assert stats.rank_correlation(x, y, resamples=500, seed=1) == rho
    assert stats.rank_correlation(x, -x, resamples=200).high == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal-length 1-d arrays of at least 3"):
        stats.rank_correlation(x, y[:10])


def test_the_permutation_band_is_centred_on_zero_unless_shuffled_within_shared_groups():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(6), 10)
    x, y = groups + 0.1 * rng.normal(size=60), groups + 0.1 * rng.normal(size=60)  # tied only through the group
    low, high = stats.permutation_band(x, y, draws=400, seed=2)
    assert low < 0 < high and high - low < 0.7
    assert stats.rank_correlation(x, y, resamples=100).estimate > high  # the plain shuffle calls the group trend an association
    low, high = stats.permutation_band(x, y, draws=400, seed=2, groups=groups)
    assert low > 0.8  # shuffled within groups the trend stays, and the null is near the observed value
    assert stats.permutation_band(x, y, draws=400, seed=2) == stats.permutation_band(x, y, draws=400, seed=2)
