"""§4 chapter: the statistics behind its figures, and the notebook run with other parameters."""

from pathlib import Path

import numpy as np
import pytest
import torch

from qklib.present import cosine as charts
from qklib.anisotropy import anisotropy_baseline, centre_token_index, mean_pairwise_cosine

ROOT = Path(__file__).resolve().parents[1]


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


def test_anisotropy_baseline_uses_the_centre_image_token(embedded_model):
    assert centre_token_index(embedded_model) == 1 + 8 * 16 + 8
    pixels = torch.randn(3, 3, 224, 224)
    baseline = anisotropy_baseline(embedded_model, pixels, batch_size=2)
    assert baseline.shape == (12,)
    assert torch.all(baseline.abs() <= 1)


def test_tables_hold_the_svd_numbers(embedded_svd):
    svds = {"m": embedded_svd}
    layers = charts.layer_table(svds)
    assert np.allclose(layers["weighted_cosine"], embedded_svd.layer_weighted_cosine().numpy())
    assert layers["depth"].iloc[-1] == 1.0 and layers["depth"].iloc[0] == 0.0
    modes = charts.mode_table(svds)
    assert len(modes) == 12 * 6 * 64
    assert np.allclose(modes.groupby(["layer", "head"])["weight"].sum(), 1.0)
    row = modes[(modes["layer"] == 3) & (modes["head"] == 2) & (modes["mode"] == 5)].iloc[0]
    assert row["cos"] == pytest.approx(embedded_svd.cos[3, 2, 5].item())
    hist = charts.cosine_histograms(modes)
    assert np.allclose(hist.groupby(["model", "layer"])["fraction"].sum(), 1.0)


@pytest.mark.slow
def test_chapter_runs_with_other_models_and_images(tmp_path, run_chapter):
    images = tmp_path / "images"
    images.mkdir()
    from qklib.core.images import shipped_photos

    for name, photo in list(shipped_photos().items())[:3]:
        photo.save(images / f"{name}.png")
    nb, error = run_chapter("s4_cosine", models=["random:vit_tiny_patch16_224", "random:deit_tiny_distilled_patch16_224"],
                             images=str(images), seed=3)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell displayed an error"
    text = "\n".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "deit_tiny_distilled_patch16_224 (random init, seed 3)" in text and "Baseline images (3)" in text
    charts_out = [o for o in outputs if "vegaEmbed" in o.get("data", {}).get("text/html", "")]
    assert len(charts_out) == 5


@pytest.mark.slow
@pytest.mark.parametrize("parameters, message", [
    ({"models": ["vit_bse_patch16_224"]}, "unknown model 'vit_bse_patch16_224'"),
    ({"images": "/no/such/folder"}, "folder '/no/such/folder' does not exist"),
    ({"max_images": -1}, "'max_images' must be an integer >= 2"),
    ({"models": [{"name": "vit_tiny_patch16_224", "weights": "/no/such.safetensors"}]}, "does not exist"),
])
def test_wrong_parameters_stop_in_the_first_cells(run_chapter, parameters, message):
    nb, error = run_chapter("s4_cosine", **parameters)
    assert error is not None and message in str(error)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    failing = next(i for i, c in enumerate(code_cells) if any(o.output_type == "error" for o in c.outputs))
    assert failing <= 2  # parameters, injected parameters, then the checking cell
