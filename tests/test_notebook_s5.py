"""The §5 chapter run end to end with small parameters (slow: papermill)."""

import re

import numpy as np
import pytest
from PIL import Image

from qklib.book import ledger


@pytest.mark.slow
def test_chapter_runs_with_small_parameters(tmp_path, run_chapter):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8)).save(images / f"im{i}.png")
    (images / "broken.jpg").write_bytes(b"no")
    parameters = dict(results_dir=str(tmp_path / "results"), models=["random:vit_tiny_patch16_224"],
                      image_dir=str(images), walkthrough_image="im3", n_scenes=6, top_k=2, layers=[0, 11],
                      heads=[0, 2], explorer_modes=1, featured=["L0 H0 M0", "L11 H2 M1-"], seed=2)
    nb, error = run_chapter("s5_modes", **parameters)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "\n".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    page = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "Scored 5 of 6 images" in markdown and "skipped 1" in markdown and "broken.jpg" in markdown
    assert "L11 H2 M1-" in page and "What we found" not in markdown  # the heading is markdown, not output
    assert "Read by eye" not in markdown  # readings by eye were dropped: the modes are chosen by a rule
    assert str(tmp_path) not in markdown + page  # no machine path in the page
    glued = {o["metadata"]["scrapbook"]["name"] for o in outputs if "scrapbook" in o.get("metadata", {})}
    assert {"s5_early", "s5_trend", "s5_top_share", "s5_seconds", "s5_walk_name", "s5_abl_by_paper_sum", "s5_abl_by_random",
            "s5_featured_modes", "s5_bg_early", "s5_course_nobg_instance", "s5_course_bg_kind", "s5_kind_gap_nobg",
            "s5_background_gap", "s5_kinds"} <= glued
    prose = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    assert not set(re.findall(r"\{glue:text\}`(s5_\w+)", prose)) - glued  # every value the prose names was glued
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    sliders = [w["state"] for w in state.values() if w["model_name"] == "SelectionSliderModel"]
    assert len(sliders) == 5  # explorer: layer, head, mode; walkthrough: layer, head
    assert sorted(tuple(s["_options_labels"]) for s in sliders) == sorted(
        [("L0", "L11"), ("H0", "H2"), ("M0",), ("L0", "L11"), ("H0", "H2")])  # the values, not positions
    assert (tmp_path / "results" / "s5_search.npz").is_file()
    record = ledger.record_from_notebook(tmp_path / "s5_modes.out.ipynb", "s5_modes")  # the claims ledger's
    assert record["models"][0]["control"] and record["data"]["optimal_images"] == "5 images (image_dir)"
    # a second run reuses the saved search (its key matches); a different top_k does not
    key = (tmp_path / "results" / "s5_search.npz.key.json").read_text()
    nb, error = run_chapter("s5_modes", **{**parameters, "top_k": 3})
    assert error is None, error
    assert (tmp_path / "results" / "s5_search.npz.key.json").read_text() != key


@pytest.mark.slow
def test_walkthrough_image_names_an_image_of_image_dir(tmp_path, run_chapter):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "cat_05.png")
    nb, error = run_chapter("s5_modes", results_dir=str(tmp_path / "results"), models=["random:vit_tiny_patch16_224"],
                            image_dir=str(images), walkthrough_image="chelsea", n_scenes=6, featured=["L0 H0 M0"])
    assert error is not None and "'chelsea' is neither an image of the gallery" in str(error)
    assert "cat_05" in str(error)  # the message lists what the folder holds


@pytest.mark.slow
@pytest.mark.parametrize("parameters, message", [
    ({"models": ["vit_bse_patch16_224"]}, "unknown model 'vit_bse_patch16_224'"),
    ({"image_dir": "/no/such/folder"}, "folder '/no/such/folder' does not exist"),
    ({"top_k": 0}, "'top_k' must be an integer >= 1"),
    ({"featured": ["layer 3"]}, "parameter 'featured'"),
    ({"device": "cuda:7"}, "device"),
    ({"layers": [12]}, "out of range"),
    ({"featured": ["L3 H9 M0"]}, "is outside the model"),
])
def test_wrong_parameters_stop_before_any_computation(tmp_path, run_chapter, parameters, message):
    nb, error = run_chapter("s5_modes", results_dir=str(tmp_path / "results"), **parameters)
    assert error is not None and message in str(error)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    failing = next(i for i, c in enumerate(code_cells) if any(o.output_type == "error" for o in c.outputs))
    # parameters, injected parameters, the checking cell; checks against the model's size in the loading cell
    assert failing <= 2 or (failing == 3 and message in ("out of range", "is outside the model"))
