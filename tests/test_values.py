"""The value side (OV SVD, composition scores, copying scores, Haar nulls), checked against dense linear algebra,
hand-worked examples and the model's own attention output."""

import copy
import dataclasses

import numpy as np
import pytest
import timm
import torch
from threadpoolctl import threadpool_limits

import qklib
from qklib.core.ov import OVWeights, haar_frames, ov_svd_from_weights
from qklib.core.svd import QKWeights, qk_svd_from_weights


def _heads(model):
    """``(wq, wk, wv, wo)`` per block, read here from the timm module's fused qkv and proj weights (float64):
    ``wq[l][h]``, ``wk``, ``wv``: ``[r, d]``; ``wo[l][h]``: ``[d, r]``."""
    out = []
    for block in model.blocks:
        heads = block.attn.num_heads
        qkv, proj = block.attn.qkv.weight.detach().double(), block.attn.proj.weight.detach().double()
        width = proj.shape[1]
        r = width // heads
        split = [qkv[i * width:(i + 1) * width].reshape(heads, r, -1) for i in range(3)]
        out.append((*split, proj.reshape(-1, heads, r).transpose(0, 1)))
    return out


@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, depth=3).eval()


@pytest.fixture(scope="module")
def tiny_timm():
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, embed_dim=64, num_heads=4,
                             img_size=32).eval()


@pytest.mark.parametrize("which", ["embedded", "random"])
def test_ov_svd_is_the_dense_svd_of_every_head(which, request):
    model = request.getfixturevalue("embedded_model") if which == "embedded" else \
        qklib.load_model("random:vit_small_patch16_224", seed=0)
    svd = qklib.ov_svd(model)
    heads = _heads(model)
    layers, count, d, r = svd.U.shape
    assert (layers, count) == (len(heads), heads[0][2].shape[0]) and svd.S.dtype == torch.float64
    eye = torch.eye(r, dtype=torch.float64)
    dense = torch.stack([wo @ wv for _wq, _wk, wv, wo in heads])  # [L, H, d, d]
    with threadpool_limits(1):  # one batched LAPACK call: threads only contend on a shared machine
        s = np.linalg.svd(dense.numpy(), compute_uv=False)[..., :r]
    assert (np.abs(svd.S.numpy() - s).max(-1) / s[..., 0]).max() < 1e-10
    rebuilt = (svd.U * svd.S.unsqueeze(-2)) @ svd.V.mT
    errors = (rebuilt - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)
    assert float(errors.max()) < 1e-10, f"worst head relative error {float(errors.max()):.1e}"
    for vectors in (svd.U, svd.V):
        assert float((vectors.mT @ vectors - eye).abs().max()) < 1e-10
    # U is the written side: it lies in the column space of W_O, which W_V's row space is not (the check can fail)
    wo0 = heads[0][3][0]
    assert torch.allclose(wo0 @ torch.linalg.lstsq(wo0, svd.U[0, 0]).solution, svd.U[0, 0], atol=1e-10)
    assert any("directions a head writes" in note for note in svd.notes)


def test_ov_reproduces_the_attention_modules_own_output(embedded_model):
    """sum_h A_h X OV_h^T plus the constant W_O b_v + b_o is the attention module's output, A_h computed from the
    model's own q and k: the head split of W_V and of W_O's columns is the model's."""
    torch.manual_seed(3)
    layer = 4
    attn = embedded_model.blocks[layer].attn
    x = torch.randn(1, 20, attn.qkv.in_features)
    with torch.no_grad():
        expected = attn(x)[0].double()
        qkv = attn.qkv(x)[0].double()
    heads, width = attn.num_heads, attn.proj.in_features
    q, k = (qkv[:, i * width:(i + 1) * width].reshape(20, heads, -1).transpose(0, 1) for i in range(2))
    probs = torch.softmax(q @ k.mT * attn.scale, dim=-1)  # [H, T, T]
    svd = qklib.ov_svd(embedded_model)
    ov = torch.stack([svd.matrix(layer, h) for h in range(heads)])
    value_bias = attn.qkv.bias.detach().double()[2 * width:]
    constant = attn.proj.weight.detach().double() @ value_bias + attn.proj.bias.detach().double()
    rebuilt = torch.einsum("hij,jd,hed->ie", probs, x[0].double(), ov) + constant
    assert float((rebuilt - expected).norm() / expected.norm()) < 1e-5


