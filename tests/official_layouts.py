"""Synthetic checkpoints in the authors' own layouts (random tensors, the right names and shapes), written from
the layouts documented in facebookresearch/ijepa (src/models/vision_transformer.py, src/train.py) and
microsoft/SimMIM (models/vision_transformer.py, models/simmim.py, utils.py, configs/vit_base__800ep/*.yaml).
Geometry is reduced (I-JEPA's own vit_tiny width, 2 blocks) so that the tests stay fast; the converters read
every size from the tensors, and tests/test_paper_models.py checks the full ViT-H and ViT-B shapes on the
meta device."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch


def _maker(generator: torch.Generator, meta: bool):
    """Random tensors (std 0.05), or shape-only tensors on the meta device for full-size layouts."""
    def make(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.randn(*shape, generator=generator) * 0.05
    return make


def _block(prefix: str, width: int, mlp: int, generator: torch.Generator, qkv_bias: bool = True, meta: bool = False) -> dict:
    r = _maker(generator, meta)

    state = {
        f"{prefix}norm1.weight": 1 + r(width), f"{prefix}norm1.bias": r(width),
        f"{prefix}attn.qkv.weight": r(3 * width, width),
        f"{prefix}attn.proj.weight": r(width, width), f"{prefix}attn.proj.bias": r(width),
        f"{prefix}norm2.weight": 1 + r(width), f"{prefix}norm2.bias": r(width),
        f"{prefix}mlp.fc1.weight": r(mlp, width), f"{prefix}mlp.fc1.bias": r(mlp),
        f"{prefix}mlp.fc2.weight": r(width, mlp), f"{prefix}mlp.fc2.bias": r(width),
    }
    if qkv_bias:
        state[f"{prefix}attn.qkv.bias"] = r(3 * width)
    return state


def ijepa_encoder(width: int = 192, depth: int = 2, patch: int = 16, grid: int = 4, seed: int = 0,
                  meta: bool = False) -> dict:
    """An I-JEPA VisionTransformer state dict (no class token; keys as DistributedDataParallel saves them)."""
    g = torch.Generator().manual_seed(seed)
    r = _maker(g, meta)
    state = {"patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
             "pos_embed": r(1, grid * grid, width), "norm.weight": 1 + r(width), "norm.bias": r(width)}
    for i in range(depth):
        state |= _block(f"blocks.{i}.", width, 4 * width, g, meta=meta)
    return {f"module.{k}": v for k, v in state.items()}


def ijepa_predictor(width: int = 192, predictor_width: int = 96, depth: int = 2, tokens: int = 16, seed: int = 1,
                    meta: bool = False) -> dict:
    """An I-JEPA VisionTransformerPredictor state dict."""
    g = torch.Generator().manual_seed(seed)
    r, p = _maker(g, meta), predictor_width
    state = {"predictor_embed.weight": r(p, width), "predictor_embed.bias": r(p), "mask_token": r(1, 1, p),
             "predictor_pos_embed": r(1, tokens, p), "predictor_norm.weight": 1 + r(p), "predictor_norm.bias": r(p),
             "predictor_proj.weight": r(width, p), "predictor_proj.bias": r(width)}
    for i in range(depth):
        state |= _block(f"predictor_blocks.{i}.", p, 4 * p, g, meta=meta)
    return {f"module.{k}": v for k, v in state.items()}


def write_ijepa(path: Path, **sizes) -> dict:
    """An I-JEPA training checkpoint as src/train.py saves it; returns what was saved."""
    encoder = ijepa_encoder(**{k: v for k, v in sizes.items() if k in ("width", "depth", "patch", "grid")})
    target = ijepa_encoder(**{k: v for k, v in sizes.items() if k in ("width", "depth", "patch", "grid")}, seed=2)
    predictor = ijepa_predictor(width=sizes.get("width", 192), tokens=sizes.get("grid", 4) ** 2)
    checkpoint = {"encoder": encoder, "predictor": predictor, "target_encoder": target,
                  "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}, "scaler": None,
                  "epoch": 300, "loss": 0.123, "batch_size": 128, "world_size": 16, "lr": 1e-3}
    torch.save(checkpoint, path)
    return checkpoint


def beit_relative_index(window: int) -> torch.Tensor:
    """``[W*W + 1, W*W + 1]`` BEiT's relative position index (SimMIM's layout): token pairs index their relative
    offset (dy + W-1) * (2W-1) + (dx + W-1); then three extra rows of the table for cls->token, token->cls, cls->cls."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    dy = rows.flatten()[:, None] - rows.flatten()[None, :] + window - 1
    dx = cols.flatten()[:, None] - cols.flatten()[None, :] + window - 1
    distances = (2 * window - 1) ** 2
    index = torch.zeros(window * window + 1, window * window + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * window - 1) + dx
    index[0, :] = distances
    index[:, 0] = distances + 1
    index[0, 0] = distances + 2
    return index


