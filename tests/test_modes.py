"""qklib.modes: query/key maps, mode contributions and their ranking, labels."""

import numpy as np
import pytest
import torch
from PIL import Image

import qklib
from qklib import modes
from qklib.core.extract import token_embeddings
from qklib.core.images import to_pixels


@pytest.fixture(scope="module")
def tiny(tiny_vit):
    return tiny_vit


@pytest.fixture(scope="module")
def tiny_tokens(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    return token_embeddings(model, to_pixels(model, images))  # [L, B, T, d]


# --- maps and contributions ------------------------------------------------------------------------------

def test_maps_are_the_projections(tiny, tiny_tokens):
    model, svd = tiny
    x = tiny_tokens[1]  # [B, T, d]
    query, key = modes.mode_maps(svd, x, 1, 2, 5)
    assert query.shape == key.shape == (2, 4, 4)
    expected = x[:, 1:].double() @ svd.U[1, 2, :, 5]
    assert torch.allclose(query.reshape(2, -1), expected)
    flipped_q, flipped_k = modes.mode_maps(svd, x, 1, 2, 5, sign=-1)
    assert torch.allclose(flipped_q, -query) and torch.allclose(flipped_k, -key)
    # agrees with the per-mode terms of qklib.mode_scores
    terms = qklib.mode_scores(svd, 1, 2, x[0, 1:], x[0, 1:])  # [r, Tq, Tk]
    outer = query[0].reshape(-1, 1) * svd.S[1, 2, 5] * key[0].reshape(1, -1)
    assert torch.allclose(terms[5], outer)
    with pytest.raises(IndexError, match="mode 64 out of range"):
        modes.mode_maps(svd, x, 1, 2, 64)
    with pytest.raises(ValueError, match="sign"):
        modes.mode_maps(svd, x, 1, 2, 0, sign=0)


def test_contributions_sum_to_the_bias_free_score(tiny, tiny_tokens):
    model, svd = tiny
    for layer in range(3):
        x = tiny_tokens[layer].double()  # [B, T, d]
        contrib = modes.mode_contributions(svd, x, layer)  # [B, H, r]
        w = model.blocks[layer].attn.qkv.weight.detach().double()  # [3D, d]
        d_attn = w.shape[0] // 3
        heads = model.blocks[layer].attn.num_heads
        image = x[:, 1:]
        q = (image @ w[:d_attn].T).reshape(2, -1, heads, d_attn // heads)  # no bias
        k = (image @ w[d_attn: 2 * d_attn].T).reshape(2, -1, heads, d_attn // heads)
        total = torch.einsum("bihc,bjhc->bh", q, k)  # sum over all image-token pairs
        assert torch.allclose(contrib.sum(-1), total, rtol=1e-8, atol=1e-8)
        # and each term is the sum over pairs of mode_scores
        terms = qklib.mode_scores(svd, layer, 1, image[0], image[0]).sum((1, 2))
        assert torch.allclose(contrib[0, 1], terms)
    with_prefix = modes.mode_contributions(svd, tiny_tokens[0], 0, include_prefix=True)
    assert not torch.allclose(with_prefix, modes.mode_contributions(svd, tiny_tokens[0], 0))


def test_top_modes_rank_by_contribution_and_show_the_present_sign(tiny, tiny_tokens):
    _, svd = tiny
    x = tiny_tokens[2][0]
    ranked = modes.top_modes(svd, x, 2, 1, count=6)
    contrib = modes.mode_contributions(svd, x, 2)[1]
    assert [r.mode for r in ranked] == torch.argsort(contrib, descending=True)[:6].tolist()
    assert all(a.contribution >= b.contribution for a, b in zip(ranked, ranked[1:]))
    assert sum(abs(r.share) for r in ranked) <= 1 + 1e-9
    for r in ranked:
        query, _ = modes.mode_maps(svd, x, 2, 1, r.mode, sign=r.sign)
        assert float(query.sum()) >= 0
        assert r.label == modes.mode_label(2, 1, r.mode, r.sign)


def test_labels():
    assert modes.mode_label(6, 4, 1) == "L6 H4 M1"
    assert modes.mode_label(6, 4, 1, -1) == "L6 H4 M1-"
    assert modes.parse_label("L10 H3 M0") == (10, 3, 0, 1)
    assert modes.parse_label("L1H2M3-") == (1, 2, 3, -1)
    with pytest.raises(ValueError, match="write it as"):
        modes.parse_label("layer 3 head 2")
