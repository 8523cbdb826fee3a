"""Same-unit versus other-unit attention (qklib.analyses.units) on attention maps built by hand."""

import numpy as np
import pytest
import torch

from qklib.analyses import units

LABELS = [units.NOT_A_UNIT, 0, 0, 0, 1, 1, 2, 2, 2, 2]  # a special token, then three units of 3, 2 and 4 tokens


def _maps(rows: torch.Tensor, layers: int = 1, heads: int = 1) -> torch.Tensor:
    rows = rows / rows.sum(dim=-1, keepdim=True)
    return rows.expand(layers, heads, *rows.shape).clone()


def test_uniform_attention_is_at_chance():
    sums = units.unit_sums(_maps(torch.ones(10, 10)), LABELS)
    table = units.layer_table(sums[None], resamples=50)
    assert table.loc[0, "same"] == pytest.approx(1.0)
    assert table.loc[0, "other"] == pytest.approx(1.0)
    assert table.loc[0, "dominance"] == pytest.approx(1.0)


def test_attention_within_the_unit_scores_the_inverse_share():
    labels = torch.tensor(LABELS)
    rows = ((labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)).double() + 1e-12
    rows[0] = 1.0  # the special token's own row is not a query
    sums = units.unit_sums(_maps(rows), LABELS)
    # every query puts all its mass on its unit's other tokens; the chance share of those keys is (n-1)/8
    # with 8 keys (9 unit tokens, the query removed), so the pooled ratio is 9 queries over sum((n-1)/8)
    chance = sum((n - 1) / 8 * n for n in (3, 2, 4))
    assert sums[0, 0, 0] == pytest.approx(9.0)
    assert sums[0, 0, 1] == pytest.approx(chance)
    assert units.layer_table(sums[None], resamples=50).loc[0, "same"] == pytest.approx(9 / chance)
    assert sums[0, 0, 2] == pytest.approx(0.0, abs=1e-9)


def test_the_query_token_and_special_tokens_are_dropped_before_renormalising():
    rows = torch.ones(10, 10) + 50 * torch.eye(10)  # heavy self-attention on top of uniform
    rows[:, 0] = 100.0  # and most of the mass on the special token
    sums = units.unit_sums(_maps(rows), LABELS)
    assert sums[0, 0, 0] / sums[0, 0, 1] == pytest.approx(1.0)
    assert sums[0, 0, 2] / sums[0, 0, 3] == pytest.approx(1.0)


def test_a_unit_of_one_token_and_an_input_of_one_unit_have_no_eligible_query():
    sums = units.unit_sums(_maps(torch.ones(4, 4)), [0, 1, 2, 3])
    assert not sums.any()
    sums = units.unit_sums(_maps(torch.ones(3, 3)), [5, 5, 5])
    assert not sums.any()
    with pytest.raises(ValueError, match="no input has an eligible query"):
        units.layer_table(sums[None])


def test_early_minus_late_follows_the_curve_and_its_interval_covers_the_inputs():
    labels = torch.tensor(LABELS)
    within = ((labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)).double()
    rng = np.random.default_rng(0)
    inputs = []
    for _ in range(12):
        strength = [3.0 + rng.normal(0, 0.2), 2.0, 1.0, 0.0]  # the preference for the own unit fades with depth
        rows = torch.stack([torch.ones(10, 10) + s * within for s in strength])[:, None]
        inputs.append(units.unit_sums(rows / rows.sum(dim=-1, keepdim=True), LABELS))
    sums = np.stack(inputs)
    table = units.layer_table(sums, resamples=200)
    assert list(table["dominance"]) == sorted(table["dominance"], reverse=True)
    assert table.loc[3, "dominance"] == pytest.approx(1.0)
    fall = units.early_minus_late(sums, resamples=200)
    assert fall.low > 0 and fall.low <= fall.estimate <= fall.high
    with pytest.raises(ValueError, match="column"):
        units.early_minus_late(sums, column="mean")


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one label per token"):
        units.unit_sums(_maps(torch.ones(4, 4)), [0, 0, 1])
    with pytest.raises(ValueError, match=r"\[layers, heads, T, T\]"):
        units.unit_sums(torch.ones(4, 4), [0, 0, 1, 1])


def test_shifted_units_roll_inside_the_labelled_span_only():
    labels = [-1, 0, 0, 1, 1, 1, 2, -1]
    rolled = units.shifted_units(labels, 2)
    assert list(rolled) == [-1, 1, 2, 0, 0, 1, 1, -1]
    assert list(units.shifted_units(labels, 6)) == labels[:1] + labels[1:7] + labels[7:]


def _band_and_block(labels: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(len(labels))
    band = ((t[:, None] - t[None, :]).abs() <= width).double() * 5 + 1
    block = (labels[:, None] == labels[None, :]).double() * 5 + 1
    return band[None, None], block[None, None]


def test_the_shifted_null_tells_locality_from_grouping():
    labels = torch.arange(60) // 4  # fifteen units of four neighbouring tokens
    band, block = _band_and_block(labels, 2)
    sums = {name: np.stack([units.unit_sums(maps / maps.sum(-1, keepdim=True), labels)]) for name, maps in
            (("band", band), ("block", block))}
    nulls = {name: np.stack([units.null_sums(maps / maps.sum(-1, keepdim=True), labels, shifts=16)]) for name, maps
             in (("band", band), ("block", block))}
    band_table = units.layer_table(sums["band"], nulls["band"], resamples=20)
    block_table = units.layer_table(sums["block"], nulls["block"], resamples=20)
    # attention to the +-2 neighbours prefers the own unit of four about as much as any run of four neighbours
    assert band_table.loc[0, "dominance"] > 2 and 0.8 < band_table.loc[0, "excess"] < 1.25
    # attention that follows the unit boundaries beats the shifted units by far
    assert block_table.loc[0, "excess"] > 1.5
    with pytest.raises(ValueError, match="must match"):
        units.layer_table(sums["band"], np.concatenate([nulls["band"]] * 2))
