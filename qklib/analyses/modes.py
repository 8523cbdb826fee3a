"""What one singular mode sees in an image: query and key maps, how much each mode contributes to an image's
attention scores and to its attention (paper §5, Fig 1, 4, 5), and a rule that picks modes to show.

Mode ``n`` of head ``(l, h)`` is ``(u_n, s_n, v_n)`` from :func:`qklib.qk_svd`. On the normed token
embeddings ``x_i`` that enter block ``l``'s qkv (``qklib.extract.token_embeddings``):

* query map ``x_i . u_n`` -- where a query token has what the mode looks for;
* key map ``x_j . v_n`` -- where a key token offers it.

SVD fixes each mode only up to a joint sign flip ``(u_n, v_n) -> (-u_n, -v_n)``; both signs are features
of the same mode. ``sign=-1`` shows the flipped feature (maps ``-x . u_n`` and ``-x . v_n``).

Labels are ``L{l} H{h} M{n}``, all 0-based (L0 is the first block, M0 the mode with the largest s_n);
a trailing ``-`` marks the sign-flipped feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import re

import numpy as np
import torch

from ..core.extract import record
from ..core.images import to_pixels
from ..core.svd import QKSVD

def mode_label(layer: int, head: int, mode: int, sign: int = 1) -> str:
    """``"L3 H2 M0"`` (0-based); ``"L3 H2 M0-"`` for the sign-flipped feature."""
    _check_sign(sign)
    return f"L{layer} H{head} M{mode}" + ("-" if sign < 0 else "")


def _check_sign(sign: int) -> None:
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1 (the flipped feature (-u_n, -v_n)), got {sign!r}")


def _check_index(svd: QKSVD, layer: int, head: int, mode: int | None = None) -> None:
    if not 0 <= layer < svd.num_layers:
        raise IndexError(f"layer {layer} out of range: the model has layers 0..{svd.num_layers - 1}")
    if not 0 <= head < svd.num_heads:
        raise IndexError(f"head {head} out of range: the model has heads 0..{svd.num_heads - 1}")
    if mode is not None and not 0 <= mode < svd.rank:
        raise IndexError(f"mode {mode} out of range: each head has modes 0..{svd.rank - 1}")


def projections(svd: QKSVD, tokens: torch.Tensor, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``tokens [..., T, d]`` (normed, entering block ``layer``) on every mode of one head.

    Returns ``(query [..., T, r], key [..., T, r])``: ``x_i . u_n`` and ``x_j . v_n`` in float64.
    """
    _check_index(svd, layer, head)
    if tokens.shape[-1] != svd.dim:
        raise ValueError(f"tokens have width {tokens.shape[-1]} but the model's is {svd.dim}")
    x = tokens.to(torch.float64)
    return x @ svd.U[layer, head], x @ svd.V[layer, head]


