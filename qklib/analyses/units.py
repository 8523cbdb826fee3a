"""Attention to the same unit versus other units, per unit area, for any sequence of tokens (§7's Fig 2).

§3 asks whether a token attends to its own object more than to other objects (paper §3, Fig 2). The same question
applies to any tokens that come in units: the word pieces of one word, the tokens of one sentence, the speech
frames inside one spoken word. Given a model's attention maps for one input and a unit label per token, every
eligible query's attention row is cut to the labelled tokens other than the query itself (the query's own token
is dropped, as in §3's headline variant, since a token trivially shares its own unit) and renormalised to 1. Its
mass on the query's own unit and on the other units is compared with what uniform attention over the same keys
would give (the chance level: the share of those keys in each group). A query is eligible when its unit has at
least one other token and some other unit has a token, so both groups have a chance level.

Per input the sums over eligible queries are kept (:func:`unit_sums`), so inputs are the units of the bootstrap
and every ratio is pooled (sum of attention over sum of chance: attention per unit area, 1 = chance), exactly as
§3's ``preference.per_area``.

The null. Units of text and speech are runs of neighbouring tokens, and attention in both kinds of model favours
neighbours whatever the boundaries: a head that only looks at the next few tokens scores far above chance on
"same word". So every ratio is also computed for shifted units (:func:`shifted_units`): the same labels rolled
along the sequence by a random offset, which keeps every unit's length and the gaps between units but puts the
boundaries where there are none. The excess of the true units' preference over the shifted ones'
(:func:`layer_table`'s ``excess``, 1 = attention follows position only) is what says that attention groups by unit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..core.stats import Interval, RESAMPLES, bootstrap

NOT_A_UNIT = -1  # the label of tokens that are neither query nor key: special tokens, padding, silence
COLUMNS = ("same", "same_chance", "other", "other_chance")  # the last axis of unit_sums


def unit_sums(attention: torch.Tensor, units) -> np.ndarray:
    """``[L, H, 4]``: over the eligible queries of one input, the summed attention to the query's own unit, its
    chance level, the summed attention to the other units and its chance level (``COLUMNS``).

    ``attention``: ``[L, H, T, T]`` (rows: queries, columns: keys) of one input; ``units``: ``[T]`` integer
    labels, ``NOT_A_UNIT`` for tokens to leave out. Inputs with no eligible query give zeros (no weight in
    the pooled ratios)."""
    return _sums(*_inputs(attention, units))


def _inputs(attention: torch.Tensor, units) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps as float64 and the labels as int64, checked against each other."""
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be [layers, heads, T, T], got {tuple(attention.shape)}")
    labels = torch.as_tensor(np.asarray(units), dtype=torch.long)
    if labels.shape != (attention.shape[-1],):
        raise ValueError(f"units must give one label per token ({attention.shape[-1]}), got {tuple(labels.shape)}")
    return attention.to(torch.float64), labels


