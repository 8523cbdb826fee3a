"""qklib.segment: every method on images whose segmentation is known, the metrics on hand-worked examples, the
mode affinity against a dense computation without the SVD, and bad inputs."""

import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import qklib
from qklib.analyses import segmentation as seg
from qklib.core.svd import qk_weights
from qklib.core.datasets.o3 import generate_scenes
from qklib.analyses.segmentation import METHODS, SegmentError, Segmenter, foreground_iou, miou

SIZE = 224
# Two flat regions meeting on a token boundary (112 px = 8 tokens of 14 px).
HALVES = np.zeros((SIZE, SIZE, 3), np.uint8)
HALVES[:, :112], HALVES[:, 112:] = (200, 60, 40), (40, 90, 200)
HALVES_TRUTH = np.zeros((SIZE, SIZE), np.int64)
HALVES_TRUTH[:, 112:] = 1
# One yellow square on a green field: a foreground object for the class token.
SQUARE = np.full((SIZE, SIZE, 3), (90, 150, 90), np.uint8)
SQUARE[56:168, 56:168] = (230, 210, 30)
SQUARE_TRUTH = np.zeros((SIZE, SIZE), np.int64)
SQUARE_TRUTH[56:168, 56:168] = 1


@pytest.fixture(scope="module")
def segmenter(embedded_model, embedded_svd):
    return Segmenter(embedded_model, embedded_svd)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Six generated odd-one-out scenes with exact instance masks (0 background, 1.. objects)."""
    return generate_scenes(tmp_path_factory.mktemp("segment_scenes"), 6, seed=5)


# --- every method on known segmentations -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["modes", "kmeans", "tokencut", "grid"])
def test_two_flat_regions_are_found(embedded_model, method):
    # A broken method (random labels, one segment, a wrong upsampling) scores about 0.5 or below.
    labels = qklib.segment(embedded_model, HALVES, 2, method)
    assert labels.shape == (SIZE, SIZE) and labels.dtype == np.int64
    assert miou(labels, HALVES_TRUTH) > 0.95


def test_the_grid_splits_two_halves_exactly(embedded_model):
    assert miou(qklib.segment(embedded_model, HALVES, 2, "grid"), HALVES_TRUTH) == 1.0


@pytest.mark.parametrize("method", ["modes", "tokencut", "cls_attention"])
def test_an_object_on_a_field_is_the_foreground(segmenter, method):
    labels = segmenter(Image.fromarray(SQUARE), 2, method)
    if method == "cls_attention":  # its labels are ordered: 1 is what the class token attends to
        inter = ((labels == 1) & (SQUARE_TRUTH == 1)).sum()
        assert inter / ((labels == 1) | (SQUARE_TRUTH == 1)).sum() > 0.6
    else:
        assert foreground_iou(labels, SQUARE_TRUTH)[0] > 0.9


def test_generated_scenes_objects_beat_the_grid(segmenter, scenes):
    """Foreground (all objects) against background, two segments, on scenes with exact masks: every method
    finds the objects far better than the grid (0.12 measured) or one segment covering everything (~0.2)."""
    views = segmenter.observe([item.image for item in scenes], sorted({segmenter.default_layer(m) for m in METHODS}))
    scores = {method: [] for method in METHODS}
    for item, layers in zip(scenes, views):
        truth = (item.objects > 0).astype(np.int64)
        for method in METHODS:
            view = layers.get(segmenter.default_layer(method))
            labels = seg.upsample_labels(segmenter.token_labels(view, 2, method), *truth.shape)
            scores[method].append(foreground_iou(labels, truth)[0])
        whole = foreground_iou(np.zeros_like(truth), truth)[0]
        assert whole < 0.3
    means = {method: float(np.mean(values)) for method, values in scores.items()}
    assert means["grid"] < 0.2, means
    for method in ("modes", "kmeans", "tokencut", "cls_attention"):
        assert means[method] > 0.3 and means[method] > 2 * means["grid"], means


@pytest.mark.parametrize("method", list(METHODS))
def test_labels_have_the_image_size_on_odd_sizes(segmenter, method):
    rng = np.random.default_rng(0)
    image = (rng.random((131, 257, 3)) * 255).astype(np.uint8)
    for n_segments in (1, 5):
        labels = segmenter(image, n_segments, method)
        assert labels.shape == (131, 257)
        assert labels.min() >= 0 and len(np.unique(labels)) <= n_segments
    grey = Image.fromarray(image[..., 0]).convert("L")
    assert segmenter(grey, 3, method).shape == (131, 257)


def test_every_method_segments_a_224_image_within_a_second_of_cpu(embedded_model):
    """The budget is one second on the CPU. Measured as this process's CPU time on one torch thread, so that the
    other jobs of a shared machine (which stretch wall time several-fold) do not decide the outcome."""
    photo = Image.fromarray(SQUARE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            best = min(_cpu_seconds(lambda: qklib.segment(embedded_model, photo, 6, method)) for _ in range(2))
            assert best < 1.0, (method, best)
    finally:
        torch.set_num_threads(threads)


def _cpu_seconds(call) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


# --- the pieces against independent computations ----------------------------------------------------------

def test_mode_affinity_equals_the_dense_attention_of_the_kept_modes(tiny_vit):
    model, svd = tiny_vit
    layer = 1
    x = torch.randn(16, svd.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = qk_weights(model)
    scale = svd.rank**-0.5
    for cos_min in (None, 0.0):
        expected = []
        for head in range(svd.num_heads):
            dense = weights.wq[layer, head].T @ weights.wk[layer, head]  # [d, d], no SVD
            u, s, vt = torch.linalg.svd(dense)
            u, s, v = u[:, : svd.rank], s[: svd.rank], vt[: svd.rank].T
            keep = torch.ones(svd.rank, dtype=torch.bool) if cos_min is None else (u * v).sum(0) > cos_min
            restricted = (u[:, keep] * s[keep]) @ v[:, keep].T
            p = torch.softmax(scale * x @ restricted @ x.T, dim=-1)
            expected.append((p + p.T) / 2)
        got = seg.mode_affinity(svd, x, layer, cos_min)
        assert np.allclose(got, torch.stack(expected).mean(0).numpy(), atol=1e-10)


def test_modes_selection_by_mask_and_its_errors(tiny_vit):
    model, svd = tiny_vit
    x = torch.randn(16, svd.dim, dtype=torch.float64)
    every = np.ones((svd.num_heads, svd.rank), bool)
    assert np.allclose(seg.mode_affinity(svd, x, 0, modes=every), seg.mode_affinity(svd, x, 0, cos_min=None))
    with pytest.raises(SegmentError, match=r"shape \[heads, modes\]"):
        seg.mode_affinity(svd, x, 0, modes=every[:, :3])
    with pytest.raises(SegmentError, match="lower cos_min"):
        seg.mode_affinity(svd, x, 0, cos_min=1.0)


def test_kmeans_recovers_separated_blobs_and_stops_at_distinct_points():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    truth = np.repeat(np.arange(3), 20)
    points = centres[truth] + rng.normal(0, 0.3, (60, 2))
    labels = seg.kmeans(points, 3, seed=0)
    assert len(np.unique(labels)) == 3
    for cluster in range(3):  # each found cluster is exactly one blob
        assert len(np.unique(truth[labels == cluster])) == 1
    repeated = np.repeat(np.eye(2), 5, axis=0)  # 2 distinct points, 4 clusters asked
    assert len(np.unique(seg.kmeans(repeated, 4))) == 2


def test_spectral_labels_cut_weakly_joined_blocks():
    blocks = np.kron(np.eye(3), np.ones((5, 5))) + 0.01
    labels = seg.spectral_labels(blocks, 3)
    assert all(len(np.unique(labels[5 * b: 5 * b + 5])) == 1 for b in range(3)) and len(np.unique(labels)) == 3
    two = np.kron(np.eye(2), np.ones((4, 4))) + 0.01
    two[:4, :4] += 1  # the first block is the stronger one
    cut = seg.spectral_labels(two, 2)
    assert set(cut[:4]) != set(cut[4:]) and len(set(cut[:4])) == 1 and len(set(cut[4:])) == 1
    assert (seg.spectral_labels(two, 1) == 0).all()


def test_attention_levels_by_hand():
    weights = np.array([0.1, 0.5, 0.3, 0.1])
    # DINO's rule: the fewest tokens holding 60 % of the mass, 0.5 + 0.3 >= 0.6.
    assert seg.attention_levels(weights, 2).tolist() == [0, 1, 1, 0]
    assert seg.attention_levels(np.array([0.2, 0.4, 0.3, 0.1]), 4).tolist() == [1, 3, 2, 0]
    assert seg.attention_levels(weights, 1).tolist() == [0, 0, 0, 0]


def test_grid_has_exactly_n_rectangular_cells():
    for rows, cols in ((16, 16), (14, 20)):
        for n in (1, 2, 3, 5, 7, 16, 17, 50, rows * cols):
            labels = seg.grid_labels(rows, cols, n)
            assert sorted(np.unique(labels)) == list(range(n))
            for cell in range(n):
                ys, xs = np.nonzero(labels == cell)
                assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == len(ys)  # a full rectangle


def test_upsampling_by_hand():
    tokens = np.array([[0, 1], [2, 3]])
    expected = [[0, 0, 1, 1, 1], [2, 2, 3, 3, 3], [2, 2, 3, 3, 3]]  # pixel centres 0.5, 1.5, ... scaled to cells
    assert seg.upsample_labels(tokens, 3, 5).tolist() == expected


# --- metrics by hand ----------------------------------------------------------------------------------------

LABELS = np.array([[0] * 9 + [1]] * 2)
TRUTH = np.array([[5] * 5 + [7] * 5] * 2)


def test_miou_matches_segments_one_to_one():
    # Segment 0 (px 0-8) is the best match of both regions: IoU 5/9 with region 5, 4/10 with region 7; segment 1
    # (px 9) has 1/5 with region 7. Greedy per region would give (5/9 + 4/10) / 2 = 0.478; the one-to-one
    # matching pairs 5 with 0 and 7 with 1: (5/9 + 1/5) / 2 = 17/45.
    assert miou(LABELS, TRUTH) == pytest.approx(17 / 45)
    with_void = np.vstack([TRUTH, -np.ones((1, 10), int)])  # a void row changes nothing
    assert miou(np.vstack([LABELS, np.zeros((1, 10), int)]), with_void) == pytest.approx(17 / 45)
    ignored = np.zeros((2, 10), bool)
    ignored[:, 9] = True  # without pixel 9, segment 0 is px 0-8: 5/9 and 4/9, segment 1 is gone
    assert miou(LABELS, TRUTH, ignore=ignored) == pytest.approx((5 / 9 + 0) / 2)
    # One segment, two regions: only one region is matched (IoU 1/2), the other counts 0.
    assert miou(np.zeros((2, 10), int), TRUTH) == pytest.approx(0.25)
    masks = np.stack([TRUTH == 5, TRUTH == 7])
    assert miou(LABELS, masks) == pytest.approx(17 / 45)


def test_foreground_iou_takes_each_objects_best_segment():
    objects = np.array([[0] * 5 + [1] * 5] * 2)  # the background (0) is not an object
    assert foreground_iou(LABELS, objects).tolist() == pytest.approx([4 / 10])
    two = np.array([[1] * 5 + [2] * 5] * 2)
    assert foreground_iou(LABELS, two).tolist() == pytest.approx([5 / 9, 4 / 10])


def test_metrics_refuse_mismatched_or_wrong_inputs():
    with pytest.raises(SegmentError, match="at one size"):
        miou(LABELS, TRUTH[:, :5])
    with pytest.raises(SegmentError, match="integer label map"):
        miou(LABELS, TRUTH.astype(float))
    with pytest.raises(SegmentError, match="labels must be an integer"):
        miou(LABELS.astype(float), TRUTH)


# --- bad inputs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_segments", [0, -1, 2.5, True, 257, "4"])
def test_bad_segment_counts_are_refused(segmenter, n_segments):
    with pytest.raises(SegmentError, match="n_segments must be an integer from 1 to 256"):
        segmenter(HALVES, n_segments, "grid")


def test_unknown_methods_options_and_non_images_are_refused(embedded_model):
    with pytest.raises(SegmentError, match="did you mean 'kmeans'"):
        qklib.segment(embedded_model, HALVES, 2, "kmean")
    with pytest.raises(SegmentError, match="takes no option.*tau.*its options are seed, restarts"):
        qklib.segment(embedded_model, HALVES, 2, "kmeans", tau=0.3)
    with pytest.raises(TypeError, match="PIL image or an \\[H, W, 3\\] uint8"):
        qklib.segment(embedded_model, "cat.png", 2)
    with pytest.raises(SegmentError, match="uint8"):
        qklib.segment(embedded_model, HALVES / 255.0, 2)
    with pytest.raises(SegmentError, match=r"\[H, W, 3\]"):
        qklib.segment(embedded_model, np.zeros((8, 8, 4), np.uint8), 2)
    with pytest.raises(SegmentError, match="empty"):
        qklib.segment(embedded_model, np.zeros((0, 8, 3), np.uint8), 2)
    with pytest.raises(ValueError, match=r"out of range: the model has layers 0..11"):
        qklib.segment(embedded_model, HALVES, 2, "modes", layer=12)


def test_class_token_attention_needs_a_class_token():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, class_token=False,
                              global_pool="avg").eval()
    with pytest.raises(SegmentError, match="no class token"):
        qklib.segment(model, HALVES, 2, "cls_attention")
    assert qklib.segment(model, HALVES, 2, "modes").shape == (SIZE, SIZE)


def test_a_foreign_svd_is_refused(embedded_model, tiny_vit):
    with pytest.raises(SegmentError, match="raw basis"):
        Segmenter(embedded_model, tiny_vit[1])


def test_evaluate_scores_every_method_and_layer_like_the_direct_calls(segmenter, scenes):
    every = seg.Variant("every mode", "modes", {"cos_min": None})
    rows = seg.evaluate(segmenter, scenes[:3], methods=("modes", "grid", "cls_attention", every), layers=[1, 11],
                        batch_size=2)
    assert len(rows) == 3 * (2 + 1 + 2 + 2)
    assert {(r["method"], r["layer"]) for r in rows} == {("modes", 1), ("modes", 11), ("grid", None),
                                                          ("cls_attention", 1), ("cls_attention", 11),
                                                          ("every mode", 1), ("every mode", 11)}
    variant = next(r for r in rows if r["image"] == scenes[2].id and r["method"] == "every mode" and r["layer"] == 1)
    truth = scenes[2].objects.astype(np.int64)
    direct = segmenter(scenes[2].image, len(np.unique(truth)), "modes", 1, cos_min=None)
    assert variant["miou"] == pytest.approx(miou(direct, truth))
    with pytest.raises(SegmentError, match="takes no option"):
        seg.evaluate(segmenter, scenes[:1], methods=(seg.Variant("x", "grid", {"tau": 1}),))
    item = scenes[1]
    truth = item.objects.astype(np.int64)
    direct = segmenter(item.image, len(np.unique(truth)), "modes", 11)
    row = next(r for r in rows if r["image"] == item.id and r["method"] == "modes" and r["layer"] == 11)
    assert row["n_segments"] == len(np.unique(truth))
    assert row["miou"] == pytest.approx(miou(direct, truth))
    assert row["foreground_iou"] == pytest.approx(foreground_iou(direct, truth).mean())
    assert all(r["seconds"] >= 0 for r in rows)


def test_object_map_of_o3_photos_and_of_items_without_masks():
    class Photo:
        id = "photo"
        objects = None
        target = np.array([[True, False, False]])
        distractor = np.array([[False, True, False]])

    assert seg.object_map(Photo()).tolist() == [[1, 2, 0]]
    Photo.target = None
    with pytest.raises(SegmentError, match="neither an object label map"):
        seg.object_map(Photo())


def test_summaries_and_paired_differences_by_hand():
    rows = [{"image": image, "method": method, "layer": layer, "miou": value}
            for image, (a, b) in enumerate([(0.5, 0.25), (0.75, 0.5), (1.0, 0.5)])
            for method, layer, value in (("modes", 1, a), ("grid", None, b))]
    rows.append({"image": 9, "method": "grid", "layer": None, "miou": 0.0})  # no partner: left out of the pairing
    summary = seg.summarise(rows, resamples=200)
    assert summary["modes", 1].estimate == pytest.approx(0.75) and summary["modes", 1].units == 3
    assert summary["grid", None].estimate == pytest.approx(1.25 / 4)
    difference = seg.paired_difference(rows, ("modes", 1), ("grid", None), resamples=200)
    assert difference.estimate == pytest.approx((0.25 + 0.25 + 0.5) / 3) and difference.units == 3
    assert 0.25 <= difference.low <= difference.estimate <= difference.high <= 0.5  # differences lie in [0.25, 0.5]
    with pytest.raises(SegmentError, match="no rows for"):
        seg.paired_difference(rows, ("tokencut", 11), ("grid", None))
