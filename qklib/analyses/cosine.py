"""§4 (Fig 3, S1, S2, S4): the cosine between each mode's query and key vectors, as tidy tables, and the
anisotropy baseline it is compared with.

The statistics themselves live on :class:`qklib.core.svd.QKSVD` (``cos``, ``weighted_cosine``, ...); this
module lays them out per model, layer, head and mode for the chapter and its CSV downloads.

Anisotropy baseline (the paper's Fig S4): token embeddings of a trained transformer share a common
direction, so even unrelated tokens have a positive cosine. Per layer, we take every image token (the
normed embedding that enters qkv, the input the SVD's form acts on) of every view (each photo and
:data:`CROPS` of it) and average the cosine over all pairs of tokens from *different* photos (crops of one
photo count as the same photo). Memory stays bounded: only the per-photo sums of unit vectors are kept,
and the mean over pairs follows exactly from them (:func:`between_group_cosine`). Its interval is a
percentile bootstrap over photos (crops travel with their photo). The mean over all pairs of distinct
tokens (same photo included) and the paper's centre-token version are kept for comparison.

The "relative cosine" is the weighted u.v cosine minus this baseline: how much more alike a mode's query
and key directions are than two tokens of unrelated images are alike. It subtracts a cosine between
token embeddings from one between weight vectors, so it is a rough yardstick, not a calibrated test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.extract import image_tokens, token_embeddings
from ..core.images import to_pixels
from ..core.models import depth, info
from ..core.stats import RESAMPLES, bootstrap
from ..core.svd import NULL_DRAWS, NULL_SEED, QKSVD, layer_null_band, layer_null_sd, null_band


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


CROPS = ((0.0, 0.0, 0.6, 0.6), (0.4, 0.0, 1.0, 0.6), (0.0, 0.4, 0.6, 1.0), (0.4, 0.4, 1.0, 1.0))
"""Crops per photo (left, top, right, bottom as fractions of its size), each seen besides the full photo."""


def pairwise_cosine_from_sum(total: torch.Tensor, count: int) -> torch.Tensor:
    """``[..., d] -> [...]``: mean cosine over the N(N-1) ordered pairs of N distinct unit vectors whose sum is
    ``total``: ``(|sum|^2 - N) / (N (N - 1))``, exact (each vector's cosine with itself is 1)."""
    if count < 2:
        raise ValueError(f"a mean over pairs needs at least two vectors, got {count}")
    return ((total.double() ** 2).sum(-1) - count) / (count * (count - 1))


def between_group_cosine(sums: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[G, ..., d] -> [...]``: mean cosine over all pairs of unit vectors from different groups, from each
    group's sum of unit vectors ``sums`` and size ``counts`` ``[G]``.

    ``weights`` ``[G]`` (integers, default 1) repeats groups, as a bootstrap draw does; pairs between two
    copies of one group are same-group pairs and left out:
    ``(|sum_g w_g S_g|^2 - sum_g w_g^2 |S_g|^2) / (N^2 - sum_g w_g^2 n_g^2)``, ``N = sum_g w_g n_g``.
    """
    sums, counts = sums.double(), counts.double()
    weights = torch.ones_like(counts) if weights is None else weights.double()
    if int((weights > 0).sum()) < 2:
        raise ValueError("pairs from different groups need at least two groups")
    shape = (-1,) + (1,) * (sums.dim() - 1)
    total = (weights.view(shape) * sums).sum(0)
    own = ((weights ** 2).view(shape[:-1]) * (sums ** 2).sum(-1)).sum(0)
    n = (weights * counts).sum()
    return ((total ** 2).sum(-1) - own) / (n ** 2 - (weights ** 2 * counts ** 2).sum())


def views(photos: list, crops=CROPS) -> tuple[list, list[int]]:
    """Each photo and its ``crops``, with the index of the photo each view comes from."""
    out, source = [], []
    for index, photo in enumerate(photos):
        width, height = photo.size
        for box in (None, *crops):
            out.append(photo if box is None else photo.crop((round(box[0] * width), round(box[1] * height),
                                                           round(box[2] * width), round(box[3] * height))))
            source.append(index)
    return out, source


def token_sums(model: nn.Module, pixels: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(sums [B, L, d], tokens per image, centre [L, B, d])``: per image and layer, the sum of the unit
    vectors of its image tokens' embeddings (prefix tokens dropped), and the centre token's embedding.
    ``pixels``: ``[B, 3, S, S]``; one batch of embeddings is held at a time."""
    prefix, centre = info(model).prefix_tokens, centre_token_index(model)
    sums, centres = [], []
    for start in range(0, len(pixels), batch_size):
        tokens = token_embeddings(model, pixels[start : start + batch_size])  # [L, b, T, d]
        centres.append(tokens[:, :, centre].double())
        unit = torch.nn.functional.normalize(image_tokens(tokens, prefix, dim=2).double(), dim=-1)
        sums.append(unit.sum(2).transpose(0, 1))  # [b, L, d]
    return torch.cat(sums), tokens.shape[2] - prefix, torch.cat(centres, dim=1)


def token_anisotropy(model: nn.Module, photos: list, crops=CROPS, batch_size: int = 16, draws: int = 1000,
                     seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per layer, the anisotropy baseline from every image token of every view (``photos`` and their ``crops``):
    ``between_images`` (pairs of tokens from different photos; the headline), its percentile-bootstrap
    ``low`` / ``high`` (``draws`` resamples of the photos with numpy's generator seeded by ``seed``),
    ``all_pairs`` (every pair of distinct tokens, same photo included), ``centre_token`` (the paper's
    version: the centre token of the uncropped photos), and the numbers of ``photos``, ``views`` and ``tokens``."""
    if len(photos) < 2:
        raise ValueError(f"the anisotropy baseline needs at least two photos, got {len(photos)}")
    shown, source = views(photos, crops)
    sums, per_view, centre = token_sums(model, to_pixels(model, shown), batch_size)
    source = torch.tensor(source)
    groups = torch.stack([sums[source == g].sum(0) for g in range(len(photos))])  # [G, L, d]
    counts = torch.full((len(photos),), float(per_view * (len(crops) + 1)))
    rng = np.random.default_rng(seed)
    draws_ = [torch.from_numpy(np.bincount(rng.integers(0, len(photos), len(photos)), minlength=len(photos)))
              for _ in range(draws)]
    boot = torch.stack([between_group_cosine(groups, counts, w) for w in draws_ if (w > 0).sum() >= 2]).numpy()
    full = (source[:, None] == torch.arange(len(photos))).float().argmax(0)  # the uncropped view of each photo
    layers = np.arange(sums.shape[1])
    return pd.DataFrame({
        "layer": layers, "between_images": between_group_cosine(groups, counts).numpy(),
        "low": np.quantile(boot, (1 - level) / 2, axis=0), "high": np.quantile(boot, (1 + level) / 2, axis=0),
        "all_pairs": pairwise_cosine_from_sum(sums.sum(0), len(shown) * per_view).numpy(),
        "centre_token": mean_pairwise_cosine(centre[:, full]).numpy(),
        "photos": len(photos), "views": len(shown), "tokens": len(shown) * per_view})


def baseline_verdicts(relative: pd.DataFrame) -> str:
    """Per model, the layers whose weighted cosine lies above, inside and below the baseline's interval
    (:func:`relative_table` rows): only what each model's numbers show."""
    parts = []
    for label, frame in relative.groupby("model", sort=False):
        above = frame["weighted_cosine"] > frame["baseline_high"]
        below = frame["weighted_cosine"] < frame["baseline_low"]
        where = {"above": above, "inside": ~(above | below), "below": below}
        text = "; ".join(f"{side} in {', '.join(f'L{layer}' for layer in frame['layer'][mask])}"
                         for side, mask in where.items() if mask.any())
        parts.append(f"{label}: against the baseline's interval, the weighted cosine lies {text}")
    return ". ".join(parts)


def layer_table(svds: dict[str, QKSVD], resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per (model, layer): weighted and unweighted cosine averaged over heads, and the weighted cosine's
    95% bootstrap interval over the layer's heads (``heads_low``, ``heads_high``; the interval the claims ledger's
    verdicts use)."""
    rows = []
    for label, svd in svds.items():
        weighted = svd.layer_weighted_cosine().numpy()
        unweighted = svd.layer_unweighted_cosine().numpy()
        heads = svd.weighted_cosine().numpy()
        for layer in range(svd.num_layers):
            interval = bootstrap(heads[layer], resamples=resamples, seed=seed)
            rows.append({"model": label, "layer": layer, "depth": depth(layer, svd.num_layers),
                         "weighted_cosine": weighted[layer], "unweighted_cosine": unweighted[layer],
                         "heads_low": interval.low, "heads_high": interval.high})
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


def relative_table(models: dict[str, nn.Module], layers: pd.DataFrame, photos: list, batch_size: int = 16,
                   crops=CROPS, draws: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (model, layer): weighted cosine, the many-token anisotropy baseline on ``photos`` (PIL images) and
    their ``crops`` (:func:`token_anisotropy`: ``anisotropy_baseline`` = mean over token pairs from different
    photos, ``baseline_low`` / ``baseline_high`` its bootstrap interval, ``all_pairs_baseline``,
    ``centre_token_baseline`` = the paper's centre-token version), and the relative cosine (Fig S4) =
    weighted cosine - anisotropy_baseline, with ``relative_low`` / ``relative_high`` from the interval."""
    frames = []
    for label, model in models.items():
        frame = layers[layers["model"] == label].copy().reset_index(drop=True)
        base = token_anisotropy(model, photos, crops, batch_size, draws, seed)
        frame["anisotropy_baseline"] = base["between_images"].to_numpy()
        frame["baseline_low"], frame["baseline_high"] = base["low"].to_numpy(), base["high"].to_numpy()
        frame["all_pairs_baseline"] = base["all_pairs"].to_numpy()
        frame["centre_token_baseline"] = base["centre_token"].to_numpy()
        frame["relative_cosine"] = frame["weighted_cosine"] - frame["anisotropy_baseline"]
        frame["relative_low"] = frame["weighted_cosine"] - frame["baseline_high"]
        frame["relative_high"] = frame["weighted_cosine"] - frame["baseline_low"]
        frame["baseline_tokens"], frame["baseline_photos"] = int(base["tokens"][0]), int(base["photos"][0])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def depth_profile(values: np.ndarray, effect: float) -> str:
    """The shape of a weighted-cosine curve over layers, judged with the effect size ``effect`` (the chapter
    uses the single-cosine null band, a change as large as one random cosine's spread).

    "concave": the mean of the first sixth (at least two layers) lies more than ``effect`` above the lowest
    layer, and the last layer more than ``effect`` above it too; "falling": only the first holds; "flat":
    every layer lies within ``±effect``; otherwise "other".
    """
    values = np.asarray(values, dtype=float)
    low = int(values.argmin())
    if (np.abs(values) < effect).all():
        return "flat"
    falls = values[: max(2, len(values) // 6)].mean() - values[low] > effect
    rises = values[-1] - values[low] > effect and low < len(values) - 1
    if falls and rises:
        return "concave"
    return "falling" if falls else "other"


def findings_table(relative: pd.DataFrame, bands: pd.DataFrame, effect: float) -> pd.DataFrame:
    """One row per model: the curve's shape (:func:`depth_profile` with ``effect``), its values at the first,
    lowest and last layer, how many layers lie outside the model's own 95% null band (``bands``:
    :func:`null_band_table`; about 1 in 20 is expected by chance alone), and the relative cosine at those layers."""
    rows = []
    for label, frame in relative.groupby("model", sort=False):
        frame = frame.reset_index(drop=True)
        values = frame["weighted_cosine"].to_numpy()
        band = bands[bands["model"] == label].sort_values("layer")["null_band"].to_numpy()
        low, last = int(values.argmin()), len(values) - 1
        rows.append({"model": label, "shape": depth_profile(values, effect), "layer 0": values[0],
                     "lowest layer": low, "lowest": values[low], "last layer": values[last],
                     "layers outside the null band": f"{int((np.abs(values) > band).sum())} of {len(values)}",
                     "relative, layer 0": frame["relative_cosine"].iloc[0],
                     "relative, lowest layer": frame["relative_cosine"].iloc[low],
                     "relative, last layer": frame["relative_cosine"].iloc[last]})
    return pd.DataFrame(rows)


def null_band_table(svds: dict[str, QKSVD], level: float = 0.95, draws: int = NULL_DRAWS,
                    seed: int = NULL_SEED) -> pd.DataFrame:
    """One row per (model, layer): the simulated ``level`` null band of the plotted statistic (Fig 3's layer mean
    of head weighted cosines) for that model's own singular values, as a half-width ``null_band`` (the null is
    symmetric about 0: the band is [-null_band, +null_band]), the exact null standard deviation ``null_sd``, and
    the single-cosine band ``single_cosine_band`` (``qklib.null_band``, for comparison and the S1 histograms).

    ``draws`` Haar draws per head with numpy's generator seeded by ``seed``
    (``qklib.core.svd.simulate_layer_null``): exactly reproducible.
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


def basis_differences(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model from :func:`basis_table`: the lowest layer in each basis and the layer where the two
    bases differ most, with both values there."""
    rows = []
    for label, frame in table.groupby("model", sort=False):
        wide = frame.pivot_table(index="layer", columns="basis", values="weighted_cosine")
        gap = (wide["gamma-folded"] - wide["raw"]).abs()
        most = int(gap.idxmax())
        rows.append({"model": label, "lowest layer, raw": int(wide["raw"].idxmin()),
                     "lowest layer, gamma folded": int(wide["gamma-folded"].idxmin()), "largest difference in layer": most,
                     "raw there": wide.loc[most, "raw"], "gamma folded there": wide.loc[most, "gamma-folded"]})
    return pd.DataFrame(rows)


VERDICT_NAMES = {"s4-early-high-falls": "high early and falling with depth", "s4-middle-zero": "near 0 in a middle layer",
                 "s4-anisotropy": "above the anisotropy baseline early", "s4-biases": "the query-bias term negligible"}


def verdicts_text(judged: dict[str, dict]) -> str:
    """Per model, the claims ledger's outcome for each of §4's general claims with the numbers behind it
    (``judged``: ``{label: qklib.book.ledger.judge_model(record, label)}``)."""
    parts = []
    for label, claims in judged.items():
        found = [f"{name}: **{claims[key].outcome}** ({claims[key].number})" for key, name in VERDICT_NAMES.items()
                 if key in claims]
        parts.append(f"{label}: " + "; ".join(found))
    return " — ".join(parts) + "."
