"""Checks for papermill parameters: a chapter's first cells call these, so a wrong parameter stops the run
at once with a message that says what to pass instead."""

from __future__ import annotations

from pathlib import Path


class ParameterError(ValueError):
    """A notebook parameter with a wrong value; the message names the parameter and what to pass."""


def model_spec(spec) -> tuple[str, str | None, bool]:
    """One entry of a chapter's ``models`` parameter -> ``(name, weights, random_init)``.

    An entry is a model name (``"vit_base_patch16_224.dino"``), ``"random:NAME"`` for the random-init
    control of NAME's architecture, or ``{"name": ..., "weights": "file.safetensors"}``.
    """
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "weights"}
        if "name" not in spec or unknown:
            raise ParameterError(f"models entry {spec!r}: use {{'name': 'arch.tag', 'weights': 'path'}}")
        return str(spec["name"]), spec.get("weights"), False
    if not isinstance(spec, str) or not spec:
        raise ParameterError(f"models entry {spec!r}: give a model name string, 'random:NAME', or a dict")
    if spec.startswith("random:"):
        return spec[len("random:"):], None, True
    return spec, None, False


def check_models(models) -> list[tuple[str, str | None, bool]]:
    """Validate a ``models`` parameter (names known to timm, weights files present) before any loading."""
    from .models import ModelError, check_name

    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list | tuple) or not models:
        raise ParameterError(f"parameter 'models' must be a non-empty list of model names, got {models!r}")
    specs = [model_spec(m) for m in models]
    for name, weights, _ in specs:
        try:
            check_name(name)
        except ModelError as error:
            raise ParameterError(f"parameter 'models': {error}") from None
        if weights is not None and not Path(weights).expanduser().is_file():
            raise ParameterError(f"parameter 'models': weights file {weights!r} for {name!r} does not exist")
    return specs


def load_models(specs, device: str = "cpu", seed: int = 0):
    """Load checked model specs -> ``{label: model}``; a random-init control (seeded with ``seed``) is
    labelled by its architecture and seed."""
    from .models import load_model, random_control

    loaded = {}
    for name, weights, random_init in specs:
        model = (random_control(name, seed=seed, device=device) if random_init
                 else load_model(name, weights=weights, device=device))
        loaded[model.qklib_name] = model
    return loaded


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(f"parameter {name!r} must be an integer >= {minimum}, got {value!r}")
    return value


def check_folder(name: str, value, required: bool = False) -> Path | None:
    """An existing folder, or None when the parameter is empty and not required."""
    if value in (None, ""):
        if required:
            raise ParameterError(f"parameter {name!r} is required: give the path of a folder")
        return None
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ParameterError(f"parameter {name!r}: folder {str(path)!r} does not exist")
    return path


def check_device(value) -> str:
    import torch

    if not isinstance(value, str):
        raise ParameterError(f"parameter 'device' must be a string such as 'cpu' or 'cuda', got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"parameter 'device' is {value!r} but no CUDA device is available; use 'cpu'")
    try:
        torch.device(value)
    except RuntimeError as error:
        raise ParameterError(f"parameter 'device': {error}") from None
    return value
