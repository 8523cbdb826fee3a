"""§4 (Fig 3, S1, S2, S4): the cosine between each mode's query and key vectors, as tidy tables, and the
anisotropy baseline it is compared with.

The statistics themselves live on :class:`qklib.core.svd.QKSVD` (``cos``, ``weighted_cosine``, ...); this
module lays them out per model, layer, head and mode for the chapter and its CSV downloads.

Anisotropy baseline (the paper's Fig S4): token embeddings of a trained transformer share a common
direction, so even unrelated tokens have a positive cosine. Per layer, take the centre image token of
each image (the normed embedding that enters qkv) and average the cosine over all pairs of different
images. The paper's "relative cosine" is the weighted u.v cosine minus this baseline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from .core.extract import token_embeddings
from .core.images import to_pixels
from .core.models import depth, info
from .core.svd import NULL_DRAWS, NULL_SEED, QKSVD, layer_null_band, layer_null_sd, null_band


def centre_token_index(model: nn.Module) -> int:
    """Index (prefix tokens included) of the image token at the centre of the token grid."""
    geometry = info(model)
    rows, cols = geometry.grid
    return geometry.prefix_tokens + (rows // 2) * cols + cols // 2


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """``[..., N, d] -> [...]``: mean cosine over the N(N-1) ordered pairs of different vectors."""
    n = vectors.shape[-2]
    if n < 2:
        raise ValueError("the anisotropy baseline needs at least two images")
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    off_diagonal = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (n * (n - 1))


def anisotropy_baseline(model: nn.Module, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``[L]``: per layer, the mean cosine between centre-token embeddings of different images.

    ``pixels``: ``[N, 3, S, S]`` model input, N >= 2.
    """
    centre = centre_token_index(model)
    per_batch = [token_embeddings(model, pixels[i : i + batch_size])[:, :, centre] for i in range(0, len(pixels), batch_size)]
    centre_tokens = torch.cat(per_batch, dim=1)  # [L, N, d]
    return mean_pairwise_cosine(centre_tokens)


