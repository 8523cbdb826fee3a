"""Exact SVD of every head's query-key interaction matrix, and the paper's cosine statistics.

Per head, the attention score between tokens i and j (biases left out, 1/sqrt(d_k) dropped) is
``x_i^T (W_q^T W_k) x_j``. ``W_q^T W_k`` is d x d but has rank <= d_k, and is the product of two thin
d x d_k factors, so its SVD is computed from the factors (thin QR of each, then the SVD of the small
d_k x d_k core) in O(d d_k^2) per head -- never a dense d x d SVD. The thin QR is Cholesky-QR with a
second pass (CholeskyQR2: four batched matrix products per factor, orthonormal to float64 rounding for
factors with condition number up to ~1e7), with Householder QR as the fallback beyond that.

Shapes used throughout: L layers, H heads, d model width, r = d_k head dim (= number of modes).
"""

from __future__ import annotations

from contextlib import contextmanager
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
    rotates q and k by position (rotary embeddings). Either way the score is no longer exactly the bilinear
    form ``x^T W_q^T W_k x``.
    """

    wq: torch.Tensor
    wk: torch.Tensor
    qk_norm: bool = False
    rope: bool = False


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


@contextmanager
def one_thread(device: torch.device | str = "cpu"):
    """For batched LAPACK calls on small matrices (r x r Cholesky, inverse, SVD, least squares): they run one
    matrix at a time, so extra threads only cost synchronisation (10x slower measured on a shared 2-core
    machine). On the CPU, torch uses one thread inside this block; elsewhere it does nothing."""
    device = torch.device(device)
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Pass 1 of Cholesky-QR loses orthogonality ~ eps * cond^2 (rounding of the Gram matrix). Where the bound
# cond_2 <= ||R||_F ||R^-1||_F (itself >= r) is at most this, the loss is ~1e-12 and the second pass is skipped:
# random-init ViT factors (cond ~2, bound ~70) take one pass, trained ones (cond up to ~1e4) two.
ONE_PASS_COND = 100.0


def _thin_qr_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Cholesky-QR of the rows of ``w [N, r, d]`` (float64, r <= d), with a second pass where needed.

    Returns ``(basis [N, r, d], fix [N, r, r], tri [N, r, r])`` with ``w^T = Q tri`` (thin QR, ``tri`` upper
    triangular) and ``Q = basis^T fix`` (orthonormal columns), so that ``Q A = (fix A)^T``-times-``basis`` costs
    one product on ``[r, d]``. Pass 1: ``w w^T = R1^T R1`` (Cholesky), ``Q1^T = R1^{-T} w``. If every factor's
    condition number is below :data:`ONE_PASS_COND` that is orthonormal to ~1e-14 and ``basis = w``,
    ``fix = R1^{-1}``; otherwise pass 2 repeats it on ``Q1`` (CholeskyQR2; orthonormal to ~eps for condition
    numbers up to ~1e7). None when a Cholesky fails or pass 1 lost too much: use Householder QR then.
    """
    eye = torch.eye(w.shape[-2], dtype=w.dtype, device=w.device)
    with one_thread(w.device):
        r1, info = torch.linalg.cholesky_ex(w @ w.mT, upper=True)  # w w^T = r1^T r1
        if bool(info.any()):
            return None
        r1_inv = torch.linalg.solve_triangular(r1, eye, upper=True)
    cond = torch.linalg.matrix_norm(r1) * torch.linalg.matrix_norm(r1_inv)  # >= cond_2(w)
    if float(cond.amax()) <= ONE_PASS_COND:
        return w, r1_inv, r1
    q1t = r1_inv.mT @ w  # [N, r, d], rows orthonormal up to ~eps * cond(w)^2
    gram = q1t @ q1t.mT
    if float((gram - eye).abs().amax()) > 0.5:
        return None
    with one_thread(w.device):
        r2, info = torch.linalg.cholesky_ex(gram, upper=True)
        if bool(info.any()):
            return None
        r2_inv = torch.linalg.solve_triangular(r2, eye, upper=True)
    return q1t, r2_inv, r2 @ r1


def qk_svd_from_weights(weights: QKWeights, model: str = "") -> QKSVD:
    """Exact SVD of ``wq[l,h]^T wk[l,h]`` for all heads in one batched call.

    With ``W_q^T = Q_1 R_1`` and ``W_k^T = Q_2 R_2`` (thin QR) and the SVD ``R_1 R_2^T = A S B^T`` of the
    r x r core, ``U = Q_1 A`` and ``V = Q_2 B``.
    """
    layers, heads, r, d = weights.wq.shape
    wq, wk = (w.to(torch.float64).reshape(layers * heads, r, d) for w in (weights.wq, weights.wk))
    qr_q = _thin_qr_rows(wq) if r <= d else None
    qr_k = _thin_qr_rows(wk) if qr_q is not None else None
    if qr_q is not None and qr_k is not None:
        with one_thread(wq.device):
            a, s, b_t = torch.linalg.svd(qr_q[2] @ qr_k[2].mT)  # [N, r, r] core; W_q^T W_k = Q1 core Q2^T
            fix_q, fix_k = qr_q[1] @ a, qr_k[1] @ b_t.mT
        u = (fix_q.mT @ qr_q[0]).mT.reshape(layers, heads, d, r)  # U = Q1 A, computed as (fix A)^T basis
        v = (fix_k.mT @ qr_k[0]).mT.reshape(layers, heads, d, r)
        s = s.reshape(layers, heads, r)
    else:
        q1, r1 = torch.linalg.qr(weights.wq.transpose(-1, -2).to(torch.float64))  # [L, H, d, r], [L, H, r, r]
        q2, r2 = torch.linalg.qr(weights.wk.transpose(-1, -2).to(torch.float64))
        a, s, b_t = torch.linalg.svd(r1 @ r2.transpose(-1, -2))
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
    return QKSVD(S=s, U=u, V=v, model=model, exact=not (weights.qk_norm or weights.rope), notes=notes)


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
    return QKWeights(wq=torch.stack(wqs), wk=torch.stack(wks), qk_norm=qk_norm,
                     rope=getattr(model, "rope", None) is not None)


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

