"""Attention preference on odd-one-out scenes (§3, Fig 2): where do a target token and a distractor token attend?

Per image, the target and distractor masks are taken into the model's view (its resize and centre crop)
and area-downscaled to the token grid: each image token gets the fraction of its patch covered by the
target (T), by distractors (D) and by neither (B = 1 - T - D; where the masks overlap the target wins).
The target query is the token at the argmax of T, the distractor query the token at the argmax of D.
Each query's attention row (the model's own softmax) is cut to the image tokens, so prefix tokens (CLS,
distillation, registers) are dropped, and renormalised to sum to 1. Its inner products with T, D and B
give six ratios, T->T, T->D, T->B, D->T, D->D, D->B; for each query its three ratios sum to 1.
same = mean(T->T, D->D), different = mean(T->D, D->T), background = mean(T->B, D->B).

An image is skipped, and counted, when no token is covered at least ``min_cover`` by the target or by a
distractor (the object vanishes at token resolution, or the centre crop cuts it off).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from .core.extract import record
from .core.images import to_pixels, view_steps
from .core.models import depth, model_name

PAIRS = ("t_t", "t_d", "t_b", "d_t", "d_d", "d_b")  # query -> key region, in the order of ratios()'s last two axes
GROUPS = {"same": ("t_t", "d_d"), "different": ("t_d", "d_t"), "background": ("t_b", "d_b")}


@dataclass
class TokenMasks:
    """Region fractions per image token, ``[B, N]`` each (N = grid rows x cols, row-major)."""

    target: torch.Tensor
    distractor: torch.Tensor
    grid: tuple[int, int]

    @property
    def background(self) -> torch.Tensor:
        return (1 - self.target - self.distractor).clamp_min(0)

    def stacked(self) -> torch.Tensor:
        """``[B, 3, N]``: target, distractor, background."""
        return torch.stack([self.target, self.distractor, self.background], dim=1)


def token_masks(model: nn.Module, targets: Sequence[np.ndarray], distractors: Sequence[np.ndarray]) -> TokenMasks:
    """Area-downscale pixel masks (``[H, W]`` bool, one per image, sizes may differ) to the model's token grid."""
    steps = view_steps(model, T.InterpolationMode.BILINEAR)
    patch = tuple(int(p) for p in model.patch_embed.patch_size)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    out_t, out_d = [], []
    for target, distractor in zip(targets, distractors, strict=True):
        target = torch.as_tensor(np.asarray(target, dtype=bool))
        distractor = torch.as_tensor(np.asarray(distractor, dtype=bool)) & ~target
        both = torch.stack([target, distractor]).float()[None]  # [1, 2, H, W]
        for step in steps:
            both = step(both)
        if tuple(both.shape[-2:]) != (grid[0] * patch[0], grid[1] * patch[1]):
            raise ValueError(f"masks end up {tuple(both.shape[-2:])} px in the model's view, expected "
                             f"{grid[0] * patch[0]}x{grid[1] * patch[1]}")
        pooled = F.avg_pool2d(both, kernel_size=patch).flatten(2)[0]  # [2, N]
        out_t.append(pooled[0])
        out_d.append(pooled[1])
    return TokenMasks(torch.stack(out_t).clamp(0, 1), torch.stack(out_d).clamp(0, 1), grid)


def query_tokens(masks: TokenMasks, min_cover: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [B, 2], keep [B])``: image-token index of the target and distractor query per image,
    and whether both are covered at least ``min_cover`` (else the image is skipped)."""
    regions = torch.stack([masks.target, masks.distractor], dim=1)  # [B, 2, N]
    cover, index = regions.max(dim=-1)
    keep = (cover >= min_cover).all(dim=1) & (cover > 0).all(dim=1)
    return index, keep


def ratios(attention: torch.Tensor, prefix_tokens: int, masks: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The six inner products, all layers and heads at once.

    ``attention``: ``[L, B, H, T, T]`` probabilities (prefix tokens first). ``masks``: ``[B, 3, N]`` target,
    distractor, background fractions over the N = T - prefix image tokens. ``queries``: ``[B, 2]`` image-token
    indices of the target and distractor query. Returns ``[L, B, H, 2, 3]``: query (target, distractor) x key
    region (target, distractor, background), each query's map cut to image tokens and renormalised.
    """
    rows = query_rows(attention, prefix_tokens, queries)
    return torch.einsum("bqlhn,bkn->lbhqk", rows, masks.to(rows.dtype))


def query_rows(attention: torch.Tensor, prefix_tokens: int, queries: torch.Tensor) -> torch.Tensor:
    """``[B, 2, L, H, N]``: the attention maps of the target and distractor queries over the image tokens,
    renormalised to sum to 1 (``attention`` ``[L, B, H, T, T]``, ``queries`` ``[B, 2]`` image-token indices)."""
    count = attention.shape[1]
    rows = attention[:, torch.arange(count)[:, None], :, prefix_tokens + queries]  # [B, 2, L, H, T]
    rows = rows[..., prefix_tokens:]
    return rows / rows.sum(dim=-1, keepdim=True)


