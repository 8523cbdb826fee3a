"""The §6 chapter run end to end on a small random model (slow: papermill)."""

import pytest


@pytest.mark.slow
def test_s6_runs_on_another_model(run_chapter):
    nb, error = run_chapter("s6_values", models=["random:vit_tiny_patch16_224"], null_draws=3, seed=2)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell displayed an error"
    text = "\n".join(str(o.get("data", {})) for o in outputs)
    assert "vit_tiny_patch16_224 (random init, seed 2)" in text
    # effective rank, spectra, copying, the composition heatmap, the layer-pair shares and the mode alignment
    assert sum("vegaEmbed" in o.get("data", {}).get("text/html", "") for o in outputs) == 6
    assert text.count("data:text/csv;base64") == 2
