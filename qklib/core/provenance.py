"""Where a loaded model came from, in one typed record: its label, architecture, the keyword arguments it was
built with, what its converter left out, and the seed of a random-init control.

``load_model``, ``random_control`` and ``convert`` write it; everything that needs it (a model's label in every
table and chart, ``random_control`` of a loaded model, the metadata of a converted file, the command line's
report) reads it through :func:`provenance`, never through loose attributes. It travels with the model object
(one attribute, :data:`ATTRIBUTE`) because ``load_model`` returns the timm module itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

__all__ = ["ATTRIBUTE", "Provenance", "attach", "provenance", "relabel"]

ATTRIBUTE = "qklib_origin"


@dataclass(frozen=True)
class Provenance:
    """``label``: what qklib shows (``arch.tag``, ``arch [file]``, ``arch (random init, seed S)``); ``arch``:
    the architecture ``core.models.build`` builds (a timm name or ``ijepa_predictor``) with ``kwargs``; ``notes``:
    what the converter left out (decoders, mask tokens, poolers); ``random_seed``: the seed of a random-init
    control, None for trained weights; ``details``: a model family's own record of where its files came from
    (for the text and speech encoders, ``core.modalities.loading.Source``), None for timm models."""

    label: str
    arch: str
    kwargs: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    random_seed: int | None = None
    details: object = None


def provenance(model: nn.Module) -> Provenance | None:
    """The record ``load_model`` attached to ``model``, or None for a model qklib did not load."""
    record = getattr(model, ATTRIBUTE, None)
    return record if isinstance(record, Provenance) else None


def attach(model: nn.Module, record: Provenance) -> nn.Module:
    """``model`` with ``record`` as its provenance (replacing any)."""
    setattr(model, ATTRIBUTE, record)
    return model


def relabel(model: nn.Module, label: str) -> nn.Module:
    """``model`` shown under ``label`` from now on (a model qklib did not load gets a record with its timm
    architecture, or its class name)."""
    record = provenance(model)
    if record is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        record = Provenance(label, cfg.get("architecture", type(model).__name__))
    return attach(model, replace(record, label=label))
