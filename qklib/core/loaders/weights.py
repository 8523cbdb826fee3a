"""Reading checkpoints safely, loading a state dict strictly, and qklib's converted-file format.

Every file is read without running code from it: safetensors, or ``torch.load(weights_only=True)``. A
converted file is a safetensors file in timm's key format whose metadata names the architecture
(``arch``, plus ``arch_kwargs`` as JSON when it differs from the named architecture's defaults), so that
``qklib.load_model(weights=file)`` needs no model name.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..messages import cli_syntax

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".ckpt")
META_ARCH, META_KWARGS, META_SOURCE, META_DATA = "arch", "arch_kwargs", "source", "data_config"
# Present only in the file of a random-init control: its seed. The model loaded back is labelled as the control
# (``arch (random init, seed N) [file]``), so a converted control never passes for trained weights.
META_RANDOM = "random_init_seed"
DATA_KEYS = ("mean", "std", "crop_pct", "interpolation")


class ModelError(ValueError):
    """A model name, architecture or weights file that qklib cannot use; the message says what to do, once, in
    Python spelling (``weights='FILE'``). ``cli``: the same message in command-line syntax (``--weights FILE``),
    by ``core.messages.cli_syntax``."""

    @property
    def cli(self) -> str:
        return cli_syntax(str(self))


@dataclass
class Converted:
    """A checkpoint translated to an architecture qklib can build.

    ``arch``: a timm architecture name (or ``ijepa_predictor``); ``kwargs``: JSON-able keyword arguments that
    override the architecture's defaults; ``state``: the state dict in that architecture's key format;
    ``source``: a short label of where the weights came from (a file name, ``hf:ORG/NAME``); ``notes``:
    what was left out (decoders, mask tokens, poolers); ``data_config``: the preprocessing the weights were
    trained with where it differs from the architecture's timm default (``mean``, ``std``, ``crop_pct``,
    ``interpolation``), applied to the model's ``pretrained_cfg``; ``random_seed``: the seed of a random-init
    control written by ``convert`` (None for trained weights).
    """

    arch: str
    kwargs: dict
    state: dict[str, torch.Tensor]
    source: str
    notes: list[str] = field(default_factory=list)
    data_config: dict = field(default_factory=dict)
    random_seed: int | None = None


class _ConfigStandIn:
    """Unpickles a yacs ``CfgNode`` (the ``config`` entry of SimMIM's training checkpoints) as a plain
    OrderedDict: nothing from the file is imported or run, and the weights next to it stay readable."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def _torch_load(path: Path):
    allowed = [(_ConfigStandIn, "yacs.config.CfgNode")]
    with torch.serialization.safe_globals(allowed):
        try:  # memory-mapped: a multi-GB training checkpoint is not read whole to take one part
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> tuple[object, dict[str, str]]:
    """``(content, metadata)`` of a ``.safetensors`` file (a flat dict of tensors and its metadata) or a
    torch file (``.pt``/``.pth``/``.bin``/``.pth.tar``/``.ckpt``: whatever dict it holds, read with
    ``weights_only=True``; metadata empty)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ModelError(f"{str(path)!r} is a folder; a Hugging Face model folder needs a config.json in it")
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                metadata = dict(handle.metadata() or {})
            return load_file(str(path)), metadata
        if path.suffix in TORCH_SUFFIXES:
            return _torch_load(path), {}
    except Exception as error:  # corrupt or truncated file, or a pickle that needs code to load
        raise ModelError(
            f"could not read weights from {str(path)!r} ({type(error).__name__}: {str(error)[:300]}); the file may "
            "be truncated (compare its size with the original), or it is not a tensor file: qklib loads only "
            "safetensors or tensor-only torch files (torch.load(weights_only=True)), never pickled code"
        ) from error
    raise ModelError(f"weights file {str(path)!r}: use a .safetensors, .pt, .pth, .pth.tar or .bin file")


def unwrap(content: object) -> object:
    """The state dict inside common training wrappers (``state_dict``, ``model``, ``module``)."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
    return content


def is_state_dict(content: object) -> bool:
    return isinstance(content, dict) and bool(content) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items())


def describe_keys(content: object, most: int = 6) -> str:
    """A short description of what a checkpoint holds, for error messages."""
    if not isinstance(content, dict):
        return f"a {type(content).__name__}"
    keys = list(content)
    shown = ", ".join(repr(k) for k in keys[:most]) + (f" (+{len(keys) - most} more)" if len(keys) > most else "")
    return f"keys {shown}" if keys else "an empty dict"


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or a torch file read with ``weights_only=True``."""
    content = unwrap(read_checkpoint(path)[0])
    if not is_state_dict(content):
        raise ModelError(f"{str(path)!r} does not hold a flat state dict of tensors in timm's key format; "
                         f"found {describe_keys(content)}")
    return content


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (DistributedDataParallel's ``module.``, for one)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, naming the first offending tensors when it does not fit."""
    own = model.state_dict()
    # Reported in the model's own (forward) order, so "first" means first in the network.
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if mismatched:
        problems.append("shape mismatch in " + "; ".join(mismatched[:3]))
    if missing:
        problems.append("missing " + ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected[:3]) + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
    if problems:
        raise ModelError(
            f"weights from {source} do not fit {type(model).__name__}: {'; '.join(problems)}. "
            "Check that the model name matches the checkpoint's architecture and that keys use timm's format"
        )
    model.load_state_dict(state, strict=True)


def converted_metadata(arch: str, kwargs: dict, source: str, data_config: dict,
                       random_seed: int | None = None) -> dict[str, str]:
    """Safetensors metadata of a converted file (strings only, as the format requires); ``random_seed``: the
    seed of a random-init control (recorded so that the file stays a control)."""
    metadata = {"format": "pt", META_ARCH: arch, META_KWARGS: json.dumps(kwargs, sort_keys=True), META_SOURCE: source,
                META_DATA: json.dumps(data_config, sort_keys=True)}
    if random_seed is not None:
        metadata[META_RANDOM] = str(random_seed)
    return metadata


def random_seed_from_metadata(metadata: dict[str, str], path: str | Path) -> int | None:
    """The seed of the random-init control a converted file holds, or None for trained weights."""
    seed = metadata.get(META_RANDOM)
    if seed is None:
        return None
    try:
        return int(seed)
    except ValueError:
        raise ModelError(f"{str(path)!r}: metadata {META_RANDOM!r} must be an integer seed, got {seed!r}") from None


def _json_object(metadata: dict[str, str], key: str, path: str | Path) -> dict:
    try:
        value = json.loads(metadata.get(key) or "{}")
    except json.JSONDecodeError as error:
        raise ModelError(f"{str(path)!r}: metadata {key!r} is not JSON ({error})") from error
    if not isinstance(value, dict):
        raise ModelError(f"{str(path)!r}: metadata {key!r} must be a JSON object, got {value!r}")
    return value


def arch_from_metadata(metadata: dict[str, str], path: str | Path) -> tuple[str, dict, dict] | None:
    """``(arch, kwargs, data_config)`` recorded in a converted file's metadata, or None for a plain file."""
    arch = metadata.get(META_ARCH)
    if not arch:
        return None
    data = _json_object(metadata, META_DATA, path)
    return arch, _json_object(metadata, META_KWARGS, path), {k: v for k, v in data.items() if k in DATA_KEYS}
