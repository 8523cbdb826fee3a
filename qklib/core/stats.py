"""The statistics every verdict of the book rests on: bootstrap intervals and one decision rule.

A verdict compares a statistic with a stated threshold. The statistic is computed from units that vary
independently (images, scenes, heads or mode-image cases); its 95% interval comes from a seeded percentile
bootstrap over those units (:func:`bootstrap`, :func:`bootstrap_slope`, and :func:`bootstrap_curve` for curves
whose layer values are means over heads), so it is exactly reproducible, and the number of resamples is a
parameter. :func:`decide` turns the interval and the threshold into one of three outcomes: the claim's side of
the threshold holds for the whole interval (agrees), the other side holds for the whole interval (disagrees), or
the interval crosses it (borderline). A fourth outcome, "not tested", is the ledger's for a claim that no model of
a run concerns. Nulls are the analyses' own (a random-init control, Haar rotations, permuted keys), each named
where its statistic is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

AGREES, DISAGREES, BORDERLINE, NOT_TESTED = "agrees", "disagrees", "borderline", "not tested in this run"
RESAMPLES = 2000  # bootstrap resamples: the interval's ends then move by well under 1% of its width between seeds
LEVEL = 0.95  # every interval of the book is a 95% interval


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval: ``estimate`` on all ``units`` (images, scenes, heads, ...),
    ``low`` and ``high`` the ends of the ``level`` percentile interval over ``resamples`` resamples."""

    estimate: float
    low: float
    high: float
    units: int
    level: float = LEVEL
    resamples: int = RESAMPLES

    def __str__(self) -> str:
        return self.text()

    def text(self, digits: int = 3) -> str:
        """``0.412 [0.371, 0.455]``."""
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict:
        """JSON-safe: NaN becomes None."""
        clean = (lambda v: None if v is None or math.isnan(v) else float(v))
        return {"estimate": clean(self.estimate), "low": clean(self.low), "high": clean(self.high),
                "units": int(self.units), "level": float(self.level), "resamples": int(self.resamples)}

    @classmethod
    def from_dict(cls, data: dict) -> Interval:
        nan = (lambda v: math.nan if v is None else float(v))
        return cls(nan(data["estimate"]), nan(data["low"]), nan(data["high"]), int(data["units"]),
                   float(data.get("level", LEVEL)), int(data.get("resamples", RESAMPLES)))


def _indices(units: int, resamples: int, seed: int) -> np.ndarray:
    if units < 1:
        raise ValueError("a bootstrap needs at least one unit (image, scene or head); got none")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, units, size=(resamples, units))


def _interval(estimate: float, draws: np.ndarray, units: int, level: float, resamples: int) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level must lie between 0 and 1, got {level}")
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Interval(float(estimate), math.nan, math.nan, units, level, resamples)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), units, level, resamples)


def bootstrap(values, statistic: Callable[[np.ndarray], np.ndarray] | None = None, *, resamples: int = RESAMPLES,
              seed: int = 0, level: float = LEVEL) -> Interval:
    """The percentile bootstrap interval of ``statistic`` over the units along ``values``' first axis.

    ``values``: ``[units, ...]`` (one row per image, scene or head). ``statistic`` maps an array
    ``[resamples, units, ...]`` to ``[resamples]`` (the default: the mean over units, then over any further
    axes); it is also applied to ``values[None]`` for the estimate. NaN rows count as missing units."""
    values = np.asarray(values, dtype=float)
    if values.ndim == 0:
        raise ValueError("bootstrap takes one value per unit (an array), got a scalar")
    if statistic is None:
        values = values.reshape(len(values), -1).mean(axis=1)
        values = values[np.isfinite(values)]
        statistic = (lambda sample: sample.mean(axis=1))
    draws = statistic(values[_indices(len(values), resamples, seed)])
    return _interval(float(statistic(values[None])[0]), np.asarray(draws, dtype=float), len(values), level, resamples)


