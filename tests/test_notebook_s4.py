"""The §4 chapter run end to end on other models and images, and with an I-JEPA checkpoint (slow: papermill)."""

import pytest

from official_layouts import write_ijepa
from qklib.book import ledger

S4_CLAIMS = [claim for claim in ledger.CLAIMS if claim.chapter == "s4_cosine"]


@pytest.mark.slow
def test_s4_runs_with_other_models_and_images(tmp_path, run_chapter):
    images = tmp_path / "images"
    images.mkdir()
    from qklib.core.images import shipped_photos

    for name, photo in list(shipped_photos().items())[:3]:
        photo.save(images / f"{name}.png")
    nb, error = run_chapter("s4_cosine", models=["random:vit_tiny_patch16_224", "random:deit_tiny_distilled_patch16_224"],
                            image_dir=str(images), seed=3)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell displayed an error"
    text = "\n".join(str(o.get("data", {})) for o in outputs)
    assert "deit_tiny_distilled_patch16_224 (random init, seed 3)" in text
    assert "astronaut.png, chelsea.png, coffee.png" in text  # the baseline used the folder's images (sorted)
    # Fig 3, the two bases, the head map, S1, S2, S4, the query bias and the grouping index (S3 needs a checkpoint)
    assert sum("vegaEmbed" in o.get("data", {}).get("text/html", "") for o in outputs) == 8
    assert "its query biases are zero, so the query-bias term is absent" in text  # random init: zero biases


@pytest.mark.slow
def test_s4_draws_fig_s3_from_an_ijepa_checkpoint(tmp_path, run_chapter):
    checkpoint = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    write_ijepa(checkpoint)
    nb, error = run_chapter("s4_cosine", models=["random:vit_tiny_patch16_224"], ijepa_checkpoint=str(checkpoint))
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "\n".join(str(o.get("data", {})) for o in outputs)
    assert "I-JEPA predictor" in text and "Not run" not in text
    # the checkpoint's encoder and predictor are recognised: the ledger judges their claims from this run
    record = ledger.record_from_notebook(tmp_path / "s4_cosine.out.ipynb", "s4_cosine")
    rows = {row.claim.key: row for row in ledger.assemble({"s4_cosine": record}, S4_CLAIMS)}
    assert [e.paper_model for e in rows["s4-ijepa-predictor"].evidence] == ["I-JEPA ViT-H/14 predictor"]
    assert [e.paper_model for e in rows["s4-ijepa-encoder"].evidence] == ["I-JEPA ViT-H/14 encoder"]
    nb, error = run_chapter("s4_cosine", models=["random:vit_tiny_patch16_224"])
    assert error is None, error
    assert "Not run:* Fig S3 needs" in "\n".join(str(o.get("data", {})) for c in nb.cells if c.cell_type == "code"
                                                  for o in c.outputs)
    record = ledger.record_from_notebook(tmp_path / "s4_cosine.out.ipynb", "s4_cosine")
    rows = {row.claim.key: row for row in ledger.assemble({"s4_cosine": record}, S4_CLAIMS)}
    # a random-init control is no evidence for any claim
    assert rows["s4-ijepa-predictor"].verdict == rows["s4-early-high-falls"].verdict == ledger.NOT_TESTED
