"""Exact SVD of every head's query-key interaction matrix, and the paper's cosine statistics.

Per head, the attention score between tokens i and j (biases left out, 1/sqrt(d_k) dropped) is
``x_i^T (W_q^T W_k) x_j``. ``W_q^T W_k`` is d x d but has rank <= d_k, and is the product of two thin
d x d_k factors, so its SVD is computed from the factors (thin QR of each, then the SVD of the small
d_k x d_k core) in O(d d_k^2) per head -- never a dense d x d SVD. The thin QR is Cholesky-QR: one pass
(two batched matrix products per factor) for heads whose factor has condition number <= 100, a second pass
(CholeskyQR2, orthonormal to float64 rounding up to condition numbers ~1e7) for the others, and Householder
QR as the fallback beyond that. Heads run in chunks of a few MB, so the intermediates stay in cache.

Shapes used throughout: L layers, H heads, d model width, r = d_k head dim (= number of modes).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import beta
from torch import nn

from .models import attention_blocks, model_name, norm1_affine, query_key_weights


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
    fold_gamma: bool = False  # True: norm1's gamma folded in, W diag(gamma), acting on the standardised token z
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


# Pass 1 of Cholesky-QR loses orthogonality ~ eps * cond^2 (rounding of the Gram matrix). Heads whose factor has
# condition number at most this keep pass 1 (loss ~1e-12); the others take a second pass (CholeskyQR2). Random-init
# ViT factors (cond ~2) and most heads of trained ones (the embedded DINOv2 ViT-S/14: median ~4) take one pass;
# near-degenerate trained heads (cond up to ~2e4 there) take two.
ONE_PASS_COND = 100.0

# The r x r core's SVD comes from the eigendecomposition of core^T core (symmetric eigensolver: about half the cost
# of LAPACK's SVD, measured 37 against 70 ms for 144 64x64 cores) where the core's condition number is at most this;
# the left vectors' orthonormality is then lost by ~eps * cond^2 (~1e-14), and the reconstruction is exact to ~eps
# whatever the condition. Random-init cores (cond ~3) take it, and 34 of the embedded model's 72; the others take
# the SVD.
CROSS_PRODUCT_COND = 10.0

# Heads go through the SVD in chunks of about this many bytes of float64 factor: the chunk's intermediates stay in
# cache and are reused by the allocator, instead of page-faulting in fresh [L*H, d_k, d] buffers on every call.
_CHUNK_BYTES = 1 << 22


def _empty_output(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An uninitialised float64 tensor for the SVD's two ``[L*H, r, d]`` outputs (56 MB each on ViT-B/16).

    On the CPU it is allocated by numpy, which asks the kernel for transparent huge pages on large arrays (numpy's
    default on Linux since 1.16); torch's own allocator does so only with ``THP_MEM_ALLOC_ENABLE=1``. Writing the
    outputs then page-faults 2 MB pages instead of 4 KB ones: measured 26 -> 5 ms per 56 MB output on a 2-core
    EPYC, about 15 % of ``qk_svd`` on ViT-B/16. The tensor shares the array's memory and keeps it alive."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype=np.float64))
    return torch.empty(shape, dtype=torch.float64, device=device)


def _condition_numbers(gram: torch.Tensor) -> torch.Tensor:
    """cond_2 of each factor ``w`` from its Gram matrix ``w w^T`` (eigenvalues are squared singular values;
    inf where the smallest is not positive). Accurate enough to compare with :data:`ONE_PASS_COND`: the Gram's
    rounding moves its smallest eigenvalue by ~eps * the largest, far below largest / ONE_PASS_COND^2."""
    with one_thread(gram.device):
        eig = torch.linalg.eigvalsh(gram)
    return torch.where(eig[..., 0] > 0, (eig[..., -1] / eig[..., 0].clamp_min(1e-300)).sqrt(), torch.inf)


def _thin_qr_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Cholesky-QR of the rows of ``w [N, r, d]`` (float64, r <= d), with a second pass for the heads that need it.

    Returns ``(basis [N, r, d], fix [N, r, r], tri [N, r, r])`` with ``w^T = Q tri`` (thin QR, ``tri`` upper
    triangular) and ``Q = basis^T fix`` (orthonormal columns), so that ``Q A`` costs one product on ``[r, d]``.
    Pass 1: ``w w^T = R1^T R1`` (Cholesky), ``Q1^T = R1^{-T} w``; for a head whose factor has condition number
    at most :data:`ONE_PASS_COND` that is orthonormal to ~1e-12 and its ``basis = w``, ``fix = R1^{-1}``. The
    condition number is bounded first by ``||R1||_F ||R1^-1||_F`` (between cond_2 and r cond_2, free) and
    computed exactly (eigenvalues of the Gram) only where the bound cannot decide. The other heads repeat it on
    ``Q1`` (pass 2, CholeskyQR2: orthonormal to ~eps for condition numbers up to ~1e7). None when a Cholesky
    fails or pass 1 lost too much: use Householder QR then.
    """
    r = w.shape[-2]
    eye = torch.eye(r, dtype=w.dtype, device=w.device)
    gram = w @ w.mT
    with one_thread(w.device):
        r1, info = torch.linalg.cholesky_ex(gram, upper=True)  # w w^T = r1^T r1
        if bool(info.any()):
            return None
        r1_inv = torch.linalg.solve_triangular(r1, eye, upper=True)
    bound = torch.linalg.matrix_norm(r1) * torch.linalg.matrix_norm(r1_inv)  # cond_2 <= bound <= r cond_2
    second = bound > ONE_PASS_COND
    undecided = second & (bound <= ONE_PASS_COND * r)
    if bool(undecided.any()):
        second[undecided] = _condition_numbers(gram[undecided]) > ONE_PASS_COND
    if not bool(second.any()):
        return w, r1_inv, r1
    index = second.nonzero().squeeze(1)
    q1t = r1_inv[index].mT @ w[index]  # rows orthonormal up to ~eps * cond(w)^2
    gram2 = q1t @ q1t.mT
    if float((gram2 - eye).abs().amax()) > 0.5:
        return None
    with one_thread(w.device):
        r2, info = torch.linalg.cholesky_ex(gram2, upper=True)
        if bool(info.any()):
            return None
        r2_inv = torch.linalg.solve_triangular(r2, eye, upper=True)
    basis = w.clone()
    basis[index] = q1t
    r1_inv[index] = r2_inv
    r1[index] = r2 @ r1[index]
    return basis, r1_inv, r1