def simmim_vit(width: int = 96, depth: int = 2, heads: int = 3, patch: int = 16, window: int = 4, shared: bool = True,
               mean_pooling: bool = False, classes: int = 0, seed: int = 0, meta: bool = False) -> dict:
    """SimMIM's (BEiT-style) VisionTransformer state dict: qkv without bias plus q_bias/v_bias, layer scale,
    relative position bias shared (pretraining config) or per layer (fine-tuning config), no pos_embed."""
    g = torch.Generator().manual_seed(seed)
    r = _maker(g, meta)
    table = (2 * window - 1) ** 2 + 3
    state = {"cls_token": r(1, 1, width), "patch_embed.proj.weight": r(width, 3, patch, patch),
             "patch_embed.proj.bias": r(width)}
    if shared:
        state["rel_pos_bias.relative_position_bias_table"] = r(table, heads)
        state["rel_pos_bias.relative_position_index"] = beit_relative_index(window)
    for i in range(depth):
        state |= _block(f"blocks.{i}.", width, 4 * width, g, qkv_bias=False, meta=meta)
        state[f"blocks.{i}.attn.q_bias"] = r(width)
        state[f"blocks.{i}.attn.v_bias"] = r(width)
        state[f"blocks.{i}.gamma_1"] = 0.1 + r(width)
        state[f"blocks.{i}.gamma_2"] = 0.1 + r(width)
        if not shared:
            state[f"blocks.{i}.attn.relative_position_bias_table"] = r(table, heads)
            state[f"blocks.{i}.attn.relative_position_index"] = beit_relative_index(window)
    norm = "fc_norm" if mean_pooling else "norm"
    state[f"{norm}.weight"] = 1 + r(width)
    state[f"{norm}.bias"] = r(width)
    if classes:
        state["head.weight"] = r(classes, width)
        state["head.bias"] = r(classes)
    return state


def _yacs_config():
    """A stand-in yacs CfgNode (SimMIM saves its config in every checkpoint), importable only while saving."""
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    module.CfgNode, package.config = CfgNode, module
    return package, module, CfgNode


def write_simmim(path: Path, pretrain: bool, **sizes) -> dict:
    """A SimMIM checkpoint as utils.save_checkpoint writes it (config included); returns the ViT state dict."""
    if pretrain:
        vit = simmim_vit(shared=True, mean_pooling=False, **sizes)
        width = vit["cls_token"].shape[-1]
        g = torch.Generator().manual_seed(5)
        model = {f"encoder.{k}": v for k, v in vit.items()}
        model["encoder.mask_token"] = torch.randn(1, 1, width, generator=g) * 0.02
        model["decoder.0.weight"] = torch.randn(16 ** 2 * 3, width, 1, 1, generator=g) * 0.02
        model["decoder.0.bias"] = torch.zeros(16 ** 2 * 3)
    else:
        vit = simmim_vit(shared=False, mean_pooling=True, classes=10, **sizes)
        model = dict(vit)
    package, module, CfgNode = _yacs_config()
    sys.modules["yacs"], sys.modules["yacs.config"] = package, module
    try:
        config = CfgNode({"MODEL": CfgNode({"TYPE": "vit", "NAME": "simmim_pretrain" if pretrain else "simmim_finetune",
                                            "VIT": CfgNode({"USE_SHARED_RPB": pretrain, "USE_RPB": not pretrain})})})
        torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 3},
                    "max_accuracy": 0.0, "epoch": 799, "config": config}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    return vit
