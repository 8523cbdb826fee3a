"""Odd-one-out scenes: the O3 dataset's layout, a loader for it, and a seeded generator that writes it.

O3 (Kotseruba et al., BMVC 2019) holds natural images, each with one odd-one-out *target* and several
similar *distractors*, plus a binary mask of each. The public release is not downloadable here, so the
book runs on generated scenes written in the same layout; a user who has O3 points ``load_o3`` at it.

Layout (``O3Layout``; every folder name is configurable)::

    root/
      images/<id>.<ext>         the scene, any image format (RGB)
      targ_images/<id>.<ext>    target mask: white (> 127) on black, same size as the image
      dist_images/<id>.<ext>    distractor mask (all distractors in one mask), same size
      objects/<id>.png          optional instance label map, uint8 (see below)

The default folder names follow the dataset authors' example files (``examples/images``,
``examples/targ_images``, ``examples/dist_images`` in github.com/ykotseruba/P3O3_metrics). If your
unpacked copy names them differently, pass ``O3Layout(images=..., targets=..., distractors=...)``.
Masks are matched to images by file stem, so a ``.jpg`` image with a ``.png`` mask is fine; JPEG masks
are thresholded at 128.

Instance label map (``objects/<id>.png``, written by ``generate_scenes`` only; O3 has none): one uint8
per pixel, ``0`` = background, ``1`` = the target, ``2, 3, ...`` = the distractors (one label per
distractor object, row-major order of the scene's array). The §5 "same-object probability" analysis
reads it; ``load_o3`` returns it as ``O3Sample.objects`` (None where the folder or file is absent).

Generated scenes: an array of objects (3x3 to 5x5 cells, some left empty, each object jittered in its
cell, no overlaps) on a varied background (uniform, gradient, smooth noise, stripes). One target differs
from the distractors in colour, shape, size or orientation (the feature cycles with the scene index).
The distractors are one kind of object but distinguishable instances: each has its own shade (hue within
``INSTANCE_HUE``, value within ``INSTANCE_VALUE`` of the kind's colour; no two objects share a paint),
size (radius within a factor ``1 +- INSTANCE_SIZE``) and rotation (within ``INSTANCE_ANGLE`` rad). These
spreads are far smaller than the target's difference in its feature (hue 0.3-0.7 turns away, radius x1.5 or
x0.62, a quarter turn or, for a triangle, a half turn), so the distractors stay closer to each other than to
the target in that feature; the target has the kind's own attributes apart from its feature.
Objects are rasterised without anti-aliasing, so the masks are exactly the pixels painted, one paint per
object. Scene ``i`` depends only on ``(seed, i)``: the first k scenes of a run of n are the scenes of a
run of k. A ``scenes.csv`` manifest records each scene's feature, shapes, background and, in column
``instances`` (JSON, decoded by the loader into ``O3Sample.info["instances"]``), every object's label,
paint, radius and angle.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import IMAGE_SUFFIXES, LazyItems, images_by_stem

FEATURES = ("colour", "shape", "size", "orientation")
SHAPES = ("disc", "square", "triangle", "cross", "ellipse", "bar")
ORIENTED_SHAPES = ("ellipse", "bar", "triangle")
BACKGROUNDS = ("uniform", "gradient", "noise", "stripes")
MANIFEST = "scenes.csv"
# Per-distractor spread around the kind's attributes: the hue (turns), HSV value, radius factor and angle (rad).
INSTANCE_HUE, INSTANCE_VALUE, INSTANCE_SIZE, INSTANCE_ANGLE = 0.03, 0.08, 0.06, math.radians(8)


class O3Error(ValueError):
    """An O3 folder or file that cannot be used; the message lists what is missing and what to do."""


@dataclass(frozen=True)
class O3Layout:
    """Folder names under an O3 root (see the module docstring)."""

    images: str = "images"
    targets: str = "targ_images"
    distractors: str = "dist_images"
    objects: str = "objects"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
                raise O3Error(f"O3Layout.{f.name} must be a folder name relative to the O3 root, got {value!r}")


@dataclass
class O3Sample:
    """One scene. ``target``/``distractor``: ``[H, W]`` bool; ``objects``: ``[H, W]`` uint8 labels or None."""

    id: str
    image: Image.Image
    target: np.ndarray
    distractor: np.ndarray
    objects: np.ndarray | None = None
    info: dict = field(default_factory=dict)  # generator metadata (feature, shapes, instances, ...); empty for O3

    @property
    def kinds(self) -> dict[int, int] | None:
        """The kind of each object label of a generated scene's label map, as ``{label: kind}``: 0 background,
        1 the target, 2 every distractor (one kind, many instances). None without a label map (O3 itself has
        none)."""
        if self.objects is None:
            return None
        return {int(label): min(int(label), 2) for label in np.unique(self.objects)}


def _read_mask(path: Path, shape: tuple[int, int], what: str) -> np.ndarray:
    mask = np.asarray(Image.open(path).convert("L")) > 127
    if mask.shape != shape:
        raise O3Error(f"{what} mask {str(path)!r} is {mask.shape[1]}x{mask.shape[0]} px but its image is "
                      f"{shape[1]}x{shape[0]}; masks must have the image's size")
    return mask


def _read_manifest(root: Path) -> dict[str, dict]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    for row in rows.values():
        if row.get("instances"):
            row["instances"] = json.loads(row["instances"])
    return rows


class O3Set(LazyItems):
    """The scenes of an O3-layout folder, read lazily (O3 has ~2000 large photos): ``len``, index, iterate."""

    def __init__(self, root: Path, layout: O3Layout, ids: list[str], files: dict[str, tuple[Path, Path, Path, Path | None]]):
        self.root, self.layout, self.ids, self._files = root, layout, ids, files
        self._manifest = _read_manifest(root)

    def read(self, key: str) -> O3Sample:
        image_path, target_path, distractor_path, objects_path = self._files[key]
        with Image.open(image_path) as handle:
            image = handle.convert("RGB")
        shape = (image.height, image.width)
        target = _read_mask(target_path, shape, "target")
        distractor = _read_mask(distractor_path, shape, "distractor")
        objects = None
        if objects_path is not None:
            objects = np.asarray(Image.open(objects_path))
            if objects.shape != shape or objects.dtype != np.uint8:
                raise O3Error(f"label map {str(objects_path)!r} must be uint8 of the image's size {shape}")
        return O3Sample(key, image, target, distractor, objects, dict(self._manifest.get(key, {})))

    def __repr__(self) -> str:
        return f"O3Set({str(self.root)!r}, {len(self)} scenes)"


def load_o3(root: str | Path, layout: O3Layout | None = None, ids: Sequence[str] | None = None,
            limit: int | None = None, seed: int | None = None) -> O3Set:
    """The scenes under ``root`` in ``layout``, checked up front, read lazily.

    ``ids``: only these scenes (in this order). ``limit``: at most this many, the first in sorted order,
    or a random choice when ``seed`` is given. Raises O3Error listing missing folders or masks.
    """
    layout = layout or O3Layout()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise O3Error(f"O3 folder {str(root)!r} does not exist")
    expected = {"images": layout.images, "target masks": layout.targets, "distractor masks": layout.distractors}
    missing = [f"{name}/ ({what})" for what, name in expected.items() if not (root / name).is_dir()]
    if missing:
        present = sorted(p.name + "/" for p in root.iterdir() if p.is_dir()) or ["no folders"]
        raise O3Error(
            f"{str(root)!r} does not match the O3 layout: missing {', '.join(missing)}; found {', '.join(present)}. "
            "If your copy uses other folder names pass O3Layout(images=..., targets=..., distractors=...); if the "
            "release unpacked into a subfolder, point at that folder"
        )
    images = images_by_stem(root / layout.images)
    if not images:
        raise O3Error(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(root / layout.images)!r}")
    targets, distractors = images_by_stem(root / layout.targets), images_by_stem(root / layout.distractors)
    objects = images_by_stem(root / layout.objects)
    chosen = list(images) if ids is None else [str(i) for i in ids]
    problems = []
    unknown = [i for i in chosen if i not in images]
    if unknown:
        problems.append(f"{len(unknown)} requested id(s) have no image in {layout.images}/: {', '.join(unknown[:5])}")
    for name, found in ((layout.targets, targets), (layout.distractors, distractors)):
        lacking = [i for i in chosen if i in images and i not in found]
        if lacking:
            problems.append(f"{len(lacking)} image(s) have no mask in {name}/: {', '.join(lacking[:5])}"
                            + (" ..." if len(lacking) > 5 else ""))
    if problems:
        raise O3Error(f"O3 folder {str(root)!r} is incomplete: " + "; ".join(problems)
                      + ". Each image needs a target and a distractor mask with the same file stem")
    if limit is not None:
        if limit < 1:
            raise O3Error(f"limit must be >= 1, got {limit}")
        if seed is not None and limit < len(chosen):
            picks = np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False)
            chosen = [chosen[i] for i in sorted(picks)]
        else:
            chosen = chosen[:limit]
    files = {i: (images[i], targets[i], distractors[i], objects.get(i)) for i in chosen}
    return O3Set(root, layout, chosen, files)


# ---------------------------------------------------------------- generator


def _shape_mask(shape: str, radius: float, angle: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels (offsets ``u``, ``v`` from the centre, image axes) inside ``shape`` rotated by ``angle`` rad."""
    cos, sin = math.cos(angle), math.sin(angle)
    a, b = u * cos + v * sin, -u * sin + v * cos
    if shape == "disc":
        return a * a + b * b <= radius * radius
    if shape == "ellipse":
        return (a / radius) ** 2 + (b / (0.5 * radius)) ** 2 <= 1
    if shape == "bar":
        return (np.abs(a) <= radius) & (np.abs(b) <= 0.4 * radius)
    if shape == "cross":
        return ((np.abs(a) <= radius) & (np.abs(b) <= 0.3 * radius)) | ((np.abs(b) <= radius) & (np.abs(a) <= 0.3 * radius))
    sides = {"square": 4, "triangle": 3}[shape]
    # A regular polygon with circumradius ``radius``; edge normals start straight down so a triangle points up.
    inside = np.ones(a.shape, dtype=bool)
    apothem = radius * math.cos(math.pi / sides)
    start = math.pi / 2 if sides == 3 else math.pi / 4
    for k in range(sides):
        phi = start + 2 * math.pi * k / sides
        inside &= a * math.cos(phi) + b * math.sin(phi) <= apothem
    return inside


