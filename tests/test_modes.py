"""qklib.analyses.modes: query/key maps, mode contributions and their ranking, labels."""

import numpy as np
import pytest
import torch
from PIL import Image

import qklib
from qklib.analyses import modes
from qklib.core.extract import record, token_embeddings
from qklib.core.images import to_pixels
from oracles import attention_contributions_of_terms


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


# --- ranking by effect on attention, ablation, the rule ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_attention(tiny):
    model, _ = tiny
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    recorded = record(model, to_pixels(model, images), tokens=True, attention=True)
    return recorded.tokens, recorded.attention  # [L, B, T, d], [L, B, H, T, T]


def test_attention_ranking_ignores_per_query_constants(tiny, tiny_attention):
    _, svd = tiny
    tokens, probs = tiny_attention
    x, p = tokens[1][0], modes.image_attention(probs[1][0, 2])
    terms = modes.score_terms(svd, x, 1, 2)  # [r, N, N]
    ours = attention_contributions_of_terms(terms, p)
    # the closed form agrees with the brute force over token pairs
    assert torch.allclose(modes.attention_contributions(svd, x, probs[1][0, 2], 1, 2), ours, atol=1e-9)
    shift = torch.from_numpy(np.random.default_rng(2).normal(size=terms.shape[:2]) * 50)[..., None]  # [r, N, 1]
    assert torch.allclose(attention_contributions_of_terms(terms + shift, p), ours, atol=1e-8)
    # the paper's sum moves with the constant, and it is N x the key-means summed over queries
    paper = modes.mode_contributions(svd, x, 1)[2]
    assert torch.allclose(terms.sum((1, 2)), paper)
    assert torch.allclose(paper, terms.shape[1] * terms.mean(-1).sum(-1))
    assert not torch.allclose((terms + shift).sum((1, 2)), paper)


def test_attention_contributions_sum_to_the_attention_weighted_centred_score(tiny, tiny_attention):
    model, svd = tiny
    tokens, probs = tiny_attention
    layer, head = 2, 1
    x = tokens[layer][0, 1:].double()
    w = model.blocks[layer].attn.qkv.weight.detach().double()
    d_attn, dk = w.shape[0] // 3, svd.rank
    q = x @ w[head * dk:(head + 1) * dk].T
    k = x @ w[d_attn + head * dk: d_attn + (head + 1) * dk].T
    score = q @ k.T  # bias-free [N, N]
    p = modes.image_attention(probs[layer][0, head])
    total = (p * (score - score.mean(-1, keepdim=True))).sum()
    ours = modes.attention_contributions(svd, tokens[layer][0], probs[layer][0, head], layer, head)
    assert float(ours.sum()) == pytest.approx(float(total), rel=1e-6)
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=torch.float64))


def test_ablation_on_a_tiny_case():
    # two keys, one query; mode 0 favours key 0 by 2, mode 1 is a per-query constant
    attention = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    terms = torch.tensor([[[2.0, 0.0]], [[3.0, 3.0]]], dtype=torch.float64)  # [r=2, 1, 2]
    assert modes.attention_change(attention, terms, [], 1.0) == 0.0
    assert modes.attention_change(attention, terms, [1], 1.0) == pytest.approx(0.0, abs=1e-12)
    removed = modes.ablated_attention(attention, terms, [0], 1.0)
    expected = torch.softmax(torch.tensor([-2.0, 0.0], dtype=torch.float64), 0)
    assert torch.allclose(removed[0], expected)
    assert modes.attention_change(attention, terms, [0], 1.0) == pytest.approx(float(expected[1] - 0.5))


def test_ablation_rows_remove_the_model_scores(tiny, tiny_attention):
    model, svd = tiny
    tokens, probs = tiny_attention
    layer = 1
    rows = modes.ablation_rows(svd, tokens[layer], probs[layer], layer, count=3)
    assert len(rows) == 2 * svd.num_heads
    assert all(0 <= r["by_attention"] <= 1 and 0 <= r["by_paper_sum"] <= 1 and 0 <= r["overlap"] <= 3 for r in rows)
    # removing every mode leaves softmax(log p - scale * bias-free score): check against the weights
    x = tokens[layer][0, 1:].double()
    w = model.blocks[layer].attn.qkv.weight.detach().double()
    d_attn, dk = w.shape[0] // 3, svd.rank
    score = (x @ w[:dk].T) @ (x @ w[d_attn:d_attn + dk].T).T
    p = modes.image_attention(probs[layer][0, 0])
    terms = modes.score_terms(svd, tokens[layer][0], layer, 0)
    everything = modes.ablated_attention(p, terms, range(svd.rank), dk ** -0.5)
    assert torch.allclose(everything, torch.softmax(p.log() - score * dk ** -0.5, -1), atol=1e-8)


