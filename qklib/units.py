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
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .stats import Interval, RESAMPLES, bootstrap

NOT_A_UNIT = -1  # the label of tokens that are neither query nor key: special tokens, padding, silence
COLUMNS = ("same", "same_chance", "other", "other_chance")  # the last axis of unit_sums


def unit_sums(attention: torch.Tensor, units) -> np.ndarray:
    """``[L, H, 4]``: over the eligible queries of one input, the summed attention to the query's own unit, its
    chance level, the summed attention to the other units and its chance level (``COLUMNS``).

    ``attention``: ``[L, H, T, T]`` (rows: queries, columns: keys) of one input; ``units``: ``[T]`` integer
    labels, :data:`NOT_A_UNIT` for tokens to leave out. Inputs with no eligible query give zeros (no weight in
    the pooled ratios)."""
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be [layers, heads, T, T], got {tuple(attention.shape)}")
    labels = torch.as_tensor(np.asarray(units), dtype=torch.long)
    if labels.shape != (attention.shape[-1],):
        raise ValueError(f"units must give one label per token ({attention.shape[-1]}), got {tuple(labels.shape)}")
    valid = labels != NOT_A_UNIT
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    same.fill_diagonal_(False)
    keys = valid[None, :] & valid[:, None] & ~torch.eye(len(labels), dtype=torch.bool)
    other = keys & ~same
    eligible = same.any(dim=1) & other.any(dim=1)
    if not eligible.any():
        return np.zeros((*attention.shape[:2], 4))
    a = attention.to(torch.float64)[..., eligible, :] * keys[eligible]  # [L, H, Q, T] rows cut to the keys
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    same_q, other_q, keys_q = (m[eligible].to(torch.float64) for m in (same, other, keys))
    count = keys_q.sum(dim=1)
    sums = [(a * same_q).sum(dim=(-1, -2)), (same_q.sum(dim=1) / count).sum().expand(a.shape[:2]),
            (a * other_q).sum(dim=(-1, -2)), (other_q.sum(dim=1) / count).sum().expand(a.shape[:2])]
    return torch.stack(sums, dim=-1).numpy()


def _pooled(sample: np.ndarray) -> np.ndarray:
    """``[..., inputs, L, 4]`` (heads already summed) -> ``[..., L, 2]``: same and other attention per unit area,
    pooled over inputs."""
    totals = sample.sum(axis=-3)  # [..., L, 4]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([totals[..., 0] / totals[..., 1], totals[..., 2] / totals[..., 3]], axis=-1)


def layer_table(sums: np.ndarray, label: str = "", resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Per layer, same-unit and other-unit attention per unit area and their ratio (``dominance``: same over
    other; 1 = no preference), each with its 95% bootstrap interval over inputs.

    ``sums``: ``[inputs, L, H, 4]``, one :func:`unit_sums` per input."""
    sums = _checked(sums)
    rows = []
    for layer in range(sums.shape[1]):
        stats = {"same": lambda s, l=layer: _pooled(s)[:, l, 0], "other": lambda s, l=layer: _pooled(s)[:, l, 1],
                 "dominance": lambda s, l=layer: _pooled(s)[:, l, 0] / _pooled(s)[:, l, 1]}
        row = {"model": label, "layer": layer, "depth": layer / max(sums.shape[1] - 1, 1)}
        for name, statistic in stats.items():
            interval = bootstrap(sums, statistic, resamples=resamples, seed=seed)
            row.update({name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high})
        rows.append(row)
    return pd.DataFrame(rows)


def early_minus_late(sums: np.ndarray, column: str = "dominance", resamples: int = RESAMPLES,
                     seed: int = 0) -> Interval:
    """The mean of ``column`` (``same``, ``other`` or ``dominance``) over the first half of the layers minus its
    mean over the second half (the middle layer of an odd count left out), with its bootstrap interval over
    inputs: positive when the preference falls with depth."""
    sums = _checked(sums)
    layers = sums.shape[1]
    if layers < 2:
        raise ValueError("early minus late needs at least two layers")
    half = layers // 2

    def statistic(sample: np.ndarray) -> np.ndarray:
        pooled = _pooled(sample)
        curve = {"same": pooled[..., 0], "other": pooled[..., 1], "dominance": pooled[..., 0] / pooled[..., 1]}[column]
        return curve[:, :half].mean(axis=1) - curve[:, layers - half:].mean(axis=1)

    if column not in ("same", "other", "dominance"):
        raise ValueError(f"column must be 'same', 'other' or 'dominance', got {column!r}")
    return bootstrap(sums, statistic, resamples=resamples, seed=seed)


def _checked(sums) -> np.ndarray:
    sums = np.asarray(sums, dtype=float)
    if sums.ndim != 4 or sums.shape[-1] != 4:
        raise ValueError(f"sums must be [inputs, layers, heads, 4] (one unit_sums per input), got {sums.shape}")
    if not (sums[..., 1] > 0).any():
        raise ValueError("no input has an eligible query (a token whose unit has another token, with another unit "
                         "present): give inputs with several multi-token units")
    return sums.sum(axis=2)  # [inputs, L, 4]: heads pooled, as the ratios pool them