def _colour(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    dark = rng.random() < 0.5
    base_value = rng.uniform(0.12, 0.3) if dark else rng.uniform(0.7, 0.9)
    first = _colour(rng.random(), rng.uniform(0, 0.25), base_value)
    second = _colour(rng.random(), rng.uniform(0, 0.25), np.clip(base_value + rng.uniform(-0.1, 0.1), 0, 1))
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if kind == "uniform":
        weight = np.zeros((size, size))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        weight = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle) + 0.5
    elif kind == "noise":
        coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
        weight = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)) / 255
    else:  # stripes
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.25)
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * ((x * math.cos(angle) + y * math.sin(angle)) / period))
    weight = np.clip(weight, 0, 1)[..., None]
    return (1 - weight) * first + weight * second, kind


def _paint(colour: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.round(colour), 0, 255))


def _instance_paint(rng: np.random.Generator, hue: float, saturation: float, value: float,
                    taken: set) -> tuple[int, int, int]:
    """A distractor's own shade of the kind's colour, differing from every paint in ``taken`` (then added)."""
    low, high = max(value - INSTANCE_VALUE, 0.0), min(value + INSTANCE_VALUE, 1.0)
    while True:
        paint = _paint(_colour(hue + rng.uniform(-INSTANCE_HUE, INSTANCE_HUE), saturation, rng.uniform(low, high)))
        if paint not in taken:
            taken.add(paint)
            return paint