def test_options_fold_gamma_and_layer_scale(embedded_model):
    """The embedded DINOv2 has LayerScale and trained LayerNorm gains: each option changes OV as stated."""
    block = embedded_model.blocks[2]
    gamma = block.norm1.weight.detach().double()
    scale = block.ls1.gamma.detach().double()
    wq, wk, wv, wo = _heads(embedded_model)[2]
    folded = qklib.ov_svd(embedded_model, fold_gamma=True, layer_scale=True)
    dense = scale[:, None] * (wo[1] @ wv[1]) * gamma
    assert float((folded.matrix(2, 1) - dense).norm() / dense.norm()) < 1e-10
    assert folded.fold_gamma and any("LayerScale folded in" in n for n in folded.notes)
    raw = qklib.ov_svd(embedded_model)
    assert any("LayerScale left out" in n for n in raw.notes) and any("not folded" in n for n in raw.notes)
    assert not torch.allclose(raw.S, folded.S)


def test_separate_value_projection_matches_fused():
    torch.manual_seed(4)
    separate = timm.create_model("eva02_tiny_patch14_224", pretrained=False, qkv_fused=False).eval()
    attn = separate.blocks[1].attn
    heads, r = attn.num_heads, attn.head_dim
    svd = qklib.ov_svd(separate)
    wv = attn.v_proj.weight.detach().double()[r:2 * r]  # head 1
    wo = attn.proj.weight.detach().double()[:, r:2 * r]
    assert torch.allclose(svd.matrix(1, 1), wo @ wv, atol=1e-12)
    assert heads == svd.num_heads


def _dense_composition(model, fold_gamma=False):
    heads = _heads(model)
    gammas = [b.norm1.weight.detach().double() if fold_gamma else None for b in model.blocks]
    qks, ovs = [], []
    for (wq, wk, wv, wo), gamma in zip(heads, gammas):
        g = torch.ones(wq.shape[-1], dtype=torch.float64) if gamma is None else gamma
        qks.append([(wq[h] * g).T @ (wk[h] * g) for h in range(wq.shape[0])])
        ovs.append([wo[h] @ (wv[h] * g) for h in range(wq.shape[0])])
    layers, count = len(heads), len(qks[0])
    out = {kind: torch.zeros(layers, count, layers, count, dtype=torch.float64) for kind in "qkv"}
    for l1 in range(layers):
        for h1 in range(count):
            for l2 in range(l1 + 1, layers):
                for h2 in range(count):
                    ov1, qk2, ov2 = ovs[l1][h1], qks[l2][h2], ovs[l2][h2]
                    for kind, second in (("q", qk2.T), ("k", qk2), ("v", ov2)):
                        out[kind][l1, h1, l2, h2] = (second @ ov1).norm() / (second.norm() * ov1.norm())
    return out


@pytest.mark.parametrize("which", ["tiny_timm", "small_vit"])
def test_composition_scores_equal_a_dense_loop(which, request):
    model = request.getfixturevalue(which)
    scores = qklib.composition_scores(model)
    dense = _dense_composition(model)
    for kind in "qkv":
        assert scores[kind].shape == dense[kind].shape
        assert torch.allclose(scores[kind], dense[kind], rtol=1e-10, atol=1e-14), kind
        assert bool((scores[kind][:, :, 0] == 0).all())  # nothing composes into the first layer
    assert float(dense["k"].max()) > 0.01  # the check compares numbers that are not all zero


def test_composition_with_gamma_folded_equals_a_dense_loop(tiny_timm):
    torch.manual_seed(5)
    for block in tiny_timm.blocks:
        block.norm1.weight.data = torch.rand_like(block.norm1.weight) + 0.5
    scores = qklib.composition_scores(tiny_timm, fold_gamma=True)
    dense = _dense_composition(tiny_timm, fold_gamma=True)
    assert all(torch.allclose(scores[k], dense[k], rtol=1e-10, atol=1e-14) for k in "qkv")
    assert not torch.allclose(scores["v"], qklib.composition_scores(tiny_timm)["v"])


