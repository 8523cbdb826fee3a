"""The exact QK SVD and its statistics, checked against dense linear algebra and the model's own numbers."""

import numpy as np
import pytest
import timm
import torch

import qklib
from qklib.core.extract import token_embeddings
from qklib.core.images import to_pixels
from qklib.core import lowrank
from qklib.core.svd import QKWeights, qk_svd_from_weights


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("which", ["embedded", "vit_b16"])
def test_every_head_reconstructs_wq_t_wk(which, request):
    model = request.getfixturevalue("embedded_model" if which == "embedded" else "vit_b16")
    weights = qklib.qk_weights(model)
    svd = qklib.qk_svd(model)
    layers, heads, r, d = weights.wq.shape
    assert svd.S.shape == (layers, heads, r) and svd.U.shape == (layers, heads, d, r) == svd.V.shape
    assert svd.S.dtype == torch.float64
    dense = weights.wq.transpose(-1, -2) @ weights.wk  # [L, H, d, d]
    rebuilt = (svd.U * svd.S.unsqueeze(-2)) @ svd.V.transpose(-1, -2)
    errors = (rebuilt - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)
    assert errors.max() < 1e-6, f"worst head relative error {errors.max():.2e}"
    assert torch.all(svd.S[..., :-1] >= svd.S[..., 1:]), "singular values must be descending"
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(svd.U.transpose(-1, -2) @ svd.U, eye.expand(layers, heads, r, r), atol=1e-10)
    assert torch.allclose(svd.V.transpose(-1, -2) @ svd.V, eye.expand(layers, heads, r, r), atol=1e-10)


def test_matches_dense_numpy_svd_on_sampled_heads(embedded_model, embedded_svd):
    weights = qklib.qk_weights(embedded_model)
    rng = np.random.default_rng(0)
    r = embedded_svd.rank
    for layer, head in zip(rng.integers(0, 12, 4), rng.integers(0, 6, 4)):
        matrix = (weights.wq[layer, head].T @ weights.wk[layer, head]).numpy()
        u, s, vt = np.linalg.svd(matrix)
        np.testing.assert_allclose(embedded_svd.S[layer, head].numpy(), s[:r], rtol=1e-8, atol=1e-12)
        cos_dense = np.einsum("dr,dr->r", u[:, :r], vt[:r].T)
        np.testing.assert_allclose(embedded_svd.cos[layer, head].numpy(), cos_dense, atol=1e-8)
        # Vectors agree up to the sign flip that SVD applies to u_n and v_n together.
        signs = np.sign(np.einsum("dr,dr->r", embedded_svd.U[layer, head].numpy(), u[:, :r]))
        np.testing.assert_allclose(embedded_svd.U[layer, head].numpy() * signs, u[:, :r], atol=1e-7)
        np.testing.assert_allclose(embedded_svd.V[layer, head].numpy() * signs, vt[:r].T, atol=1e-7)


def test_modes_sum_to_the_models_own_scores_on_a_real_photo(embedded_model, embedded_svd, cat_photo):
    """sum_n (x_i.u_n) s_n (v_n.x_j) equals q_i.k_j (biases removed) as the model computes q and k."""
    pixels = to_pixels(embedded_model, cat_photo)
    layer = 6
    captured = {}
    block = embedded_model.blocks[layer]
    handle = block.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("qkv", out.detach()))
    try:
        tokens = token_embeddings(embedded_model, pixels, layers=[layer])[0, 0].double()  # [T, d]
    finally:
        handle.remove()
    qkv = captured["qkv"][0].double()  # [T, 3 * D]
    bias = block.attn.qkv.bias.detach().double()
    heads, head_dim = block.attn.num_heads, block.attn.head_dim
    width = heads * head_dim
    q = (qkv[:, :width] - bias[:width]).reshape(-1, heads, head_dim)
    k = (qkv[:, width : 2 * width] - bias[width : 2 * width]).reshape(-1, heads, head_dim)
    for head in range(heads):
        model_scores = q[:, head] @ k[:, head].T
        mode_sum = qklib.mode_scores(embedded_svd, layer, head, tokens, tokens).sum(0)
        assert _relative(mode_sum, model_scores) < 1e-4


