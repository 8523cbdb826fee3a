"""qklib.preference: token masks in the model's view, the six ratios, and the measure against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qklib.o3 import generate_scenes, load_o3
from qklib.preference import GROUPS, PAIRS, TokenMasks, chance, measure, query_tokens, ratios, token_masks


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
