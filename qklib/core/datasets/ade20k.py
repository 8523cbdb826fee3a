"""ADE20K with instance label maps, for the same-object probability (paper §5, Fig 6).

ADE20K segments everything in a scene (sky, wall and floor are objects too). :func:`load_ade20k` reads
the full release, the ADEChallengeData2016 instance or semantic annotations, or any ``images/`` +
``objects/`` folder pair, lazily, as :class:`MaskedImage` items. Where the files name each instance's class
(the full release and the instance annotations), an item's ``kinds`` maps its object labels to classes, so the
same-object probability can also ask whether two objects are of one kind (``qklib.analyses.same_object``,
``match="kind"``); semantic maps (one object per class already) and plain label folders carry no kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import ImageError, images_by_stem

_recursive = partial(images_by_stem, recursive=True)


@dataclass
class MaskedImage:
    """One image with an instance label map ``objects [H, W]`` (int; 0 = background, 1.. = objects) and, where the
    files name classes, ``kinds``: object label -> class id (None otherwise)."""

    id: str
    image: Image.Image
    objects: np.ndarray
    kinds: dict[int, int] | None = None


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
        labels, kinds = decode_ade_classes(mask_path, self.kind)
        if labels.shape != (image.height, image.width):
            raise ImageError(f"mask {str(mask_path)!r} is {labels.shape[::-1]} but its image is {image.size}")
        return MaskedImage(image_path.stem, image, labels, kinds)

    def __repr__(self) -> str:
        return f"ADE20K({str(self.root)!r}, {self.kind}, {len(self)} images)"


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
                images, masks = _recursive(images_dir), _recursive(masks_dir)
                return kind, [(images[k], masks[k]) for k in sorted(images) if k in masks]
    if (root / "images").is_dir() and (root / "objects").is_dir():
        images, masks = _recursive(root / "images"), _recursive(root / "objects")
        return "labels", [(images[k], masks[k]) for k in sorted(images) if k in masks]
    return "none", []


def decode_ade_mask(path: Path, kind: str) -> np.ndarray:
    """``[H, W]`` int32 instance labels, 0 = unlabelled, from one ADE20K mask file of the given layout kind."""
    return decode_ade_classes(path, kind)[0]


def decode_ade_classes(path: Path, kind: str) -> tuple[np.ndarray, dict[int, int] | None]:
    """``(labels [H, W] int32, kinds)``: the instance labels of :func:`decode_ade_mask` and, for the layouts whose
    files name classes (``"full"``, ``"instance"``), each label's class id (the label's most frequent class);
    ``kinds`` is None for the others."""
    with Image.open(path) as handle:
        array = np.asarray(handle.convert("RGB") if kind in ("full", "instance") else handle).astype(np.int64)
    category = None
    if kind == "full":
        category = array[..., 0] // 10 * 256 + array[..., 1]
        key = np.where(category > 0, array[..., 2] + 1, 0)  # instance ids live in B; unlabelled pixels -> 0
    elif kind == "instance":
        category = array[..., 0]
        key = np.where(category > 0, array[..., 0] * 256 + array[..., 1] + 1, 0)
    else:
        key = array if array.ndim == 2 else array[..., 0]
    _, labels = np.unique(key, return_inverse=True)  # 0 stays 0 when present (it is the smallest key)
    labels = labels.reshape(key.shape).astype(np.int32)
    if not (key == 0).any():
        labels += 1
    if category is None:
        return labels, None
    pairs, counts = np.unique(np.stack([labels.ravel(), category.ravel()]), axis=1, return_counts=True)
    kinds: dict[int, int] = {}
    for (label, cls), _ in sorted(zip(pairs.T.tolist(), counts.tolist()), key=lambda pair: pair[1]):
        if label != 0:
            kinds[label] = cls  # the most frequent class comes last and wins
    return labels, kinds


def load_ade20k(root: str | Path, split: str = "validation", limit: int | None = None) -> ADE20K:
    """An ADE20K folder as a lazy sequence of :class:`MaskedImage` (see :class:`ADE20K` for the layouts)."""
    return ADE20K(root, split, limit)