def test_invariant_under_a_change_of_head_basis():
    torch.manual_seed(1)
    layers, heads, r, d = 2, 3, 8, 24
    wq = torch.randn(layers, heads, r, d, dtype=torch.float64)
    wk = torch.randn(layers, heads, r, d, dtype=torch.float64)
    a = torch.randn(layers, heads, r, r, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    before = qk_svd_from_weights(QKWeights(wq, wk))
    after = qk_svd_from_weights(QKWeights(a.transpose(-1, -2) @ wq, torch.linalg.inv(a) @ wk))
    assert torch.allclose(before.S, after.S, rtol=1e-9)
    assert torch.allclose(before.cos, after.cos, atol=1e-9)
    for layer in range(layers):
        for head in range(heads):
            assert torch.allclose(before.matrix(layer, head), after.matrix(layer, head), atol=1e-9)
    # A non-invariant change (scaling W_q alone) does change the spectrum: the check can fail.
    scaled = qk_svd_from_weights(QKWeights(2 * wq, wk))
    assert not torch.allclose(before.S, scaled.S)


def test_weighted_cosine_is_the_papers_sum_not_divided_by_dk():
    torch.manual_seed(2)
    wq = torch.randn(1, 2, 4, 10, dtype=torch.float64)
    wk = wq + 0.3 * torch.randn(1, 2, 4, 10, dtype=torch.float64)  # correlated: cosines well above 0
    svd = qk_svd_from_weights(QKWeights(wq, wk))
    for head in range(2):
        u, s, vt = np.linalg.svd((wq[0, head].T @ wk[0, head]).numpy())
        s, cos = s[:4], np.einsum("dr,dr->r", u[:, :4], vt[:4].T)
        expected = float(np.sum(s / s.sum() * cos))
        assert svd.weighted_cosine()[0, head].item() == pytest.approx(expected, abs=1e-10)
        assert svd.unweighted_cosine()[0, head].item() == pytest.approx(cos.mean(), abs=1e-10)
    assert svd.layer_weighted_cosine()[0].item() == pytest.approx(svd.weighted_cosine()[0].mean().item())
    assert svd.layer_weighted_cosine()[0] > 0.3


def test_null_band_matches_monte_carlo():
    rng = np.random.default_rng(3)
    for dim in (64, 384):
        a = rng.standard_normal((40000, dim))
        b = rng.standard_normal((40000, dim))
        cos = np.einsum("nd,nd->n", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert qklib.null_band(dim) == pytest.approx(np.quantile(np.abs(cos), 0.95), rel=0.03)
    assert qklib.null_band(768) == pytest.approx(1.96 / np.sqrt(768), rel=0.01)


def test_random_init_control_stays_near_zero():
    control = qklib.random_control(qklib.DEFAULT_MODEL, seed=0)
    svd = qklib.qk_svd(control)
    band = qklib.null_band(svd.dim)
    layers = svd.layer_weighted_cosine()
    assert layers.shape == (12,)
    assert layers.abs().max() < band / 2, layers
    # The same seed gives the same control; another seed a different one.
    again = qklib.qk_svd(qklib.random_control(qklib.DEFAULT_MODEL, seed=0)).S
    other = qklib.qk_svd(qklib.random_control(qklib.DEFAULT_MODEL, seed=1)).S
    assert torch.equal(again, svd.S) and not torch.equal(other, svd.S)


def test_embedded_model_groups_early_and_differs_from_its_control(embedded_svd):
    layers = embedded_svd.layer_weighted_cosine()
    control = qklib.qk_svd(qklib.random_control(qklib.DEFAULT_MODEL, seed=0)).layer_weighted_cosine()
    band = qklib.null_band(embedded_svd.dim)
    assert layers[:2].min() > 5 * band  # early layers: strongly positive, far outside the null band
    assert control.abs().max() < band  # the same architecture untrained: every layer inside the band
    assert (layers[:2] - control[:2]).min() > 5 * band


def test_separate_q_k_projections_match_fused():
    torch.manual_seed(4)
    fused = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    separate = timm.create_model("eva02_tiny_patch14_224", pretrained=False, qkv_fused=False).eval()
    for model in (fused, separate):
        weights = qklib.qk_weights(model)
        attn = model.blocks[0].attn
        q_weight = attn.qkv.weight[: weights.wq.shape[1] * weights.wq.shape[2]] if getattr(attn, "qkv", None) is not None \
            else attn.q_proj.weight
        assert torch.equal(weights.wq[0].reshape(-1, weights.wq.shape[-1]), q_weight.detach().double())
    svd = qklib.qk_svd(separate)
    assert not svd.exact and any("rotary" in note for note in svd.notes)
    assert qklib.qk_svd(fused).exact


def test_head_dim_80_and_qk_norm_flag():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=240, num_heads=3).eval()
    svd = qklib.qk_svd(model)
    assert svd.S.shape == (12, 3, 80) and svd.U.shape == (12, 3, 240, 80)
    normed = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True).eval()
    svd = qklib.qk_svd(normed)
    assert not svd.exact and any("q_norm" in note for note in svd.notes)


