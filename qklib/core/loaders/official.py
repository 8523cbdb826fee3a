"""The authors' own checkpoints, converted to architectures qklib can analyse.

**I-JEPA** (facebookresearch/ijepa, e.g. ``IN1K-vit.h.14-300e.pth.tar``): a training checkpoint, a dict with
``encoder``, ``predictor`` and ``target_encoder`` state dicts (keys prefixed ``module.`` by
DistributedDataParallel) next to ``opt``, ``scaler``, ``epoch``, ``loss``, ``batch_size``, ``world_size``, ``lr``.

* The encoder (and the EMA target encoder) is a ViT without a class token: ``patch_embed.proj`` (conv),
  ``pos_embed [1, N, D]`` (fixed 2-D sine-cosine), ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2}``, ``norm`` applied to every token; LayerNorm eps 1e-6, qkv with bias. Exactly timm's
  ``vit_huge_patch14_gap_224`` for ViT-H/14 (timm's own ``.in1k_ijepa`` weights are the ``encoder`` part).
  The head count is not stored: it follows from the width as in the repository's ``vit_*`` constructors.
* The predictor is a narrow transformer: ``predictor_embed`` (Linear D -> P), ``mask_token [1, 1, P]``,
  ``predictor_pos_embed [1, N, P]``, ``predictor_blocks.i.*`` (the same block layout at width P, with the
  encoder's head count), ``predictor_norm``, ``predictor_proj`` (Linear P -> D). It maps context tokens plus
  target positions to predicted target tokens: it never sees an image. It loads as :class:`IJepaPredictor`.

**SimMIM** (microsoft/SimMIM, ``simmim_pretrain__vit_base__img224__800ep`` and
``simmim_finetune__vit_base__img224__800ep``): ``{"model": state_dict, ...}`` (plus ``optimizer``,
``lr_scheduler``, ``epoch``, ``config``, read without running code). The ViT is BEiT-style: ``attn.qkv``
without bias plus ``attn.q_bias``/``attn.v_bias`` (no key bias), layer scale ``gamma_1``/``gamma_2``, no
absolute position embedding, and a relative position bias: shared (``rel_pos_bias.*``, pretraining) or per
layer (``blocks.i.attn.relative_position_bias_table``, fine-tuning). Pretraining wraps the ViT as
``encoder.*`` (with a ``mask_token``) next to a 1x1-conv ``decoder.*``; the fine-tuned model ends in mean
pooling, ``fc_norm`` and ``head``. Both are timm ``Beit`` (``beit_base_patch16_224`` is the fine-tuned layout).
"""

from __future__ import annotations

import math
import re
from functools import partial

import timm
import torch
from timm.layers import trunc_normal_
from timm.models.beit import gen_relative_position_index
from timm.models.vision_transformer import Block
from torch import nn

from .weights import Converted, ModelError, describe_keys, is_state_dict, strip_prefix, unwrap