def _hand_circuits(wq1, wk1, wv1, wo1):
    """Two layers of one head in R^3, r = 1; layer 0 reads e1 and writes e2 (OV_0 = e2 e1^T)."""
    e = torch.eye(3, dtype=torch.float64)
    stack = lambda first, second: torch.stack([first, second]).reshape(2, 1, *first.shape)  # noqa: E731
    qk = qk_svd_from_weights(QKWeights(wq=stack(e[:1], wq1), wk=stack(e[:1], wk1)))
    ov = ov_svd_from_weights(OVWeights(wv=stack(e[:1], wv1), wo=stack(e[:, 1:2], wo1)))
    return qk, ov


def _transformer_lens(wq1, wk1, wv1, wo1):
    """TransformerLens's row-vector formulas on its layouts W_Q = W_q^T, W_K = W_k^T, W_V = W_v^T, W_O = W_o^T:
    QK_TL = W_Q W_K^T, OV_TL = W_V W_O, modes Q: OV_1 QK_2, K: OV_1 QK_2^T, V: OV_1 OV_2."""
    e = torch.eye(3, dtype=torch.float64)
    ov1_tl = e[:1].T @ e[:, 1:2].T
    qk2_tl, ov2_tl = wq1.T @ wk1, wv1.T @ wo1.T
    score = lambda a, b: float((a @ b).norm() / (a.norm() * b.norm()))  # noqa: E731
    return {"q": score(ov1_tl, qk2_tl), "k": score(ov1_tl, qk2_tl.T), "v": score(ov1_tl, ov2_tl)}


def test_hand_worked_two_layer_example_and_transformer_lens_mapping():
    """Layer 1's key reads e2 + e3, its query e1; its value reads 3 e2 + 4 e3 and writes e3. Layer 0 writes e2,
    so: K-composition |e1 (e2+e3)^T e2 e1^T| / sqrt(2) = 1/sqrt(2), Q-composition 0, V-composition 3 / 5.
    Swapping query and key moves the composition from K to Q."""
    row = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    cases = [((row(1, 0, 0), row(0, 1, 1), row(0, 3, 4), row(0, 0, 1).T), {"q": 0, "k": 2 ** -0.5, "v": 0.6}),
             ((row(0, 1, 1), row(1, 0, 0), row(0, 3, 4), row(0, 0, 1).T), {"q": 2 ** -0.5, "k": 0, "v": 0.6})]
    for weights, expected in cases:
        scores = qklib.composition_scores(_hand_circuits(*weights))
        lens = _transformer_lens(*weights)
        for kind in "qkv":
            assert scores[kind].shape == (2, 1, 2, 1)
            assert float(scores[kind][0, 0, 1, 0]) == pytest.approx(expected[kind], abs=1e-12)
            assert float(scores[kind][0, 0, 1, 0]) == pytest.approx(lens[kind], abs=1e-12)
            assert float(scores[kind][1, 0, 0, 0]) == 0 and float(scores[kind][0, 0, 0, 0]) == 0


def test_copying_scores_equal_dense_eigenvalues(tiny_timm, embedded_model):
    for model, picks in ((tiny_timm, None), (embedded_model, [(0, 1), (5, 3), (11, 0)])):
        heads = _heads(model)
        picks = picks or [(l, h) for l in range(len(heads)) for h in range(heads[0][2].shape[0])]
        ov = qklib.ov_svd(model)
        for kind in ("positive_real", "real_part"):
            scores = qklib.copying_scores(ov, kind=kind)
            for layer, head in picks:
                with threadpool_limits(1):
                    lam = np.linalg.eigvals((heads[layer][3][head] @ heads[layer][2][head]).numpy())
                tiny = np.abs(lam) < 1e-9 * np.abs(lam).max()  # the d - r zero eigenvalues, at rounding level
                lam = lam[~tiny]
                mass = lam.real[(np.abs(lam.imag) < 1e-12) & (lam.real > 0)].sum() if kind == "positive_real" \
                    else lam.real.sum()
                assert float(scores[layer, head]) == pytest.approx(mass / np.abs(lam).sum(), abs=1e-8)
    assert torch.allclose(qklib.copying_scores(tiny_timm), qklib.copying_scores(qklib.ov_svd(tiny_timm)))