@dataclass(frozen=True)
class _Look:
    """How a scene's objects look: the distractors' shape, paint (from hue, saturation, value), radius and angle,
    and the target's, which differ from them in the scene's one feature."""

    shape: str
    target_shape: str
    hue: float
    saturation: float
    value: float
    target_paint: tuple[int, int, int]
    radius: float
    target_radius: float
    angle: float
    target_angle: float


def _layout(rng: np.random.Generator, feature: str, size: int) -> tuple[int, float, np.ndarray, int]:
    """``(cells per side, cell size px, occupied cells, the target's cell)``: a 3x3 to 5x5 array, about 80 %
    of its cells occupied, at least four."""
    cells_per_side = int(rng.integers(3, 6))
    if feature == "size" and cells_per_side == 5:
        cells_per_side = 4  # a shrunken target in a 5x5 array would be about one token wide
    keep = rng.random(cells_per_side ** 2) < 0.8
    while keep.sum() < 4:  # a target and at least three distractors
        keep[rng.integers(keep.size)] = True
    cells = np.flatnonzero(keep)
    return cells_per_side, size / cells_per_side, cells, int(rng.choice(cells))


def _look(rng: np.random.Generator, feature: str, cell: float) -> _Look:
    """The scene's :class:`_Look`, the target odd in ``feature`` (the draws in a fixed order: scenes stay as they
    were for a given seed)."""
    shape = str(rng.choice(ORIENTED_SHAPES if feature == "orientation" else SHAPES))
    target_shape = str(rng.choice([s for s in SHAPES if s != shape])) if feature == "shape" else shape
    hue, saturation, value = rng.random(), rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0)
    target_paint = _paint(_colour(hue, saturation, value))
    if feature == "colour":
        target_paint = _paint(_colour(hue + rng.uniform(0.3, 0.7), rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0)))
    radius = cell * rng.uniform(0.28, 0.33)
    target_radius = radius
    if feature == "size":
        target_radius = min(radius * 1.5, cell * 0.47) if rng.random() < 0.6 else radius * 0.62
    angle = rng.uniform(0, math.pi)
    target_angle = angle
    if feature == "orientation":
        target_angle = angle + (math.pi / 3 if shape == "triangle" else math.pi / 2)
    return _Look(shape, target_shape, hue, saturation, value, target_paint, radius, target_radius, angle, target_angle)


