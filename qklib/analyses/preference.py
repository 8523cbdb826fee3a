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

Two robustness variants, both computed from the same forward pass by :func:`measure`:

- the query's own token: its map either keeps it (``self_token == "kept"``, the paper's definition) or drops
  it from the key set and renormalises over the remaining image tokens (``"removed"``). A query token lies on
  its own object, so keeping it adds p_ii (the query's attention to itself) to the same-object ratio; in
  early layers that self term is a large part of "same object".
- the query token: the object's most-covered token (``queries="peak"``, the paper's choice) or the average
  of the ratios over every token the object covers at least ``all_cover`` (``queries="all"``; by default
  ``min_cover``, the bar the peak token must clear; ``all_cover=1`` keeps fully covered tokens only, which
  on small generated objects drops most scenes).
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

from ..core.extract import record
from ..core.images import to_pixels, view_steps
from ..core.models import depth, model_name
from ..core.stats import Interval, bootstrap

QUERY_CHOICES = ("peak", "all")
SELF_TOKEN = ("kept", "removed")
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


def query_weights(masks: TokenMasks, queries: str = "peak", min_cover: float = 0.5,
                  all_cover: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [B, 2, N], keep [B])``: how much each image token counts as the target query (row 0) and the
    distractor query (row 1); each row sums to 1.

    ``queries="peak"``: one-hot at the most-covered token (:func:`query_tokens`); ``"all"``: uniform over the
    tokens the object covers at least ``all_cover`` (None: ``min_cover``; 0.999 for "fully covered").
    ``keep`` is False where the peak token is covered less than ``min_cover`` or (for "all") no token
    reaches ``all_cover``.
    """
    if queries not in QUERY_CHOICES:
        raise ValueError(f"queries must be one of {QUERY_CHOICES}, got {queries!r}")
    index, keep = query_tokens(masks, min_cover)
    regions = torch.stack([masks.target, masks.distractor], dim=1)  # [B, 2, N]
    if queries == "peak":
        return F.one_hot(index, regions.shape[-1]).to(torch.float64), keep
    full = (regions >= (min_cover if all_cover is None else all_cover) - 1e-9).to(torch.float64)
    count = full.sum(-1, keepdim=True)
    keep = keep & (count[..., 0] > 0).all(dim=1)
    return full / count.clamp_min(1), keep


def token_ratios(attention: torch.Tensor, prefix_tokens: int, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, removed)``, each ``[L, B, H, N, 3]``: for every image token as the query, its attention map over
    the image tokens (prefix tokens dropped, renormalised to 1) times the target, distractor and background
    masks; ``kept`` with the query's own token in the key set, ``removed`` without it (its probability taken
    out, the rest renormalised). ``attention``: ``[L, B, H, T, T]``; ``masks``: ``[B, 3, N]``.
    """
    image = attention[..., prefix_tokens:, prefix_tokens:].double()  # [L, B, H, N, N]
    masks = masks.double()
    total = image.sum(-1)  # [L, B, H, N]
    hits = torch.einsum("lbhqn,bkn->lbhqk", image, masks)
    own = image.diagonal(dim1=-2, dim2=-1)  # [L, B, H, N]: p_ii
    rest = (total - own).clamp_min(torch.finfo(torch.float64).tiny)
    removed = (hits - own[..., None] * masks.transpose(1, 2)[None, :, None]) / rest[..., None]
    return hits / total[..., None], removed


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
            label: str | None = None, queries: str | Sequence[str] = "peak", all_cover: float | None = None,
            self_token: str | Sequence[str] = "kept") -> Preference:
    """Attention preference of ``model`` on O3-style ``samples`` (``image``, ``target``, ``distractor``, ``id``).

    ``queries``: "peak" (the most-covered token, the paper's choice), "all" (average over the tokens covered
    at least ``all_cover``, by default ``min_cover``: see :func:`query_weights`) or a sequence of both; every choice comes from one forward pass, and an
    image skipped under one choice is skipped under all, so they share their images. The table has one row per
    model, image, layer, head, ``queries`` and ``self_token`` ("kept": the paper's map; "removed": the query's
    own token taken out of the key set and the map renormalised over the other image tokens); ``self_token``
    names one variant or a sequence of both. The defaults give the paper's measurement alone.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    choices = (queries,) if isinstance(queries, str) else tuple(queries)
    if not choices or any(q not in QUERY_CHOICES for q in choices):
        raise ValueError(f"queries must be one of {QUERY_CHOICES} or a sequence of them, got {queries!r}")
    variants = (self_token,) if isinstance(self_token, str) else tuple(self_token)
    if not variants or any(v not in SELF_TOKEN for v in variants):
        raise ValueError(f"self_token must be one of {SELF_TOKEN} or a sequence of them, got {self_token!r}")
    label = label or model_name(model)
    frames, chances, skipped, measured = [], [], {}, []
    stream = iter(samples)  # batch by batch: an O3Set reads its photos lazily, never all at once
    while batch := list(itertools.islice(stream, batch_size)):
        masks = token_masks(model, [s.target for s in batch], [s.distractor for s in batch])
        weights = {q: query_weights(masks, q, min_cover, all_cover) for q in choices}
        keep = torch.stack([k for _, k in weights.values()]).all(dim=0)
        for sample, kept, cover_t, cover_d in zip(batch, keep.tolist(), masks.target.max(1).values.tolist(),
                                                   masks.distractor.max(1).values.tolist()):
            if not kept:
                skipped[sample.id] = (f"largest token cover: target {cover_t:.2f}, distractor {cover_d:.2f} "
                                      f"(needs {min_cover:.2f})")
        chosen = [s for s, k in zip(batch, keep.tolist()) if k]
        if not chosen:
            continue
        index = keep.nonzero().flatten()
        ids = [s.id for s in chosen]
        rec = record(model, to_pixels(model, [s.image for s in chosen]), tokens=False, attention=True)
        per_token = token_ratios(rec.attention, rec.prefix_tokens, masks.stacked()[index])
        for q, (w, _) in weights.items():
            for variant, values in zip(SELF_TOKEN, per_token):
                if variant not in variants:
                    continue
                picked = torch.einsum("lbhqk,brq->lbhrk", values, w[index])
                frames.append(_frame(picked.float(), ids, label).assign(queries=q, self_token=variant))
        chances.append(chance(masks.stacked()[index], ids, query_tokens(masks, min_cover)[0][index]))
        measured += ids
    if not frames:
        raise ValueError(f"every image was skipped ({len(skipped)}): no target or distractor token is covered "
                         f"at least {min_cover}; lower min_cover or check the masks")
    return Preference(pd.concat(frames, ignore_index=True), skipped, measured, pd.concat(chances, ignore_index=True))


def chance(masks: torch.Tensor, ids: list[str], queries: torch.Tensor | None = None) -> pd.DataFrame:
    """What uniform attention over the key tokens would give, per image (``masks``: ``[B, 3, N]``): the
    per-unit-area baseline every ratio is compared with.

    With the query's own token kept, each ratio is the region's mean token fraction, whichever the query, so
    same = different = (area(T) + area(D)) / 2 and background = area(B), all as fractions of the token grid
    (columns ``same``, ``different``, ``background``). With ``queries`` (``[B, 2]``, the peak target and distractor
    tokens) the columns ``*_removed`` give the same for the headline variant, whose key set leaves the query's own
    token out: a region's chance is then its cover summed over the other ``N - 1`` tokens, divided by ``N - 1``.
    """
    masks = masks.double()
    area = masks.mean(dim=-1).numpy()  # [B, 3]
    frame = pd.DataFrame({"image": ids, "same": area[:, :2].mean(1), "different": area[:, :2].mean(1),
                          "background": area[:, 2]})
    if queries is not None:
        count = masks.shape[-1]
        own = torch.gather(masks, 2, queries[:, None, :].expand(-1, 3, -1).long())  # [B, 3 regions, 2 queries]
        rest = ((masks.sum(-1, keepdim=True) - own) / (count - 1)).numpy()  # [B, region, query]
        frame["same_removed"] = (rest[:, 0, 0] + rest[:, 1, 1]) / 2  # T->T and D->D
        frame["different_removed"] = (rest[:, 1, 0] + rest[:, 0, 1]) / 2  # T->D and D->T
        frame["background_removed"] = (rest[:, 2, 0] + rest[:, 2, 1]) / 2
    return frame


def image_curves(table: pd.DataFrame, group: str) -> tuple[list[str], np.ndarray]:
    """``(image ids, curves [images, layers])``: one group's ratio per image and layer, averaged over heads, for
    one model's rows of a :func:`measure` table (one variant)."""
    wide = table.groupby(["image", "layer"], sort=False)[group].mean().unstack("layer").sort_index(axis=1)
    return list(wide.index), wide.to_numpy(dtype=float)


