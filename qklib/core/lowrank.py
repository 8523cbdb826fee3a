"""The fast exact SVD of a product of two thin factors, ``W_q^T W_k``, for a stack of heads.

``W_q^T W_k`` is d x d but has rank <= r, and is the product of two thin d x r factors, so its SVD is computed
from the factors (thin QR of each, then the SVD of the small r x r core) in O(d r^2) per head -- never a dense
d x d SVD. The thin QR is Cholesky-QR: one pass (two batched matrix products per factor) for heads whose factor
has condition number <= 100, a second pass (CholeskyQR2, orthonormal to float64 rounding up to condition numbers
~1e7) for the others, and Householder QR as the fallback beyond that. Heads run in chunks of a few MB, so the
intermediates stay in cache. ``core.svd`` wraps the result in its container (``QKSVD``); ``core.ov`` uses the same
routine for ``W_O W_V``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["CROSS_PRODUCT_COND", "ONE_PASS_COND", "one_thread", "product_svd"]


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

# The r x r core's SVD comes from the eigendecomposition of core^T core (a symmetric eigensolver costs about half
# of LAPACK's SVD) where the core's condition number is at most this;
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
    outputs then page-faults 2 MB pages instead of 4 KB ones, one fault where there were 512 (``make bench`` times
    ``qk_svd``). The tensor shares the array's memory and keeps it alive."""
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



def product_svd(wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD of ``wq[l,h]^T wk[l,h]`` for all heads, in batched chunks of heads: ``(S [L, H, m], U [L, H, d, m],
    V [L, H, d, m])`` float64, ``m = min(r, d)``, S descending, each ``u_n`` summing positive (``QKSVD``'s sign
    convention). ``wq``, ``wk``: ``[L, H, r, d]``.

    With ``W_q^T = Q_1 R_1`` and ``W_k^T = Q_2 R_2`` (thin QR) and the SVD ``R_1 R_2^T = A S B^T`` of the
    r x r core, ``U = Q_1 A`` and ``V = Q_2 B``.
    """
    layers, heads, r, d = wq.shape
    count = layers * heads
    wq, wk = (w.reshape(count, r, d) for w in (wq, wk))
    device = wq.device
    if r > d:  # more modes than dimensions (never in a ViT): Householder QR on the whole stack
        u, s, v = _householder_svd(wq.to(torch.float64), wk.to(torch.float64))
        return s.reshape(layers, heads, -1), u.reshape(layers, heads, d, -1), v.reshape(layers, heads, d, -1)
    s = torch.empty(count, r, dtype=torch.float64, device=device)
    ut, vt = _empty_output((count, r, d), device), _empty_output((count, r, d), device)
    step = max(1, _CHUNK_BYTES // (8 * r * d)) if device.type == "cpu" else count
    for start in range(0, count, step):
        part = slice(start, start + step)
        _svd_chunk(wq[part], wk[part], s[part], ut[part], vt[part])
    return s.reshape(layers, heads, r), ut.mT.reshape(layers, heads, d, r), vt.mT.reshape(layers, heads, d, r)
