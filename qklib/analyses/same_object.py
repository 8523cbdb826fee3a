"""Do a mode's query and key features land on the same object? (paper §5, Fig 6)

For every layer, head, mode and sign, take the mode's top-k images (by the optimal-image score of
``qklib.search``) from a set of images with object masks. In each, the *query object* is the object with the
largest mean projection ``sign * x_i . u_n`` over its tokens and the *key object* the one with the largest
mean ``sign * x_j . v_n``. P_n = fraction of the top images where they coincide (both signs pooled, each a
separate feature as in ``qklib.search``). Per head the paper weights modes by singular value as in §4.2:
``P_head = sum_n (s_n / sum_m s_m) P_n`` (over modes with at least one scored image); per layer, the mean
over heads.

Objects are the non-zero labels of an instance label map; the background (label 0) is left out, or, with
``background=True``, counted as one more object (ADE20K segments everything, sky and wall included, so a
mode from an object to its surroundings can count there). Each object's mean projection is area-weighted
over the tokens it covers (the label map is resized and centre-cropped exactly like the image, nearest
neighbour, then the fraction of each token's 14 x 14 patch the object covers is its weight). Objects
covering less than ``min_tokens`` tokens' worth of area are ignored; images with fewer than two such objects
are skipped (the answer would be trivially "same").

"Same" has two meanings (``match``):

* ``"instance"``: the query object and the key object are one object (equal labels);
* ``"kind"``: they are objects of one kind (the item's ``kinds`` maps each label to a kind: in generated
  scenes every distractor is one kind, the target another; in ADE20K the object class). The objects are
  found exactly as for ``"instance"``, so P(same kind) >= P(same instance), and the difference is the share
  of top images where the two features fall on two different objects of one kind. The background is a kind
  of its own.

Chance: if the two objects were picked independently and uniformly among an image's K objects,
P(same instance) = 1/K and P(same kind) = sum_c (n_c / K)^2 (n_c objects of kind c); the same weighting
gives the chance level per layer.

:func:`same_object_variants` computes every combination of ``background`` and ``match`` from one forward
pass per batch; :func:`same_object_probability` is one of them.

Data: generated odd-one-out scenes (``qklib.core.datasets.o3.generate_scenes``, whose ``objects/`` label maps hold
1 = target, 2.. = distractors) by default, or an ADE20K folder (``qklib.core.datasets.ade20k.load_ade20k``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from ..core.images import ImageError, model_transform, view_steps
from ..core.models import info
from ..core.svd import QKSVD
from ..search import Features, RunningTopK, feature_scores


# --- label maps on the token grid ----------------------------------------------------------------------

def crop_labels(model, labels: np.ndarray) -> np.ndarray:
    """Resize and centre-crop a label map exactly like the model's image transform, nearest neighbour."""
    mask = Image.fromarray(np.asarray(labels).astype(np.int32), mode="I")
    for step in view_steps(model, T.InterpolationMode.NEAREST):
        mask = step(mask)
    return np.asarray(mask).astype(np.int32)