def _core_svd(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``core = A diag(s) B^T`` for each r x r core (``[N, r, r]``), ``s`` descending.

    From ``core^T core = B diag(s^2) B^T`` (eigh), ``A = core B diag(1/s)`` with ``s`` the column norms of
    ``core B``, for the cores whose condition number is at most :data:`CROSS_PRODUCT_COND` (decided from the
    eigenvalues); LAPACK's SVD for the others. ``core B B^T = core`` to rounding, so ``A diag(s) B^T`` reconstructs
    the core exactly either way; ``A^T A`` is off the identity by the eigensolver's residual over ``s_i s_j``,
    ~eps * cond^2. ``s_i`` is a norm, accurate to second order in the eigenvector's error."""
    with one_thread(core.device):
        lam, b = torch.linalg.eigh(core.mT @ core)  # ascending
        cross = (lam[..., 0] > 0) & (lam[..., 0] * CROSS_PRODUCT_COND**2 >= lam[..., -1])
        w = core @ b
        s, order = torch.linalg.vector_norm(w, dim=-2).sort(dim=-1, descending=True)
        columns = order.unsqueeze(-2).expand_as(b)
        b, a = b.gather(-1, columns), w.gather(-1, columns) / s.unsqueeze(-2)
        if not bool(cross.all()):
            index = (~cross).nonzero().squeeze(1)
            a[index], s[index], b_t = torch.linalg.svd(core[index])
            b[index] = b_t.mT
    return a, s, b


def _positive_sums(basis_sums: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """The sign convention of :class:`QKSVD`, in place: flip column n of ``left`` and ``right`` (``[N, r, m]``)
    where ``u_n = basis^T left[:, n]`` has a negative sum of entries. ``basis_sums`` (``[N, r]``): the sums of the
    basis's rows, so that ``basis_sums @ left`` are those sums without forming ``u``."""
    sums = (basis_sums.unsqueeze(-2) @ left).squeeze(-2)
    sign = torch.where(sums < 0, -1.0, 1.0).to(left.dtype).unsqueeze(-2)
    left.mul_(sign)
    right.mul_(sign)


def _householder_svd(wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fallback for factors of (nearly) deficient rank, or more modes than dimensions: Householder QR of both
    (``wq``, ``wk``: ``[N, r, d]`` float64) and the SVD of the core. ``(U [N, d, m], S [N, m], V [N, d, m])``,
    ``m = min(r, d)``."""
    q1, r1 = torch.linalg.qr(wq.mT)  # [N, d, m], [N, m, r]
    q2, r2 = torch.linalg.qr(wk.mT)
    a, s, b_t = torch.linalg.svd(r1 @ r2.mT)
    b = b_t.mT
    _positive_sums(q1.sum(-2), a, b)
    return q1 @ a, s, q2 @ b


def _svd_chunk(wq: torch.Tensor, wk: torch.Tensor, s: torch.Tensor, ut: torch.Tensor, vt: torch.Tensor) -> None:
    """SVD of ``wq[n]^T wk[n]`` for a chunk of heads (``[N, r, d]`` each, r <= d), written into ``s [N, r]`` and
    the transposed singular vectors ``ut``, ``vt`` (``[N, r, d]``)."""
    wq, wk = wq.to(torch.float64), wk.to(torch.float64)
    qr_q = _thin_qr_rows(wq)
    qr_k = _thin_qr_rows(wk) if qr_q is not None else None
    if qr_q is not None and qr_k is not None:
        with one_thread(wq.device):
            a, s_chunk, b = _core_svd(qr_q[2] @ qr_k[2].mT)  # [N, r, r] core; W_q^T W_k = Q1 core Q2^T
            fix_q, fix_k = qr_q[1] @ a, qr_k[1] @ b
            _positive_sums(qr_q[0].sum(-1), fix_q, fix_k)
        torch.matmul(fix_q.mT, qr_q[0], out=ut)  # U^T = (Q1 A)^T, computed as (fix A)^T basis
        torch.matmul(fix_k.mT, qr_k[0], out=vt)
    else:  # a factor of (nearly) deficient rank
        u, s_chunk, v = _householder_svd(wq, wk)
        ut.copy_(u.mT)
        vt.copy_(v.mT)
    s.copy_(s_chunk)


def qk_svd_from_weights(weights: QKWeights, model: str = "") -> QKSVD:
    """Exact SVD of ``wq[l,h]^T wk[l,h]`` for all heads, in batched chunks of heads.

    With ``W_q^T = Q_1 R_1`` and ``W_k^T = Q_2 R_2`` (thin QR) and the SVD ``R_1 R_2^T = A S B^T`` of the
    r x r core, ``U = Q_1 A`` and ``V = Q_2 B``.
    """
    layers, heads, r, d = weights.wq.shape
    count = layers * heads
    wq, wk = (w.reshape(count, r, d) for w in (weights.wq, weights.wk))
    device = wq.device
    if r > d:  # more modes than dimensions (never in a ViT): Householder QR on the whole stack
        u, s, v = _householder_svd(wq.to(torch.float64), wk.to(torch.float64))
        u, v = u.reshape(layers, heads, d, -1), v.reshape(layers, heads, d, -1)
        s = s.reshape(layers, heads, -1)
    else:
        s = torch.empty(count, r, dtype=torch.float64, device=device)
        ut, vt = _empty_output((count, r, d), device), _empty_output((count, r, d), device)
        step = max(1, _CHUNK_BYTES // (8 * r * d)) if device.type == "cpu" else count
        for start in range(0, count, step):
            part = slice(start, start + step)
            _svd_chunk(wq[part], wk[part], s[part], ut[part], vt[part])
        u, v = ut.mT.reshape(layers, heads, d, r), vt.mT.reshape(layers, heads, d, r)
        s = s.reshape(layers, heads, r)
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


def _query_key_biases(attn: nn.Module, d_attn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b_q, b_k)``, each ``[D_attn]`` float64 (zeros where the model has none): a fused ``qkv`` bias, separate
    ``q``/``k`` (``q_proj``/``k_proj``) biases, or BEiT's ``q_bias`` (its key bias is zero)."""
    zeros = torch.zeros(d_attn, dtype=torch.float64)

    def as64(bias):
        return zeros if bias is None else bias.detach().to("cpu", torch.float64)

    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear) and qkv.bias is not None:
        bias = as64(qkv.bias)
        return bias[:d_attn], bias[d_attn : 2 * d_attn]
    for q_name, k_name in (("q", "k"), ("q_proj", "k_proj")):
        q, k = getattr(attn, q_name, None), getattr(attn, k_name, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return as64(q.bias), as64(k.bias)
    q_bias = getattr(attn, "q_bias", None)
    if isinstance(q_bias, torch.Tensor):  # BEiT: q_bias and v_bias learnt, the key bias fixed at zero
        return as64(q_bias), as64(getattr(attn, "k_bias", None))
    return zeros, zeros


def qk_weights(model: nn.Module, fold_gamma: bool = False, with_bias: bool | str = False) -> QKWeights:
    """Stack every block's per-head W_q and W_k from a timm vision transformer.

    Handles timm's fused ``attn.qkv`` (rows [0:D) are W_q, [D:2D) W_k, head h owns rows
    h*d_k:(h+1)*d_k of each) and separate ``q``/``k`` (or ``q_proj``/``k_proj``) projections.

    ``fold_gamma``: fold ``norm1``'s gamma into both projections, ``W_q diag(gamma)`` and ``W_k diag(gamma)``:
    the form on the standardised token z, with ``x = gamma * z + beta`` (TransformerLens's default). Without
    ``with_bias`` beta is left out: ``z_i^T (W_q diag g)^T (W_k diag g) z_j = (x_i - beta)^T W_q^T W_k (x_j - beta)``.
    ``with_bias``: append each head's bias as a last column, ``[W_q | b_q]`` and ``[W_k | b_k]``, so the form
    acts on ``[x; 1]`` and ``[x_i; 1]^T [W_q|b_q]^T [W_k|b_k] [x_j; 1] = q_i . k_j`` exactly, biases included.
    Both together: biases ``W_q beta + b_q`` and ``W_k beta + b_k`` on ``[z; 1]``, again exactly ``q_i . k_j``.
    ``with_bias="query"``: the key side's bias column is zero, ``[W_k | 0]``: the form is ``q_i . W_k x_j``, the
    score less the per-query constant ``q_i . b_k`` (which the softmax over keys discards).
    """
    _check_bias_option(with_bias)
    blocks = attention_blocks(model, "qk_weights")
    wqs, wks, qk_norm = [], [], False
    for index, block, attn in blocks:
        heads = attn.num_heads
        wq, wk = (w.to("cpu", torch.float64) for w in query_key_weights(attn))
        d_attn, d = wq.shape
        if d_attn % heads:
            raise ValueError(f"block {index}: attention width {d_attn} is not divisible by {heads} heads")
        head_dim = d_attn // heads
        if with_bias:
            bq, bk = _query_key_biases(attn, d_attn)
            if with_bias == "query":
                bk = torch.zeros_like(bk)
        if fold_gamma:
            gamma, beta = norm1_affine(block, index, d)
            if with_bias:  # beta moves into the biases before gamma is folded into the weights
                bq = bq + wq @ beta
                bk = bk + wk @ beta if with_bias is True else bk
            wq, wk = wq * gamma, wk * gamma
        if with_bias:
            wq, wk = torch.cat([wq, bq[:, None]], dim=1), torch.cat([wk, bk[:, None]], dim=1)
        wqs.append(wq.reshape(heads, head_dim, wq.shape[1]))
        wks.append(wk.reshape(heads, head_dim, wk.shape[1]))
        for norm_name in ("q_norm", "k_norm"):
            norm = getattr(attn, norm_name, None)
            if norm is not None and not isinstance(norm, nn.Identity):
                qk_norm = True
    if len({tuple(w.shape) for w in wqs}) != 1:
        raise ValueError("blocks differ in head count or width; stacked analysis needs a uniform transformer")
    rel_pos_bias = getattr(model, "rel_pos_bias", None) is not None or any(
        getattr(attn, "relative_position_bias_table", None) is not None for _index, _block, attn in blocks)
    return QKWeights(wq=torch.stack(wqs), wk=torch.stack(wks), qk_norm=qk_norm,
                     rope=getattr(model, "rope", None) is not None, rel_pos_bias=rel_pos_bias,
                     fold_gamma=fold_gamma, with_bias=with_bias)


def qk_svd(model: nn.Module, fold_gamma: bool = False, with_bias: bool | str = False) -> QKSVD:
    """Exact SVD of every head's W_q^T W_k of a timm ViT: ``S [L,H,r]``, ``U``/``V [L,H,d,r]``, float64.

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


def null_band(dim: int, level: float = 0.95) -> float:
    """Half-width of the central ``level`` interval of the cosine of two independent random unit vectors
    in R^dim. Exact: (cos + 1) / 2 ~ Beta((dim-1)/2, (dim-1)/2); sd is ~ 1/sqrt(dim)."""
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    a = (dim - 1) / 2
    return float(2 * beta.ppf(0.5 + level / 2, a, a) - 1)


# The null for what Fig 3 plots: a layer's mean over heads of each head's s-weighted mean of cos_n = u_n . v_n
# when U and V are Haar-random (uniform orthonormal d x r frames, independent per head) and each head keeps its
# own singular values. Because U^T V of independent Haar frames is distributed as the top r x r block of one Haar
# d x r frame (rotate U onto the first r axes), cos_n has the law of that block's n-th diagonal entry.
NULL_DRAWS = 2000  # draws of each head's r cosines (shared by all layers: the layers' bands are marginals); the 95%
# half-width's Monte Carlo error is about 0.95 / sqrt(draws) of itself (~2% at 2000) for a near-normal statistic
NULL_SEED = 0
_NULL_MATRICES_PER_CHUNK = 1536  # memory bound only; part of what fixes the random stream (keep it fixed)


def haar_diagonals(count: int, dim: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """``[count, rank]``: the diagonal of the top ``rank x rank`` block of ``count`` independent Haar-random
    ``dim x rank`` orthonormal frames, i.e. the ``rank`` cosines ``u_n . v_n`` of two independent Haar frames.

    Exact, and O(rank^3) per frame instead of O(dim rank^2): the frame is Q = G R^{-1} for Gaussian G = [G1; G2]
    and R the Cholesky factor of G^T G = G1^T G1 + G2^T G2 (the QR factor with positive diagonal, which makes Q
    Haar). Only the top block G1 R^{-1} is needed, and it depends on G2 only through the Wishart_rank(dim - rank)
    matrix G2^T G2, drawn by Bartlett's decomposition when dim - rank >= rank.
    """
    if not 1 <= rank <= dim:
        raise ValueError(f"need 1 <= rank <= dim, got rank {rank}, dim {dim}")
    g1 = rng.standard_normal((count, rank, rank))
    rest = dim - rank
    if rest >= rank:  # Bartlett: G2^T G2 = A A^T, A lower triangular, A_ii^2 ~ chi2(rest - i), A_ij ~ N(0, 1)
        a = np.tril(rng.standard_normal((count, rank, rank)), -1)
        chi = np.sqrt(rng.chisquare(rest - np.arange(rank), size=(count, rank)))
        a[:, np.arange(rank), np.arange(rank)] = chi
        stacked = np.concatenate([g1, a.transpose(0, 2, 1)], axis=1)  # [count, 2 rank, rank]
    else:
        stacked = np.concatenate([g1, rng.standard_normal((count, rest, rank))], axis=1)
    gram = torch.from_numpy(stacked).transpose(-1, -2) @ torch.from_numpy(stacked)  # G^T G, [count, rank, rank]
    lower = np.linalg.cholesky(gram.numpy())  # G^T G = L L^T, R = L^T
    # diag(G1 R^{-1})_n = sum_m G1[n, m] (L^{-1})[n, m]
    return np.einsum("cnm,cnm->cn", g1, np.linalg.inv(lower))


def _head_weights(S: torch.Tensor) -> np.ndarray:
    s = S.detach().to("cpu", torch.float64).numpy()
    if s.ndim != 3:
        raise ValueError(f"singular values must be [L, H, r], got shape {tuple(s.shape)}")
    if (s < 0).any() or (s.sum(-1) <= 0).any():
        raise ValueError("singular values must be >= 0 with a positive sum in every head")
    return s / s.sum(-1, keepdims=True)


def simulate_layer_null(S: torch.Tensor, dim: int, draws: int = NULL_DRAWS, seed: int = NULL_SEED) -> torch.Tensor:
    """``[draws, L]``: draws of the layer statistic of Fig 3, ``mean_h sum_n (s_hn / sum_m s_hm) cos_hn``, with
    each head's own singular values ``S [L, H, r]`` and Haar-random U and V in R^dim (independent per head).

    Exactly reproducible for given (S's shape, dim, draws, seed): numpy's PCG64 generator seeded with ``seed``.
    Each draw holds H independent heads' r cosines (:func:`haar_diagonals`), shared by the L layers (each layer
    has its own weights): every layer's column is a correct sample of that layer's null, the layers' errors are
    correlated.
    """
    weights = _head_weights(S)  # [L, H, r]
    _layers, heads, rank = weights.shape
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _NULL_MATRICES_PER_CHUNK // heads)
    out = []
    for start in range(0, draws, per_chunk):
        count = min(per_chunk, draws - start)
        cosines = haar_diagonals(count * heads, dim, rank, rng).reshape(count, heads, rank)
        out.append(np.einsum("chr,lhr->cl", cosines, weights) / heads)
    return torch.from_numpy(np.concatenate(out))


def layer_null_sd(S: torch.Tensor, dim: int) -> torch.Tensor:
    """``[L]``: the exact standard deviation of the layer statistic under the Haar null (no simulation).

    Each cos_n has mean 0 and variance 1/dim, and the r cosines of one head are uncorrelated (E[O_11 O_22] = 0
    for a Haar orthogonal O), heads independent: Var = sum_h sum_n w_hn^2 / (dim H^2), w_hn = s_hn / sum_m s_hm.
    """
    weights = _head_weights(S)
    heads = weights.shape[1]
    return torch.from_numpy(np.sqrt((weights**2).sum((-1, -2)) / dim) / heads)


def layer_null_band_from(S: torch.Tensor, dim: int, level: float = 0.95, draws: int = NULL_DRAWS,
                         seed: int = NULL_SEED) -> torch.Tensor:
    """``[L]``: half-width of the central ``level`` band of the layer statistic (see ``simulate_layer_null``).

    The null is symmetric about 0 (V -> -V preserves the Haar law and flips the sign), so the band is
    ``[-h, +h]`` with ``h`` the ``level`` quantile of the absolute statistic over the draws (which uses that symmetry).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    samples = simulate_layer_null(S, dim, draws=draws, seed=seed)
    return torch.quantile(samples.abs(), level, dim=0)


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

