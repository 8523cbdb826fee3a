"""The QK decomposition: every head's query-key interaction matrix, its exact SVD, and the container of the modes.

Per head, the attention score between tokens i and j (biases left out, 1/sqrt(d_k) dropped) is
``x_i^T (W_q^T W_k) x_j``. :func:`qk_weights` takes W_q and W_k from the model's attention as the reader gives
them (``core.reader``), in the basis asked for (raw, gamma-folded, with biases); :func:`qk_svd` decomposes them
exactly with the fast thin-factor SVD (``core.lowrank``) and returns a :class:`QKSVD`, whose methods give the
paper's cosine statistics. The nulls of those statistics live in ``core.nulls`` (re-exported here).

Shapes used throughout: L layers, H heads, d model width, r = d_k head dim (= number of modes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .lowrank import CROSS_PRODUCT_COND, ONE_PASS_COND, one_thread, product_svd
from .models import model_name
from .nulls import (NULL_DRAWS, NULL_SEED, haar_diagonals, layer_null_band_from, layer_null_sd, null_band,
                    simulate_layer_null)
from .reader import AttentionWeights, read_attention

__all__ = ["BIAS_OPTIONS", "CROSS_PRODUCT_COND", "NULL_DRAWS", "NULL_SEED", "ONE_PASS_COND", "QKSVD", "QKWeights",
           "append_one", "basis_name", "basis_notes", "haar_diagonals", "layer_null_band", "layer_null_band_from",
           "layer_null_sd", "mode_scores", "null_band", "one_thread", "qk_svd", "qk_svd_from_weights", "qk_weights",
           "qk_weights_from", "simulate_layer_null"]


@dataclass
class QKWeights:
    """Per-head query and key projections, stacked.

    ``wq``, ``wk``: ``[L, H, d_k, d]`` float64, so that ``q = wq[l, h] @ x`` (``[L, H, d_k, d + 1]`` with
    ``with_bias``: ``q = wq[l, h] @ [x; 1]``).
    ``qk_norm``: True where the model normalises q and k per head (q_norm/k_norm); ``rope``: True where it
    rotates q and k by position (rotary embeddings); ``rel_pos_bias``: True where it adds a learned relative
    position bias to every score (BEiT, SimMIM). Either way the score is no longer exactly the bilinear
    form ``x^T W_q^T W_k x``.
    """

    wq: torch.Tensor
    wk: torch.Tensor
    qk_norm: bool = False
    rope: bool = False
    rel_pos_bias: bool = False
    fold_gamma: bool = False  # True: the LayerNorm's gamma folded in, W diag(gamma), acting on the standardised token z
    with_bias: bool | str = False  # True / "query": the last of d+1 columns is the bias, on [x; 1] (``qk_weights``)

    @property
    def basis(self) -> str:
        """What the bilinear form acts on (``basis_name``): raw, gamma-folded, with biases."""
        return basis_name(self.fold_gamma, self.with_bias)


@dataclass
class QKSVD:
    """Singular modes of ``W_q,h^T W_k,h`` for every layer and head.

    ``S``: ``[L, H, r]`` singular values, descending.
    ``U``: ``[L, H, d, r]`` left singular vectors (what a query looks for), columns unit norm.
    ``V``: ``[L, H, d, r]`` right singular vectors (what a key offers).
    The SVD fixes a mode only up to the joint flip ``(u_n, v_n) -> (-u_n, -v_n)``; here the entries of every
    ``u_n`` sum to a positive number, so that modes' signs (red and cyan in the maps, a feature's ``+`` and ``-``)
    do not depend on which LAPACK routine or build computed them.
    Mode ``n`` of head ``(l, h)`` is ``(U[l, h, :, n], S[l, h, n], V[l, h, :, n])``; indices are 0-based.
    """

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    model: str = ""
    exact: bool = True  # False: the model's scores are not exactly bilinear in the tokens (see ``notes``)
    notes: list[str] = field(default_factory=list)
    fold_gamma: bool = False  # see QKWeights; then U, V act on the standardised token z, not on x
    with_bias: bool | str = False  # see QKWeights; then U, V are [L, H, d + 1, r] and act on [x; 1]

    @property
    def basis(self) -> str:
        """What the modes act on (``basis_name``): raw, gamma-folded, with biases."""
        return basis_name(self.fold_gamma, self.with_bias)

    @property
    def num_layers(self) -> int:
        return self.S.shape[0]

    @property
    def num_heads(self) -> int:
        return self.S.shape[1]

    @property
    def dim(self) -> int:
        return self.U.shape[2]

    @property
    def rank(self) -> int:
        return self.S.shape[2]

    @property
    def cos(self) -> torch.Tensor:
        """``[L, H, r]``: cos_n = u_n . v_n. Its sign is meaningful (SVD flips u_n and v_n together)."""
        return torch.einsum("lhdr,lhdr->lhr", self.U, self.V)

    def weighted_cosine(self) -> torch.Tensor:
        """``[L, H]``: the paper's ``sum_n (s_n / sum_m s_m) cos_n`` per head.

        The authors' notebook further divides this sum by d_k; we follow the paper's formula.
        """
        weights = self.S / self.S.sum(-1, keepdim=True)
        return (weights * self.cos).sum(-1)

    def unweighted_cosine(self) -> torch.Tensor:
        """``[L, H]``: the plain mean of cos_n over modes."""
        return self.cos.mean(-1)

    def layer_weighted_cosine(self) -> torch.Tensor:
        """``[L]``: weighted cosine averaged over heads (Fig 3's y-axis)."""
        return self.weighted_cosine().mean(-1)

    def layer_unweighted_cosine(self) -> torch.Tensor:
        """``[L]``: unweighted cosine averaged over heads."""
        return self.unweighted_cosine().mean(-1)

    def matrix(self, layer: int, head: int) -> torch.Tensor:
        """``[d, d]``: U S V^T of one head, i.e. its W_q^T W_k (for checks, not analysis)."""
        u, s, v = self.U[layer, head], self.S[layer, head], self.V[layer, head]
        return (u * s) @ v.T


def _inexact_notes(weights: QKWeights) -> list[str]:
    """Why the scores of this model are not exactly the bilinear form ``x_i^T W_q^T W_k x_j`` (none when they are)."""
    notes = []
    if weights.qk_norm:
        notes.append(
            "this model normalises q and k per head (q_norm/k_norm): attention scores are not exactly "
            "the bilinear form x_i^T W_q^T W_k x_j, so the modes describe the pre-normalisation projections only"
        )
    if weights.rope:
        notes.append(
            "this model rotates q and k by token position (rotary embeddings): the score between two tokens "
            "depends on their positions, so W_q^T W_k is exact only for tokens at the same position"
        )
    if weights.rel_pos_bias:
        notes.append(
            "this model adds a learned relative position bias to every attention score (BEiT/SimMIM): the score is "
            "x_i^T W_q^T W_k x_j plus a term that depends only on where the two tokens are, so the modes describe "
            "the content part of the score only"
        )
    return notes


def qk_svd_from_weights(weights: QKWeights, model: str = "") -> QKSVD:
    """Exact SVD of ``wq[l,h]^T wk[l,h]`` for all heads (``core.lowrank.product_svd``), with the notes that say
    where the model's scores are not exactly this bilinear form."""
    s, u, v = product_svd(weights.wq, weights.wk)
    notes = _inexact_notes(weights)
    return QKSVD(S=s, U=u, V=v, model=model, exact=not notes, notes=notes)


BIAS_OPTIONS = (False, True, "query")


def _check_bias_option(with_bias) -> None:
    if with_bias not in BIAS_OPTIONS or isinstance(with_bias, int) and not isinstance(with_bias, bool):
        raise ValueError(f"with_bias must be False, True (both biases) or 'query' (the query bias only), "
                         f"got {with_bias!r}")


def basis_name(fold_gamma: bool = False, with_bias: bool | str = False) -> str:
    """``"raw"`` (the paper's: the form on the LayerNorm output x), ``"gamma-folded"`` (on the standardised
    token z), each with ``"+bias"`` when it acts on ``[x; 1]`` (resp. ``[z; 1]``) with both biases included, or
    ``"+query-bias"`` with the query bias only (``with_bias="query"``)."""
    _check_bias_option(with_bias)
    suffix = {False: "", True: "+bias", "query": "+query-bias"}[with_bias]
    return ("gamma-folded" if fold_gamma else "raw") + suffix


def basis_notes(fold_gamma: bool = False, with_bias: bool | str = False) -> list[str]:
    """The sentences that say which basis a decomposition is in (none for the paper's raw basis)."""
    notes = []
    if fold_gamma:
        notes.append(
            "basis: LayerNorm gamma folded in (W_q diag(gamma), W_k diag(gamma)): the modes act on the "
            "standardised token z = (h - mean) / std, not on the LayerNorm output x = gamma * z + beta that the "
            "paper's raw weights act on; beta is left out of the bilinear form (it joins the biases: "
            "W_q beta + b_q, W_k beta + b_k)"
        )
    if with_bias is True:
        notes.append(
            "bias-augmented: the modes act on [x; 1] (last coordinate the constant 1), so that "
            "[x_i; 1]^T M [x_j; 1] = q_i . k_j with the query and key biases included (1/sqrt(d_k) dropped); "
            "the top-left d x d block of M is the plain W_q^T W_k. The last column (x_i^T W_q^T b_k) and the corner "
            "(b_q . b_k) are constant over keys and cancel in the softmax, yet they can carry the largest mode "
            "(u_n, v_n close to the constant coordinate, cos_n near 1): with_bias='query' leaves them out"
        )
    elif with_bias == "query":
        notes.append(
            "query-bias-augmented: the modes act on [x; 1] (last coordinate the constant 1) with the query bias "
            "only, so that [x_i; 1]^T M [x_j; 1] = q_i . W_k x_j = q_i . k_j - q_i . b_k: the score up to the "
            "per-query constant that the softmax discards, i.e. exactly what sets the attention; the top-left "
            "d x d block of M is the plain W_q^T W_k and its last row is b_q^T W_k"
        )
    return notes


def _times(w: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``[L, H, r]``: ``w[l] @ vector[l]`` for ``w [L, H, r, d]``, ``vector [L, d]``, one matrix-vector product per
    layer over all its heads' rows (the rounding of one product per layer, whatever the head count)."""
    layers, heads, r, d = w.shape
    return torch.stack([(w[layer].reshape(heads * r, d) @ vector[layer]).reshape(heads, r) for layer in range(layers)])


def qk_weights_from(attention: AttentionWeights, fold_gamma: bool = False, with_bias: bool | str = False) -> QKWeights:
    """:func:`qk_weights` on weights the reader already gave (``core.reader.read_attention``)."""
    _check_bias_option(with_bias)
    wq, wk = attention.wq, attention.wk
    if with_bias:
        bq = attention.bq
        bk = attention.bk if with_bias is True else torch.zeros_like(attention.bk)
    if fold_gamma:
        gamma, beta = attention.norm_affine("fold_gamma")
        if with_bias:  # beta moves into the biases before gamma is folded into the weights
            bq = bq + _times(wq, beta)
            bk = bk + _times(wk, beta) if with_bias is True else bk
        wq, wk = wq * gamma[:, None, None, :], wk * gamma[:, None, None, :]
    if with_bias:
        wq, wk = torch.cat([wq, bq.unsqueeze(-1)], dim=-1), torch.cat([wk, bk.unsqueeze(-1)], dim=-1)
    return QKWeights(wq=wq, wk=wk, qk_norm=attention.qk_norm, rope=attention.rope,
                     rel_pos_bias=attention.rel_pos_bias, fold_gamma=fold_gamma, with_bias=with_bias)


def qk_weights(model: nn.Module, fold_gamma: bool = False, with_bias: bool | str = False) -> QKWeights:
    """Stack every layer's per-head W_q and W_k of a model (any family ``core.reader`` reads: timm ViTs with a
    fused ``qkv`` or separate q/k/v projections, the I-JEPA predictor, converted Hugging Face models).

    ``fold_gamma``: fold the LayerNorm's gamma into both projections, ``W_q diag(gamma)`` and ``W_k diag(gamma)``:
    the form on the standardised token z, with ``x = gamma * z + beta`` (TransformerLens's default). Without
    ``with_bias`` beta is left out: ``z_i^T (W_q diag g)^T (W_k diag g) z_j = (x_i - beta)^T W_q^T W_k (x_j - beta)``.
    ``with_bias``: append each head's bias as a last column, ``[W_q | b_q]`` and ``[W_k | b_k]``, so the form
    acts on ``[x; 1]`` and ``[x_i; 1]^T [W_q|b_q]^T [W_k|b_k] [x_j; 1] = q_i . k_j`` exactly, biases included.
    Both together: biases ``W_q beta + b_q`` and ``W_k beta + b_k`` on ``[z; 1]``, again exactly ``q_i . k_j``.
    ``with_bias="query"``: the key side's bias column is zero, ``[W_k | 0]``: the form is ``q_i . W_k x_j``, the
    score less the per-query constant ``q_i . b_k`` (which the softmax over keys discards).
    """
    _check_bias_option(with_bias)
    return qk_weights_from(read_attention(model), fold_gamma=fold_gamma, with_bias=with_bias)


def qk_svd(model: nn.Module, fold_gamma: bool = False, with_bias: bool | str = False) -> QKSVD:
    """Exact SVD of every head's W_q^T W_k of a model: ``S [L,H,r]``, ``U``/``V [L,H,d,r]``, float64.

    Default: the raw weights, the form on the LayerNorm output x (the paper's basis). ``fold_gamma`` and
    ``with_bias`` change the basis as in ``qk_weights`` (``with_bias=True`` or ``"query"``: ``U``/``V
    [L,H,d+1,r]`` on ``[x; 1]``); the result's ``basis`` and ``notes`` say which. With both biases the corner
    ``b_q . b_k`` and the column ``x_i^T W_q^T b_k``, constant over keys, can dominate the modes;
    ``with_bias="query"`` decomposes exactly the part of the score that the softmax keeps.
    """
    weights = qk_weights(model, fold_gamma=fold_gamma, with_bias=with_bias)
    svd = qk_svd_from_weights(weights, model=model_name(model))
    svd.fold_gamma, svd.with_bias = fold_gamma, with_bias
    svd.notes.extend(basis_notes(fold_gamma, with_bias))
    return svd


def append_one(x: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [..., d + 1]``: ``[x; 1]``, the token as a bias-augmented decomposition reads it."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def layer_null_band(svd: QKSVD, level: float = 0.95, draws: int = NULL_DRAWS, seed: int = NULL_SEED) -> torch.Tensor:
    """``[L]``: per layer, the half-width of the simulated ``level`` null band of Fig 3's statistic (the head mean
    of the s-weighted cosine) for this model's own singular values and width. ``null_band`` is the band of
    one cosine (the S1 histograms' line); this one is far narrower."""
    return layer_null_band_from(svd.S, svd.dim, level=level, draws=draws, seed=seed)


def mode_scores(svd: QKSVD, layer: int, head: int, x_query: torch.Tensor, x_key: torch.Tensor) -> torch.Tensor:
    """``[r, Tq, Tk]``: each mode's term (x_i . u_n) s_n (v_n . x_j) of one head's bias-free score.

    ``x_query``: ``[Tq, d]``, ``x_key``: ``[Tk, d]`` normed token embeddings. Summing over modes gives
    ``q_i . k_j`` with biases left out (and without the 1/sqrt(d_k) scale).
    """
    u, s, v = svd.U[layer, head], svd.S[layer, head], svd.V[layer, head]
    qp = x_query.to(u) @ u  # [Tq, r]
    kp = x_key.to(v) @ v  # [Tk, r]
    return torch.einsum("ir,r,jr->rij", qp, s, kp)
