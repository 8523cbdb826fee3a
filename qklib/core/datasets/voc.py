"""Pascal VOC's segmentation annotations, for §8's segmentation measurements on a copy the user has.

Nothing is downloaded: point :func:`load_voc` at the folder of one VOC year (``VOCdevkit/VOC2012``), which holds::

    JPEGImages/<id>.jpg              the photos
    SegmentationObject/<id>.png      palette PNG: 0 background, 1..K one index per object instance, 255 void
    SegmentationClass/<id>.png       palette PNG: 0 background, 1..20 the class (``VOC_CLASSES``), 255 void
    ImageSets/Segmentation/<split>.txt   optional: the ids of each split (train, val, trainval)

Only the images with a ``SegmentationObject`` PNG are annotated (2,913 of VOC2012's 17,125). The PNGs' pixel
values are palette indices (the colours are only for viewing), so a mask saved as an RGB picture is refused.
Void (255: object borders and ambiguous pixels) becomes ``VOID = -1`` in the returned maps, so that label maps
keep qklib's convention (0 background, 1.. objects, negative ignored): ``qklib.analyses.segmentation.miou`` and
``foreground_iou`` skip those pixels, and ``qklib.analyses.same_object`` never counts them as an object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import ImageError, LazyItems, images_by_stem

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
FOLDERS = ("JPEGImages", "SegmentationObject", "SegmentationClass")
SPLITS = Path("ImageSets") / "Segmentation"
VOID_INDEX, VOID = 255, -1


@dataclass
class VOCSample:
    """One annotated VOC image. ``objects``: ``[H, W]`` int32 instance labels (0 background, 1..K, ``VOID``);
    ``classes``: ``[H, W]`` int32 class indices into ``VOC_CLASSES`` (``VOID`` likewise); ``kinds``: each
    instance's class, ``{label: class}`` (the class most of its pixels carry)."""

    id: str
    image: Image.Image
    objects: np.ndarray
    classes: np.ndarray
    kinds: dict[int, int]

    @property
    def void(self) -> np.ndarray:
        """``[H, W]`` bool: the pixels VOC leaves unlabelled (255 in the files)."""
        return self.objects == VOID


def read_index_png(path: Path, what: str) -> np.ndarray:
    """``[H, W]`` int32 palette indices of a VOC mask, 255 turned into ``VOID``; ImageError for an RGB picture."""
    with Image.open(path) as handle:
        if handle.mode not in ("P", "L"):
            raise ImageError(f"{what} {str(path)!r} is a {handle.mode} picture, not a palette PNG: VOC's masks store "
                             "one palette index per pixel (the colours are only for viewing); use the original "
                             "PNGs, or convert colours back to indices first")
        indices = np.asarray(handle).astype(np.int32)
    indices[indices == VOID_INDEX] = VOID
    return indices


def instance_classes(objects: np.ndarray, classes: np.ndarray) -> dict[int, int]:
    """``{instance: class}``: the most frequent class under each instance label > 0 (void pixels left out)."""
    kinds = {}
    for label in np.unique(objects[objects > 0]):
        under = classes[(objects == label) & (classes >= 0)]
        kinds[int(label)] = int(np.bincount(under).argmax()) if under.size else 0
    return kinds


class VOCSet(LazyItems):
    """The annotated images of a VOC folder, read lazily: ``len``, index, iterate (items are :class:`VOCSample`)."""

    def __init__(self, root: Path, ids: list[str], images: dict[str, Path]):
        self.root, self.ids, self._images = root, ids, images

    def read(self, key: str) -> VOCSample:
        with Image.open(self._images[key]) as handle:
            image = handle.convert("RGB")
        objects = read_index_png(self.root / FOLDERS[1] / f"{key}.png", "object mask")
        classes = read_index_png(self.root / FOLDERS[2] / f"{key}.png", "class mask")
        for name, mask in (("object", objects), ("class", classes)):
            if mask.shape != (image.height, image.width):
                raise ImageError(f"the {name} mask of {key!r} is {mask.shape[1]}x{mask.shape[0]} px but its image is "
                                 f"{image.width}x{image.height}; masks must have the image's size")
        return VOCSample(key, image, objects, classes, instance_classes(objects, classes))

    def __repr__(self) -> str:
        return f"VOCSet({str(self.root)!r}, {len(self)} images)"


def _layout_error(root: Path) -> ImageError:
    missing = [f"{name}/" for name in FOLDERS if not (root / name).is_dir()]
    # Three levels down covers VOCdevkit/VOC2012 and VOCtrainval/VOCdevkit/VOC2012 without walking 17,000 files.
    nested = sorted({p.parent for pattern in ("*", "*/*", "*/*/*") for p in root.glob(f"{pattern}/{FOLDERS[0]}")
                     if p.is_dir() and (p.parent / FOLDERS[1]).is_dir()})
    hint = (f"the VOC folders are under {', '.join(repr(str(p)) for p in nested[:3])}: point at that folder"
            if nested else "point at the folder of one VOC year, e.g. VOCdevkit/VOC2012")
    found = sorted(p.name + "/" for p in root.iterdir() if p.is_dir()) or ["no folders"]
    return ImageError(f"{str(root)!r} is not a Pascal VOC folder: missing {', '.join(missing)} (found "
                      f"{', '.join(found)}); {hint}")


def _split_ids(root: Path, split: str) -> list[str]:
    path = root / SPLITS / f"{split}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in (root / SPLITS).glob("*.txt")) or ["none"]
        raise ImageError(f"no split {split!r} in {str(root)!r}: {SPLITS / (split + '.txt')} is missing (splits "
                         f"there: {', '.join(known)}); pass split=None for every annotated image")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_voc(root: str | Path, split: str | None = None, limit: int | None = None) -> VOCSet:
    """The annotated images of a VOC folder (see the module docstring), checked up front, read lazily.

    ``split``: the ids of ``ImageSets/Segmentation/<split>.txt`` (e.g. ``"val"``), None for every image with an
    object mask; ``limit``: the first ``limit`` of them. ImageError names what is missing and what to do.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImageError(f"VOC folder {str(root)!r} does not exist")
    if not all((root / name).is_dir() for name in FOLDERS):
        raise _layout_error(root)
    images = images_by_stem(root / FOLDERS[0])
    objects, classes = images_by_stem(root / FOLDERS[1]), images_by_stem(root / FOLDERS[2])
    ids = sorted(objects) if split is None else _split_ids(root, split)
    problems = [f"{len(lacking)} id(s) without {what}: {', '.join(lacking[:5])}" for what, lacking in (
        (f"an image in {FOLDERS[0]}/", [i for i in ids if i not in images]),
        (f"a mask in {FOLDERS[1]}/", [i for i in ids if i not in objects]),
        (f"a mask in {FOLDERS[2]}/", [i for i in ids if i not in classes])) if lacking]
    if problems:
        raise ImageError(f"VOC folder {str(root)!r} is incomplete: " + "; ".join(problems)
                         + ". Each annotated image needs its photo and both masks, with the same file stem")
    if not ids:
        raise ImageError(f"no annotated images in {str(root)!r}: {FOLDERS[1]}/ holds no PNG masks")
    if limit is not None:
        if limit < 1:
            raise ImageError(f"limit must be >= 1, got {limit}")
        ids = ids[:limit]
    return VOCSet(root, ids, {i: images[i] for i in ids})
