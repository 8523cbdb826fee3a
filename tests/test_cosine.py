"""qklib.analyses.cosine: the §4 tables, the anisotropy baseline and the verdict on a curve's shape."""

import numpy as np
import pandas as pd
import pytest
import torch

from qklib.core.extract import token_embeddings
from qklib.core.images import to_pixels
from qklib.analyses.cosine import (CROPS, anisotropy_baseline, baseline_verdicts, relative_table, between_group_cosine,
                                   pairwise_cosine_from_sum, token_anisotropy, views, basis_differences,
                                   centre_token_index, cosine_histograms, depth_profile, findings_table, layer_table,
                                   mean_pairwise_cosine, mode_table)


def test_mean_pairwise_cosine_matches_brute_force():
    torch.manual_seed(0)
    vectors = torch.randn(3, 5, 16)
    got = mean_pairwise_cosine(vectors)
    for layer in range(3):
        pairs = [torch.nn.functional.cosine_similarity(vectors[layer, i], vectors[layer, j], dim=0)
                 for i in range(5) for j in range(5) if i != j]
        assert got[layer].item() == pytest.approx(torch.stack(pairs).mean().item(), abs=1e-6)
    shared = torch.randn(16)
    assert mean_pairwise_cosine(shared.expand(4, 16)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two"):
        mean_pairwise_cosine(torch.randn(1, 16))


def test_anisotropy_baseline_is_the_centre_tokens_pairwise_cosine(tiny_vit, cat_photo):
    model, _ = tiny_vit
    assert centre_token_index(model) == 1 + 2 * 4 + 2  # CLS, then row 2, column 2 of the 4 x 4 grid
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 64, 64)
    baseline = anisotropy_baseline(model, pixels, batch_size=3)  # batches of 3 + 1 must not matter
    centre = token_embeddings(model, pixels)[:, :, centre_token_index(model)]  # [L, 4, d]
    for layer in range(3):
        pairs = [torch.nn.functional.cosine_similarity(centre[layer, i], centre[layer, j], dim=0)
                 for i in range(4) for j in range(4) if i != j]
        assert baseline[layer].item() == pytest.approx(torch.stack(pairs).mean().item(), abs=1e-5)
    same = to_pixels(model, [cat_photo, cat_photo])
    assert torch.allclose(anisotropy_baseline(model, same), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_tables_hold_the_svd_numbers(embedded_svd):
    svds = {"m": embedded_svd}
    layers = layer_table(svds)
    assert np.allclose(layers["weighted_cosine"], embedded_svd.layer_weighted_cosine().numpy())
    assert layers["depth"].tolist() == [layer / 11 for layer in range(12)]
    modes = mode_table(svds)
    assert len(modes) == 12 * 6 * 64
    row = modes[(modes["layer"] == 3) & (modes["head"] == 2) & (modes["mode"] == 5)].iloc[0]
    assert row["cos"] == pytest.approx(embedded_svd.cos[3, 2, 5].item())
    assert row["weight"] == pytest.approx((embedded_svd.S[3, 2, 5] / embedded_svd.S[3, 2].sum()).item())
    histograms = cosine_histograms(modes, bins=8)
    layer4 = histograms[histograms["layer"] == 4]["fraction"].to_numpy()
    counts, _ = np.histogram(embedded_svd.cos[4].flatten().numpy(), bins=np.linspace(-1, 1, 9))
    assert np.allclose(layer4, counts / counts.sum())


@pytest.mark.parametrize("values, shape", [
    ([0.6, 0.5, 0.2, 0.1, 0.1, 0.4], "concave"),
    ([0.6, 0.5, 0.2, 0.1, 0.1, 0.12], "falling"),
    ([0.05, -0.05, 0.02, 0.0], "flat"),
    ([0.1, 0.2, 0.3, 0.4], "other"),
])
def test_depth_profile(values, shape):
    assert depth_profile(np.array(values), effect=0.1) == shape


def test_findings_table_reads_first_lowest_and_last_layer():
    frame = pd.DataFrame({"model": "m", "layer": range(4), "weighted_cosine": [0.5, 0.05, 0.3, 0.4],
                          "relative_cosine": [0.4, -0.1, 0.2, 0.3]})
    bands = pd.DataFrame({"model": "m", "layer": [3, 2, 1, 0], "null_band": [0.5, 0.01, 0.01, 0.01]})
    row = findings_table(frame, bands, effect=0.1).iloc[0]
    assert (row["lowest layer"], row["lowest"], row["last layer"]) == (1, 0.05, 0.4)
    assert row["layers outside the null band"] == "3 of 4"  # layer 3's own band (0.5) holds its 0.4
    assert row["relative, lowest layer"] == -0.1
    assert row["shape"] == "concave"


def test_basis_differences_finds_the_lowest_layers_and_the_largest_gap():
    table = pd.DataFrame({"model": "m", "basis": ["raw"] * 3 + ["gamma-folded"] * 3, "layer": [0, 1, 2] * 2,
                          "weighted_cosine": [0.5, 0.1, 0.2, 0.6, 0.4, 0.15]})
    row = basis_differences(table).iloc[0]
    assert (row["lowest layer, raw"], row["lowest layer, gamma folded"]) == (1, 2)
    assert (row["largest difference in layer"], row["raw there"], row["gamma folded there"]) == (1, 0.1, 0.4)


def _brute_mean_cosine(vectors, groups=None):
    """Mean cosine over ordered pairs of distinct vectors (of different groups when ``groups`` is given)."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    values = [unit[i] @ unit[j] for i in range(len(unit)) for j in range(len(unit))
              if i != j and (groups is None or groups[i] != groups[j])]
    return torch.stack(values).mean()


def test_mean_cosine_from_running_sums_matches_brute_force():
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(11, 6, generator=generator) + 0.7  # a shared direction, like anisotropic tokens
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    assert pairwise_cosine_from_sum(unit.sum(0), 11).item() == pytest.approx(_brute_mean_cosine(vectors).item(), abs=1e-12)
    groups = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    sums = torch.stack([unit[[i for i, g in enumerate(groups) if g == k]].sum(0) for k in range(4)])
    counts = torch.tensor([3, 2, 4, 2])
    expected = _brute_mean_cosine(vectors, groups)
    assert between_group_cosine(sums, counts).item() == pytest.approx(expected.item(), abs=1e-12)
    # a bootstrap draw repeats groups: pairs across different source groups, copies of one group left out
    weights = torch.tensor([2, 0, 1, 1])
    copies = [k for k in range(4) for _ in range(int(weights[k]))]
    stacked = torch.cat([unit[[i for i, g in enumerate(groups) if g == k]] for k in copies])
    labels = [k for k in copies for g in groups if g == k]
    assert between_group_cosine(sums, counts, weights).item() == pytest.approx(
        _brute_mean_cosine(stacked, labels).item(), abs=1e-12)
    with pytest.raises(ValueError, match="at least two"):
        between_group_cosine(sums, counts, torch.tensor([3, 0, 0, 0]))
    with pytest.raises(ValueError, match="at least two"):
        pairwise_cosine_from_sum(unit[0], 1)


def test_token_anisotropy_matches_brute_force_over_every_token(tiny_vit, cat_photo):
    from qklib.core.images import shipped_photos

    model, _ = tiny_vit
    photos = [cat_photo, shipped_photos()["coffee"], shipped_photos()["rocket"]]
    crops = CROPS[:2]
    frame = token_anisotropy(model, photos, crops=crops, batch_size=4, draws=200)
    shown, source = views(photos, crops)
    assert len(shown) == 9 and source == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    tokens = token_embeddings(model, to_pixels(model, shown))[:, :, 1:]  # [L, 9, 16, d], CLS dropped
    labels = [s for s in source for _ in range(16)]
    for layer in range(3):
        flat = tokens[layer].reshape(-1, tokens.shape[-1])
        assert frame["between_images"][layer] == pytest.approx(_brute_mean_cosine(flat, labels).item(), abs=1e-6)
        assert frame["all_pairs"][layer] == pytest.approx(_brute_mean_cosine(flat).item(), abs=1e-6)
    assert (frame["low"] <= frame["between_images"] + 1e-12).all() and (frame["between_images"] <= frame["high"] + 1e-12).all()
    assert frame["tokens"][0] == 9 * 16 and frame["photos"][0] == 3
    centre = anisotropy_baseline(model, to_pixels(model, photos)).numpy()
    np.testing.assert_allclose(frame["centre_token"], centre, atol=1e-8)
    again = token_anisotropy(model, photos, crops=crops, batch_size=2, draws=200)
    pd.testing.assert_frame_equal(frame, again)  # batching and the seeded bootstrap change nothing
    with pytest.raises(ValueError, match="at least two photos"):
        token_anisotropy(model, photos[:1])


def test_baseline_verdicts_say_only_what_the_numbers_show():
    relative = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "layer": [0, 1, 2] * 2,
                             "weighted_cosine": [0.5, 0.1, 0.0, 0.2, 0.2, 0.2],
                             "baseline_low": [0.1, 0.05, 0.1] + [0.1] * 3, "baseline_high": [0.2, 0.15, 0.2] + [0.3] * 3})
    text = baseline_verdicts(relative)
    assert text == ("a: against the baseline's interval, the weighted cosine lies above in L0; inside in L1; below in L2. "
                    "b: against the baseline's interval, the weighted cosine lies inside in L0, L1, L2")


def test_relative_table_and_s4_chart(tiny_vit, cat_photo):
    from qklib.core.images import shipped_photos
    from qklib.present.cosine_figures import S4_QUANTITIES, s4_relative

    model, svd = tiny_vit
    layers = layer_table({"m": svd})
    photos = [cat_photo, shipped_photos()["coffee"]]
    relative = relative_table({"m": model}, layers, photos, batch_size=4, draws=100)
    base = token_anisotropy(model, photos, draws=100)
    np.testing.assert_allclose(relative["anisotropy_baseline"], base["between_images"])
    np.testing.assert_allclose(relative["relative_cosine"], relative["weighted_cosine"] - base["between_images"])
    np.testing.assert_allclose(relative["relative_low"], relative["weighted_cosine"] - base["high"])
    assert relative["baseline_tokens"].iloc[0] == 2 * 5 * 16
    spec = s4_relative(relative).to_dict()
    values = next(iter(spec["datasets"].values()))
    assert len(values) == 3 * len(S4_QUANTITIES)
    assert {v["quantity"] for v in values} == set(S4_QUANTITIES.values())