def _conditioned_stack(conds: list[float], r: int = 16, d: int = 96, seed: int = 5) -> torch.Tensor:
    """``[1, len(conds), r, d]`` factors with the given condition numbers (random singular vectors)."""
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for cond in conds:
        left = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=generator))[0]
        right = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=generator))[0]
        factors.append(left @ torch.diag(torch.logspace(0, -np.log10(cond), r, dtype=torch.float64)) @ right.T)
    return torch.stack(factors)[None]


def _dense_error(svd, wq: torch.Tensor, wk: torch.Tensor) -> tuple[float, float]:
    """Worst head's relative reconstruction error of W_q^T W_k and worst loss of orthonormality of U and V."""
    dense = wq.transpose(-1, -2) @ wk
    rebuilt = (svd.U * svd.S.unsqueeze(-2)) @ svd.V.transpose(-1, -2)
    error = ((rebuilt - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)).max()
    eye = torch.eye(svd.rank, dtype=torch.float64)
    ortho = max(float((m.transpose(-1, -2) @ m - eye).abs().max()) for m in (svd.U, svd.V))
    return float(error), ortho


def _assert_exact(svd, wq: torch.Tensor, wk: torch.Tensor, error: float, ortho: float, rtol: float) -> None:
    """Reconstruction error, orthonormality and singular values of every head against a dense SVD."""
    measured = _dense_error(svd, wq, wk)
    assert measured[0] < error and measured[1] < ortho, measured
    dense_s = torch.linalg.svdvals(wq.transpose(-1, -2) @ wk)[..., : svd.rank]
    assert torch.allclose(svd.S, dense_s, rtol=rtol, atol=1e-14 * float(dense_s.max()))


def test_ill_conditioned_heads_take_the_second_pass_and_stay_exact(monkeypatch):
    """Heads of condition number 1 to 1e6 side by side: each is exact to float64 rounding against a dense SVD, and
    the per-head choice of passes matches running the second pass on every head. Without a second pass (the
    threshold set to infinity) the cond-1e6 head loses orthonormality: the check can fail."""
    conds = [1.0, 3.0, 50.0, 1e3, 1e6]
    wq, wk = _conditioned_stack(conds), _conditioned_stack(conds[::-1], seed=6)
    mixed = qk_svd_from_weights(QKWeights(wq, wk))
    _assert_exact(mixed, wq, wk, error=1e-10, ortho=1e-12, rtol=1e-10)
    monkeypatch.setattr(lowrank, "ONE_PASS_COND", 0.0)  # second pass everywhere
    everywhere = qk_svd_from_weights(QKWeights(wq, wk))
    assert torch.allclose(mixed.matrix(0, 2), everywhere.matrix(0, 2), atol=1e-12)
    assert torch.allclose(mixed.S, everywhere.S, rtol=1e-12)
    monkeypatch.setattr(lowrank, "ONE_PASS_COND", float("inf"))  # never a second pass
    _error, ortho_one_pass = _dense_error(qk_svd_from_weights(QKWeights(wq, wk)), wq, wk)
    assert ortho_one_pass > 1e-6