def token_coverage(model, labels: np.ndarray, min_tokens: float = 0.5,
                   background: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage [K, T_img], ids [K])``: fraction of each image token's patch covered by each object.

    Background (0) is left out unless ``background`` (then it is one more object, as ADE20K's sky or wall would
    be), and so are objects covering less than ``min_tokens`` tokens in total.
    """
    meta = info(model)
    cropped = crop_labels(model, labels)
    rows, cols = meta.grid
    patch_h, patch_w = cropped.shape[0] // rows, cropped.shape[1] // cols
    cropped = cropped[: rows * patch_h, : cols * patch_w]
    ids = np.unique(cropped)
    ids = ids[ids >= 0] if background else ids[ids > 0]
    if len(ids) == 0:
        return np.zeros((0, rows * cols), np.float32), ids
    onehot = cropped[None] == ids[:, None, None]  # [K, H, W]
    coverage = onehot.reshape(len(ids), rows, patch_h, cols, patch_w).mean((2, 4)).reshape(len(ids), -1)
    keep = coverage.sum(1) >= min_tokens
    return coverage[keep].astype(np.float32), ids[keep]


# --- the statistic -------------------------------------------------------------------------------------

MATCHES = ("instance", "kind")
_BACKGROUND_KIND, _PADDING_KIND = -1, -2


@dataclass
class SameObject:
    """Same-object statistics of one variant (``background``: label 0 counted as an object; ``match``:
    ``"instance"`` or ``"kind"``).

    ``same``: ``[L', H, r, 2]`` P_n per feature (sign axis +1, -1), NaN where no image scored above 0.
    ``chance``: same shape, the mean chance over those images. ``per_head``, ``chance_head``: ``[L', H]`` after
    the s_n weighting (signs pooled); ``per_layer``, ``chance_layer``: ``[L']``, mean over heads.
    ``images_used``: images with >= 2 objects; ``images_skipped``: the rest.
    """

    layers: list[int]
    k: int
    same: np.ndarray
    chance: np.ndarray
    per_head: np.ndarray
    chance_head: np.ndarray
    per_layer: np.ndarray
    chance_layer: np.ndarray
    images_used: int
    images_skipped: int
    seconds: float
    background: bool = False
    match: str = "instance"


def _weighted(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``values [L, H, r, 2]`` (NaN = no data), ``weights [L, H, r]`` -> ``[L, H]`` s_n-weighted mean."""
    w = np.broadcast_to(weights[..., None], values.shape)
    valid = ~np.isnan(values)
    total = np.where(valid, w, 0).sum((2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, values * w, 0).sum((2, 3)) / total


def has_kinds(dataset: Sequence) -> bool:
    """Whether the items of ``dataset`` carry kind labels (``item.kinds``), so ``match="kind"`` applies: generated
    scenes do, ADE20K in its full and instance layouts does (the object class), other folders do not."""
    return len(dataset) > 0 and getattr(dataset[0], "kinds", None) is not None


def _object_kinds(item, ids: np.ndarray) -> np.ndarray:
    """``[K]`` kind of each object id (the background its own kind), from ``item.kinds`` (label -> kind)."""
    kinds = getattr(item, "kinds", None)
    if kinds is None:
        raise ImageError(f"image {getattr(item, 'id', '?')!r} has no kind labels, so P(same kind) cannot be computed; "
                         "pass match=('instance',) or use data with kinds (generated scenes, ADE20K's full or "
                         "instance layout)")
    missing = [int(i) for i in ids if i != 0 and int(i) not in kinds]
    if missing:
        raise ImageError(f"image {getattr(item, 'id', '?')!r}: object label(s) {missing[:5]} have no kind in its kinds")
    return np.array([_BACKGROUND_KIND if i == 0 else kinds[int(i)] for i in ids], np.int64)


def _chances(kinds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``kinds [B, K]``, ``valid [B, K]`` -> ``[B, 2]``: chance of the same instance (1/K) and of the same kind
    (sum over kinds of (n_c / K)^2) when both objects are drawn uniformly among the valid ones."""
    count = valid.sum(1).clamp_min(1).float()
    pairs = (kinds[:, :, None] == kinds[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return torch.stack([1 / count, pairs.sum((1, 2)).float() / count**2], 1)


@dataclass
class _Pending:
    """One image waiting for the next forward pass: its pixels, object coverage ``[K, T_img]``, object ids ``[K]``
    (0 = background) and kinds ``[K]``."""

    pixels: torch.Tensor
    coverage: np.ndarray
    ids: np.ndarray
    kinds: np.ndarray


@dataclass
class _Tally:
    """What :func:`same_object_variants` accumulates over the dataset: per background setting (``background``,
    the variants ``V``) a running top-k of every feature's images with their (same, chance) payload, and how many
    images it could use; ``seen``: images scored so far (their stream positions), ``skipped``: images with fewer
    than two objects under every setting."""

    model: nn.Module
    device: torch.device
    features: Features
    prefix_tokens: int
    background: tuple[bool, ...]
    match: tuple[str, ...]
    tops: list[RunningTopK]
    used: list[int]
    seen: int = 0
    skipped: int = 0


def _check_variants(k: int, background: Sequence[bool], match: Sequence[str]) -> tuple[tuple[bool, ...], tuple[str, ...]]:
    """The variants asked for, deduplicated in order; ValueError for anything else."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    background, match = tuple(dict.fromkeys(bool(b) for b in background)), tuple(dict.fromkeys(match))
    unknown = [m for m in match if m not in MATCHES]
    if unknown or not match or not background:
        raise ValueError(f"match must be a non-empty subset of {MATCHES} and background of (False, True); "
                         f"got {match!r}, {background!r}")
    return background, match


def _pending(model, item, transform, min_tokens: float, tally: _Tally) -> _Pending | None:
    """The item ready for a batch, or None (counted as skipped) when no setting finds two objects in it."""
    labels = getattr(item, "objects", None)
    if labels is None:
        raise ImageError(f"image {getattr(item, 'id', '?')!r} has no object label map; same-object "
                         "probability needs instance masks (generated scenes or ADE20K)")
    coverage, ids = token_coverage(model, labels, min_tokens, background=True)
    enough = max((ids != 0).sum() if not bg else len(ids) for bg in tally.background)
    if enough < 2:
        tally.skipped += 1
        return None
    kinds = _object_kinds(item, ids) if "kind" in tally.match else np.zeros(len(ids), np.int64)
    return _Pending(transform(item.image.convert("RGB")), coverage, ids, kinds)


def _batch_objects(batch: list[_Pending]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coverage [B, K, T_img], kinds [B, K], present [B, K])`` of a batch. Row 0 of every image is its
    background (empty where it covers too little), rows 1.. its objects, so "background left out" is the same
    argmax over rows 1..; ``present`` is False for padding and a missing background."""
    count = 1 + max(int((b.ids != 0).sum()) for b in batch)
    coverage = torch.zeros(len(batch), count, batch[0].coverage.shape[1])
    kinds = torch.full((len(batch), count), _PADDING_KIND, dtype=torch.long)
    for row, pending in enumerate(batch):
        slots = torch.from_numpy(np.where(pending.ids == 0, 0, np.cumsum(pending.ids != 0)))
        coverage[row, slots] = torch.from_numpy(pending.coverage)
        kinds[row, slots] = torch.from_numpy(pending.kinds)
    return coverage, kinds, coverage.sum(-1) > 0


def _same_picks(means: torch.Tensor, absent: torch.Tensor, kinds: torch.Tensor, starts: list[int],
                match: tuple[str, ...]) -> torch.Tensor:
    """``[V, B, F, 2, M]``: whether each feature's query and key sides pick the same object (the object with the
    highest mean projection for sign +, the lowest for sign -), per background setting (``starts``: its first
    object row) and match. ``means``: ``[B, K, 2F]`` each object's mean projection (u columns then v columns)."""
    batch, f = means.shape[0], means.shape[-1] // 2
    hi, lo = means.masked_fill(absent, float("-inf")), means.masked_fill(absent, float("inf"))
    rows = torch.arange(batch, device=means.device)[None, :, None]
    found = []
    for s in starts:
        best = torch.cat([hi[:, s:].argmax(1), lo[:, s:].argmin(1)], 1) + s  # [B, 4F]: q+, k+, q-, k-
        picks = best.view(batch, 4, f).transpose(0, 1)  # [4, B, F]
        same = {"instance": picks[0::2] == picks[1::2]}  # [2 signs, B, F]
        if "kind" in match:
            picked = kinds[rows, picks]  # [4, B, F]
            same["kind"] = picked[0::2] == picked[1::2]
        found.append(torch.stack([same[m] for m in match], -1).permute(1, 2, 0, 3))  # [B, F, 2, M]
    return torch.stack(found)


def _flush(tally: _Tally, batch: list[_Pending]) -> None:
    """One forward pass over ``batch``: every feature's score and same-object picks, into the running top-ks."""
    if not batch:
        return
    device = tally.device
    pixels = torch.stack([b.pixels for b in batch]).to(device)
    coverage, kinds, present = _batch_objects(batch)
    starts = [0 if bg else 1 for bg in tally.background]
    eligible = torch.stack([present[:, s:].sum(-1) >= 2 for s in starts])  # [V, B]
    chances = torch.stack([_chances(kinds[:, s:], present[:, s:]) for s in starts])  # [V, B, 2]
    coverage, kinds, absent = coverage.to(device), kinds.to(device), ~present.to(device)[..., None]
    area = coverage.sum(-1, keepdim=True).clamp_min(1e-9)  # [B, K, 1]
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer(layer, x, qkv):
        projected = tally.features.projected(layer, x, qkv, tally.prefix_tokens)  # [B, T, 2F]
        means = (coverage @ projected) / area  # [B, K, 2F]
        out[layer] = (feature_scores(projected), _same_picks(means, absent, kinds, starts, tally.match))

    tally.features.run(tally.model, pixels, on_layer)
    layers, width = tally.features.layers, 2 * len(tally.match)
    scores = torch.cat([out[layer][0] for layer in layers], 1).reshape(len(batch), -1)  # [B, F]
    same = torch.cat([out[layer][1] for layer in layers], 2)
    same = same.reshape(len(tally.background), len(batch), -1, len(tally.match)).float()  # [V, B, F, M]
    positions = torch.arange(tally.seen, tally.seen + len(batch), device=device)
    for i, top in enumerate(tally.tops):
        chance = chances[i][:, [MATCHES.index(m) for m in tally.match]].to(device)[:, None].expand_as(same[i])
        payload = torch.stack([same[i], chance], -1).reshape(len(batch), -1, width).transpose(0, 1)
        top.update(scores.T * eligible[i].to(device), positions, payload)  # score 0: never kept
        tally.used[i] += int(eligible[i].sum())
    tally.seen += len(batch)
    batch.clear()


def _results(tally: _Tally, weights: np.ndarray, k: int, seconds: float) -> dict[tuple[bool, str], SameObject]:
    """Each variant's :class:`SameObject` from its top-k: P(same) and chance per feature over the kept images,
    then s_n-weighted per head (``weights [L', H, r]``) and averaged per layer."""
    shape = (*tally.features.shape, k)
    results = {}
    for bg, top, n_used in zip(tally.background, tally.tops, tally.used):
        top = top.cpu()
        valid = (top.position >= 0).reshape(shape).numpy()
        payload = top.payload.reshape(*shape, len(tally.match), 2).numpy()
        count = valid.sum(-1)
        for m, name in enumerate(tally.match):
            with np.errstate(invalid="ignore", divide="ignore"):
                same = np.where(valid, payload[..., m, 0], 0).sum(-1) / count
                chance = np.where(valid, payload[..., m, 1], 0).sum(-1) / count
            same[count == 0] = np.nan
            chance[count == 0] = np.nan
            per_head, chance_head = _weighted(same, weights), _weighted(chance, weights)
            results[bg, name] = SameObject(tally.features.layers, k, same, chance, per_head, chance_head,
                                           np.nanmean(per_head, 1), np.nanmean(chance_head, 1), n_used,
                                           tally.seen + tally.skipped - n_used, seconds, bg, name)
    return results


@torch.no_grad()
def same_object_variants(model, svd: QKSVD, dataset: Sequence, k: int = 5, layers=None, batch_size: int = 16,
                         min_tokens: float = 0.5, background: Sequence[bool] = (False, True),
                         match: Sequence[str] = MATCHES) -> dict[tuple[bool, str], SameObject]:
    """P(query and key features pick the same object) per layer for every ``(background, match)`` asked for,
    from one forward pass per batch; see the module docstring. Returns ``{(background, match): SameObject}``.

    ``dataset``: a sequence of items with ``.image`` (PIL), ``.objects`` (instance label map, 0 = background)
    and, for ``match="kind"``, ``.kinds`` (label -> kind); e.g. generated scenes
    (``qklib.core.datasets.o3.generate_scenes``) or ``qklib.core.datasets.ade20k.load_ade20k(root)``. Streams: memory
    does not grow with its length. The top-k of each background setting is taken over the images it can use (two or more
    objects).
    """
    background, match = _check_variants(k, background, match)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, None, None, device=device, model=model)  # projections read from q, k
    tops = [RunningTopK(features.count, k, payload_dtype=torch.float32, payload_width=2 * len(match), device=device)
            for _ in background]
    tally = _Tally(model, device, features, info(model).prefix_tokens, background, match, tops, [0] * len(background))
    transform, start, batch = model_transform(model), time.perf_counter(), []
    for item in dataset:
        pending = _pending(model, item, transform, min_tokens, tally)
        if pending is not None:
            batch.append(pending)
        if len(batch) == batch_size:
            _flush(tally, batch)
    _flush(tally, batch)
    if max(tally.used, default=0) == 0:
        raise ImageError("no image had two or more objects large enough to compare; check the masks")
    return _results(tally, svd.S[features.layers].numpy(), k, time.perf_counter() - start)


def same_object_probability(model, svd: QKSVD, dataset: Sequence, k: int = 5, layers=None, batch_size: int = 16,
                            min_tokens: float = 0.5, background: bool = False, match: str = "instance") -> SameObject:
    """P(query and key features pick the same object) per layer, one variant of :func:`same_object_variants`.

    ``background=True`` counts label 0 as an object too (:func:`token_coverage`); ``match="kind"`` counts two
    objects of one kind as the same (the items need ``.kinds``).
    """
    return same_object_variants(model, svd, dataset, k, layers, batch_size, min_tokens, (background,),
                                (match,))[bool(background), match]


def mismatched(svd: QKSVD) -> QKSVD:
    """A null for the same-object statistic that keeps everything trained but the pairing: every mode's key
    direction replaced by the next mode's of the same head (``v_n -> v_{n+1}``, cyclically), singular values and
    query directions unchanged. A high P(same) that survives this pairing comes from the features themselves
    (both maps peaking on salient objects, say), not from a mode linking a query feature to its own key feature."""
    return replace(svd, V=svd.V.roll(-1, dims=-1), notes=[*svd.notes, "key directions paired with the next mode's"])