def _sums(attention: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """:func:`unit_sums` on float64 maps and checked labels. Each row's mass on the keys splits into the own
    unit's and the other units', so the other units' share is one minus the own unit's."""
    valid = labels != NOT_A_UNIT
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    same.fill_diagonal_(False)
    keys = valid[None, :] & valid[:, None] & ~torch.eye(len(labels), dtype=torch.bool)
    eligible = same.any(dim=1) & (keys & ~same).any(dim=1)
    if not eligible.any():
        return np.zeros((*attention.shape[:2], 4))
    rows = attention[..., eligible, :]  # [L, H, Q, T]
    keys_q, same_q = keys[eligible].to(torch.float64), same[eligible].to(torch.float64)
    total = torch.einsum("lhqt,qt->lhq", rows, keys_q).clamp_min(1e-300)
    same_share = (torch.einsum("lhqt,qt->lhq", rows, same_q) / total).sum(dim=-1)  # [L, H]
    queries = float(eligible.sum())
    same_chance = float((same_q.sum(dim=1) / keys_q.sum(dim=1)).sum())
    columns = [same_share, torch.full_like(same_share, same_chance), queries - same_share,
               torch.full_like(same_share, queries - same_chance)]
    return torch.stack(columns, dim=-1).numpy()


def shifted_units(units, shift: int) -> np.ndarray:
    """The labels rolled by ``shift`` positions within the span from the first to the last labelled token (tokens
    outside it, such as [CLS], [SEP] or trailing padding, keep ``NOT_A_UNIT``)."""
    labels = np.asarray(units).copy()
    inside = np.flatnonzero(labels != NOT_A_UNIT)
    if inside.size:
        first, last = inside[0], inside[-1] + 1
        labels[first:last] = np.roll(labels[first:last], shift)
    return labels


def null_sums(attention: torch.Tensor, units, shifts: int = 8, seed: int = 0) -> np.ndarray:
    """``[L, H, 4]``: :func:`unit_sums` averaged over ``shifts`` shifted segmentations (offsets drawn uniformly
    from 1 .. span - 1 with ``seed``)."""
    maps, labels = _inputs(attention, units)
    inside = np.flatnonzero(labels.numpy() != NOT_A_UNIT)
    span = inside[-1] + 1 - inside[0] if inside.size else 0
    if span < 2:
        return np.zeros((*attention.shape[:2], 4))
    offsets = np.random.default_rng(seed).integers(1, span, size=shifts)
    return np.mean([_sums(maps, torch.as_tensor(shifted_units(labels.numpy(), int(o)))) for o in offsets], axis=0)


def _pooled(sample: np.ndarray) -> np.ndarray:
    """``[..., inputs, L, 4]`` (heads already summed) -> ``[..., L, 2]``: same and other attention per unit area,
    pooled over inputs."""
    totals = sample.sum(axis=-3)  # [..., L, 4]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([totals[..., 0] / totals[..., 1], totals[..., 2] / totals[..., 3]], axis=-1)


def _curves(sample: np.ndarray) -> dict[str, np.ndarray]:
    """``[..., inputs, L, 4 or 8]`` (true sums, then the null's) -> the per-layer statistics ``[..., L]``."""
    true = _pooled(sample[..., :4])
    curves = {"same": true[..., 0], "other": true[..., 1], "dominance": true[..., 0] / true[..., 1]}
    if sample.shape[-1] == 8:
        null = _pooled(sample[..., 4:])
        curves["null_dominance"] = null[..., 0] / null[..., 1]
        curves["excess"] = curves["dominance"] / curves["null_dominance"]
    return curves


def layer_table(sums: np.ndarray, null: np.ndarray | None = None, label: str = "", resamples: int = RESAMPLES,
                seed: int = 0) -> pd.DataFrame:
    """Per layer, same-unit and other-unit attention per unit area and their ratio (``dominance``: same over
    other; 1 = no preference), each with its 95% bootstrap interval over inputs; with ``null`` (the shifted
    units' sums, :func:`null_sums`) also ``null_dominance`` and ``excess`` (dominance over null_dominance: 1 =
    attention follows position only), resampled jointly with the true sums.

    ``sums``, ``null``: ``[inputs, L, H, 4]``, one :func:`unit_sums` / :func:`null_sums` per input."""
    data = _joined(sums, null)
    names = ("same", "other", "dominance") + (("null_dominance", "excess") if null is not None else ())
    rows = []
    for layer in range(data.shape[1]):
        row = {"model": label, "layer": layer, "depth": layer / max(data.shape[1] - 1, 1)}
        for name in names:
            interval = bootstrap(data, lambda s, n=name, l=layer: _curves(s)[n][:, l], resamples=resamples, seed=seed)
            row.update({name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high})
        rows.append(row)
    return pd.DataFrame(rows)


def _joined(sums, null) -> np.ndarray:
    """``[inputs, L, 4]`` or, with a null, ``[inputs, L, 8]``: heads pooled."""
    sums = _checked(sums)
    if null is None:
        return sums
    null = _checked(null)
    if null.shape != sums.shape:
        raise ValueError(f"the null's sums {null.shape} must match the true sums {sums.shape}")
    return np.concatenate([sums, null], axis=-1)


def early_minus_late(sums: np.ndarray, null: np.ndarray | None = None, column: str = "dominance",
                     resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of ``column`` (a :func:`layer_table` statistic; ``excess`` and ``null_dominance`` need ``null``)
    over the first half of the layers minus its mean over the second half (the middle layer of an odd count left
    out), with its bootstrap interval over inputs: positive when the preference falls with depth."""
    data = _joined(sums, null)
    layers = data.shape[1]
    if layers < 2:
        raise ValueError("early minus late needs at least two layers")
    if column not in _curves(data[None]):
        raise ValueError(f"column must be one of {sorted(_curves(data[None]))}, got {column!r}")
    half = layers // 2

    def statistic(sample: np.ndarray) -> np.ndarray:
        curve = _curves(sample)[column]
        return curve[:, :half].mean(axis=1) - curve[:, layers - half:].mean(axis=1)

    return bootstrap(data, statistic, resamples=resamples, seed=seed)


def _checked(sums) -> np.ndarray:
    sums = np.asarray(sums, dtype=float)
    if sums.ndim != 4 or sums.shape[-1] != 4:
        raise ValueError(f"sums must be [inputs, layers, heads, 4] (one unit_sums per input), got {sums.shape}")
    if not (sums[..., 1] > 0).any():
        raise ValueError("no input has an eligible query (a token whose unit has another token, with another unit "
                         "present): give inputs with several multi-token units")
    return sums.sum(axis=2)  # [inputs, L, 4]: heads pooled, as the ratios pool them


def first_half_mean(sums: np.ndarray, null: np.ndarray | None = None, column: str = "excess",
                    resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of ``column`` (a :func:`layer_table` statistic) over the first half of the layers (the middle
    layer of an odd count left out), with its bootstrap interval over inputs."""
    data = _joined(sums, null)
    if column not in _curves(data[None]):
        raise ValueError(f"column must be one of {sorted(_curves(data[None]))}, got {column!r}")
    half = max(data.shape[1] // 2, 1)
    return bootstrap(data, lambda s: _curves(s)[column][:, :half].mean(axis=1), resamples=resamples, seed=seed)


def pooled_heads(sums: np.ndarray) -> np.ndarray:
    """``[inputs, L, H, 4]`` -> ``[inputs, L, 1, 4]``: the heads summed (every statistic here pools them), the form
    the claims ledger stores."""
    sums = np.asarray(sums, dtype=float)
    return sums.sum(axis=2, keepdims=True)


def curves(sums: np.ndarray, null: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every :func:`layer_table` statistic per layer (``[L]`` each), without intervals."""
    return {name: values[0] for name, values in _curves(_joined(sums, null)[None]).items()}
