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
1 = target, 2.. = distractors) by default, or an ADE20K folder (:func:`load_ade20k`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import IMAGE_SUFFIXES, ImageError
from .extract import stream_layers
from .search import Features, RunningTopK, feature_scores
from .svd import QKSVD


@dataclass
class MaskedImage:
    """One image with an instance label map ``objects [H, W]`` (int; 0 = background, 1.. = objects)."""

    id: str
    image: Image.Image
    objects: np.ndarray


# --- ADE20K ------------------------------------------------------------------------------------------

class ADE20K(Sequence):
    """Images of an ADE20K folder with per-image instance label maps, read lazily.

    Layouts recognised (``root`` may be the release folder or any folder above the files):

    * full ADE20K (``ADE20K_2021_17_01`` and older ``ADE20K_2016_07_26``): ``.../ADE_val_00000001.jpg`` next
      to ``ADE_val_00000001_seg.png``; class = R / 10 * 256 + G, instance = distinct values of B. Objects
      are the instances of labelled (class > 0) pixels.
    * ADEChallengeData2016 with the instance-segmentation annotations: ``images/<split>/X.jpg`` and
      ``annotations_instance/<split>/X.png`` with R = category, G = instance id (R = 0 is unlabelled).
    * ADEChallengeData2016 semantic maps only (``annotations/<split>/X.png``, one class id per pixel): each
      class present counts as one object, so instances of a class are merged -- coarser than the paper.
    * any folder with ``images/X.<ext>`` and ``objects/X.png`` label maps (0 = background), e.g. generated
      scenes.
    """

    def __init__(self, root: str | Path, split: str = "validation", limit: int | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ImageError(f"ADE20K folder {str(root)!r} does not exist")
        self.root, self.split = root, split
        self.kind, pairs = _ade_pairs(root, split)
        if not pairs:
            raise ImageError(
                f"no ADE20K images with object masks found under {str(root)!r}: expected X.jpg next to X_seg.png "
                f"(full ADE20K), images/{split}/ + annotations_instance/{split}/ or annotations/{split}/ "
                "(ADEChallengeData2016), or images/ + objects/ label maps")
        self.pairs = pairs[:limit] if limit else pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> MaskedImage:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as handle:
            image = handle.convert("RGB")
        labels = decode_ade_mask(mask_path, self.kind)
        if labels.shape != (image.height, image.width):
            raise ImageError(f"mask {str(mask_path)!r} is {labels.shape[::-1]} but its image is {image.size}")
        return MaskedImage(image_path.stem, image, labels)

    def __repr__(self) -> str:
        return f"ADE20K({str(self.root)!r}, {self.kind}, {len(self)} images)"


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def _ade_pairs(root: Path, split: str) -> tuple[str, list[tuple[Path, Path]]]:
    segs = sorted(root.rglob("*_seg.png"))
    if segs:
        in_split = [s for s in segs if split in s.parts] or segs
        pairs = []
        for seg in in_split:
            stem = seg.name[: -len("_seg.png")]
            image = next((seg.with_name(stem + ext) for ext in (".jpg", ".jpeg", ".png") if seg.with_name(stem + ext).is_file()), None)
            if image is not None:
                pairs.append((image, seg))
        return "full", pairs
    for kind, folder_name in (("instance", "annotations_instance"), ("semantic", "annotations")):
        hits = sorted(root.rglob(folder_name))
        for folder in hits:
            images_dir = folder.parent / "images"
            masks_dir = folder / split if (folder / split).is_dir() else folder
            images_dir = images_dir / split if (images_dir / split).is_dir() else images_dir
            if images_dir.is_dir():
                images, masks = _images_in(images_dir), _images_in(masks_dir)
                return kind, [(images[k], masks[k]) for k in sorted(images) if k in masks]
    if (root / "images").is_dir() and (root / "objects").is_dir():
        images, masks = _images_in(root / "images"), _images_in(root / "objects")
        return "labels", [(images[k], masks[k]) for k in sorted(images) if k in masks]
    return "none", []


def decode_ade_mask(path: Path, kind: str) -> np.ndarray:
    """``[H, W]`` int32 instance labels, 0 = unlabelled, from one ADE20K mask file of the given layout kind."""
    with Image.open(path) as handle:
        array = np.asarray(handle.convert("RGB") if kind in ("full", "instance") else handle).astype(np.int64)
    if kind == "full":
        category = array[..., 0] // 10 * 256 + array[..., 1]
        key = np.where(category > 0, array[..., 2] + 1, 0)  # instance ids live in B; unlabelled pixels -> 0
    elif kind == "instance":
        key = np.where(array[..., 0] > 0, array[..., 0] * 256 + array[..., 1] + 1, 0)
    else:
        key = array if array.ndim == 2 else array[..., 0]
    _, labels = np.unique(key, return_inverse=True)  # 0 stays 0 when present (it is the smallest key)
    labels = labels.reshape(key.shape).astype(np.int32)
    if not (key == 0).any():
        labels += 1
    return labels


def load_ade20k(root: str | Path, split: str = "validation", limit: int | None = None) -> ADE20K:
    """An ADE20K folder as a lazy sequence of :class:`MaskedImage` (see :class:`ADE20K` for the layouts)."""
    return ADE20K(root, split, limit)


def scenes(root: str | Path, n: int, seed: int = 0, size: int = 224):
    """``n`` generated odd-one-out scenes with instance label maps, written under ``root`` (qklib.o3)."""
    from .o3 import generate_scenes

    return generate_scenes(root, n, seed=seed, size=size)


# --- label maps on the token grid ----------------------------------------------------------------------

def crop_labels(model, labels: np.ndarray) -> np.ndarray:
    """Resize and centre-crop a label map exactly like the model's image transform, nearest neighbour."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    from .images import model_transform

    mask = Image.fromarray(np.asarray(labels).astype(np.int32), mode="I")
    for step in model_transform(model).transforms:
        if isinstance(step, T.Resize):
            mask = TF.resize(mask, step.size, interpolation=T.InterpolationMode.NEAREST, max_size=step.max_size)
        elif isinstance(step, T.CenterCrop):
            mask = TF.center_crop(mask, step.size)
    return np.asarray(mask).astype(np.int32)


def token_coverage(model, labels: np.ndarray, min_tokens: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage [K, T_img], ids [K])``: fraction of each image token's patch covered by each object.

    Background (0) is left out, and so are objects covering less than ``min_tokens`` tokens in total.
    """
    from .models import info

    meta = info(model)
    cropped = crop_labels(model, labels)
    rows, cols = meta.grid
    patch_h, patch_w = cropped.shape[0] // rows, cropped.shape[1] // cols
    cropped = cropped[: rows * patch_h, : cols * patch_w]
    ids = np.unique(cropped)
    ids = ids[ids > 0]
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
                            min_tokens: float = 0.5) -> SameObject:
    """P(query and key features pick the same object) per layer; see the module docstring.

    ``dataset``: a sequence of items with ``.image`` (PIL) and ``.objects`` (instance label map, 0 = background),
    e.g. ``qklib.o3.load_o3(root)`` or :func:`load_ade20k`. Streams: memory does not grow with its length.
    """
    from .images import model_transform
    from .models import info

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    meta = info(model)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, None, None, device=device)
    transform = model_transform(model)
    top = RunningTopK(features.count, k, payload_dtype=torch.float32, payload_width=2)
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

        def on_tokens(layer, x):
            projected = x[:, meta.prefix_tokens :] @ features.projection[layer]  # [B, T, 2F]
            means = (coverage @ projected) / present.clamp_min(1e-9)  # [B, K, 2F]
            f = projected.shape[-1] // 2
            hi = means.masked_fill(present == 0, float("-inf"))
            lo = means.masked_fill(present == 0, float("inf"))
            same_pos = hi[..., :f].argmax(1) == hi[..., f:].argmax(1)  # [B, F]
            same_neg = lo[..., :f].argmin(1) == lo[..., f:].argmin(1)
            out[layer] = (feature_scores(projected), torch.stack([same_pos, same_neg], -1).float())

        stream_layers(model, pixels, features.layers, on_tokens=on_tokens)
        scores = torch.cat([out[layer][0] for layer in features.layers], 1).reshape(len(batch), -1)  # [B, F]
        same = torch.cat([out[layer][1] for layer in features.layers], 1).reshape(len(batch), -1)
        chance = (1.0 / objects)[:, None].expand_as(same)
        payload = torch.stack([same, chance], -1).transpose(0, 1)  # [F, B, 2]
        top.update(scores.T, torch.arange(used, used + len(batch)), payload)
        used += len(batch)
        batch.clear()

    for item in dataset:
        labels = getattr(item, "objects", None)
        if labels is None:
            raise ImageError(f"image {getattr(item, 'id', '?')!r} has no object label map; same-object "
                             "probability needs instance masks (generated scenes or ADE20K)")
        coverage, ids = token_coverage(model, labels, min_tokens)
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