def _draw_objects(rng: np.random.Generator, variation: np.random.Generator, look: _Look, cells: np.ndarray,
                  target_cell: int, cells_per_side: int, cell: float, rgb: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Paint every object into ``rgb`` and ``labels`` (in place; target label 1, distractors 2.. in reading
    order) and return one dict per object, by label. Each distractor's own paint, size and angle come from
    ``variation``, a stream of their own, so that the layout draws from ``rng`` stay in step."""
    size = labels.shape[0]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    taken, instances, next_label = {look.target_paint}, {}, 2
    for c in cells:  # row-major, so distractor labels follow reading order
        row, col = divmod(int(c), cells_per_side)
        if int(c) == target_cell:
            label, kind, r, a, paint = 1, look.target_shape, look.target_radius, look.target_angle, look.target_paint
        else:
            label, kind, next_label = next_label, look.shape, next_label + 1
            paint = _instance_paint(variation, look.hue, look.saturation, look.value, taken)
            r = look.radius * (1 + variation.uniform(-INSTANCE_SIZE, INSTANCE_SIZE))
            a = look.angle + variation.uniform(-INSTANCE_ANGLE, INSTANCE_ANGLE)
        slack = max(cell / 2 - r * 1.05 - 1, 0)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        inside = _shape_mask(kind, r, a, xs - cx, ys - cy) & (labels == 0)
        labels[inside] = label
        rgb[inside] = paint
        instances[label] = {"label": label, "paint": list(paint), "radius": round(r, 2),
                            "angle": round(math.degrees(a), 1)}
    return [instances[label] for label in sorted(instances)]


def render_scene(seed: int, index: int, size: int = 224) -> tuple[np.ndarray, np.ndarray, dict]:
    """Scene ``index`` of ``seed`` -> ``(rgb [S, S, 3] uint8, labels [S, S] uint8, info)``.

    ``labels``: 0 background, 1 target, 2.. distractors. ``info``: feature, shapes, background, and
    ``instances``: one dict per object (``label``, ``paint`` RGB, ``radius`` px, ``angle`` degrees), the target first.
    """
    rng = np.random.default_rng([seed, index])
    feature = FEATURES[index % len(FEATURES)]
    cells_per_side, cell, cells, target_cell = _layout(rng, feature, size)
    look = _look(rng, feature, cell)
    rgb, background = _background(rng, size)
    labels = np.zeros((size, size), dtype=np.uint8)
    instances = _draw_objects(rng, np.random.default_rng([seed, index, 1]), look, cells, target_cell, cells_per_side,
                              cell, rgb, labels)
    info = {"feature": feature, "shape": look.shape, "target_shape": look.target_shape, "objects": len(cells),
            "grid": cells_per_side, "background": background, "instances": instances}
    return np.clip(rgb, 0, 255).round().astype(np.uint8), labels, info


def generate_scenes(root: str | Path, n: int, seed: int = 0, size: int = 224, layout: O3Layout | None = None) -> O3Set:
    """Write ``n`` odd-one-out scenes (``size`` px square) in the O3 layout under ``root`` and return them.

    Deterministic in ``(seed, index)``. ``root`` must be empty, missing, or a folder this function wrote
    before (it has ``scenes.csv``); scenes listed there but not rewritten now are removed, so the folder
    always holds exactly this run's scenes.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer >= 32 px, got {size!r}")
    layout = layout or O3Layout()
    root = Path(root).expanduser()
    old = _read_manifest(root)
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise O3Error(f"{str(root)!r} is not empty and was not written by generate_scenes (no {MANIFEST}); "
                      "choose an empty or new folder so no data is overwritten")
    folders = [root / name for name in (layout.images, layout.targets, layout.distractors, layout.objects)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    ids = [f"scene_{i:05d}" for i in range(n)]
    for stale in set(old) - set(ids):
        for folder in folders:
            (folder / f"{stale}.png").unlink(missing_ok=True)
    rows = []
    for index, key in enumerate(ids):
        rgb, labels, info = render_scene(seed, index, size)
        Image.fromarray(rgb).save(folders[0] / f"{key}.png")
        Image.fromarray(((labels == 1) * 255).astype(np.uint8)).save(folders[1] / f"{key}.png")
        Image.fromarray(((labels >= 2) * 255).astype(np.uint8)).save(folders[2] / f"{key}.png")
        Image.fromarray(labels).save(folders[3] / f"{key}.png")
        rows.append({"id": key, "seed": seed, "index": index, "size": size, **info,
                     "instances": json.dumps(info["instances"], separators=(",", ":"))})
    with (root / MANIFEST).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return load_o3(root, layout, ids=ids)