def query_maps(model: nn.Module, sample, min_cover: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, TokenMasks]:
    """One scene's query maps for display: ``(maps [L, H, 2, gh, gw], queries [2], masks)``."""
    masks = token_masks(model, [sample.target], [sample.distractor])
    queries, keep = query_tokens(masks, min_cover)
    if not keep.all():
        raise ValueError(f"scene {sample.id!r}: target or distractor vanishes at token resolution")
    rec = record(model, to_pixels(model, sample.image), tokens=False, attention=True)
    rows = query_rows(rec.attention, rec.prefix_tokens, queries)[0]  # [2, L, H, N]
    return rows.permute(1, 2, 0, 3).reshape(*rows.shape[1:3], 2, *masks.grid), queries[0], masks


@dataclass
class Preference:
    """``table``: one row per model, image, layer and head (columns in ``PAIRS`` and ``GROUPS``);
    ``skipped``: image id -> why it was left out; ``measured``: ids of the images in the table."""

    table: pd.DataFrame
    skipped: dict[str, str] = field(default_factory=dict)
    measured: list[str] = field(default_factory=list)
    chance: pd.DataFrame | None = None  # per measured image: the groups under uniform attention (see chance())


def measure(model: nn.Module, samples: Iterable, batch_size: int = 8, min_cover: float = 0.5,
            label: str | None = None) -> Preference:
    """Attention preference of ``model`` on O3-style ``samples`` (``image``, ``target``, ``distractor``, ``id``)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    label = label or model_name(model)
    frames, chances, skipped, measured = [], [], {}, []
    stream = iter(samples)  # batch by batch: an O3Set reads its photos lazily, never all at once
    while batch := list(itertools.islice(stream, batch_size)):
        masks = token_masks(model, [s.target for s in batch], [s.distractor for s in batch])
        queries, keep = query_tokens(masks, min_cover)
        for sample, kept, cover_t, cover_d in zip(batch, keep.tolist(), masks.target.max(1).values.tolist(),
                                                   masks.distractor.max(1).values.tolist()):
            if not kept:
                skipped[sample.id] = (f"largest token cover: target {cover_t:.2f}, distractor {cover_d:.2f} "
                                      f"(needs {min_cover:.2f})")
        chosen = [s for s, k in zip(batch, keep.tolist()) if k]
        if not chosen:
            continue
        index = keep.nonzero().flatten()
        rec = record(model, to_pixels(model, [s.image for s in chosen]), tokens=False, attention=True)
        values = ratios(rec.attention, rec.prefix_tokens, masks.stacked()[index], queries[index])
        frames.append(_frame(values, [s.id for s in chosen], label))
        chances.append(chance(masks.stacked()[index], [s.id for s in chosen]))
        measured += [s.id for s in chosen]
    if not frames:
        raise ValueError(f"every image was skipped ({len(skipped)}): no target or distractor token is covered "
                         f"at least {min_cover}; lower min_cover or check the masks")
    return Preference(pd.concat(frames, ignore_index=True), skipped, measured, pd.concat(chances, ignore_index=True))


def chance(masks: torch.Tensor, ids: list[str]) -> pd.DataFrame:
    """What uniform attention over image tokens would give, per image (``masks``: ``[B, 3, N]``).

    Each ratio is then the region's mean token fraction, whichever the query, so same = different
    = (area(T) + area(D)) / 2 and background = area(B), all as fractions of the token grid.
    """
    area = masks.mean(dim=-1).double().numpy()  # [B, 3]
    return pd.DataFrame({"image": ids, "same": area[:, :2].mean(1), "different": area[:, :2].mean(1),
                         "background": area[:, 2]})


def _frame(values: torch.Tensor, ids: list[str], label: str) -> pd.DataFrame:
    layers, count, heads = values.shape[:3]
    flat = values.permute(1, 0, 2, 3, 4).reshape(count * layers * heads, 6).numpy()
    image, layer, head = np.meshgrid(np.arange(count), np.arange(layers), np.arange(heads), indexing="ij")
    frame = pd.DataFrame(flat, columns=list(PAIRS))
    frame.insert(0, "model", label)
    frame.insert(1, "image", np.asarray(ids)[image.ravel()])
    frame.insert(2, "layer", layer.ravel())
    frame.insert(3, "head", head.ravel())
    frame.insert(4, "depth", depth(layer.ravel(), layers))
    for group, pair in GROUPS.items():
        frame[group] = frame[list(pair)].mean(axis=1)
    return frame


def per_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over images and heads per model and layer, with a 95% interval over images
    (each image first averaged over heads): columns model, layer, depth, group, mean, low, high."""
    by_image = table.groupby(["model", "layer", "depth", "image"], sort=False)[list(GROUPS)].mean().reset_index()
    long = by_image.melt(["model", "layer", "depth", "image"], list(GROUPS), var_name="group", value_name="ratio")
    stats = long.groupby(["model", "layer", "depth", "group"], sort=False)["ratio"].agg(["mean", "std", "count"]).reset_index()
    half = 1.96 * stats["std"].fillna(0) / np.sqrt(stats["count"])
    stats["low"], stats["high"] = stats["mean"] - half, stats["mean"] + half
    return stats.drop(columns=["std"]).rename(columns={"count": "images"})