def test_copying_scores_hand_worked():
    """OV = W^T W (positive semi-definite) copies: 1. OV = -W^T W: 0. A quarter-turn rotation on (e1, e2): no real
    eigenvalue (0 positive real), real parts 0. A rotation by 60 degrees: real parts cos 60 = 1/2."""
    torch.manual_seed(6)
    w = torch.randn(1, 4, 2, 6, dtype=torch.float64)
    e = torch.eye(6, dtype=torch.float64)
    turn = lambda angle: torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])  # noqa: E731
    wo = torch.stack([w[0, 0].T, -w[0, 1].T, e[:, :2] @ turn(np.pi / 2).double(), e[:, :2] @ turn(np.pi / 3).double()])
    wv = torch.stack([w[0, 0], w[0, 1], e[:2], e[:2]])
    ov = ov_svd_from_weights(OVWeights(wv=wv[None], wo=wo[None]))
    positive = qklib.copying_scores(ov)[0]
    real = qklib.copying_scores(ov, kind="real_part")[0]
    assert positive.tolist() == pytest.approx([1, 0, 0, 0], abs=1e-12)
    assert real.tolist() == pytest.approx([1, -1, 0, 0.5], abs=1e-12)
    with pytest.raises(ValueError, match="kind"):
        qklib.copying_scores(ov, kind="trace")


def test_haar_null_keeps_each_spectrum_and_is_seeded(tiny_timm):
    qk, ov = qklib.qk_svd(tiny_timm), qklib.ov_svd(tiny_timm)
    generator = torch.Generator().manual_seed(0)
    rotated = qklib.haar_rotated(ov, generator)
    eye = torch.eye(ov.rank, dtype=torch.float64)
    for vectors in (rotated.U, rotated.V):
        assert float((vectors.mT @ vectors - eye).abs().max()) < 1e-12
    dense = (rotated.U * rotated.S.unsqueeze(-2)) @ rotated.V.mT
    assert torch.allclose(torch.linalg.svdvals(dense)[..., : ov.rank], ov.S, rtol=1e-10)
    assert not torch.allclose(rotated.U, ov.U)
    null = qklib.composition_null((qk, ov), count=3, seed=1)
    again = qklib.composition_null(tiny_timm, count=3, seed=1)
    other = qklib.composition_null(tiny_timm, count=3, seed=2)
    assert null["k"].shape == (3, 3, 4, 3, 4)
    assert torch.equal(null["v"], again["v"]) and not torch.equal(null["v"], other["v"])
    assert bool((null["q"][:, :, :, 0] == 0).all()) and float(null["q"][:, 0, :, 1].min()) > 0
    # Every head's keys read exactly what every head writes: K-composition far above chance. Under the null
    # E[score^2] = 1/d whatever the spectra (E[(x . y)^2] = 1/d for a unit x and a uniform unit y).
    frame = qk.V[0, 0].expand_as(qk.V)
    aligned = (dataclasses.replace(qk, V=frame), dataclasses.replace(ov, U=frame))
    later = torch.arange(3)[:, None] < torch.arange(3)[None, :]  # [L1, L2]: pairs across layers
    pairs = lambda t: t.movedim((-4, -2), (-2, -1))[..., later]  # noqa: E731  # [..., H, H, pairs of layers]
    assert float(pairs(qklib.composition_scores(aligned)["k"]).square().mean()) > 4 / 64  # ~1/r against 1/d
    many = qklib.composition_null(aligned, count=40, seed=3)
    for kind in "qkv":
        assert float(pairs(many[kind]).square().mean()) == pytest.approx(1 / 64, rel=0.1), kind
    copying = qklib.copying_null(ov, count=4, seed=0)
    assert copying.shape == (4, 3, 4) and bool(((copying >= 0) & (copying <= 1)).all())


def test_haar_frames_are_uniform():
    """E[U U^T] = (r / d) I for Haar frames, and the cosine of two independent frames' first columns has variance
    1/d: both within Monte Carlo error of 4000 draws (a frame that kept the Gaussian's first axis would fail)."""
    generator = torch.Generator().manual_seed(2)
    frames = haar_frames(4000, 8, 2, generator)
    mean = (frames @ frames.mT).mean(0)
    assert torch.allclose(mean, torch.eye(8, dtype=torch.float64) / 4, atol=0.02)
    other = haar_frames(4000, 8, 2, generator)
    cos = (frames[:, :, 0] * other[:, :, 0]).sum(-1)
    assert float(cos.var()) == pytest.approx(1 / 8, rel=0.1)


