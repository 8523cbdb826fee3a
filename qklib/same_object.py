"""Do a mode's query and key features land on the same object? (paper §5, Fig 6)

For every layer, head, mode and sign, take the mode's top-k images (by the optimal-image score of
``qklib.search``) from a set of images with object masks. In each, the *query object* is the object with the
largest mean projection ``sign * x_i . u_n`` over its tokens and the *key object* the one with the largest
mean ``sign * x_j . v_n``. P_n = fraction of the top images where they coincide (both signs pooled, each a
separate feature as in ``qklib.search``). Per head the paper weights modes by singular value as in §4.2:
``P_head = sum_n (s_n / sum_m s_m) P_n`` (over modes with at least one scored image); per layer, the mean
over heads.

Objects are the non-zero labels of an instance label map (0 = background/unlabelled, left out). Each
object's mean projection is area-weighted over the tokens it covers (the label map is resized and
centre-cropped exactly like the image, nearest neighbour, then the fraction of each token's 14 x 14 patch
the object covers is its weight). Objects covering less than ``min_tokens`` tokens' worth of area are
ignored; images with fewer than two such objects are skipped (the answer would be trivially "same").
Chance: if the two objects were picked at random among an image's K objects, P = 1/K; the same weighting
gives the chance level per layer.

Data: generated odd-one-out scenes (``qklib.o3.generate_scenes``, whose ``objects/`` label maps hold
1 = target, 2.. = distractors) by default, or an ADE20K folder (``qklib.ade20k.load_ade20k``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .core.images import ImageError, model_transform, view_steps
from .core.models import info
from .core.svd import QKSVD
from .search import Features, RunningTopK, feature_scores


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

@dataclass
class SameObject:
    """Same-object statistics.

    ``same``: ``[L', H, r, 2]`` P_n per feature (sign axis +1, -1), NaN where no image scored above 0.
    ``chance``: same shape, mean 1/K over those images. ``per_head``, ``chance_head``: ``[L', H]`` after
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


def _weighted(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``values [L, H, r, 2]`` (NaN = no data), ``weights [L, H, r]`` -> ``[L, H]`` s_n-weighted mean."""
    w = np.broadcast_to(weights[..., None], values.shape)
    valid = ~np.isnan(values)
    total = np.where(valid, w, 0).sum((2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, values * w, 0).sum((2, 3)) / total


@torch.no_grad()
def same_object_probability(model, svd: QKSVD, dataset: Sequence, k: int = 5, layers=None, batch_size: int = 16,
                            min_tokens: float = 0.5, background: bool = False) -> SameObject:
    """P(query and key features pick the same object) per layer; see the module docstring.

    ``dataset``: a sequence of items with ``.image`` (PIL) and ``.objects`` (instance label map, 0 = background),
    e.g. generated scenes (``qklib.o3.generate_scenes``) or ``qklib.ade20k.load_ade20k(root)``. Streams: memory does not grow with its length.
    ``background=True`` counts label 0 as an object too (:func:`token_coverage`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    meta = info(model)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, None, None, device=device, model=model)  # projections read from q, k
    transform = model_transform(model)
    top = RunningTopK(features.count, k, payload_dtype=torch.float32, payload_width=2, device=device)
    used = skipped = 0
    start = time.perf_counter()
    batch: list[tuple[torch.Tensor, np.ndarray]] = []

    def flush():
        nonlocal used
        if not batch:
            return
        pixels = torch.stack([p for p, _ in batch]).to(device)
        count = max(len(c) for _, c in batch)
        coverage = torch.zeros(len(batch), count, batch[0][1].shape[1])
        for row, (_, cov) in enumerate(batch):
            coverage[row, : len(cov)] = torch.from_numpy(cov)
        coverage = coverage.to(device)
        present = coverage.sum(-1, keepdim=True)  # [B, K, 1]; 0 for padding
        objects = (present[..., 0] > 0).sum(1).float()  # [B]
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def on_layer(layer, x, qkv):
            projected = features.projected(layer, x, qkv, meta.prefix_tokens)  # [B, T, 2F]
            means = (coverage @ projected) / present.clamp_min(1e-9)  # [B, K, 2F]
            f = projected.shape[-1] // 2
            hi = means.masked_fill(present == 0, float("-inf"))
            lo = means.masked_fill(present == 0, float("inf"))
            same_pos = hi[..., :f].argmax(1) == hi[..., f:].argmax(1)  # [B, F]
            same_neg = lo[..., :f].argmin(1) == lo[..., f:].argmin(1)
            out[layer] = (feature_scores(projected), torch.stack([same_pos, same_neg], -1).float())

        features.run(model, pixels, on_layer)
        scores = torch.cat([out[layer][0] for layer in features.layers], 1).reshape(len(batch), -1)  # [B, F]
        same = torch.cat([out[layer][1] for layer in features.layers], 1).reshape(len(batch), -1)
        chance = (1.0 / objects)[:, None].expand_as(same)
        payload = torch.stack([same, chance], -1).transpose(0, 1)  # [F, B, 2]
        top.update(scores.T, torch.arange(used, used + len(batch), device=device), payload)
        used += len(batch)
        batch.clear()

    for item in dataset:
        labels = getattr(item, "objects", None)
        if labels is None:
            raise ImageError(f"image {getattr(item, 'id', '?')!r} has no object label map; same-object "
                             "probability needs instance masks (generated scenes or ADE20K)")
        coverage, ids = token_coverage(model, labels, min_tokens, background)
        if len(ids) < 2:
            skipped += 1
            continue
        batch.append((transform(item.image.convert("RGB")), coverage))
        if len(batch) == batch_size:
            flush()
    flush()
    if used == 0:
        raise ImageError("no image had two or more objects large enough to compare; check the masks")
    shape = (*features.shape, k)
    top = top.cpu()
    valid = (top.position >= 0).reshape(shape)
    payload = top.payload.reshape(*shape, 2).numpy()
    count = valid.sum(-1).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        same = np.where(valid.numpy(), payload[..., 0], 0).sum(-1) / count
        chance = np.where(valid.numpy(), payload[..., 1], 0).sum(-1) / count
    same[count == 0] = np.nan
    chance[count == 0] = np.nan
    weights = svd.S[features.layers].numpy()
    per_head, chance_head = _weighted(same, weights), _weighted(chance, weights)
    return SameObject(features.layers, k, same, chance, per_head, chance_head, np.nanmean(per_head, 1),
                      np.nanmean(chance_head, 1), used, skipped, time.perf_counter() - start)
