"""The §6 chapter run end to end on a small random model (slow: papermill)."""

import pytest


def glued(nb, name: str) -> str:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("metadata", {}).get("scrapbook", {}).get("name") == name:
                return next(iter(output["data"].values()))
    raise AssertionError(f"nothing glued as {name!r}")


@pytest.mark.slow
def test_s6_runs_on_another_model(run_chapter):
    nb, error = run_chapter("s6_values", models=["random:vit_tiny_patch16_224"], null_draws=3, seed=2, n_scenes=4,
                            permutations=100, resamples=200)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell displayed an error"
    text = "\n".join(str(o.get("data", {})) for o in outputs)
    assert "vit_tiny_patch16_224 (random init, seed 2)" in text
    # effective rank, spectra, copying, the composition heatmap, the layer-pair shares, the mode alignment, the
    # key features read by the value per layer and per mode, the object contrast per layer and grouping against
    # copying
    assert sum("vegaEmbed" in o.get("data", {}).get("text/html", "") for o in outputs) == 10
    assert text.count("data:text/csv;base64") == 5
    # the OV images: 3 rule layers x 2 modes x 4 photos, red/cyan, with the captions' numbers
    pictures = next(o["data"]["text/html"] for o in outputs if "<img" in o.get("data", {}).get("text/html", ""))
    assert pictures.count("<img") == 24 and "cos(OV v_n, v_n)" in pictures
    assert "4 generated scenes (" in glued(nb, "s6_masked")
    answers = glued(nb, "s6_answers")
    for question in ("Does a head's value read", "does what the heads write make the tokens",
                     "Are the grouping heads"):
        assert question in answers
    assert answers.count("(control, not evidence): ") == 3
    record = glued(nb, "s6_ledger")
    assert {"composition", "copying", "key_value", "grouping", "grouping_copying"} <= set(record["models"][0])
