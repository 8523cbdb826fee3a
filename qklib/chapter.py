"""What the book's chapters share: their declared parameters and one call that checks them, the gallery and
generated scenes on disk, and results cached by their inputs.

Each chapter's parameters are declared once, in :data:`SPECS`; the chapter's ``parameters`` cell holds their
defaults (papermill overrides them) and its next cell calls ``p = chapter.check("s4_cosine", globals())``.
A wrong value stops the run there, with a message that names the parameter and says what to pass; the
book builder refuses a parameter name that the chapter does not declare before anything runs.

Parameter names are the same in every chapter: ``models``, ``image_dir``, ``max_images``, ``n_scenes``,
``batch_size``, ``device``, ``seed``, ``results_dir``, ``live_explorer``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from .core.files import atomic_write
from .core.images import images_by_stem, load_folder, open_rgb, shipped_photos
from .core.models import ModelError, check_name, load_model, random_control
from .o3 import O3Error, O3Layout, O3Set, generate_scenes
from .present.lab import use_served_vega


class ParameterError(ValueError):
    """A notebook parameter with a wrong value; the message names the parameter and what to pass."""


# --- checkers: (parameter name, value) -> normalised value, or ParameterError ------------------------------

def model_spec(spec) -> tuple[str, str | None, bool]:
    """One entry of a chapter's ``models`` parameter -> ``(name, weights, random_init)``.

    An entry is a model name (``"vit_base_patch16_224.dino"``), ``"random:NAME"`` for the random-init
    control of NAME's architecture, or ``{"name": ..., "weights": "file.safetensors"}``.
    """
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "weights"}
        if "name" not in spec or unknown:
            raise ParameterError(f"models entry {spec!r}: use {{'name': 'arch.tag', 'weights': 'path'}}")
        return str(spec["name"]), spec.get("weights") or None, False
    if not isinstance(spec, str) or not spec:
        raise ParameterError(f"models entry {spec!r}: give a model name string, 'random:NAME', or a dict")
    if spec.startswith("random:"):
        return spec[len("random:"):], None, True
    return spec, None, False


def check_models(models, name: str = "models", most: int | None = None) -> list[tuple[str, str | None, bool]]:
    """Validate a ``models`` parameter (names known to timm, weights files present) before any loading."""
    if isinstance(models, str | dict):
        models = [models]
    if not isinstance(models, list | tuple) or not models:
        raise ParameterError(f"parameter {name!r} must be a non-empty list of model names, got {models!r}")
    if most is not None and len(models) > most:
        raise ParameterError(f"parameter {name!r}: this chapter draws one model at a time; give at most {most} "
                             f"entr{'y' if most == 1 else 'ies'}, got {len(models)}")
    specs = [model_spec(m) for m in models]
    for model, weights, _ in specs:
        try:
            check_name(model)
        except ModelError as error:
            raise ParameterError(f"parameter {name!r}: {error}") from None
        if weights is not None and not Path(weights).expanduser().is_file():
            raise ParameterError(f"parameter {name!r}: weights file {weights!r} for {model!r} does not exist")
    return specs


def models(most: int | None = None) -> Callable:
    return lambda name, value: check_models(value, name, most)


def count(minimum: int = 1) -> Callable:
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ParameterError(f"parameter {name!r} must be an integer >= {minimum}, got {value!r}")
        return value
    return check


def number(low: float, high: float) -> Callable:
    """A number in ``(low, high]``."""
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= high:
            raise ParameterError(f"parameter {name!r} must be a number in ({low}, {high}], got {value!r}")
        return float(value)
    return check


def folder(required: bool = False) -> Callable:
    """An existing folder, or None when the parameter is empty and not required."""
    def check(name, value):
        if value in (None, ""):
            if required:
                raise ParameterError(f"parameter {name!r} is required: give the path of a folder")
            return None
        if not isinstance(value, str | Path):
            raise ParameterError(f"parameter {name!r} must be a folder path, got {value!r}")
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ParameterError(f"parameter {name!r}: folder {str(path)!r} does not exist")
        return path.resolve()
    return check


def output_folder(name, value) -> Path:
    """A folder to write to (created when missing)."""
    if not isinstance(value, str | Path) or not str(value):
        raise ParameterError(f"parameter {name!r} must be a folder path to write results to, got {value!r}")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ParameterError(f"parameter {name!r}: {str(path)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def flag(name, value) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(f"parameter {name!r} must be True or False, got {value!r}")
    return value


def text(name, value) -> str:
    if not isinstance(value, str) or not value:
        raise ParameterError(f"parameter {name!r} must be a non-empty string, got {value!r}")
    return value


def labels(name, value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise ParameterError(f"parameter {name!r} must be a non-empty list of strings, got {value!r}")
    return list(value)


def indices(name, value):
    """``"all"``, an integer or a list of integers (0-based); checked against the model later."""
    ok = (value == "all" or (isinstance(value, int) and not isinstance(value, bool))
          or (isinstance(value, list | tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)))
    if not ok:
        raise ParameterError(f"parameter {name!r} must be 'all', an integer or a list of integers (0-based), got {value!r}")
    return value


def check_device(name, value) -> str:
    if not isinstance(value, str):
        raise ParameterError(f"parameter {name!r} must be a string such as 'cpu' or 'cuda', got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"parameter {name!r} is {value!r} but no CUDA device is available; use 'cpu'")
    try:
        torch.device(value)
    except RuntimeError as error:
        raise ParameterError(f"parameter {name!r}: {error}") from None
    return value


def o3_layout(name, value) -> O3Layout:
    if not isinstance(value, dict):
        raise ParameterError(f"parameter {name!r} must be a dict of folder names, got {value!r}")
    try:
        return O3Layout(**value)
    except (TypeError, O3Error) as error:
        raise ParameterError(f"parameter {name!r}: {error}; keys: images, targets, distractors, objects") from None


# --- the chapters' declared parameters ----------------------------------------------------------------------

COMMON = {"batch_size": count(1), "device": check_device, "seed": count(0), "results_dir": output_folder}

SPECS: dict[str, dict[str, Callable]] = {
    "s3_attention": {
        "models": models(), "o3_dir": folder(), "o3_layout": o3_layout, "max_images": count(1),
        "n_scenes": count(1), "min_cover": number(0, 1), **COMMON,
    },
    "s4_cosine": {
        "models": models(), "image_dir": folder(), "max_images": count(2), **COMMON, "live_explorer": flag,
    },
    "s5_modes": {
        "models": models(most=1), "image_dir": folder(), "max_images": count(0), "ade20k_dir": folder(),
        "ade20k_limit": count(1), "n_scenes": count(6), "top_k": count(1), "layers": indices, "heads": indices,
        "explorer_modes": count(1), "featured": labels, "walkthrough_image": text, "live_explorer": flag, **COMMON,
    },
}


def declared_parameters(notebook: str | Path) -> list[str]:
    """Names assigned in the ``parameters`` cell of a jupytext py:percent notebook (``notebooks/<name>.py``)."""
    text = Path(notebook).read_text()
    cells = re.split(r"^# %%", text, flags=re.M)
    cell = next((c for c in cells if re.match(r"[^\n]*tags\s*=\s*\[[^\]]*[\"']parameters[\"']", c)), None)
    if cell is None:
        raise ParameterError(f"{str(notebook)!r} has no cell tagged 'parameters'")
    names = []
    for node in ast.parse(cell.split("\n", 1)[1] if "\n" in cell else "").body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [target.id for target in targets if isinstance(target, ast.Name)]
    return names


def check(chapter: str, namespace: Mapping) -> SimpleNamespace:
    """Check every declared parameter of ``chapter`` found in ``namespace`` (the notebook's ``globals()``)
    and return the normalised values (folders resolved, models parsed into ``(name, weights, random)``).
    In JupyterLab started by ``make lab``, charts are then drawn with the vega it serves (offline)."""
    use_served_vega()
    if chapter not in SPECS:
        raise KeyError(f"unknown chapter {chapter!r}; chapters: {', '.join(SPECS)}")
    missing = [name for name in SPECS[chapter] if name not in namespace]
    if missing:
        raise ParameterError(f"chapter {chapter!r} is missing parameter(s) {', '.join(missing)} in its parameters cell")
    return SimpleNamespace(**{name: checker(name, namespace[name]) for name, checker in SPECS[chapter].items()})


# --- loading, the gallery and scenes on disk -------------------------------------------------------------

def load_models(specs, device: str = "cpu", seed: int = 0) -> dict:
    """Load checked model specs -> ``{label: model}``; a random-init control (seeded with ``seed``) is
    labelled by its architecture and seed."""
    loaded = {}
    for name, weights, random_init in specs:
        model = (random_control(name, seed=seed, device=device) if random_init
                 else load_model(name, weights=weights, device=device))
        loaded[model.qklib_name] = model
    return loaded


def photos(image_dir: Path | None, max_images: int, minimum: int = 2) -> dict[str, Image.Image]:
    """Up to ``max_images`` readable photos of ``image_dir`` by relative path, or the photos shipped in
    installed packages when ``image_dir`` is None."""
    found = load_folder(image_dir, limit=max_images) if image_dir else shipped_photos()
    found = dict(list(found.items())[:max_images])
    if len(found) < minimum:
        raise ParameterError(f"parameter 'image_dir': need at least {minimum} readable images, found {len(found)}")
    return found


def scenes(results_dir: Path, n: int, seed: int = 0, size: int = 224) -> O3Set:
    """``n`` generated odd-one-out scenes, written once under ``results_dir/scenes-<size>px-seed<seed>``."""
    return generate_scenes(Path(results_dir) / f"scenes-{size}px-seed{seed}", n, seed=seed, size=size)


def gallery(results_dir: Path, scene_set: O3Set | None = None) -> Path:
    """The default image gallery as a folder: the photos shipped in installed packages (``photos/``) and the
    scenes' images (``scenes/``), written under ``results_dir/gallery``; stale scene files are removed."""
    root = Path(results_dir) / "gallery"
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for name, photo in shipped_photos().items():
        target = root / "photos" / f"{name}.png"
        if not target.is_file():
            photo.save(target)
    scene_dir = root / "scenes"
    scene_dir.mkdir(exist_ok=True)
    wanted = {sample.id for sample in scene_set} if scene_set is not None else set()
    for stem, path in images_by_stem(scene_dir).items():
        if stem not in wanted:
            path.unlink()
    for sample in scene_set or ():
        target = scene_dir / f"{sample.id}.png"
        if not target.is_file():
            sample.image.save(target)
    return root


def gallery_image(name_or_path: str, root: Path, names: list[str]) -> tuple[str, Image.Image]:
    """A gallery image by file stem or relative path under ``root``, or any image file by path."""
    by_stem = {Path(n).stem: n for n in names}
    relative = by_stem.get(name_or_path) or (name_or_path if name_or_path in names else None)
    if relative is not None:
        return Path(relative).stem, open_rgb(root / relative)
    if Path(name_or_path).expanduser().is_file():
        return Path(name_or_path).stem, open_rgb(Path(name_or_path).expanduser())
    shown = ", ".join(sorted(by_stem)[:20]) + (" ..." if len(by_stem) > 20 else "")
    raise ParameterError(f"{name_or_path!r} is neither an image of the gallery under {str(root)!r} ({shown}) "
                         "nor an image file")


# --- results cached by their inputs --------------------------------------------------------------------

def file_digest(path: str | Path | None) -> str:
    """sha256 of a file's bytes ('' for None): what a cache key records for a weights file."""
    if not path:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing_digest(root: Path, names: list[str]) -> str:
    """sha256 over the relative paths, sizes and modification times of ``names`` under ``root``."""
    lines = []
    for name in names:
        stat = (Path(root) / name).stat()
        lines.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass
class Cached:
    """A result file under ``folder`` reused only when its recorded inputs equal ``key``.

    ``key`` holds everything the result depends on (model, weights digest, file listing digest, parameters,
    the result format's version), never the source code's bytes.
    """

    path: Path
    key: dict

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".key.json")

    def valid(self) -> bool:
        if not (self.path.is_file() and self.key_path.is_file()):
            return False
        try:
            return json.loads(self.key_path.read_text()) == json.loads(json.dumps(self.key))
        except ValueError:
            return False

    def store(self) -> None:
        """Record the key after the result itself has been written."""
        with atomic_write(self.key_path, "w") as stream:
            stream.write(json.dumps(self.key, indent=1))