def test_effective_rank_and_bad_input():
    S = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    p = np.array([0.5, 0.25, 0.25])
    assert qklib.effective_rank(S).tolist() == pytest.approx([4, 1, float(np.exp(-(p * np.log(p)).sum()))])
    with pytest.raises(TypeError, match="ov_svd"):
        qklib.composition_scores("vit_small_patch16_224")
    with pytest.raises(TypeError, match="ov_svd"):
        qklib.copying_scores("vit_small_patch16_224")


def test_chapter_tables_against_their_inputs(tiny_timm):
    """§6's tables: a row per pair of heads in different layers, ``beyond`` exactly where the score exceeds every
    null draw, the summary's counts, and the head table's columns equal to the library's numbers."""
    from qklib.analyses import values

    qk, ov = qklib.qk_svd(tiny_timm), qklib.ov_svd(tiny_timm)
    scores, null = qklib.composition_scores((qk, ov)), qklib.composition_null((qk, ov), count=4, seed=0)
    table = values.composition_table({"m": scores}, {"m": null})
    assert len(table) == 3 * 16 * 3  # kinds x head pairs x layer pairs (0, 1), (0, 2), (1, 2)
    row = table[(table.kind == "v") & (table.layer1 == 0) & (table.head1 == 2) & (table.layer2 == 2)
                & (table.head2 == 1)].iloc[0]
    assert row.score == float(scores["v"][0, 2, 2, 1])
    assert row.null_max == float(null["v"][:, 0, 2, 2, 1].max())
    assert row.beyond == (row.score > row.null_max)
    summary = values.composition_summary(table).set_index("kind")
    assert summary.loc["k", "beyond"] == int(table[table.kind == "k"].beyond.sum())
    assert summary.loc["k", "chance_share"] == pytest.approx(1 / 5)
    heads = values.head_table({"m": ov})
    assert np.allclose(heads.copying.to_numpy(), qklib.copying_scores(ov).numpy().ravel())
    assert np.allclose(heads.effective_rank.to_numpy(), qklib.effective_rank(ov.S).numpy().ravel())
    layers = values.layer_table(heads, "copying", resamples=200)
    assert np.allclose(layers["mean"], heads.groupby("layer").copying.mean())
    assert bool((layers["low"] <= layers["mean"]).all() and (layers["mean"] <= layers["high"]).all())
    aligned = values.alignment_table({"m": qk}, {"m": ov})
    assert len(aligned) == 4 * 16 * 3  # later heads x modes x (earlier layer < later layer) for layers 1, 2
    row = aligned[(aligned.layer == 2) & (aligned["head"] == 1) & (aligned["mode"] == 3) & (aligned.earlier_layer == 1)]
    assert float(row.alignment.iloc[0]) == float(qklib.mode_alignment(qk, ov)[2, 1, 3, 1].max())
    share = table[table.kind == "v"].beyond.mean()
    assert f"V {share:.1%}" in values.findings(heads, values.composition_summary(table), resamples=200)


def test_a_norm_before_the_output_projection_is_flagged():
    """timm's scale_norm puts a LayerNorm between the heads and W_O: the OV map is then not exactly W_O W_V."""
    normed = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, scale_attn_norm=True).eval()
    svd = qklib.ov_svd(normed)
    assert not svd.exact and any("scale_norm" in note for note in svd.notes)
    assert qklib.ov_svd(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)).exact


