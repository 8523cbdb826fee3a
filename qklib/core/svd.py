"""Exact SVD of every head's query-key interaction matrix, and the paper's cosine statistics.

Per head, the attention score between tokens i and j (biases left out, 1/sqrt(d_k) dropped) is
``x_i^T (W_q^T W_k) x_j``. ``W_q^T W_k`` is d x d but has rank <= d_k, and is the product of two thin
d x d_k factors, so its SVD is computed from the factors (thin QR of each, then the SVD of the small
d_k x d_k core) in O(d d_k^2) per head -- never a dense d x d SVD.

Shapes used throughout: L layers, H heads, d model width, r = d_k head dim (= number of modes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy.stats import beta
from torch import nn

from .models import attention_module, model_name, query_key_weights


@dataclass
class QKWeights:
    """Per-head query and key projections, stacked.

    ``wq``, ``wk``: ``[L, H, d_k, d]`` float64, so that ``q = wq[l, h] @ x``.
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


@dataclass
class QKSVD:
    """Singular modes of ``W_q,h^T W_k,h`` for every layer and head.

    ``S``: ``[L, H, r]`` singular values, descending.
    ``U``: ``[L, H, d, r]`` left singular vectors (what a query looks for), columns unit norm.
    ``V``: ``[L, H, d, r]`` right singular vectors (what a key offers).
    Mode ``n`` of head ``(l, h)`` is ``(U[l, h, :, n], S[l, h, n], V[l, h, :, n])``; indices are 0-based.
    """

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    model: str = ""
    exact: bool = True  # False: the model's scores are not exactly bilinear in the tokens (see ``notes``)
    notes: list[str] = field(default_factory=list)

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


def qk_svd_from_weights(weights: QKWeights, model: str = "") -> QKSVD:
    """Exact SVD of ``wq[l,h]^T wk[l,h]`` for all heads in one batched call."""
    wq_t = weights.wq.transpose(-1, -2).to(torch.float64)  # [L, H, d, r]
    wk_t = weights.wk.transpose(-1, -2).to(torch.float64)
    q1, r1 = torch.linalg.qr(wq_t)  # [L, H, d, r], [L, H, r, r]
    q2, r2 = torch.linalg.qr(wk_t)
    core = r1 @ r2.transpose(-1, -2)  # [L, H, r, r]; W_q^T W_k = Q1 core Q2^T
    a, s, b_t = torch.linalg.svd(core)
    u = q1 @ a
    v = q2 @ b_t.transpose(-1, -2)
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
    exact = not (weights.qk_norm or weights.rope or weights.rel_pos_bias)
    return QKSVD(S=s, U=u, V=v, model=model, exact=exact, notes=notes)


def qk_weights(model: nn.Module) -> QKWeights:
    """Stack every block's per-head W_q and W_k from a timm vision transformer.

    Handles timm's fused ``attn.qkv`` (rows [0:D) are W_q, [D:2D) W_k, head h owns rows
    h*d_k:(h+1)*d_k of each) and separate ``q``/``k`` (or ``q_proj``/``k_proj``) projections.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(
            f"{type(model).__name__} has no transformer 'blocks'; qk_weights needs a timm vision transformer"
        )
    wqs, wks, qk_norm = [], [], False
    for index, block in enumerate(blocks):
        attn = attention_module(block)
        if attn is None:
            raise TypeError(
                f"block {index} ({type(block).__name__}): no self-attention module with a fused 'qkv' Linear "
                "or separate 'q'/'k' Linears"
            )
        heads = attn.num_heads
        wq, wk = (w.to("cpu", torch.float64) for w in query_key_weights(attn))
        d_attn, d = wq.shape
        if d_attn % heads:
            raise ValueError(f"block {index}: attention width {d_attn} is not divisible by {heads} heads")
        head_dim = d_attn // heads
        wqs.append(wq.reshape(heads, head_dim, d))
        wks.append(wk.reshape(heads, head_dim, d))
        for norm_name in ("q_norm", "k_norm"):
            norm = getattr(attn, norm_name, None)
            if norm is not None and not isinstance(norm, nn.Identity):
                qk_norm = True
    if len({tuple(w.shape) for w in wqs}) != 1:
        raise ValueError("blocks differ in head count or width; stacked analysis needs a uniform transformer")
    rel_pos_bias = getattr(model, "rel_pos_bias", None) is not None or any(
        getattr(block.attn, "relative_position_bias_table", None) is not None for block in blocks)
    return QKWeights(wq=torch.stack(wqs), wk=torch.stack(wks), qk_norm=qk_norm,
                     rope=getattr(model, "rope", None) is not None, rel_pos_bias=rel_pos_bias)


def qk_svd(model: nn.Module) -> QKSVD:
    """Exact SVD of every head's W_q^T W_k of a timm ViT: ``S [L,H,r]``, ``U``/``V [L,H,d,r]``, float64."""
    return qk_svd_from_weights(qk_weights(model), model=model_name(model))


def null_band(dim: int, level: float = 0.95) -> float:
    """Half-width of the central ``level`` interval of the cosine of two independent random unit vectors
    in R^dim. Exact: (cos + 1) / 2 ~ Beta((dim-1)/2, (dim-1)/2); sd is ~ 1/sqrt(dim)."""
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    a = (dim - 1) / 2
    return float(2 * beta.ppf(0.5 + level / 2, a, a) - 1)


def mode_scores(svd: QKSVD, layer: int, head: int, x_query: torch.Tensor, x_key: torch.Tensor) -> torch.Tensor:
    """``[r, Tq, Tk]``: each mode's term (x_i . u_n) s_n (v_n . x_j) of one head's bias-free score.

    ``x_query``: ``[Tq, d]``, ``x_key``: ``[Tk, d]`` normed token embeddings. Summing over modes gives
    ``q_i . k_j`` with biases left out (and without the 1/sqrt(d_k) scale).
    """
    u, s, v = svd.U[layer, head], svd.S[layer, head], svd.V[layer, head]
    qp = x_query.to(u) @ u  # [Tq, r]
    kp = x_key.to(v) @ v  # [Tk, r]
    return torch.einsum("ir,r,jr->rij", qp, s, kp)