def per_area(curves: dict[str, np.ndarray], chances: dict[str, np.ndarray], layer: int, resamples: int = 2000,
             seed: int = 0) -> dict[str, Interval]:
    """Attention per unit area in one layer: for each group, the ratio pooled over images divided by what
    uniform attention over the same key tokens would give (``sum ratio / sum chance``; 1 = chance), and
    ``"dominance"``: same-object attention per unit area over the larger of the other two groups', each with its
    bootstrap interval over images (one resampling for all four, so they are consistent).

    ``curves``: group -> ``[images, layers]`` (:func:`image_curves`); ``chances``: group -> ``[images]`` (the
    matching columns of :func:`chance`, in the same image order)."""
    columns = np.column_stack([curves[g][:, layer] for g in GROUPS] + [chances[g] for g in GROUPS])  # [images, 6]

    def ratios(sample: np.ndarray) -> np.ndarray:  # [R, images, 6] -> [R, 3] per-area ratios
        sums = sample.sum(axis=1)
        return sums[:, :3] / sums[:, 3:]

    out = {g: bootstrap(columns, lambda s, i=i: ratios(s)[:, i], resamples=resamples, seed=seed)
           for i, g in enumerate(GROUPS)}
    out["dominance"] = bootstrap(columns, lambda s: ratios(s)[:, 0] / ratios(s)[:, 1:].max(axis=1),
                                 resamples=resamples, seed=seed)
    return out


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


