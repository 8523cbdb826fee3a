"""Null statistics of the QK cosines: what ``cos_n = u_n . v_n`` and Fig 3's layer statistic look like when U and
V are Haar-random, exactly (one cosine's Beta law) or simulated with each head's own singular values.

Shapes: L layers, H heads, r modes, ``dim`` the model width.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta

__all__ = ["NULL_DRAWS", "NULL_SEED", "haar_diagonals", "layer_null_band_from", "layer_null_sd",
           "null_band", "simulate_layer_null"]


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
    """``[L]``: half-width of the central ``level`` band of the layer statistic (see ``simulate_layer_null``;
    ``core.svd.layer_null_band`` takes a QKSVD).

    The null is symmetric about 0 (V -> -V preserves the Haar law and flips the sign), so the band is
    ``[-h, +h]`` with ``h`` the ``level`` quantile of the absolute statistic over the draws (which uses that symmetry).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    samples = simulate_layer_null(S, dim, draws=draws, seed=seed)
    return torch.quantile(samples.abs(), level, dim=0)