def _grid(tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"{tokens} image tokens do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"grid {grid} does not hold {tokens} image tokens")
    return grid


def mode_maps(svd: QKSVD, tokens: torch.Tensor, layer: int, head: int, mode: int, prefix_tokens: int = 1,
              sign: int = 1, grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key maps of one mode over the image tokens.

    ``tokens``: ``[B, T, d]`` (or ``[T, d]``) normed embeddings entering block ``layer``, prefix tokens first.
    Returns ``(query [B, rows, cols], key [B, rows, cols])`` float64: ``sign * x_i . u_n`` and
    ``sign * x_j . v_n`` (unnormalised).
    """
    _check_index(svd, layer, head, mode)
    _check_sign(sign)
    single = tokens.dim() == 2
    if single:
        tokens = tokens[None]
    x = tokens[:, prefix_tokens:].to(torch.float64)
    rows, cols = _grid(x.shape[1], grid)
    query = sign * (x @ svd.U[layer, head, :, mode])
    key = sign * (x @ svd.V[layer, head, :, mode])
    query, key = query.reshape(-1, rows, cols), key.reshape(-1, rows, cols)
    return (query[0], key[0]) if single else (query, key)


# --- Fig 5: one image through many modes -----------------------------------------------------------------

def mode_contributions(svd: QKSVD, tokens: torch.Tensor, layer: int, prefix_tokens: int = 1,
                       include_prefix: bool = False) -> torch.Tensor:
    """``[B, H, r]``: each mode's contribution to an image's attention scores in every head of ``layer``.

    The contribution of mode n of head h is the sum over token pairs of its term of the bias-free score:

        c_n = sum_{i, j} (x_i . u_n) s_n (v_n . x_j) = s_n (sum_i x_i . u_n) (sum_j x_j . v_n),

    with i (queries) and j (keys) over the image tokens only (``include_prefix=True`` adds CLS/registers).
    Summed over n it is the head's total bias-free score ``sum_{i,j} (W_q x_i) . (W_k x_j)`` (no 1/sqrt(d_k)).
    c_n does not change when the mode's sign is flipped. ``tokens``: ``[B, T, d]`` or ``[T, d]``.
    """
    if not 0 <= layer < svd.num_layers:
        raise IndexError(f"layer {layer} out of range: the model has layers 0..{svd.num_layers - 1}")
    single = tokens.dim() == 2
    if single:
        tokens = tokens[None]
    x = tokens if include_prefix else tokens[:, prefix_tokens:]
    total = x.to(torch.float64).sum(1)  # [B, d]: sum over tokens first, the sums factor
    query = torch.einsum("bd,hdr->bhr", total, svd.U[layer])
    key = torch.einsum("bd,hdr->bhr", total, svd.V[layer])
    out = query * svd.S[layer] * key
    return out[0] if single else out


def present_sign(svd: QKSVD, tokens: torch.Tensor, layer: int, head: int, mode: int, prefix_tokens: int = 1) -> int:
    """The sign of the feature an image holds on average: +1 if sum_i x_i . u_n >= 0 (over image tokens), else -1.

    For a mode with positive contribution both sums share this sign, so these maps show the present feature.
    """
    x = tokens[..., prefix_tokens:, :].to(torch.float64)
    return 1 if float((x @ svd.U[layer, head, :, mode]).sum()) >= 0 else -1


@dataclass(frozen=True)
class RankedMode:
    layer: int
    head: int
    mode: int
    sign: int
    contribution: float
    share: float  # contribution / sum over the head's modes of |contribution| (in [-1, 1])
    singular_value: float
    cos: float

    @property
    def label(self) -> str:
        return mode_label(self.layer, self.head, self.mode, self.sign)


def top_modes(svd: QKSVD, tokens: torch.Tensor, layer: int, head: int, count: int = 6,
              prefix_tokens: int = 1, probs: torch.Tensor | None = None) -> list[RankedMode]:
    """One image's ``count`` modes of head ``(layer, head)`` with the largest contribution (by signed value).
    ``tokens``: ``[T, d]`` entering block ``layer``.

    Without ``probs``, the contribution is the paper's sum over token pairs (:func:`mode_contributions`: the
    modes that raise the image's scores most, a key-mean the softmax discards); with the head's attention
    ``probs [T, T]``, it is the key-centred, attention-weighted contribution (:func:`attention_contributions`:
    the modes that make the head attend where it does). ``share`` is the contribution over the sum of the
    absolute contributions of all the head's modes. Each mode carries the sign of the feature present in the
    image (:func:`present_sign`)."""
    _check_index(svd, layer, head)
    if tokens.dim() != 2:
        raise ValueError(f"top_modes takes one image's tokens [T, d], got shape {tuple(tokens.shape)}")
    if probs is None:
        contrib = mode_contributions(svd, tokens, layer, prefix_tokens)[head]  # [r]
    else:
        contrib = attention_contributions(svd, tokens, probs, layer, head, prefix_tokens)
    # Modes can contribute with either sign, so a share of the signed total can exceed 1; use the absolute mass.
    total = float(contrib.abs().sum())
    order = torch.argsort(contrib, descending=True)[:count].tolist()
    cos = svd.cos[layer, head]
    return [
        RankedMode(layer, head, n, present_sign(svd, tokens, layer, head, n, prefix_tokens), float(contrib[n]),
                   float(contrib[n]) / total if total else float("nan"), float(svd.S[layer, head, n]), float(cos[n]))
        for n in order
    ]


# --- Fig 5 by effect on attention ---------------------------------------------------------------------------

def score_terms(svd: QKSVD, tokens: torch.Tensor, layer: int, head: int, prefix_tokens: int = 1,
                modes=None) -> torch.Tensor:
    """``[r, N, N]`` float64: every mode's term ``a^n_ij = (x_i . u_n) s_n (v_n . x_j)`` of the bias-free score
    between the image tokens (queries i, keys j); with ``modes`` (a list of indices) only those, in that order.
    ``tokens``: one image's ``[T, d]`` entering block ``layer``."""
    query, key = projections(svd, tokens[prefix_tokens:], layer, head)  # [N, r] each
    s = svd.S[layer, head].double()
    if modes is not None:
        modes = list(modes)
        query, key, s = query[:, modes], key[:, modes], s[modes]
    return torch.einsum("in,n,jn->nij", query, s, key)


def image_attention(probs: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """``[..., N, N]`` float64: attention among the image tokens (prefix rows and columns dropped), each row
    renormalised to sum 1. ``probs``: ``[..., T, T]`` probabilities as the model computes them."""
    p = probs[..., prefix_tokens:, prefix_tokens:].to(torch.float64)
    return p / p.sum(-1, keepdim=True)


def attention_contributions(svd: QKSVD, tokens: torch.Tensor, probs: torch.Tensor, layer: int, head: int,
                            prefix_tokens: int = 1) -> torch.Tensor:
    """``[r]``: each mode's key-centred contribution weighted by the head's own attention,
    ``c_n = sum_i sum_j p_ij (a^n_ij - mean_j a^n_ij) = s_n sum_i (x_i . u_n) (sum_j p_ij x_j . v_n - mean_j x_j . v_n)``.

    ``tokens``: one image's ``[T, d]`` entering block ``layer``; ``probs``: that head's ``[T, T]`` attention
    (:func:`qklib.core.extract.attention_probs`), restricted to image tokens and renormalised
    (:func:`image_attention`). A positive ``c_n``: the mode raises the scores of the keys the head attends to."""
    _check_index(svd, layer, head)
    query, key = projections(svd, tokens[prefix_tokens:], layer, head)  # [N, r]
    p = image_attention(probs, prefix_tokens)
    if p.shape != (query.shape[0], query.shape[0]):
        raise ValueError(f"attention {tuple(probs.shape)} does not match {tokens.shape[0]} tokens")
    return svd.S[layer, head].double() * (query * (p @ key - key.mean(0))).sum(0)


def ablated_attention(attention: torch.Tensor, terms: torch.Tensor, removed, scale: float) -> torch.Tensor:
    """``[N, N]``: the head's attention with the modes ``removed`` taken out of its score.

    The model's logits are ``log p_ij`` up to a per-query constant (biases and everything else included), so
    removing mode n from ``W_q^T W_k`` gives ``softmax_j(log p_ij - scale * sum_{n removed} a^n_ij)``; ``scale``
    is the head's ``1 / sqrt(d_k)``. ``attention [N, N]``, ``terms [r, N, N]``."""
    removed = list(removed)
    logits = attention.to(torch.float64).log()
    if removed:
        logits = logits - scale * terms[removed].sum(0)
    return torch.softmax(logits, dim=-1)


def attention_change(attention: torch.Tensor, terms: torch.Tensor, removed, scale: float) -> float:
    """Mean over query rows of the total-variation distance ``0.5 sum_j |p'_ij - p_ij|`` between the head's
    attention and :func:`ablated_attention` (0: no change, 1: disjoint)."""
    changed = ablated_attention(attention, terms, removed, scale)
    return float(0.5 * (changed - attention.to(torch.float64)).abs().sum(-1).mean())


def ablation_rows(svd: QKSVD, tokens: torch.Tensor, probs: torch.Tensor, layer: int, count: int = 6,
                  prefix_tokens: int = 1, seed: int = 0) -> list[dict]:
    """Ablation of four mode rankings in every head of ``layer`` for a batch of images.

    ``tokens [B, T, d]`` entering block ``layer``, ``probs [B, H, T, T]`` its attention. For each image and head:
    the mean total-variation change of the attention rows (:func:`attention_change`) when the top ``count``
    modes are removed by the attention-weighted ranking (``by_attention``), by the paper's sum (``by_paper_sum``,
    :func:`mode_contributions`), by singular value alone (``by_singular_value``: modes 0..count-1), and
    ``count`` modes drawn at random (``by_random``, the null; a generator seeded with ``seed`` and the layer),
    and how many of the attention-weighted and paper top sets are shared (``overlap``)."""
    scale = svd.rank ** -0.5
    paper = mode_contributions(svd, tokens, layer, prefix_tokens)  # [B, H, r]
    generator = torch.Generator().manual_seed(seed * 1000 + layer)
    chosen = {}
    rows = []
    for b in range(tokens.shape[0]):
        for head in range(svd.num_heads):
            attention = image_attention(probs[b, head], prefix_tokens)
            ours = attention_contributions(svd, tokens[b], probs[b, head], layer, head, prefix_tokens)
            chosen["by_attention"] = torch.argsort(ours, descending=True)[:count].tolist()
            chosen["by_paper_sum"] = torch.argsort(paper[b, head], descending=True)[:count].tolist()
            chosen["by_singular_value"] = list(range(min(count, svd.rank)))
            chosen["by_random"] = torch.randperm(svd.rank, generator=generator)[:count].tolist()
            terms = score_terms(svd, tokens[b], layer, head, prefix_tokens, sum(chosen.values(), []))
            row = {"image": b, "layer": layer, "head": head, "count": count,
                   "overlap": len(set(chosen["by_attention"]) & set(chosen["by_paper_sum"]))}
            for i, name in enumerate(chosen):
                row[name] = attention_change(attention, terms, range(i * count, (i + 1) * count), scale)
            rows.append(row)
    return rows


def ablation(model, svd: QKSVD, images, layers, count: int = 6, seed: int = 0) -> list[dict]:
    """:func:`ablation_rows` for every layer in ``layers`` over a few PIL ``images`` (one forward pass)."""
    recorded = record(model, to_pixels(model, list(images)), tokens=True, attention=True, layers=list(layers))
    rows = []
    for i, layer in enumerate(layers):
        rows += ablation_rows(svd, recorded.tokens[i], recorded.attention[i], layer, count, recorded.prefix_tokens,
                              seed)
    return rows


# --- modes chosen by a rule -------------------------------------------------------------------------------

RULE_DEPTHS = (0.1, 0.5, 0.9)  # early, middle and late: fractions of the way from the first to the last layer


def rule_layers(num_layers: int, depths=RULE_DEPTHS) -> list[int]:
    """The layers nearest to ``depths`` (fractions of ``L - 1``), rounded half up, without repeats."""
    chosen = [int(float(f) * (num_layers - 1) + 0.5) for f in depths]
    return list(dict.fromkeys(chosen))


def rule_modes(svd: QKSVD, depths=RULE_DEPTHS) -> list[tuple[int, int, int, int]]:
    """The rule, fixed before looking at any picture: in an early, a middle and a late layer
    (:func:`rule_layers`), the mode with the largest singular value of all its heads (M0 of the head whose
    s_0 is largest), with sign +1. Returns ``(layer, head, mode, sign)`` tuples."""
    return [(layer, int(torch.argmax(svd.S[layer, :, 0])), 0, 1) for layer in rule_layers(svd.num_layers, depths)]


def map_correlation(svd: QKSVD, tokens: torch.Tensor, layer: int, head: int, mode: int,
                    prefix_tokens: int = 1) -> float:
    """Pearson correlation, over all image tokens of ``tokens [B, T, d]``, between the query map ``x . u_n`` and
    the key map ``x . v_n`` of one mode: high where a token that has the query feature also offers the key
    feature (maps that overlap), near 0 or negative where they sit apart. Unchanged by the sign flip."""
    _check_index(svd, layer, head, mode)
    x = tokens[..., prefix_tokens:, :].reshape(-1, tokens.shape[-1]).to(torch.float64)
    query, key = x @ svd.U[layer, head, :, mode], x @ svd.V[layer, head, :, mode]
    return float(torch.corrcoef(torch.stack([query, key]))[0, 1])


def position_share(maps: np.ndarray) -> float:
    """The share of a mode's map variance that token position alone explains: over ``maps [images, tokens]``, the
    variance of the per-position mean (over images) divided by the total variance. 1: every image gives the same
    map (the mode reads position, not content); about ``1 / images``: position says nothing."""
    maps = np.asarray(maps, dtype=float)
    total = maps.var()
    return float(maps.mean(axis=0).var() / total) if total > 0 else float("nan")


def position_shares(model, svd: QKSVD, batches, chosen, draws: int = 20, seed: int = 0) -> list[dict]:
    """For each ``(layer, head, mode, sign)`` in ``chosen``: :func:`position_share` of its query map
    (``x . u_n``) and of its key map (``x . v_n``) over all images of ``batches`` (an iterable of lists of PIL
    images), the 97.5th percentile of each under a null that permutes every image's tokens (``draws``
    seeded permutations: position then carries no information), the maps' ``correlation`` pooled over every
    token of every image (:func:`map_correlation` over the whole gallery, from the same pass), and the
    per-position mean maps ``query_mean``, ``key_mean`` (``[N]``, sign +1: the part of each map that position
    explains, which :func:`qklib.present.render.mode_pictures` can take out)."""
    chosen = list(chosen)
    layers = sorted({c[0] for c in chosen})
    maps: list[list[torch.Tensor]] = [[] for _ in chosen]
    for images in batches:
        recorded = record(model, to_pixels(model, list(images)), layers=layers)
        for c, (layer, head, mode, _sign) in enumerate(chosen):
            x = recorded.tokens[layers.index(layer)][:, recorded.prefix_tokens:].double()  # [B, N, d]
            maps[c].append(torch.stack([x @ svd.U[layer, head, :, mode], x @ svd.V[layer, head, :, mode]]))
    rng = np.random.default_rng(seed)
    rows = []
    for c, parts in enumerate(maps):
        both = torch.cat(parts, dim=1).numpy()  # [2, images, N]
        shuffled = [[position_share(rng.permuted(side, axis=1)) for _ in range(draws)] for side in both]
        rows.append({"query": position_share(both[0]), "key": position_share(both[1]),
                     "query_mean": both[0].mean(axis=0), "key_mean": both[1].mean(axis=0),
                     "correlation": float(np.corrcoef(both[0].ravel(), both[1].ravel())[0, 1]),
                     "query_null": float(np.percentile(shuffled[0], 97.5)),
                     "key_null": float(np.percentile(shuffled[1], 97.5)), "images": both.shape[1]})
    return rows


def parse_label(text: str) -> tuple[int, int, int, int]:
    """``"L10 H3 M0"`` -> ``(10, 3, 0, +1)``; a trailing ``-`` (``"L10 H3 M0-"``) gives sign -1. 0-based."""
    match = re.fullmatch(r"\s*L(\d+)\s*H(\d+)\s*M(\d+)\s*(-?)\s*", str(text))
    if not match:
        raise ValueError(f"mode label {text!r}: write it as 'L<layer> H<head> M<mode>' (0-based), e.g. 'L10 H3 M0', "
                         "with a trailing '-' for the sign-flipped feature")
    return int(match[1]), int(match[2]), int(match[3]), -1 if match[4] else 1