def test_mode_alignment_is_the_projection_onto_earlier_written_subspaces(tiny_timm):
    qk, ov = qklib.qk_svd(tiny_timm), qklib.ov_svd(tiny_timm)
    aligned = qklib.mode_alignment(qk, ov)
    assert aligned.shape == (3, 4, 16, 3, 4)
    for l2, h2, n, l1, h1 in [(1, 0, 0, 0, 3), (2, 3, 15, 1, 2), (2, 1, 4, 0, 0)]:
        u = ov.U[l1, h1]
        projected = u @ torch.linalg.solve(u.T @ u, u.T @ qk.V[l2, h2, :, n])  # least squares, not U's orthonormality
        assert float(aligned[l2, h2, n, l1, h1]) == pytest.approx(float(projected.square().sum()), abs=1e-12)
        assert float(qklib.mode_alignment(qk, ov, side="query")[l2, h2, n, l1, h1]) == pytest.approx(
            float((u.T @ qk.U[l2, h2, :, n]).square().sum()), abs=1e-12)
    assert bool((aligned[0] == 0).all()) and bool((aligned[1, :, :, 1:] == 0).all())  # only earlier layers
    assert float(aligned[2, :, :, :2].mean()) == pytest.approx(16 / 64, rel=0.15)  # random init: chance r / d


def test_key_value_alignment_and_ov_images_against_dense_heads(tiny_timm):
    """QK meets OV in one head: the share of each key feature v_n in the head's own value row space (by least
    squares on the dense W_V, not through the SVD), and OV v_n as the dense product."""
    from qklib.analyses import values

    qk, ov = qklib.qk_svd(tiny_timm), qklib.ov_svd(tiny_timm)
    aligned, images = values.key_value_alignment(qk, ov), values.ov_images(qk, ov)
    assert aligned.shape == (3, 4, 16) and images.shape == (3, 4, 64, 16)
    heads = _heads(tiny_timm)
    for layer, head, mode in [(0, 0, 0), (1, 3, 7), (2, 2, 15)]:
        _wq, _wk, wv, wo = (w[head] for w in heads[layer])
        v = qk.V[layer, head, :, mode]
        projected = wv.T @ torch.linalg.solve(wv @ wv.T, wv @ v)
        assert float(aligned[layer, head, mode]) == pytest.approx(float(projected.square().sum()), abs=1e-12)
        assert torch.allclose(images[layer, head, :, mode], wo @ wv @ v, atol=1e-12)
    assert float(aligned.mean()) == pytest.approx(16 / 64, rel=0.15)  # random init: chance r / d
    table = values.key_value_table({"m": qk}, {"m": ov})
    row = table[(table.layer == 1) & (table["head"] == 3) & (table["mode"] == 7)].iloc[0]
    image, v = images[1, 3, :, 7], qk.V[1, 3, :, 7]
    assert row.gain == pytest.approx(float(image.norm() / ov.S[1, 3, 0]))
    assert row.self_cosine == pytest.approx(float(image @ v / image.norm()))
    assert row.alignment == float(aligned[1, 3, 7]) and row.chance == 0.25


def test_a_head_whose_value_reads_its_keys_aligns_fully(tiny_timm):
    """Copy a head's key rows into its value rows: the value then reads every key feature exactly (share 1),
    the Haar null stays near r / d, and the featured head of that layer is this one."""
    from qklib.analyses import values

    model = copy.deepcopy(tiny_timm)
    qkv = model.blocks[1].attn.qkv.weight.data
    qkv[128 + 16:128 + 32] = qkv[64 + 16:64 + 32]  # head 1 of block 1: W_V = W_k
    qk, ov = qklib.qk_svd(model), qklib.ov_svd(model)
    aligned = values.key_value_alignment(qk, ov)
    assert torch.allclose(aligned[1, 1], torch.ones(16, dtype=torch.float64), atol=1e-10)
    assert float(aligned[1, 0].mean()) < 0.5
    nulls = values.key_value_nulls({"m": qk}, {"m": ov}, draws=6, seed=3)["m"]
    assert nulls.shape == (6, 3, 4) and float(nulls[:, 1, 1].max()) < 0.6
    assert torch.equal(nulls, values.key_value_nulls({"m": qk}, {"m": ov}, draws=6, seed=3)["m"])
    assert float(nulls.mean()) == pytest.approx(0.25, rel=0.1)
    heads = values.key_value_heads(values.key_value_table({"m": qk}, {"m": ov}))
    assert values.featured_heads(heads, "m", [1]) == [(1, 1)]
    measure = values.key_value_measures(heads, {"m": nulls})["m"]["key_value"]
    assert measure["heads"][4 + 1] == pytest.approx(1.0) and len(measure["null"]) == 6 and measure["chance"] == 0.25
