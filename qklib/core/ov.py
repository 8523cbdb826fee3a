"""The value side of every head: the exact SVD of its OV matrix, Q-, K- and V-composition between heads, copying
scores, and Haar nulls for each.

Per head, attention adds ``sum_j a_ij W_O^h W_V^h x_j`` to token i (value and output biases left out: with rows of
``a`` summing to 1 they add the same vector ``W_O b_v + b_o`` to every token). ``OV = W_O^h W_V^h`` is d x d with
rank <= d_k, the product of the thin factors ``(W_O^h)^T`` and ``W_V^h`` (each d_k x d), so its SVD is exactly
``qk_svd``'s problem and goes through the same routine (``qk_svd_from_weights``: Cholesky-QR of the factors, SVD of
the r x r core), O(d d_k^2) per head. In the returned ``QKSVD`` the left vectors ``U`` are the directions the head
writes (the column space of W_O^h), the right vectors ``V`` the directions it reads (the row space of W_V^h).

Conventions: column vectors, as everywhere in qklib. The score of query x_q and key x_k is ``x_q^T QK x_k`` with
``QK = W_q^T W_k``; the head's output is ``OV x`` with ``OV = W_O W_V``. TransformerLens (row vectors,
``HookedTransformer.all_composition_scores``) has ``QK_TL = W_Q W_K^T`` and ``OV_TL = W_V W_O`` with
``W_Q = W_q^T``, ``W_K = W_k^T``, ``W_V = W_v^T``, ``W_O = W_o^T`` (its weights are ours transposed), so
``QK_TL = QK`` and ``OV_TL = OV^T``. Its scores ``|OV_1,TL R_2|_F / (|OV_1|_F |R_2|_F)`` with ``R = QK_TL`` (mode
"Q"), ``QK_TL^T`` ("K"), ``OV_TL`` ("V") are therefore, transposing inside the norm, ``|QK_2^T OV_1|``,
``|QK_2 OV_1|`` and ``|OV_2 OV_1|`` over the norms: a later head's query (resp. key, value) reading what an earlier
head wrote. TransformerLens's default loading folds the LayerNorm's gamma into W_Q, W_K and W_V and centres W_O;
qklib's default is the raw weights (``fold_gamma=True`` is the first of those two).

Shapes: L layers, H heads, d model width, r = d_k head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .models import model_name
from .reader import AttentionWeights, read_attention
from .svd import QKSVD, QKWeights, one_thread, qk_svd, qk_svd_from_weights

COMPOSITION_KINDS = ("q", "k", "v")
COPYING_KINDS = ("positive_real", "real_part")
NULL_COUNT = 20
NULL_SEED = 0


@dataclass
class OVWeights:
    """Per-head value and output projections, stacked, float64.

    ``wv``: ``[L, H, r, d]``, the head's rows of the value projection; ``wo``: ``[L, H, d, r]``, its columns of the
    output projection, so that the head writes ``wo[l, h] @ (wv[l, h] @ x)``.
    ``fold_gamma``: the LayerNorm's gamma folded in (``W_V diag(gamma)``, the OV reads the standardised token z);
    ``layer_scale``: the block's LayerScale folded in (``diag(ls) W_O``, what joins the residual stream);
    ``has_layer_scale``: whether the model has one; ``head_norm``: True where the model normalises the heads'
    outputs before the output projection (timm's ``scale_norm``), so that the OV map is not exactly linear.
    """

    wv: torch.Tensor
    wo: torch.Tensor
    fold_gamma: bool = False
    layer_scale: bool = False
    has_layer_scale: bool = False
    head_norm: bool = False


def ov_weights_from(attention: AttentionWeights, fold_gamma: bool = False, layer_scale: bool = False) -> OVWeights:
    """:func:`ov_weights` on weights the reader already gave (``core.reader.read_attention``)."""
    wv, wo = attention.wv, attention.wo
    if fold_gamma:
        wv = wv * attention.norm_affine("fold_gamma")[0][:, None, None, :]
    if layer_scale and attention.layer_scale is not None:
        wo = attention.layer_scale[:, None, :, None] * wo
    return OVWeights(wv=wv, wo=wo, fold_gamma=fold_gamma, layer_scale=layer_scale,
                     has_layer_scale=attention.layer_scale is not None, head_norm=attention.head_norm)


def ov_weights(model: nn.Module, fold_gamma: bool = False, layer_scale: bool = False) -> OVWeights:
    """Stack every layer's per-head W_V and W_O of a model, as the reader gives them (``core.reader``).

    ``fold_gamma``: ``W_V diag(gamma)`` with the LayerNorm's gamma (beta left out, as ``qk_weights`` does).
    ``layer_scale``: ``diag(ls) W_O`` with the block's LayerScale (a no-op, and said so, where there is none).
    """
    return ov_weights_from(read_attention(model), fold_gamma=fold_gamma, layer_scale=layer_scale)


def ov_notes(weights: OVWeights) -> list[str]:
    """The sentences that say what an OV decomposition is of: its vectors, and each option's state."""
    notes = ["OV circuits W_O^h W_V^h: U are the directions a head writes (column space of W_O^h), V the directions "
             "it reads (row space of W_V^h); value and output biases left out (they add one fixed vector per block)"]
    notes.append("LayerNorm gamma folded in: W_V diag(gamma), the OV reads the standardised token z, not the "
                 "LayerNorm output x" if weights.fold_gamma else
                 "LayerNorm gamma not folded in (fold_gamma=False): the OV reads the LayerNorm output x")
    if not weights.has_layer_scale:
        notes.append("this model has no LayerScale: layer_scale changes nothing")
    elif weights.layer_scale:
        notes.append("LayerScale folded in: diag(ls1) W_O, the head's contribution as it joins the residual stream")
    else:
        notes.append("LayerScale left out (layer_scale=False): the model multiplies each block's attention output by "
                     "ls1 before adding it to the residual stream")
    if weights.head_norm:
        notes.append("this model normalises the heads' outputs before the output projection (scale_norm): the "
                     "OV matrix describes the map without that normalisation")
    return notes


def ov_svd_from_weights(weights: OVWeights, model: str = "") -> QKSVD:
    """Exact SVD of ``wo[l,h] @ wv[l,h]`` for all heads: ``qk_svd_from_weights`` on the thin factors
    ``(W_O^h)^T`` and ``W_V^h`` (``(W_O^h)^T`` takes the place of W_q, W_V^h of W_k)."""
    svd = qk_svd_from_weights(QKWeights(wq=weights.wo.transpose(-1, -2), wk=weights.wv), model=model)
    svd.fold_gamma, svd.exact, svd.notes = weights.fold_gamma, not weights.head_norm, ov_notes(weights)
    return svd


def ov_svd(model: nn.Module, fold_gamma: bool = False, layer_scale: bool = False) -> QKSVD:
    """Exact SVD of every head's OV matrix ``W_O^h W_V^h`` of a timm ViT, float64, all heads in one call.

    Returns a ``QKSVD``: ``S [L, H, r]`` descending, ``U [L, H, d, r]`` the written directions, ``V [L, H, d, r]``
    the read directions, with the sign convention of ``QKSVD`` (each u_n sums positive). Default: the attention
    module's own projections, on the LayerNorm output. ``fold_gamma``: the LayerNorm's gamma folded into W_V;
    ``layer_scale``: the block's LayerScale folded into W_O. ``notes`` states both options.
    """
    return ov_svd_from_weights(ov_weights(model, fold_gamma=fold_gamma, layer_scale=layer_scale),
                               model=model_name(model))


def circuits(model_or_svds, fold_gamma: bool = False, layer_scale: bool = False) -> tuple[QKSVD, QKSVD]:
    """``(qk, ov)``: the QK and OV decompositions of a model (``qk_svd`` and ``ov_svd`` with the options), or a
    given pair checked for a common geometry and basis (no bias-augmented QK: the OV writes d-vectors)."""
    if isinstance(model_or_svds, nn.Module):
        return (qk_svd(model_or_svds, fold_gamma=fold_gamma),
                ov_svd(model_or_svds, fold_gamma=fold_gamma, layer_scale=layer_scale))
    pair = tuple(model_or_svds) if isinstance(model_or_svds, tuple | list) else ()
    if len(pair) != 2 or not all(isinstance(svd, QKSVD) for svd in pair):
        raise TypeError("pass a timm vision transformer, or the pair (qklib.qk_svd(model), qklib.ov_svd(model)), "
                        f"got {type(model_or_svds).__name__}")
    qk, ov = pair
    if qk.with_bias or qk.U.shape[:3] != ov.U.shape[:3] or qk.rank != ov.rank:
        raise ValueError(f"the QK ({tuple(qk.U.shape)}, basis {qk.basis}) and OV ({tuple(ov.U.shape)}) "
                         "decompositions must come from one model, with the same heads, width and rank and without "
                         "with_bias")
    if qk.fold_gamma != ov.fold_gamma:
        raise ValueError("the QK and OV decompositions must both fold gamma or both not (fold_gamma)")
    return qk, ov


def composition_from(qk: QKSVD, ov: QKSVD) -> dict[str, torch.Tensor]:
    """The three composition tensors ``[L, H, L, H]`` from the two decompositions (see ``composition_scores``).

    With ``QK = U_qk S_qk V_qk^T`` and ``OV = U_ov S_ov V_ov^T`` (orthonormal columns), the Frobenius norm of each
    product is that of an r x r core: ``|QK_2^T OV_1| = |S_qk U_qk,2^T U_ov,1 S_ov|``, ``|QK_2 OV_1| = |S_qk
    V_qk,2^T U_ov,1 S_ov|``, ``|OV_2 OV_1| = |S_ov V_ov,2^T U_ov,1 S_ov|``, and ``|M|_F = |S|_2``. Every later
    head's three readers ``[3 H r, d]`` meet every earlier layer's written directions ``[d, H r]`` in one matrix
    product per pair of layers (3 r^2 d per pair of heads, never a d x d matrix).
    """
    layers, heads, d, r = ov.U.shape
    written = (ov.U * ov.S.unsqueeze(-2)).permute(0, 2, 1, 3).reshape(layers, d, heads * r)  # columns s_n u_n
    scores = torch.zeros(3, layers, heads, layers, heads, dtype=torch.float64, device=ov.S.device)
    for later in range(1, layers):
        readers = torch.stack([qk.U[later] * qk.S[later, :, None], qk.V[later] * qk.S[later, :, None],
                               ov.V[later] * ov.S[later, :, None]])  # kinds q, k, v: [3, H, d, r]
        readers = readers.transpose(-1, -2).reshape(3 * heads * r, d)
        for earlier in range(later):
            cores = (readers @ written[earlier]).view(3, heads, r, heads, r)  # every pair's r x r core
            with one_thread(cores.device):  # a strided reduction: 10-20x slower with 2 threads on a busy machine
                scores[:, earlier, :, later, :] = torch.linalg.vector_norm(cores, dim=(2, 4)).mT  # [3, H1, H2]
    norms = torch.stack([qk.S, qk.S, ov.S]).norm(dim=-1)  # [3, L, H]: Frobenius norms of the later heads' matrices
    scores /= ov.S.norm(dim=-1)[None, :, :, None, None] * norms[:, None, None]
    return dict(zip(COMPOSITION_KINDS, scores, strict=True))


def mode_alignment(qk: QKSVD, ov: QKSVD, side: str = "key") -> torch.Tensor:
    """``[L, H, r, L, H]``: for every later head's QK mode n (``[l2, h2, n]``) and every earlier head
    (``[l1, h1]``), the squared length of the mode's unit key feature ``v_n`` (``side="key"``) or query feature
    ``u_n`` (``side="query"``) inside the earlier head's written subspace: ``|U_ov,1^T v_n|^2`` in [0, 1], zero
    unless ``l1 < l2``. 1: everything the mode reads on that side can come from the earlier head; a Haar-random
    feature has ``r / d`` on average. One matrix product per pair of layers, as ``composition_from``."""
    if side not in ("key", "query"):
        raise ValueError(f"side must be 'key' or 'query', got {side!r}")
    features = qk.V if side == "key" else qk.U
    layers, heads, d, r = ov.U.shape
    written = ov.U.permute(0, 2, 1, 3).reshape(layers, d, heads * r)
    out = torch.zeros(layers, heads, r, layers, heads, dtype=torch.float64, device=ov.U.device)
    for later in range(1, layers):
        readers = features[later].transpose(-1, -2).reshape(heads * r, d)  # rows: (head, mode)
        for earlier in range(later):
            inner = (readers @ written[earlier]).view(heads, r, heads, r)
            with one_thread(inner.device):
                out[later, :, :, earlier, :] = inner.square().sum(-1)
    return out


def composition_scores(model_or_svds, fold_gamma: bool = False, layer_scale: bool = False) -> dict[str, torch.Tensor]:
    """Q-, K- and V-composition of every pair of heads (Elhage et al. 2021), ``{"q", "k", "v"}``, each
    ``[L, H, L, H]`` float64 in TransformerLens's ``all_composition_scores`` layout: ``T[l1, h1, l2, h2]`` for the
    earlier head ``(l1, h1)`` writing and the later head ``(l2, h2)`` reading, zero unless ``l2 > l1``.

    ``q = |QK_2^T OV_1|_F``, ``k = |QK_2 OV_1|_F``, ``v = |OV_2 OV_1|_F``, each over the product of the two
    matrices' Frobenius norms, with ``QK = W_q^T W_k`` and ``OV = W_O W_V`` (the module docstring maps this onto
    TransformerLens's row-vector ``QK_TL = W_Q W_K^T = QK`` and ``OV_TL = W_V W_O = OV^T``). Each lies in [0, 1].
    ``model_or_svds``: a timm ViT (then ``fold_gamma`` folds the LayerNorm's gamma into both W_q, W_k and W_V, and
    ``layer_scale`` LayerScale into W_O), or the pair ``(qk_svd(model), ov_svd(model))``. Computed from r x r
    cores of the thin factors (``composition_from``).
    """
    return composition_from(*circuits(model_or_svds, fold_gamma=fold_gamma, layer_scale=layer_scale))


def ov_eigenvalues(ov: QKSVD) -> torch.Tensor:
    """``[L, H, r]`` complex128 on the CPU: the r eigenvalues of each head's d x d OV matrix that can be nonzero.

    ``OV = U S V^T`` has rank <= r, and its nonzero eigenvalues are those of the r x r core ``S V^T U`` (``AB``
    and ``BA`` share them); the other d - r are 0. LAPACK's real eigensolver returns real eigenvalues with
    imaginary part exactly 0 and complex ones in conjugate pairs."""
    if not isinstance(ov, QKSVD):
        raise TypeError(f"pass a timm vision transformer or qklib.ov_svd(model), got {type(ov).__name__}")
    core = (ov.S.unsqueeze(-1) * (ov.V.transpose(-1, -2) @ ov.U)).cpu()  # [L, H, r, r]
    with one_thread():
        return torch.linalg.eigvals(core)


def copying_scores(model_or_ov, kind: str = "positive_real") -> torch.Tensor:
    """``[L, H]``: how much each head's OV matrix copies what it reads, from its eigenvalues (Elhage et al. 2021).

    ``kind="positive_real"``: the share of the eigenvalue mass that is positive real, ``sum_{lambda real > 0}
    lambda / sum |lambda|``, in [0, 1]. ``kind="real_part"``: ``sum Re(lambda) / sum |lambda| = trace(OV) / sum
    |lambda|``, in [-1, 1] (the summary of Elhage et al. and TransformerLens's tutorials; complex pairs with a
    positive real part count here, not above). 1 for a head whose OV is positive semi-definite. The eigenvalues
    come from the r x r core (``ov_eigenvalues``), never from the d x d matrix.
    ``model_or_ov``: a timm ViT (raw weights) or an ``ov_svd`` result, e.g. a Haar-rotated one.
    """
    if kind not in COPYING_KINDS:
        raise ValueError(f"kind must be one of {COPYING_KINDS}, got {kind!r}")
    ov = ov_svd(model_or_ov) if isinstance(model_or_ov, nn.Module) else model_or_ov
    eigenvalues = ov_eigenvalues(ov)
    if kind == "positive_real":
        mass = torch.where(eigenvalues.imag == 0, eigenvalues.real.clamp_min(0), 0).sum(-1)
    else:
        mass = eigenvalues.real.sum(-1)
    return (mass / eigenvalues.abs().sum(-1)).to(ov.S.device)


def haar_frames(count: int, dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, dim, rank]`` independent Haar-random orthonormal frames: Q of the QR of a Gaussian matrix with the
    signs fixed so that R has a positive diagonal (then Q is uniform on the Stiefel manifold, Mezzadri 2007)."""
    gaussian = torch.randn(count, dim, rank, dtype=torch.float64, generator=generator)
    with one_thread():
        q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def haar_rotated(svd: QKSVD, generator: torch.Generator) -> QKSVD:
    """The null that keeps each head's spectrum: ``R_1 M R_2^T`` for independent Haar-random rotations ``R_1``,
    ``R_2`` of R^d per head, i.e. the same singular values ``S`` with ``U`` and ``V`` replaced by independent
    Haar-random frames (``R U`` is Haar whatever U is). Everything that depends on how the heads' directions line
    up (composition, cosines, eigenvalues) is then at chance, and everything the spectrum alone fixes (norms,
    effective rank) unchanged."""
    layers, heads, d, r = svd.U.shape
    frames = haar_frames(2 * layers * heads, d, r, generator).to(svd.U.device)
    u, v = frames.view(2, layers, heads, d, r)
    return replace(svd, U=u, V=v, notes=[*svd.notes, "Haar null: U and V replaced by independent Haar-random frames, "
                                                   "S kept"])


def composition_null(model_or_svds, count: int = NULL_COUNT, seed: int = NULL_SEED, fold_gamma: bool = False,
                     layer_scale: bool = False) -> dict[str, torch.Tensor]:
    """``{"q", "k", "v"}``, each ``[count, L, H, L, H]``: ``composition_scores`` of ``count`` draws in which every
    head's written directions are Haar-rotated (``R OV``: the spectrum kept, ``U`` replaced by a Haar-random frame
    as in ``haar_rotated``, independently per head and draw). For each pair that makes the r x r core ``X^T R Y``
    of the later head's readers X and the earlier head's written directions Y Haar-distributed whatever X is, so
    every pair's score has exactly the law it has when both heads' QK and OV are rotated (rotating the readers too
    would cost more and change nothing in any pair's law). A pair composes beyond chance where its score exceeds
    its null: above all ``count`` draws happens by chance with probability ``1 / (count + 1)``. Under this null
    ``E[score^2] = 1/d`` whatever the spectra. Seeded (``torch.Generator().manual_seed(seed)``); the random-init
    control is ``composition_scores`` of a ``random:`` model."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    qk, ov = circuits(model_or_svds, fold_gamma=fold_gamma, layer_scale=layer_scale)
    generator = torch.Generator().manual_seed(seed)
    layers, heads, d, r = ov.U.shape
    draws = [composition_from(qk, replace(ov, U=haar_frames(layers * heads, d, r, generator).view(ov.U.shape)
                                          .to(ov.U.device))) for _ in range(count)]
    return {kind: torch.stack([draw[kind] for draw in draws]) for kind in COMPOSITION_KINDS}


def copying_null(model_or_ov, count: int = NULL_COUNT, seed: int = NULL_SEED,
                 kind: str = "positive_real") -> torch.Tensor:
    """``[count, L, H]``: ``copying_scores`` of ``count`` Haar-rotated draws of every head's OV matrix (same
    singular values, independent random read and write directions). Seeded like ``composition_null``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    ov = ov_svd(model_or_ov) if isinstance(model_or_ov, nn.Module) else model_or_ov
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([copying_scores(haar_rotated(ov, generator), kind=kind) for _ in range(count)])


def effective_rank(S: torch.Tensor) -> torch.Tensor:
    """``[...]``: the effective rank of each spectrum ``S [..., r]`` (Roy & Vetterli 2007), ``exp(-sum p_n log p_n)``
    with ``p_n = s_n / sum_m s_m``: r for a flat spectrum, 1 for a single mode, between them otherwise."""
    p = S / S.sum(-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))