def layer_table(svds: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per (model, layer): weighted and unweighted cosine averaged over heads."""
    rows = []
    for label, svd in svds.items():
        weighted = svd.layer_weighted_cosine().numpy()
        unweighted = svd.layer_unweighted_cosine().numpy()
        for layer in range(svd.num_layers):
            rows.append({"model": label, "layer": layer, "depth": depth(layer, svd.num_layers),
                         "weighted_cosine": weighted[layer], "unweighted_cosine": unweighted[layer]})
    return pd.DataFrame(rows)


def head_table(svds: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per (model, layer, head): the weighted cosine of that head."""
    frames = []
    for label, svd in svds.items():
        values = svd.weighted_cosine().numpy()
        layers, heads = np.meshgrid(np.arange(svd.num_layers), np.arange(svd.num_heads), indexing="ij")
        frames.append(pd.DataFrame({"model": label, "layer": layers.ravel(), "head": heads.ravel(),
                                    "weighted_cosine": values.ravel()}))
    return pd.concat(frames, ignore_index=True)


def mode_table(svds: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per (model, layer, head, mode): s_n, its weight s_n / sum(s) and cos_n."""
    frames = []
    for label, svd in svds.items():
        s = svd.S.numpy()
        weight = s / s.sum(-1, keepdims=True)
        layers, heads, modes = np.meshgrid(np.arange(svd.num_layers), np.arange(svd.num_heads), np.arange(svd.rank),
                                           indexing="ij")
        frames.append(pd.DataFrame({"model": label, "layer": layers.ravel(), "head": heads.ravel(),
                                    "mode": modes.ravel(), "singular_value": s.ravel(),
                                    "weight": weight.ravel(), "cos": svd.cos.numpy().ravel()}))
    return pd.concat(frames, ignore_index=True)


def cosine_histograms(modes: pd.DataFrame, bins: int = 40) -> pd.DataFrame:
    """Per (model, layer): the fraction of modes (all heads) whose cos_n falls in each of ``bins`` bins on [-1, 1]."""
    edges = np.linspace(-1, 1, bins + 1)
    rows = []
    for (model, layer), group in modes.groupby(["model", "layer"], sort=False):
        counts, _ = np.histogram(group["cos"].to_numpy(), bins=edges)
        for index, count in enumerate(counts):
            rows.append({"model": model, "layer": layer, "bin_start": edges[index], "bin_end": edges[index + 1],
                         "fraction": count / len(group)})
    return pd.DataFrame(rows)


def null_band_for(svds: dict[str, QKSVD]) -> float:
    """The single-cosine 95% null band for the smallest model width among ``svds``."""
    dims = {svd.dim for svd in svds.values()}
    return null_band(min(dims))


def relative_table(models: dict[str, nn.Module], layers: pd.DataFrame, photos: list, batch_size: int = 16) -> pd.DataFrame:
    """Per (model, layer): weighted cosine, the anisotropy baseline on ``photos`` (PIL images) and their
    difference, the relative cosine (Fig S4)."""
    frames = []
    for label, model in models.items():
        frame = layers[layers["model"] == label].copy()
        frame["anisotropy_baseline"] = anisotropy_baseline(model, to_pixels(model, photos), batch_size).numpy()
        frame["relative_cosine"] = frame["weighted_cosine"] - frame["anisotropy_baseline"]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def depth_profile(values: np.ndarray, band: float) -> str:
    """The shape of a weighted-cosine curve over layers, decided against the null band ``band``.

    "concave": the mean of the first sixth (at least two layers) lies more than ``band`` above the lowest
    layer, and the last layer more than ``band`` above it too; "falling": only the first holds; "inside
    band": every layer lies inside the band; otherwise "other".
    """
    values = np.asarray(values, dtype=float)
    low = int(values.argmin())
    if (np.abs(values) < band).all():
        return "inside band"
    falls = values[: max(2, len(values) // 6)].mean() - values[low] > band
    rises = values[-1] - values[low] > band and low < len(values) - 1
    if falls and rises:
        return "concave"
    return "falling" if falls else "other"


def findings_table(relative: pd.DataFrame, band: float) -> pd.DataFrame:
    """One row per model: the curve's shape (:func:`depth_profile`), its values at the first, lowest and last
    layer, how many layers lie inside the null band, and the relative cosine at those layers."""
    rows = []
    for label, frame in relative.groupby("model", sort=False):
        frame = frame.reset_index(drop=True)
        values = frame["weighted_cosine"].to_numpy()
        low, last = int(values.argmin()), len(values) - 1
        rows.append({"model": label, "shape": depth_profile(values, band), "layer 0": values[0],
                     "lowest layer": low, "lowest": values[low], "last layer": values[last],
                     "layers inside band": f"{int((np.abs(values) < band).sum())} of {len(values)}",
                     "relative, layer 0": frame["relative_cosine"].iloc[0],
                     "relative, lowest layer": frame["relative_cosine"].iloc[low],
                     "relative, last layer": frame["relative_cosine"].iloc[last]})
    return pd.DataFrame(rows)


def null_band_table(svds: dict[str, QKSVD], level: float = 0.95, draws: int = NULL_DRAWS,
                    seed: int = NULL_SEED) -> pd.DataFrame:
    """One row per (model, layer): the simulated ``level`` null band of the plotted statistic (Fig 3's layer mean
    of head weighted cosines) for that model's own singular values, as a half-width ``null_band`` (the null is
    symmetric about 0: the band is [-null_band, +null_band]), the exact null standard deviation ``null_sd``, and
    the single-cosine band ``single_cosine_band`` (:func:`null_band`, for comparison and the S1 histograms).

    ``draws`` Haar draws per head with numpy's generator seeded by ``seed``
    (:func:`qklib.core.svd.simulate_layer_null`): exactly reproducible.
    """
    frames = []
    for label, svd in svds.items():
        band = layer_null_band(svd, level=level, draws=draws, seed=seed).numpy()
        sd = layer_null_sd(svd.S, svd.dim).numpy()
        layers = np.arange(svd.num_layers)
        frames.append(pd.DataFrame({"model": label, "layer": layers, "depth": depth(layers, svd.num_layers),
                                    "null_band": band, "null_sd": sd, "single_cosine_band": null_band(svd.dim),
                                    "draws": draws, "seed": seed}))
    return pd.concat(frames, ignore_index=True)


BASIS_LABELS = {"raw": "raw weights (the paper's): form on x = gamma * z + beta",
                "gamma-folded": "LayerNorm gamma folded in: form on the standardised token z"}


def basis_table(raw: dict[str, QKSVD], folded: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per (model, basis, layer): the layer weighted cosine in the raw basis (``qk_svd(model)``) and with
    norm1's gamma folded into W_q and W_k (``qk_svd(model, fold_gamma=True)``); ``basis`` is ``"raw"`` or
    ``"gamma-folded"``, ``basis_label`` says what the form acts on. The two dicts must hold the same models."""
    if set(raw) != set(folded):
        raise ValueError(f"raw and folded decompositions must cover the same models: {sorted(raw)} vs {sorted(folded)}")
    rows = []
    for label in raw:
        for basis, svd in (("raw", raw[label]), ("gamma-folded", folded[label])):
            if svd.basis != basis:
                raise ValueError(f"{label!r}: expected a {basis!r} decomposition, got {svd.basis!r} "
                                 "(use qk_svd(model) and qk_svd(model, fold_gamma=True))")
            weighted = svd.layer_weighted_cosine().numpy()
            for layer in range(svd.num_layers):
                rows.append({"model": label, "basis": basis, "basis_label": BASIS_LABELS[basis], "layer": layer,
                             "depth": depth(layer, svd.num_layers), "weighted_cosine": weighted[layer]})
    return pd.DataFrame(rows)
