"""Does a head's attention group alike tokens? A grouping index on real tokens, for §4.

The weighted cosine of §4 is a property of the weights, measured in one basis of the token space and blind to
how tokens are actually spread (anisotropy). This index asks the question on the tokens a head really sees:

    G = E_i [ sum_j p_ij cos(x_i, x_j) ]  -  E_i [ mean_j cos(x_i, x_j) ]

per head and image, with i and j over the image tokens, j != i (the query's attention to itself is left out and
each row renormalised over the other tokens), p the head's own attention and x the tokens entering the block
(after its norm). The first term is how alike the tokens a query attends to are to it; the second is the same
for uniform attention over the same keys. G > 0: the head attends to tokens like the query (grouping); G < 0:
to tokens unlike it. G does not depend on the basis (cosines between tokens are unchanged by any rotation) and
subtracts the anisotropy of the layer's tokens by construction.

Null: the key tokens of each image are permuted (one permutation per image and draw, the same for every query and
head: each query's similarities to the keys are shuffled), which keeps each attention row's weights and the
tokens' similarities but breaks which key gets which weight.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.extract import image_tokens, record
from ..core.models import depth, prefix_tokens
from ..core.stats import RESAMPLES, bootstrap

NULL_DRAWS = 20


def _without_self(attention: torch.Tensor) -> torch.Tensor:
    """``[..., N, N]`` rows over the image tokens with the diagonal removed and each row renormalised."""
    rows = attention * (1 - torch.eye(attention.shape[-1], dtype=attention.dtype))
    return rows / rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)


def index_of(attention: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """``[B, H]``: G from ``attention [B, H, N, N]`` (rows without the query itself, renormalised) and the
    tokens' cosine ``similarity [B, N, N]``."""
    count = similarity.shape[-1]
    off = similarity * (1 - torch.eye(count, dtype=similarity.dtype))
    uniform = off.sum(-1) / (count - 1)  # [B, N]
    attended = torch.einsum("bhij,bij->bhi", attention, similarity)
    return (attended - uniform[:, None]).mean(-1)


@torch.no_grad()
def grouping_index(model: nn.Module, pixels: torch.Tensor, batch_size: int = 8, draws: int = NULL_DRAWS,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [L, H, N], null [L, H, draws])``: G per layer, head and image (``pixels``: ``[N, 3, S, S]``), and
    ``draws`` values of the layer-and-head mean over images under the key-permutation null (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    prefix = prefix_tokens(model)
    index, null = [], []
    for start in range(0, len(pixels), batch_size):
        recorded = record(model, pixels[start : start + batch_size], tokens=True, attention=True)
        x = image_tokens(recorded.tokens, prefix).double()  # [L, B, N, d]
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = unit @ unit.transpose(-1, -2)  # [L, B, N, N]
        attention = _without_self(recorded.attention[..., prefix:, prefix:].double())  # [L, B, H, N, N]
        index.append(torch.stack([index_of(attention[l], similarity[l]) for l in range(len(x))]))  # [L, B, H]
        count, images = x.shape[-2], x.shape[1]
        drawn = []
        for _ in range(draws):  # each attention row keeps its weights; which key stands where is shuffled
            order = torch.stack([torch.randperm(count, generator=generator) for _ in range(images)])  # [B, N]
            shuffled = torch.take_along_dim(similarity, order[None, :, None, :], dim=-1)  # [L, B, N, N]
            drawn.append(torch.stack([index_of(attention[l], shuffled[l]).sum(0) for l in range(len(x))]))  # [L, H]
        null.append(torch.stack(drawn, dim=-1))
    if not index:
        raise ValueError("no images: pixels must be [N, 3, S, S] with N >= 1")
    return torch.cat(index, dim=1).permute(0, 2, 1), sum(null) / len(pixels)


def head_table(models: dict[str, nn.Module], pixels: dict[str, torch.Tensor], weighted: dict[str, torch.Tensor],
               batch_size: int = 8, draws: int = NULL_DRAWS, resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per (model, layer, head): the grouping index (mean over images) with its 95% bootstrap interval
    over images (``low``, ``high``), the central 95% of its key-permutation null (``null_low``, ``null_high``),
    and the head's weighted cosine (``weighted``: ``{label: [L, H]}``, ``QKSVD.weighted_cosine()``)."""
    rows = []
    for label, model in models.items():
        index, null = grouping_index(model, pixels[label], batch_size, draws, seed)
        bounds = np.percentile(null.numpy(), [2.5, 97.5], axis=-1)  # [2, L, H]
        layers, heads = index.shape[:2]
        for layer in range(layers):
            for head in range(heads):
                interval = bootstrap(index[layer, head].numpy(), resamples=resamples, seed=seed)
                rows.append({"model": label, "layer": layer, "head": head, "depth": depth(layer, layers),
                             "grouping": interval.estimate, "low": interval.low, "high": interval.high,
                             "null_low": float(bounds[0, layer, head]), "null_high": float(bounds[1, layer, head]),
                             "weighted_cosine": float(weighted[label][layer, head])})
    return pd.DataFrame(rows)


def agreement(table: pd.DataFrame, model: str, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """For one model's heads of :func:`head_table`: the Spearman rank correlation between the grouping index and
    the weighted cosine with its 95% bootstrap interval over heads, and how many heads group beyond their null
    (the interval over images above the null's upper end) or anti-group below it."""
    rows = table[table["model"] == model]
    ranks = rows[["grouping", "weighted_cosine"]].rank().to_numpy()

    def spearman(sample: np.ndarray) -> np.ndarray:  # [R, heads, 2]
        centred = sample - sample.mean(axis=1, keepdims=True)
        return (centred[..., 0] * centred[..., 1]).sum(1) / np.sqrt(
            (centred[..., 0] ** 2).sum(1) * (centred[..., 1] ** 2).sum(1))

    return {"rho": bootstrap(ranks, spearman, resamples=resamples, seed=seed),
            "grouping": int((rows["low"] > rows["null_high"]).sum()),
            "anti": int((rows["high"] < rows["null_low"]).sum()), "heads": len(rows)}


def findings(table: pd.DataFrame, resamples: int = RESAMPLES, seed: int = 0) -> str:
    """Per model, in words: how many heads group or anti-group beyond the null, the layers of the strongest
    grouping heads, and whether the heads' grouping index follows their weighted cosine (Spearman with interval)."""
    parts = []
    for label in dict.fromkeys(table["model"]):
        found = agreement(table, label, resamples, seed)
        rows = table[table["model"] == label]
        top = rows.nlargest(3, "grouping")
        strongest = ", ".join(f"L{r.layer} H{r.head} {r.grouping:+.3f}" for r in top.itertuples())
        rho = found["rho"]
        follows = ("follows the weighted cosine" if rho.low > 0 else "runs against the weighted cosine"
                   if rho.high < 0 else "is not tied to the weighted cosine either way (the interval includes 0)")
        parts.append(f"{label}: {found['grouping']} of {found['heads']} heads attend to tokens like the query beyond "
                     f"the key-permutation null and {found['anti']} to tokens unlike it (strongest: {strongest}); "
                     f"across heads G {follows}, Spearman {rho.text(2)}")
    return "; ".join(parts) + "."