def test_well_conditioned_cores_take_the_cross_product_and_stay_exact(monkeypatch):
    """Cores of condition number 2 to 1e6 side by side (W_k orthonormal, so each core has W_q's): the ones at most
    CROSS_PRODUCT_COND come from the eigendecomposition of core^T core, the others from LAPACK's SVD; each is exact
    to float64 rounding against a dense SVD and agrees with the SVD route. With the cross product everywhere the
    cond-1e6 core loses orthonormality: the check can fail."""
    conds = [2.0, 3.0, 9.0, 1e3, 1e6]  # distinct singular values: vectors defined up to sign
    wq, wk = _conditioned_stack(conds), _conditioned_stack([1.0] * len(conds), seed=6)
    mixed = qk_svd_from_weights(QKWeights(wq, wk))
    _assert_exact(mixed, wq, wk, error=1e-12, ortho=1e-13, rtol=1e-12)
    monkeypatch.setattr(lowrank, "CROSS_PRODUCT_COND", 0.0)  # the SVD everywhere
    by_svd = qk_svd_from_weights(QKWeights(wq, wk))
    monkeypatch.setattr(lowrank, "CROSS_PRODUCT_COND", float("inf"))  # the cross product everywhere
    by_cross = qk_svd_from_weights(QKWeights(wq, wk))
    assert torch.allclose(mixed.S, by_svd.S, rtol=1e-12)
    for head in range(len(conds)):
        assert torch.allclose(mixed.U[0, head].abs(), by_svd.U[0, head].abs(), atol=1e-10)
        assert torch.allclose(mixed.matrix(0, head), by_svd.matrix(0, head), atol=1e-12)
    # the route is chosen per head: the first three cores as with the cross product everywhere, the last two as
    # with the SVD everywhere (the two routes round differently, so bitwise equality identifies the route)
    assert torch.equal(mixed.U[0, :3], by_cross.U[0, :3]) and not torch.equal(mixed.U[0, :3], by_svd.U[0, :3])
    assert torch.equal(mixed.U[0, 3:], by_svd.U[0, 3:])
    eye = torch.eye(mixed.rank, dtype=torch.float64)
    assert float((by_cross.U[0, 4].T @ by_cross.U[0, 4] - eye).abs().max()) > 1e-8


def test_every_mode_has_a_positive_sum_whichever_route_computed_it(monkeypatch, embedded_svd):
    """The sign convention of QKSVD: the entries of every u_n sum to a positive number, for the embedded model's
    modes and for cores by the cross product, by the SVD, by the Householder fallback and with more modes than
    dimensions (LAPACK's own signs are arbitrary: about half the sums would be negative)."""
    wq, wk = _conditioned_stack([2.0, 1e3]), _conditioned_stack([1.0, 1.0], seed=6)
    cases = {"embedded": embedded_svd}
    for route, threshold in (("cross product", float("inf")), ("SVD", 0.0)):
        monkeypatch.setattr(lowrank, "CROSS_PRODUCT_COND", threshold)
        cases[route] = qk_svd_from_weights(QKWeights(wq, wk))
    deficient = wq.clone()
    deficient[0, 0, -1] = deficient[0, 0, 0]  # Cholesky fails: Householder QR
    cases["Householder"] = qk_svd_from_weights(QKWeights(deficient, wk))
    generator = torch.Generator().manual_seed(3)
    wide = [torch.randn(1, 2, 8, 5, dtype=torch.float64, generator=generator) for _ in range(2)]  # r = 8 > d = 5
    cases["r > d"] = qk_svd_from_weights(QKWeights(*wide))
    for route, svd in cases.items():
        assert bool((svd.U.sum(-2) > 0).all()), route


def test_chunks_and_rank_deficient_heads(monkeypatch):
    """The result does not depend on how heads are chunked; a head whose factor has deficient rank (Cholesky fails)
    falls back to Householder QR and is still an exact decomposition."""
    torch.manual_seed(7)
    wq = torch.randn(3, 4, 8, 40, dtype=torch.float64)
    wk = torch.randn(3, 4, 8, 40, dtype=torch.float64)
    whole = qk_svd_from_weights(QKWeights(wq, wk))
    monkeypatch.setattr(lowrank, "_CHUNK_BYTES", 1)  # one head per chunk
    single = qk_svd_from_weights(QKWeights(wq, wk))
    assert torch.allclose(whole.S, single.S, rtol=1e-13)
    assert torch.allclose(whole.U.abs(), single.U.abs(), atol=1e-12)
    deficient = wq.clone()
    deficient[1, 2, -1] = deficient[1, 2, 0]  # two equal rows: W_q of this head has rank r - 1
    svd = qk_svd_from_weights(QKWeights(deficient, wk))
    error, ortho = _dense_error(svd, deficient, wk)
    assert error < 1e-12 and ortho < 1e-12
    assert float(svd.S[1, 2, -1]) < 1e-12 * float(svd.S[1, 2, 0])  # the lost direction shows as a zero mode