def test_rule_modes_and_map_correlation(tiny, tiny_tokens):
    _, svd = tiny
    assert modes.rule_layers(12) == [1, 6, 10] and modes.rule_layers(3) == [0, 1, 2] and modes.rule_layers(1) == [0]
    chosen = modes.rule_modes(svd)
    assert [c[0] for c in chosen] == modes.rule_layers(svd.num_layers)
    for layer, head, mode, sign in chosen:
        assert mode == 0 and sign == 1 and float(svd.S[layer, head, 0]) == float(svd.S[layer, :, 0].max())
    x = tiny_tokens[1]
    query, key = modes.mode_maps(svd, x, 1, 2, 3)
    expected = np.corrcoef(query.flatten().numpy(), key.flatten().numpy())[0, 1]
    assert modes.map_correlation(svd, x, 1, 2, 3) == pytest.approx(expected)


def test_ablation_rows_agree_with_the_brute_force(tiny, tiny_attention):
    _, svd = tiny
    tokens, probs = tiny_attention
    row = modes.ablation_rows(svd, tokens[2][1:], probs[2][1:], 2, count=2)[1]  # image 1, head 1
    p = modes.image_attention(probs[2][1, 1])
    terms = modes.score_terms(svd, tokens[2][1], 2, 1)
    ours = attention_contributions_of_terms(terms, p).argsort(descending=True)[:2].tolist()
    paper = terms.sum((1, 2)).argsort(descending=True)[:2].tolist()
    assert row["by_attention"] == pytest.approx(modes.attention_change(p, terms, ours, svd.rank ** -0.5))
    assert row["by_paper_sum"] == pytest.approx(modes.attention_change(p, terms, paper, svd.rank ** -0.5))
    assert row["overlap"] == len(set(ours) & set(paper)) and row["head"] == 1
    assert row["by_singular_value"] == pytest.approx(modes.attention_change(p, terms, [0, 1], svd.rank ** -0.5))
    drawn = modes.ablation_rows(svd, tokens[2][1:], probs[2][1:], 2, count=2)
    assert [r["by_random"] for r in drawn] == [r["by_random"] for r in modes.ablation_rows(
        svd, tokens[2][1:], probs[2][1:], 2, count=2)]  # seeded: the same random modes again
    assert len({round(r["by_random"], 12) for r in drawn}) > 1  # but not the same modes in every head
    assert torch.allclose(modes.score_terms(svd, tokens[2][1], 2, 1, modes=[3, 0]), terms[[3, 0]])


def test_top_modes_by_attention_and_the_image_level_helpers(tiny):
    model, svd = tiny
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    recorded = record(model, to_pixels(model, images), tokens=True, attention=True, layers=[2])
    x, p = recorded.tokens[0][0], recorded.attention[0][0, 1]
    ranked = modes.top_modes(svd, x, 2, 1, count=4, probs=p)
    ours = modes.attention_contributions(svd, x, p, 2, 1)
    assert [r.mode for r in ranked] == ours.argsort(descending=True)[:4].tolist()
    assert ranked[0].share == pytest.approx(float(ours.max() / ours.abs().sum()))
    rows = modes.ablation(model, svd, images[:2], [0, 2], count=3)
    assert len(rows) == 2 * 2 * svd.num_heads and {r["layer"] for r in rows} == {0, 2}
    chosen = [(1, 0, 0, 1), (2, 2, 5, -1)]
    pooled = [row["correlation"] for row in modes.position_shares(model, svd, [images[:2], images[2:]], chosen, draws=2)]
    tokens = token_embeddings(model, to_pixels(model, images), layers=[1, 2])  # [2, 3, T, d]
    assert pooled[0] == pytest.approx(modes.map_correlation(svd, tokens[0], 1, 0, 0), rel=1e-6)
    assert pooled[1] == pytest.approx(modes.map_correlation(svd, tokens[1], 2, 2, 5), rel=1e-6)


def test_position_share_on_hand_made_maps():
    same_everywhere = np.tile(np.arange(6.0), (4, 1))  # every image the same map: all position
    assert modes.position_share(same_everywhere) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    content = rng.normal(size=(400, 6))  # no position effect: about 1 / images
    assert modes.position_share(content) < 0.01
    half = np.array([[1.0, -1.0], [3.0, 1.0]])  # position means (2, 0): var 1 of total var 2
    assert modes.position_share(half) == pytest.approx(0.5)


def test_position_shares_of_modes_with_their_null(tiny, tiny_tokens):
    model, svd = tiny
    rng = np.random.default_rng(4)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(6)]
    rows = modes.position_shares(model, svd, [images[:3], images[3:]], [(1, 0, 0, 1), (2, 1, 3, -1)], draws=10)
    tokens = token_embeddings(model, to_pixels(model, images), layers=[1])[0][:, 1:].double()
    query = (tokens @ svd.U[1, 0, :, 0]).numpy()
    assert rows[0]["query"] == pytest.approx(modes.position_share(query))
    assert rows[0]["images"] == 6 and 0 < rows[0]["query_null"] < 1
    assert rows[1]["correlation"] == pytest.approx(modes.map_correlation(svd, token_embeddings(
        model, to_pixels(model, images), layers=[2])[0], 2, 1, 3), rel=1e-6)
