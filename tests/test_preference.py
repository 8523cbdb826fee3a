"""qklib.analyses.preference: token masks in the model's view, the six ratios, and the measure against a direct
computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qklib.core.datasets.o3 import generate_scenes, load_o3
from qklib.analyses.preference import (GROUPS, PAIRS, TokenMasks, chance, measure, per_layer, query_tokens,
                                       query_weights, ratios, select, token_masks, token_ratios)
from oracles import weighted_ratios


@pytest.fixture(scope="module")
def model(embedded_model):
    return embedded_model


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("scenes"), 6, seed=3)



def _random_attention(layers=2, batch=3, heads=4, tokens=1 + 9, seed=0) -> torch.Tensor:
    scores = torch.randn(layers, batch, heads, tokens, tokens, generator=torch.Generator().manual_seed(seed))
    return scores.softmax(-1)


def _random_masks(batch=3, count=9, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, count, generator=generator) * 0.5
    distractor = torch.rand(batch, count, generator=generator) * (1 - target)
    return TokenMasks(target, distractor, (3, 3)).stacked()


def test_ratios_of_each_query_sum_to_one():
    attention, masks = _random_attention(), _random_masks()
    queries = torch.tensor([[0, 4], [8, 2], [3, 3]])
    values = ratios(attention, 1, masks, queries)
    assert values.shape == (2, 3, 4, 2, 3)
    torch.testing.assert_close(values.sum(-1), torch.ones(values.shape[:-1]), atol=1e-6, rtol=0)


def test_uniform_attention_gives_the_mask_area_fractions():
    prefix, count = 2, 9
    attention = torch.zeros(1, 3, 2, prefix + count, prefix + count)
    attention[..., :prefix] = 0.3 / prefix  # mass on prefix tokens is dropped and the rest renormalised
    attention[..., prefix:] = 0.7 / count
    masks = _random_masks(count=count)
    values = ratios(attention, prefix, masks, torch.tensor([[0, 1], [5, 6], [8, 0]]))
    area = masks.mean(-1)  # [B, 3]
    torch.testing.assert_close(values, area[None, :, None, None, :].expand_as(values), atol=1e-6, rtol=0)
    table = chance(masks, ["a", "b", "c"])
    np.testing.assert_allclose(table["background"], area[:, 2].numpy(), atol=1e-6)
    np.testing.assert_allclose(table["same"], table["different"])


def test_hand_built_case():
    # 2x2 token grid after one CLS token: token 0 is target, token 3 distractor, tokens 1-2 background.
    masks = TokenMasks(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1.0]]), (2, 2))
    queries, keep = query_tokens(masks)
    assert queries.tolist() == [[0, 3]] and keep.tolist() == [True]
    attention = torch.zeros(1, 1, 1, 5, 5)
    attention[0, 0, 0, 1] = torch.tensor([0.2, 0.4, 0.2, 0.1, 0.1])  # target query (token 1 with CLS)
    attention[0, 0, 0, 4] = torch.tensor([0.5, 0.0, 0.25, 0.0, 0.25])  # distractor query
    values = ratios(attention, 1, masks.stacked(), queries)[0, 0, 0]
    torch.testing.assert_close(values, torch.tensor([[0.5, 0.125, 0.375], [0.0, 0.5, 0.5]]))
    # chance with the query's own token left out of the keys: among the other 3 tokens the query's own object
    # covers nothing, the other object one token and the background two
    levels = chance(masks.stacked(), ["x"], queries).iloc[0]
    assert (levels["same"], levels["background"]) == pytest.approx((0.25, 0.5))  # self kept: the area shares
    assert (levels["same_removed"], levels["different_removed"], levels["background_removed"]) == pytest.approx(
        (0.0, 1 / 3, 2 / 3))


def test_token_masks_area_downscale_and_overlap(model):
    target = np.zeros((224, 224), bool)
    target[0:14, 0:7] = True  # half of token 0
    distractor = np.zeros((224, 224), bool)
    distractor[0:14, 0:28] = True  # overlaps the target there: the target wins
    masks = token_masks(model, [target], [distractor])
    assert masks.grid == (16, 16)
    assert masks.target[0, 0].item() == pytest.approx(0.5)
    assert masks.distractor[0, 0].item() == pytest.approx(0.5) and masks.distractor[0, 1].item() == pytest.approx(1.0)
    assert masks.background[0, 0].item() == pytest.approx(0.0) and masks.background[0, 2].item() == pytest.approx(1.0)


def test_token_masks_follow_the_models_resize_and_crop(model):
    # 448 x 672 image: resized to 224 x 336, centre crop keeps columns 56..280; a target at the far left is cut off.
    target = np.zeros((448, 672), bool)
    target[:, :100] = True
    distractor = np.zeros((448, 672), bool)
    distractor[:, 300:372] = True
    masks = token_masks(model, [target], [distractor])
    assert masks.target.max().item() == 0
    assert masks.distractor.max().item() == pytest.approx(1.0)
    _, keep = query_tokens(masks)
    assert keep.tolist() == [False]


def test_measure_table_skips_and_counts_vanishing_targets(model, scenes):
    class Tiny:
        id, image = "tiny", scenes[0].image
        target = np.zeros((224, 224), bool)
        target[100:104, 100:104] = True  # 16 px: under a tenth of a token
        distractor = scenes[0].distractor

    result = measure(model, [*scenes[:2], Tiny()], batch_size=2)
    assert set(result.skipped) == {"tiny"} and result.measured == [s.id for s in scenes[:2]]
    table = result.table
    assert len(table) == 2 * 12 * 6
    assert set(table.columns) >= {"model", "image", "layer", "head", "depth", *PAIRS, *GROUPS}
    assert table["layer"].min() == 0 and table["head"].max() == 5 and table["depth"].max() == 1.0
    total = table[list(GROUPS)].sum(axis=1)
    np.testing.assert_allclose(total, 1, atol=1e-5)


def test_measure_matches_a_direct_computation(model, scenes):
    """The batched table equals the six ratios computed by hand for one image, layer and head."""
    from qklib.core.extract import record
    from qklib.core.images import to_pixels

    sample = scenes[1]
    table = measure(model, [sample]).table
    masks = token_masks(model, [sample.target], [sample.distractor])
    queries, _ = query_tokens(masks)
    t_query, d_query = queries[0].tolist()
    attention = record(model, to_pixels(model, sample.image), tokens=False, attention=True).attention
    layer, head = 7, 2
    row = attention[layer, 0, head, 1 + t_query, 1:]
    row = row / row.sum()
    row_d = attention[layer, 0, head, 1 + d_query, 1:]
    row_d = row_d / row_d.sum()
    expected = [float(row @ masks.target[0]), float(row @ masks.distractor[0]), float(row @ masks.background[0]),
                float(row_d @ masks.target[0]), float(row_d @ masks.distractor[0]), float(row_d @ masks.background[0])]
    got = table[(table["layer"] == layer) & (table["head"] == head)][list(PAIRS)].to_numpy()[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_measure_runs_on_an_o3_folder_of_non_square_photos(model, tmp_path, write_o3):
    write_o3(tmp_path, names=("a", "b", "c"))
    result = measure(model, load_o3(tmp_path), batch_size=2)
    assert result.measured == ["a", "b", "c"] and not result.skipped
    assert len(result.table) == 3 * 12 * 6
    np.testing.assert_allclose(result.table[list(GROUPS)].sum(axis=1), 1, atol=1e-5)


def _brute_ratios(attention, prefix, masks, b, layer, head, query, drop_self):
    """One query token's three ratios by hand: cut to image tokens, optionally delete the query's own key."""
    row = attention[layer, b, head, prefix + query, prefix:].double().clone()
    keys = [k for k in range(row.shape[0]) if not (drop_self and k == query)]
    row = row[keys] / row[keys].sum()
    return torch.stack([row @ masks[b, region, keys].double() for region in range(3)])


def test_removing_the_self_token_matches_brute_force_and_touches_only_the_self_mass():
    attention, masks = _random_attention(layers=2, batch=2, heads=3, tokens=1 + 9, seed=4), _random_masks(2, 9, seed=5)
    kept, removed = token_ratios(attention, 1, masks)
    assert kept.shape == removed.shape == (2, 2, 3, 9, 3)
    for b in range(2):
        for layer in range(2):
            for head in range(3):
                for query in range(9):
                    for drop, got in ((False, kept), (True, removed)):
                        expected = _brute_ratios(attention, 1, masks, b, layer, head, query, drop)
                        torch.testing.assert_close(got[layer, b, head, query], expected, atol=1e-10, rtol=0)
    # kept equals the paper's ratios() at the peak tokens
    queries = torch.tensor([[0, 4], [8, 2]])
    picked = kept[:, torch.arange(2)[:, None], :, queries].permute(2, 0, 3, 1, 4)  # [L, B, H, 2, 3]
    torch.testing.assert_close(picked, ratios(attention, 1, masks, queries).double(), atol=1e-6, rtol=0)


def test_self_token_changes_only_the_same_object_ratio_of_a_fully_covered_query():
    # 3x3 grid: tokens 0, 1 fully target, token 8 fully distractor, the rest background
    target = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0, 0]])
    distractor = torch.tensor([[0.0, 0, 0, 0, 0, 0, 0, 0, 1]])
    masks = TokenMasks(target, distractor, (3, 3))
    attention = _random_attention(layers=3, batch=1, heads=2, tokens=1 + 9, seed=7)
    weights, keep = query_weights(masks, "peak")
    assert keep.tolist() == [True]
    kept, removed = weighted_ratios(attention, 1, masks.stacked(), weights)  # [L, 1, H, 2, 3]
    image = attention[..., 1:, 1:].double()
    image = image / image.sum(-1, keepdim=True)
    for row, query, same in ((0, 0, 0), (1, 8, 1)):
        own = image[:, 0, :, query, query]  # p_ii of the renormalised map
        before = removed[:, 0, :, row] * (1 - own)[..., None]  # undo the renormalisation
        other = [k for k in range(3) if k != same]
        torch.testing.assert_close(before[..., other], kept[:, 0, :, row][..., other], atol=1e-12, rtol=0)
        torch.testing.assert_close(before[..., same], kept[:, 0, :, row, same] - own, atol=1e-12, rtol=0)
        assert (removed[:, 0, :, row, same] < kept[:, 0, :, row, same]).all()


def test_all_covered_tokens_is_the_brute_force_average():
    target = torch.tensor([[1.0, 1, 0.6, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0.9995, 0.3, 0, 0]])
    distractor = torch.tensor([[0.0, 0, 0, 0, 0, 0, 1, 1, 1], [0.7, 0, 0, 0, 0, 0, 0, 1, 0]])
    masks = TokenMasks(target, distractor, (3, 3))
    weights, keep = query_weights(masks, "all", all_cover=0.999)
    assert keep.tolist() == [True, True]
    covered = [[[0, 1], [6, 7, 8]], [[4, 5], [7]]]  # cover >= 0.999, per image and object
    default, _ = query_weights(masks, "all")  # all_cover defaults to min_cover = 0.5
    assert [[w.nonzero().flatten().tolist() for w in image] for image in default] == [[[0, 1, 2], [6, 7, 8]], [[4, 5], [0, 7]]]
    attention = _random_attention(layers=2, batch=2, heads=3, tokens=2 + 9, seed=9)
    for drop, got in zip((False, True), weighted_ratios(attention, 2, masks.stacked(), weights)):
        for b in range(2):
            for layer in range(2):
                for head in range(3):
                    for row in range(2):
                        expected = torch.stack([_brute_ratios(attention, 2, masks.stacked(), b, layer, head, q, drop)
                                                for q in covered[b][row]]).mean(0)
                        torch.testing.assert_close(got[layer, b, head, row], expected, atol=1e-10, rtol=0)
    partial = TokenMasks(torch.tensor([[0.8, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1.0]]), (2, 2))
    assert query_weights(partial, "peak")[1].tolist() == [True]
    assert query_weights(partial, "all", all_cover=0.999)[1].tolist() == [False]  # no fully covered target token
    assert query_weights(partial, "all")[1].tolist() == [True]
    with pytest.raises(ValueError, match="queries must be one of"):
        query_weights(partial, "centre")


def test_measure_variants_share_one_pass_and_the_default_is_the_paper(model, scenes):
    default = measure(model, scenes[:3], batch_size=2).table
    assert set(default["queries"]) == {"peak"} and set(default["self_token"]) == {"kept"}
    both = measure(model, scenes[:3], batch_size=2, queries=("peak", "all"), self_token=("kept", "removed"))
    table = both.table
    assert len(table) == 4 * len(default)
    paper = select(table, "peak", "kept")
    np.testing.assert_allclose(paper[list(PAIRS)].to_numpy(), default[list(PAIRS)].to_numpy(), atol=1e-6)
    for variant in (("peak", "removed"), ("all", "kept"), ("all", "removed")):
        np.testing.assert_allclose(select(table, *variant)[list(GROUPS)].sum(axis=1), 1, atol=1e-5)
    no_self = select(table, "peak", "removed")
    # the self term only ever adds to "same" (ties where the query barely attends to itself; 1e-9 vanishes in float32)
    assert (no_self["same"].to_numpy() <= paper["same"].to_numpy() + 1e-6).all()
    stats = per_layer(table)
    assert len(stats) == 2 * 2 * 12 * 3 and set(stats["self_token"]) == {"kept", "removed"}
    with pytest.raises(ValueError, match="no rows"):
        select(default, "all", "kept")