def bootstrap_slope(curves, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The interval of the least-squares slope per layer of the mean curve, resampling the units (rows of
    ``curves`` ``[units, layers]``, e.g. one per-layer curve per image)."""
    curves = np.asarray(curves, dtype=float)
    if curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves must be [units, layers] with at least two layers, got {curves.shape}")
    x = np.arange(curves.shape[1], dtype=float)
    x = (x - x.mean()) / ((x - x.mean()) ** 2).sum()  # the slope is this weighting of the curve
    return bootstrap(curves, lambda sample: np.nanmean(sample, axis=1) @ x, resamples=resamples, seed=seed,
                     level=level)


def bootstrap_curve(per_unit, statistic: Callable[[np.ndarray], np.ndarray], *, resamples: int = RESAMPLES,
                    seed: int = 0, level: float = LEVEL) -> Interval:
    """The interval of a statistic of a per-layer curve whose value in each layer is the mean over that layer's
    units (heads, say), resampling the units within each layer independently (a stratified bootstrap).

    ``per_unit``: ``[layers, units]`` (NaN: a missing unit); ``statistic`` maps curves ``[resamples, layers]``
    to ``[resamples]`` (e.g. ``lambda c: c[:, 0] - c[:, -1]``)."""
    per_unit = np.asarray(per_unit, dtype=float)
    if per_unit.ndim != 2:
        raise ValueError(f"per_unit must be [layers, units], got shape {per_unit.shape}")
    layers, units = per_unit.shape
    if units == 0:
        raise ValueError("bootstrap_curve needs at least one unit per layer")
    index = np.random.default_rng(seed).integers(0, units, size=(resamples, layers, units))
    drawn = per_unit[np.arange(layers)[None, :, None], index]  # [resamples, layers, units]
    with np.errstate(invalid="ignore"):
        draws = statistic(np.nanmean(drawn, axis=2))
        estimate = statistic(np.nanmean(per_unit, axis=1)[None])[0]
    return _interval(float(estimate), np.asarray(draws, dtype=float), units, level, resamples)


def decide(interval: Interval, threshold: float, holds_above: bool = True) -> str:
    """``AGREES`` when the whole interval lies on the claim's side of ``threshold`` (above it when
    ``holds_above``), ``DISAGREES`` when it lies wholly on the other side, ``BORDERLINE`` when it crosses or
    touches the threshold or cannot be computed."""
    low, high = interval.low, interval.high
    if math.isnan(low) or math.isnan(high):
        return BORDERLINE
    if holds_above:
        return AGREES if low > threshold else DISAGREES if high < threshold else BORDERLINE
    return AGREES if high < threshold else DISAGREES if low > threshold else BORDERLINE


def decide_within(interval: Interval, bound: float) -> str:
    """For a claim "close to zero": ``AGREES`` when the interval lies inside ``(-bound, bound)``, ``DISAGREES``
    when it lies wholly outside it, ``BORDERLINE`` otherwise."""
    low, high = interval.low, interval.high
    if math.isnan(low) or math.isnan(high):
        return BORDERLINE
    if -bound < low and high < bound:
        return AGREES
    if low > bound or high < -bound:
        return DISAGREES
    return BORDERLINE


def combine(outcomes) -> str:
    """One outcome from several that must all hold: disagrees if any disagrees, agrees if all agree, else
    borderline."""
    outcomes = list(outcomes)
    if any(o == DISAGREES for o in outcomes):
        return DISAGREES
    return AGREES if outcomes and all(o == AGREES for o in outcomes) else BORDERLINE


def _spearman(sample: np.ndarray) -> np.ndarray:
    """``[..., units, 2]`` ranks -> ``[...]``: Pearson correlation of the two columns (of ranks: Spearman)."""
    centred = sample - sample.mean(axis=-2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (centred[..., 0] * centred[..., 1]).sum(-1) / np.sqrt(
            (centred[..., 0] ** 2).sum(-1) * (centred[..., 1] ** 2).sum(-1))


def rank_correlation(x, y, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Spearman's rank correlation of paired ``x``, ``y`` (one pair per unit, e.g. per head) with its percentile
    bootstrap interval over units (the pairs resampled, the ranks taken on the full sample)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"rank_correlation takes two equal-length 1-d arrays of at least 3 units, got {x.shape} "
                         f"and {y.shape}")
    return bootstrap(np.stack([rankdata(x), rankdata(y)], axis=1), _spearman, resamples=resamples, seed=seed, level=level)


def permutation_band(x, y, *, draws: int = 1000, seed: int = 0, groups=None, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` range of Spearman's correlation when ``y`` is shuffled against ``x`` (seeded): what
    no association gives. ``groups``: shuffle only within each group (e.g. within a layer, so that a trend that
    both share with depth is kept in the null)."""
    x, y = rankdata(x), np.asarray(y, dtype=float)
    groups = np.zeros(len(y)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    shuffled = np.repeat(y[None], draws, axis=0)
    for group in np.unique(groups):
        where = np.flatnonzero(groups == group)
        shuffled[:, where] = rng.permuted(shuffled[:, where], axis=1)
    paired = np.stack([np.broadcast_to(x, shuffled.shape), rankdata(shuffled, axis=1)], axis=-1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(_spearman(paired), [tail, 100 - tail])
    return float(low), float(high)
