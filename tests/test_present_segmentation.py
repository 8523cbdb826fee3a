"""qklib.present.segmentation_figures: the pictures and the findings' verdicts from rows whose answer is known."""

from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from qklib.present import segmentation_figures as figures
from qklib.analyses.recognition import ProbeResult
from qklib.analyses.segmentation import Segmenter

DEFAULTS = {"modes": 1, "kmeans": 11, "tokencut": 11, "cls_attention": 11, "grid": None}


def test_segments_are_tinted_and_their_boundaries_white():
    photo = np.zeros((4, 6, 3), np.uint8)
    labels = np.array([[0, 0, 0, 1, 1, 1]] * 4)
    picture = figures.draw_segments(photo, labels, opacity=0.5)
    assert picture.shape == (4, 6, 3) and picture.dtype == np.uint8
    assert (picture[:, 2] == 255).all()  # the last column of segment 0 borders segment 1
    assert picture[0, 0].tolist() == (figures.PALETTE[0] / 2).round().astype(int).tolist()
    assert picture[0, 5].tolist() == (figures.PALETTE[1] / 2).round().astype(int).tolist()


def _rows(modes, kmeans, others):
    """Rows for 20 images: the modes and k-means at L1, the other methods at their defaults."""
    rows = []
    for image in range(20):
        jitter = 0.01 * (image % 5)
        values = {("modes", 1): modes + jitter, ("kmeans", 1): kmeans + jitter, ("kmeans", 11): others + jitter,
                  ("tokencut", 11): others + jitter, ("cls_attention", 11): others - 0.05 + jitter,
                  ("grid", None): 0.1 + jitter}
        rows += [{"image": image, "method": m, "layer": l, "miou": v, "foreground_iou": v} for (m, l), v in values.items()]
    return rows


def test_findings_read_the_paired_intervals():
    found = figures.findings({"trained": _rows(0.5, 0.3, 0.6), "control": _rows(0.2, 0.2, 0.2)}, DEFAULTS, [1],
                             resamples=200)
    trained, control = found["record"]["models"]["trained"], found["record"]["models"]["control"]
    assert trained["against_kmeans_verdict"] == "better" and trained["against_kmeans"]["estimate"] == pytest.approx(0.2)
    assert trained["against_best_verdict"] == "worse" and trained["best_baseline"] == "kmeans"
    assert trained["against_grid_verdict"] == "better"
    assert control["against_kmeans_verdict"] == "not distinguishable"
    assert "trained: the modes at L1 reach mean IoU (Hungarian) 0.520" in found["text"]
    assert found["record"]["question"] == figures.QUESTION


def test_difference_table_pairs_each_layer_and_each_default():
    table = figures.difference_table({"trained": _rows(0.5, 0.3, 0.6)}, DEFAULTS, [1], resamples=200)
    miou = table[table["metric"] == "miou"]
    assert set(miou["method"]) == {"modes"}
    assert miou["against"].tolist() == ["kmeans", "kmeans", "tokencut", "cls_attention", "grid"]
    assert miou["against_layer"].tolist()[:4] == [1, 11, 11, 11] and np.isnan(miou["against_layer"].iloc[4])
    assert miou["difference"].tolist() == pytest.approx([0.2, -0.1, -0.1, -0.05, 0.4])


def test_probe_table_reads_accuracy_chance_and_classes():
    results = {("m", "class token", None): ProbeResult(np.array(list("aaab")), np.array(list("aabb")), 2),
               ("m", "modes", 3): ProbeResult(np.array(list("aaab")), np.array(list("aaab")), 2)}
    table = figures.probe_table(results, resamples=100)
    assert table["accuracy"].tolist() == [0.75, 1.0] and table["chance"].tolist() == [0.75, 0.75]
    assert table["class a"].tolist() == pytest.approx([2 / 3, 1.0]) and table["class b"].tolist() == [1.0, 1.0]
    assert table["layer"].isna().tolist() == [True, False] and table["layer"].iloc[1] == 3


def test_the_live_explorer_redraws_and_refuses_a_file_that_is_not_an_image(tiny_vit):
    model, svd = tiny_vit
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8))
    live = figures.explore_segments({"tiny": Segmenter(model, svd)}, {"noise": photo}, size=64)
    assert "qk-live-explorer" in live._dom_classes and live.message.value == ""
    first = live.pictures["segments"].value
    live.controls["method"].value = "grid"
    assert live.pictures["segments"].value != first  # a grid of 4 cells, not the modes' segments
    data = b"not an image"
    live.controls["upload"].value = ({"name": "notes.txt", "type": "", "size": len(data), "content": memoryview(data),
                                      "last_modified": datetime.now(timezone.utc)},)
    assert "notes.txt" in live.message.value and live.controls["image"].value == "noise"