IJEPA_PARTS = ("encoder", "target_encoder", "predictor")
# Both repositories normalise with ImageNet's mean and std; SimMIM evaluates on a 224 crop of a 256 resize.
_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PREDICTOR_ARCH = "ijepa_predictor"
# Heads per width in the I-JEPA repository's vit_tiny ... vit_giant constructors (not stored in checkpoints).
_IJEPA_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
_SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1408: "giant"}
_BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias")


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """``[grid * grid, dim]`` fixed 2-D sine-cosine position embedding in I-JEPA's layout: for the token in
    row r, column c, the first half encodes c and the second half r, each as [sin, cos] over dim/4 frequencies."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def one(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


class IJepaPredictor(nn.Module):
    """I-JEPA's predictor: encoder tokens of the context plus target positions -> predicted target tokens.

    Not an image model: it has ``blocks[i].attn.qkv`` (timm blocks, so ``qklib.qk_svd`` reads it like any
    ViT) but no patch embedding. ``forward(context [B, Nc, D], context_index [Nc], target_index [Nt])``
    returns ``[B, Nt, D]``; indices are positions in the encoder's token grid (0 .. N-1).
    """

    def __init__(self, embed_dim: int = 1280, predictor_dim: int = 384, depth: int = 12, num_heads: int = 16,
                 num_patches: int = 256, mlp_ratio: float = 4.0):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed_dim, self.predictor_dim, self.num_patches = embed_dim, predictor_dim, num_patches
        self.predictor_embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, predictor_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(predictor_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(predictor_dim)
        self.proj = nn.Linear(predictor_dim, embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # I-JEPA's initialisation: truncated normal (std 0.02) weights, zero biases, fixed sine-cosine positions.
        for module in self.modules():
            if isinstance(module, nn.Linear) and not module.weight.is_meta:
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if not self.mask_token.is_meta:
            trunc_normal_(self.mask_token, std=0.02)
            grid = math.isqrt(self.num_patches)
            if grid * grid == self.num_patches and self.predictor_dim % 4 == 0:
                with torch.no_grad():
                    self.pos_embed.copy_(sincos_2d(self.predictor_dim, grid)[None])

    def forward(self, context: torch.Tensor, context_index: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        x = self.predictor_embed(context) + self.pos_embed[:, context_index]
        targets = self.mask_token + self.pos_embed[:, target_index]
        x = torch.cat([x, targets.expand(len(x), -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x)[:, context.shape[1]:])

    def forward_features(self, *_args, **_kwargs):
        raise ModelError(
            "the I-JEPA predictor takes encoder tokens and target positions, not an image: it has no token "
            "embeddings of an image to record. Its QK modes (qklib.qk_svd) are defined; for image tokens use the "
            "encoder (part='encoder')")


def build_predictor(**kwargs) -> IJepaPredictor:
    return IJepaPredictor(**kwargs)


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m[1]) for k in state if (m := pattern.match(k))}
    if not indices:
        return 0
    if indices != set(range(max(indices) + 1)):
        raise ModelError(f"blocks {sorted(set(range(max(indices) + 1)) - indices)} are missing from the checkpoint")
    return max(indices) + 1


def _require(state: dict[str, torch.Tensor], keys, what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise ModelError(f"{what}: missing {shown}; the checkpoint is truncated or of another kind")


def _no_leftovers(state: dict[str, torch.Tensor], used: set[str], what: str) -> None:
    left = [k for k in state if k not in used]
    if left:
        raise ModelError(f"{what}: unexpected tensors {', '.join(left[:4])}" + (f" (+{len(left) - 4} more)" if len(left) > 4 else "")
                         + "; qklib does not know this layout")


def is_ijepa(content: object) -> bool:
    """Whether ``content`` is an I-JEPA training checkpoint (a dict with I-JEPA's parts as state dicts)."""
    return isinstance(content, dict) and any(isinstance(content.get(p), dict) for p in IJEPA_PARTS)


def convert_ijepa(content: dict, part: str | None, source: str) -> Converted:
    """The chosen part (``encoder`` by default, as timm and transformers take it) of an I-JEPA checkpoint."""
    part = part or "encoder"
    if part not in IJEPA_PARTS:
        raise ModelError(f"part={part!r}: an I-JEPA checkpoint has parts {', '.join(IJEPA_PARTS)}")
    if not is_ijepa(content):
        raise ModelError(f"{source}: expected an official I-JEPA checkpoint (a dict with 'encoder', 'predictor' and "
                         f"'target_encoder' state dicts), found {describe_keys(content)}")
    if not is_state_dict(content.get(part)):
        raise ModelError(f"{source}: this I-JEPA checkpoint has no {part!r} state dict (it has {describe_keys(content)})")
    state = strip_prefix(content[part], "module.")
    what = f"{source} ({part})"
    if part == "predictor":
        return _ijepa_predictor(state, what, source)
    _require(state, ("patch_embed.proj.weight", "pos_embed", "norm.weight"), what + ", I-JEPA encoder")
    if "cls_token" in state:
        raise ModelError(f"{what}: has a cls_token; an I-JEPA encoder has none (is this another model?)")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    depth = _blocks(state, "blocks.")
    if grid * grid != tokens or depth == 0 or width not in _IJEPA_HEADS:
        raise ModelError(f"{what}: pos_embed of {tokens} tokens, width {width}, {depth} blocks; expected a square token "
                         f"grid, blocks, and one of I-JEPA's widths {sorted(_IJEPA_HEADS)}")
    _require(state, [f"blocks.{i}.{p}" for i in range(depth) for p in _BLOCK_PARTS], what)
    _no_leftovers(state, {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "norm.bias"}
                  | {f"blocks.{i}.{p}" for i in range(depth) for p in _BLOCK_PARTS}, what)
    img = grid * patch
    kwargs = {"img_size": img, "patch_size": patch, "embed_dim": width, "depth": depth,
              "num_heads": _IJEPA_HEADS[width], "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width,
              "num_classes": 0}
    arch = f"vit_{_SIZE_NAMES[width]}_patch{patch}_gap_{img}"
    if not timm.is_model(arch):
        arch = "vit_huge_patch14_gap_224"
    return Converted(arch, kwargs, state, f"{source}, {part}", data_config=dict(_IMAGENET))


def _ijepa_predictor(state: dict[str, torch.Tensor], what: str, source: str) -> Converted:
    what = what + ", I-JEPA predictor"
    _require(state, ("predictor_embed.weight", "predictor_pos_embed", "mask_token", "predictor_norm.weight",
                     "predictor_proj.weight"), what)
    width_p, width = state["predictor_embed.weight"].shape
    depth = _blocks(state, "predictor_blocks.")
    if depth == 0 or width not in _IJEPA_HEADS:
        raise ModelError(f"{what}: {depth} blocks, encoder width {width}; expected blocks and one of I-JEPA's "
                         f"widths {sorted(_IJEPA_HEADS)}")
    renamed = {"predictor_embed.weight": "predictor_embed.weight", "predictor_embed.bias": "predictor_embed.bias",
               "mask_token": "mask_token", "predictor_pos_embed": "pos_embed",
               "predictor_norm.weight": "norm.weight", "predictor_norm.bias": "norm.bias",
               "predictor_proj.weight": "proj.weight", "predictor_proj.bias": "proj.bias"}
    renamed |= {f"predictor_blocks.{i}.{p}": f"blocks.{i}.{p}" for i in range(depth) for p in _BLOCK_PARTS}
    _require(state, list(renamed), what)
    _no_leftovers(state, set(renamed), what)
    kwargs = {"embed_dim": width, "predictor_dim": width_p, "depth": depth, "num_heads": _IJEPA_HEADS[width],
              "num_patches": state["predictor_pos_embed"].shape[1],
              "mlp_ratio": state["predictor_blocks.0.mlp.fc1.weight"].shape[0] / width_p}
    if width_p % kwargs["num_heads"]:
        raise ModelError(f"{what}: predictor width {width_p} is not divisible by {kwargs['num_heads']} heads")
    return Converted(PREDICTOR_ARCH, kwargs, {renamed[k]: v for k, v in state.items()}, f"{source}, predictor")


def simmim_state(content: object) -> dict[str, torch.Tensor] | None:
    """The ViT state dict of a SimMIM checkpoint (``encoder.`` and ``module.`` prefixes removed, decoder and
    mask token kept for the converter to report), or None when ``content`` does not look like one."""
    state = unwrap(content)
    if not is_state_dict(state):
        return None
    state = strip_prefix(state, "module.")
    if any(k.startswith("encoder.") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")} | \
                {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    beit_style = "blocks.0.attn.q_bias" in state and "blocks.0.attn.qkv.bias" not in state
    return state if beit_style else None


def convert_simmim(state: dict[str, torch.Tensor], source: str) -> Converted:
    """A SimMIM ViT (pretrained or fine-tuned) as timm ``Beit``; the pretraining decoder and mask token are dropped."""
    what = f"{source} (SimMIM ViT)"
    _require(state, ("patch_embed.proj.weight", "cls_token"), what)
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = _blocks(state, "blocks.")
    shared = "rel_pos_bias.relative_position_bias_table" in state
    per_layer = "blocks.0.attn.relative_position_bias_table" in state
    table = state.get("rel_pos_bias.relative_position_bias_table", state.get("blocks.0.attn.relative_position_bias_table"))
    if table is None or depth == 0:
        raise ModelError(f"{what}: expected blocks and a relative position bias table (shared 'rel_pos_bias.*' or "
                         f"per layer), found {describe_keys(state)}")
    window = (math.isqrt(table.shape[0] - 3) + 1) // 2
    if (2 * window - 1) ** 2 + 3 != table.shape[0]:
        raise ModelError(f"{what}: relative position table of {table.shape[0]} rows is not (2W-1)^2 + 3 for a square window")
    heads = table.shape[1]
    index = gen_relative_position_index((window, window))
    dropped, notes = set(), []
    for key in [k for k in state if k.endswith("relative_position_index")]:
        if not torch.equal(state[key].long(), index):
            raise ModelError(f"{what}: {key} differs from BEiT's relative position index for a {window}x{window} grid")
        dropped.add(key)  # timm recomputes it
    for key in [k for k in state if k == "mask_token" or k.startswith("decoder.")]:
        dropped.add(key)
    if "mask_token" in state or any(k.startswith("decoder.") for k in state):
        notes.append("SimMIM pretraining's mask token and pixel decoder are not part of the ViT and were left out")
    state = {k: v for k, v in state.items() if k not in dropped}
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"]
    layer_scale = "blocks.0.gamma_1" in state
    block += ["gamma_1", "gamma_2"] if layer_scale else []
    block += ["attn.relative_position_bias_table"] if per_layer else []
    expected = {f"blocks.{i}.{p}" for i in range(depth) for p in block} | {"patch_embed.proj.weight", "patch_embed.proj.bias",
                                                                          "cls_token"}
    expected |= {"rel_pos_bias.relative_position_bias_table"} if shared else set()
    mean_pooling = "fc_norm.weight" in state
    expected |= {"fc_norm.weight", "fc_norm.bias"} if mean_pooling else {"norm.weight", "norm.bias"}
    expected |= {"pos_embed"} if "pos_embed" in state else set()
    expected |= {"head.weight", "head.bias"} if "head.weight" in state else set()
    _require(state, sorted(expected), what)
    _no_leftovers(state, expected, what)
    kwargs = {"img_size": window * patch, "patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads,
              "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width, "qkv_bias": True,
              "use_abs_pos_emb": "pos_embed" in state, "use_rel_pos_bias": per_layer, "use_shared_rel_pos_bias": shared,
              "init_values": 0.1 if layer_scale else None, "global_pool": "avg" if mean_pooling else "token",
              "use_fc_norm": mean_pooling, "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0}
    data_config = {**_IMAGENET, "crop_pct": 0.875, "interpolation": "bicubic"}
    return Converted("beit_base_patch16_224", kwargs, state, source, notes, data_config)