def select(table: pd.DataFrame, queries: str = "peak", self_token: str = "removed") -> pd.DataFrame:
    """The rows of one variant of a :func:`measure` table (the chapter's headline: peak token, self removed)."""
    if queries not in QUERY_CHOICES or self_token not in SELF_TOKEN:
        raise ValueError(f"queries must be one of {QUERY_CHOICES} and self_token one of {SELF_TOKEN}, "
                         f"got {queries!r}, {self_token!r}")
    rows = table[(table["queries"] == queries) & (table["self_token"] == self_token)]
    if rows.empty:
        raise ValueError(f"the table holds no rows for queries={queries!r}, self_token={self_token!r}: "
                         "measure with that choice of queries")
    return rows.reset_index(drop=True)


def per_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over images and heads per model and layer, with a 95% interval over images
    (each image first averaged over heads): columns model, layer, depth, group, mean, low, high, and
    ``queries`` / ``self_token`` when the table has them (each variant kept apart)."""
    variants = [c for c in ("queries", "self_token") if c in table.columns]
    keys = ["model", *variants, "layer", "depth"]
    by_image = table.groupby([*keys, "image"], sort=False)[list(GROUPS)].mean().reset_index()
    long = by_image.melt([*keys, "image"], list(GROUPS), var_name="group", value_name="ratio")
    stats = long.groupby([*keys, "group"], sort=False)["ratio"].agg(["mean", "std", "count"]).reset_index()
    half = 1.96 * stats["std"].fillna(0) / np.sqrt(stats["count"])
    stats["low"], stats["high"] = stats["mean"] - half, stats["mean"] + half
    return stats.drop(columns=["std"]).rename(columns={"count": "images"})
