"""§6: does attention group the tokens of one object? What each head's output does to token similarity.

The paper (§3, Fig 2; §5, Fig 6) finds that early layers attend within objects. Attention only chooses *where* a
head reads; what it adds to token i is ``o_i = sum_j a_ij OV x_j`` (``OV`` = ``diag(ls) W_O W_V``, LayerScale
included where the model has one, so ``o`` is what joins the residual stream; the value and output biases are
left out: they add one vector to every token whatever the attention). Whether that makes the tokens of one
object more alike depends on the OV as much as on the attention: a copying head that attends within objects
pulls each object's tokens towards their common mean, a head that writes one fixed direction moves every token
alike. This module measures it on images with exact object masks:

    contrast(t) = mean cos(t_i, t_j) over token pairs of one object  -  mean over pairs of different objects
    delta[l, h] = contrast(x + o^h) - contrast(x)

per image, with x the residual stream entering block l (the block's input, before its norm), o^h head h's
output for every image token (its attention rows over all keys, prefix tokens included), and pairs pooled over
the image's objects (i != j). ``delta > 0``: the head makes objects more distinct. The whole attention block
(every head's output together) is ``block``. Two nulls: the random-init control
(timm starts LayerScale at 1e-5, so where the architecture has one its heads add almost nothing), and the same
head attending uniformly, ``OV mean_j x_j`` added to every token (its OV and scale kept, its choice of keys
taken away). Beside it, per head, the *same-object attention*: over the tokens
of an object, the mean attention to the other tokens of the same object (the token's own weight removed and the
row renormalised, as §3 does) minus what uniform attention over the other tokens gives, ``(n_k - 1) / (N - 1)``.

A token belongs to the object that covers at least ``min_cover`` of its patch
(``qklib.analyses.same_object.token_coverage``, the label map resized and cropped like the image); other tokens
(background, edges) are in no pair. An image needs two objects of at least two tokens each, else it is skipped and
counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import nn

from ..core.extract import stream_layers
from ..core.images import to_pixels
from ..core.models import depth, prefix_tokens
from ..core.ov import OVWeights, ov_weights
from ..core.stats import RESAMPLES, bootstrap
from .same_object import token_coverage

MIN_COVER = 0.5  # a token belongs to an object that covers at least half of its patch


@dataclass
class ObjectContrast:
    """One model over one image set. ``delta``: ``[images, L, H]`` the change in within- minus between-object
    cosine that each head's output causes; ``uniform``: the same when the head attends uniformly
    (:func:`uniform_outputs`, the null that keeps its OV); ``block``: ``[images, L]`` the same for every head's output at once;
    ``before``: ``[images, L]`` the contrast of the block's input itself; ``attention``: ``[images, L, H]``
    same-object attention above uniform. ``images_used`` images had two objects of two tokens or more,
    ``images_skipped`` did not."""

    delta: np.ndarray
    uniform: np.ndarray
    block: np.ndarray
    before: np.ndarray
    attention: np.ndarray
    images_used: int
    images_skipped: int


def token_objects(model: nn.Module, labels: np.ndarray, min_cover: float = MIN_COVER) -> np.ndarray:
    """``[N]`` int64 over the image tokens: the index (0, 1, ...) of the object covering at least ``min_cover``
    of each token's patch, -1 for none; objects with fewer than two such tokens are dropped (-1) and the rest
    renumbered in label order. ``labels``: ``[H, W]`` instance label map (0 background, never an object)."""
    coverage, _ids = token_coverage(model, labels, min_tokens=0.0)
    if not len(coverage):
        return np.full(coverage.shape[1], -1, np.int64)
    owner = np.where(coverage.max(0) >= min_cover, coverage.argmax(0), -1)
    sizes = np.bincount(owner[owner >= 0], minlength=len(coverage))
    renumber = np.where(sizes >= 2, np.cumsum(sizes >= 2) - 1, -1)
    return np.where(owner >= 0, renumber[np.maximum(owner, 0)], -1).astype(np.int64)


def contrast(tokens: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """``[...]``: mean cosine of token pairs (i != j) within one object minus between two objects, pooled over
    pairs. ``tokens``: ``[..., N, d]``; ``objects``: ``[..., N]`` (broadcast against the tokens' leading axes) the
    object index per token, -1 for none; every image needs two objects of two tokens at least. From each object's
    sum of unit vectors ``S_k``: within pairs sum to ``sum_k |S_k|^2 - n_k``, all pairs to ``|sum_k S_k|^2 - n``;
    no N x N matrix, and the tokens are never copied (each token's ``1 / |t_i|`` goes into the K x N membership)."""
    objects = torch.as_tensor(objects)
    onehot = (objects[..., None, :] == torch.arange(int(objects.max()) + 1)[:, None]).to(tokens.dtype)  # [..., K, N]
    sizes = onehot.sum(-1).double()  # [..., K]
    if int((sizes >= 2).sum(-1).min()) < 2:
        raise ValueError("contrast needs two objects of two tokens or more in every image")
    inverse = 1 / tokens.norm(dim=-1).clamp_min(1e-12)  # [..., N]
    sums = ((onehot * inverse[..., None, :]) @ tokens).double()  # [..., K, d]
    within = (sums.square().sum(-1) - sizes).sum(-1)
    total = sums.sum(-2).square().sum(-1) - sizes.sum(-1)
    within_pairs, all_pairs = (sizes * (sizes - 1)).sum(-1), sizes.sum(-1) ** 2 - sizes.sum(-1)
    return within / within_pairs - (total - within) / (all_pairs - within_pairs)


def same_object_attention(attention: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """``[..., H]``: mean over the object tokens of their attention to the other tokens of their object, minus
    ``(n_k - 1) / (N - 1)`` (uniform attention). ``attention``: ``[..., H, N, N]`` over the image tokens (each
    row's own weight is removed and the row renormalised over the other image tokens); ``objects``: ``[..., N]``."""
    objects = torch.as_tensor(objects)
    tokens = attention.shape[-1]
    inside = objects >= 0
    others = ~torch.eye(tokens, dtype=torch.bool)
    same = (objects[..., :, None] == objects[..., None, :]) & inside[..., :, None] & others  # [..., N, N]
    rest = attention.sum(-1) - attention.diagonal(dim1=-2, dim2=-1)  # each row without its own weight
    share = (attention * same.unsqueeze(-3).to(attention.dtype)).sum(-1) / rest.clamp_min(1e-30)  # [..., H, N]
    chance = same.sum(-1).double() / (tokens - 1)  # [..., N]
    excess = (share.double() - chance.unsqueeze(-2)) * inside.unsqueeze(-2)
    return excess.sum(-1) / inside.sum(-1, keepdim=True)


def uniform_outputs(weights: OVWeights, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, H, d]``: what each head would add to every token with uniform attention over all T tokens,
    ``OV mean_j z_j``: the null that keeps the head's OV and its scale and takes away where it attends."""
    mean = tokens.mean(1)  # [B, d]
    return torch.einsum("bd,hrd,hcr->bhc", mean, weights.wv[layer].to(mean.dtype), weights.wo[layer].to(mean.dtype))


def head_outputs(weights: OVWeights, layer: int, tokens: torch.Tensor, attention: torch.Tensor,
                 prefix: int) -> torch.Tensor:
    """``[B, H, N, d]``: each head's output for every image token, ``sum_j a_ij OV z_j`` (``tokens`` z: ``[B, T, d]``
    normed block input; ``attention``: ``[B, H, T, T]``; the keys j run over all T tokens, prefix included)."""
    wv = weights.wv[layer].to(tokens.dtype)  # [H, r, d]
    wo = weights.wo[layer].to(tokens.dtype)  # [H, d, r]
    values = torch.einsum("btd,hrd->bhtr", tokens, wv)
    mixed = attention[:, :, prefix:, :].to(tokens.dtype) @ values  # [B, H, N, r]
    return torch.einsum("bhnr,hdr->bhnd", mixed, wo)


@torch.no_grad()
def _batch(model: nn.Module, pixels: torch.Tensor) -> tuple[dict, dict, dict]:
    """One forward pass: per layer the residual stream entering the block ``[B, T, d]``, the normed tokens and
    the attention probabilities, on the CPU in float32."""
    residual, normed, probs = {}, {}, {}
    hooks = [block.register_forward_pre_hook(lambda _m, args, i=i: residual.__setitem__(i, args[0].float().cpu()))
             for i, block in enumerate(model.blocks)]
    try:
        stream_layers(model, pixels, on_tokens=lambda i, z: normed.__setitem__(i, z.float().cpu()),
                      on_attention=lambda i, p: probs.__setitem__(i, p.float().cpu()))
    finally:
        for hook in hooks:
            hook.remove()
    return residual, normed, probs


def _layer(x: torch.Tensor, out: torch.Tensor, flat: torch.Tensor, attention: torch.Tensor,
           objects: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(delta [B, H], uniform [B, H], block [B], before [B], attention [B, H])`` of one layer for a batch:
    ``x`` ``[B, N, d]`` the block's input, ``out`` ``[B, H, N, d]`` (:func:`head_outputs`), ``flat`` ``[B, H, d]``
    (:func:`uniform_outputs`), ``attention`` ``[B, H, N, N]`` over the image tokens, ``objects`` ``[B, N]``."""
    start = contrast(x, objects)[:, None]  # [B, 1]
    block = contrast(x + out.sum(1), objects)[:, None] - start
    out += x[:, None]  # in place: [B, H, N, d] is the largest tensor here
    delta = contrast(out, objects[:, None]) - start
    uniform = contrast(x[:, None] + flat[:, :, None], objects[:, None]) - start
    return delta, uniform, block[:, 0], start[:, 0], same_object_attention(attention, objects)


def measure(model: nn.Module, dataset: Sequence, batch_size: int = 16, min_cover: float = MIN_COVER) -> ObjectContrast:
    """:class:`ObjectContrast` of ``model`` on ``dataset``: items with ``.image`` (PIL) and ``.objects``
    (``[H, W]`` instance labels, 0 background), e.g. ``qklib.core.datasets.o3.generate_scenes`` or
    ``qklib.core.datasets.ade20k.load_ade20k``. Raises ``ValueError`` when no image has two objects of two tokens
    each."""
    weights = ov_weights(model, layer_scale=True)
    prefix, layers = prefix_tokens(model), len(model.blocks)
    parts, skipped = [], 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        owners = [torch.as_tensor(token_objects(model, item.objects, min_cover)) for item in items]
        chosen = [i for i, owner in enumerate(owners) if int(owner.max()) >= 1]
        skipped += len(items) - len(chosen)
        if not chosen:
            continue
        residual, normed, probs = _batch(model, to_pixels(model, [items[i].image for i in chosen]))
        objects = torch.stack([owners[i] for i in chosen])
        per_layer = [_layer(residual[l][:, prefix:], head_outputs(weights, l, normed[l], probs[l], prefix),
                            uniform_outputs(weights, l, normed[l]), probs[l][:, :, prefix:, prefix:], objects)
                     for l in range(layers)]
        parts.append([torch.stack(values, 1).numpy() for values in zip(*per_layer)])  # each [B, L, ...]
    if not parts:
        raise ValueError(f"none of the {len(dataset)} images has two objects covering at least two tokens each "
                         f"(a token counts for an object covering {min_cover:.0%} of its patch); use images with "
                         "several larger objects")
    delta, uniform, block, before, attention = (np.concatenate(column) for column in zip(*parts))
    return ObjectContrast(delta, uniform, block, before, attention, len(delta), skipped)


def layer_table(runs: dict[str, ObjectContrast], resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Per model and layer: the change in contrast, mean over the layer's heads (``quantity`` "per head"), the
    same with each head attending uniformly ("uniform", the null) and for the whole attention block ("block"),
    and the contrast of the block's input itself ("before"), each with its 95% bootstrap interval over images
    (``low``, ``high``), in the layout of ``qklib.analyses.values.layer_table``."""
    rows = []
    for label, run in runs.items():
        layers = run.delta.shape[1]
        for quantity, values in (("per head", run.delta.mean(-1)), ("uniform", run.uniform.mean(-1)),
                                 ("block", run.block), ("before", run.before)):
            for layer in range(layers):
                interval = bootstrap(values[:, layer], resamples=resamples, seed=seed)
                rows.append({"model": label, "layer": layer, "depth": depth(layer, layers), "quantity": quantity,
                             "mean": interval.estimate, "low": interval.low, "high": interval.high})
    return pd.DataFrame(rows)


def head_table(runs: dict[str, ObjectContrast], heads: pd.DataFrame, weighted: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per model, layer and head: the change in contrast and the same-object attention (means over
    images), the head's weighted cosine (``weighted``: ``{label: [L, H]}``, ``QKSVD.weighted_cosine()``) and its
    copying score (from ``heads``, ``qklib.analyses.values.head_table``)."""
    frames = []
    for label, run in runs.items():
        layers, count = run.delta.shape[1:]
        layer, head = np.meshgrid(np.arange(layers), np.arange(count), indexing="ij")
        frame = pd.DataFrame({"model": label, "layer": layer.ravel(), "head": head.ravel(),
                              "delta": run.delta.mean(0).ravel(), "same_object_attention": run.attention.mean(0).ravel(),
                              "weighted_cosine": np.asarray(weighted[label]).ravel()})
        frames.append(frame.merge(heads[heads.model == label][["model", "layer", "head", "copying"]],
                                  on=["model", "layer", "head"]))
    return pd.concat(frames, ignore_index=True)


def grouping_score(attention, weighted_cosine) -> np.ndarray:
    """``[heads]``: how much each head groups, the mean of its rank (1 = lowest) in same-object attention and in
    weighted cosine: a grouping head attends within objects (measured on images) and pairs each query feature
    with a like key feature (the weights, §4)."""
    return (rankdata(np.asarray(attention, dtype=float)) + rankdata(np.asarray(weighted_cosine, dtype=float))) / 2


def ledger_measures(runs: dict[str, ObjectContrast], heads: pd.DataFrame, control: str | None = None,
                    permutations: int = 1000, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """The claims ledger's measures per model (``qklib.book.ledger.question_record``): ``grouping``, every image's
    change in contrast per layer (mean over heads), with the uniform-attention null and the random-init control's
    (``control``: its label in ``runs``, or None) beside it; ``grouping_copying``, every head's same-object
    attention, weighted cosine, copying score and layer (``heads``: :func:`head_table`)."""
    measures = {}
    for label, run in runs.items():
        rows = heads[heads.model == label]
        baseline = runs[control].delta.mean(-1).tolist() if control and control != label else None
        measures[label] = {
            "grouping": {"images": run.delta.mean(-1).tolist(), "uniform": run.uniform.mean(-1).tolist(),
                         "control": baseline, "resamples": int(resamples), "seed": int(seed)},
            "grouping_copying": {"attention": rows["same_object_attention"].tolist(),
                                 "weighted_cosine": rows["weighted_cosine"].tolist(),
                                 "copying": rows["copying"].tolist(), "layers": rows["layer"].astype(int).tolist(),
                                 "permutations": int(permutations), "resamples": int(resamples), "seed": int(seed)}}
    return measures


def output_scale(model: nn.Module) -> float | None:
    """How much the block's LayerScale scales the heads' outputs as they join the residual stream:
    ``|diag(ls) W_O|_F / |W_O|_F`` averaged over layers; None for a model without LayerScale. A random-init
    control starts it where timm initialises it, which can make its heads' contributions vanish."""
    raw, scaled = ov_weights(model), ov_weights(model, layer_scale=True)
    if not raw.has_layer_scale:
        return None
    return float((scaled.wo.flatten(1).norm(dim=1) / raw.wo.flatten(1).norm(dim=1)).mean())
