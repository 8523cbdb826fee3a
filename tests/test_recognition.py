"""qklib.analyses.recognition: the nearest-centroid probe by hand and on separable data, the image features against a
brute-force computation, and bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from qklib.analyses import recognition as rec
from qklib.core.extract import token_embeddings
from qklib.core.images import ImageError, to_pixels
from qklib.analyses.recognition import ProbeResult, RecognitionError


def test_standardising_lets_a_small_informative_feature_win():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 20)
    informative = np.where(labels == "a", -1.0, 1.0) + rng.normal(0, 0.1, 40)
    noise = rng.normal(0, 1000, 40)  # a thousand times larger, unrelated to the class
    features = np.stack([noise, informative], 1)
    test = np.array([[2000.0, -1.0], [-2000.0, 1.0]])
    assert rec.nearest_centroid(features, labels, test).tolist() == ["a", "b"]


def test_probe_on_separable_classes_is_perfect():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [7, 5, 2])
    features = np.eye(3)[labels] * 5 + rng.normal(0, 0.2, (14, 3))
    result = rec.probe(features, labels, folds=5)
    assert result.accuracy == 1.0 and result.per_class() == {0: 1.0, 1: 1.0, 2: 1.0}
    two = rec.probe(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]), np.array([0, 1, 0, 1]), folds=2)
    assert two.accuracy == 1.0  # a class of two images is split over two folds and still predicted


def test_probe_result_accuracies_by_hand():
    result = ProbeResult(np.array(["a", "a", "b", "b", "b"]), np.array(["a", "b", "b", "b", "a"]), folds=2)
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.per_class() == pytest.approx({"a": 0.5, "b": 2 / 3})
    interval = result.interval(resamples=300)
    assert interval.estimate == pytest.approx(0.6) and 0 <= interval.low <= 0.6 <= interval.high <= 1


def test_image_features_match_a_brute_force_computation(tiny_vit):
    model, svd = tiny_vit
    rng = np.random.default_rng(2)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    layer = 1
    got = rec.image_features(model, svd, images, [0, layer], batch_size=2)
    pixels = to_pixels(model, images)
    with torch.no_grad():
        assert np.allclose(got["class_token"], model.forward_features(pixels)[:, 0].double().numpy(), atol=1e-5)
    x = token_embeddings(model, pixels, [layer])[0, :, 1:].double()  # [B, N, d] image tokens
    query = torch.einsum("bnd,hdr->bnhr", x, svd.U[layer])
    key = torch.einsum("bnd,hdr->bnhr", x, svd.V[layer])
    positive = query.amax(1).clamp_min(0) * key.amax(1).clamp_min(0)  # [B, H, r]
    negative = (-query.amin(1)).clamp_min(0) * (-key.amin(1)).clamp_min(0)
    expected = torch.stack([positive, negative], -1).sqrt().flatten(1).numpy()  # layout [H, r, sign]
    assert got["modes"][layer].shape == (3, svd.num_heads * svd.rank * 2) and set(got["modes"]) == {0, layer}
    assert np.allclose(got["modes"][layer], expected, atol=1e-4)


def test_bad_probes_and_models_are_refused(tiny_vit):
    with pytest.raises(RecognitionError, match="two classes or more"):
        rec.probe(np.zeros((4, 2)), [0, 0, 0, 0])
    with pytest.raises(RecognitionError, match="two classes or more"):
        rec.probe(np.zeros((3, 2)), [0, 0, 1])
    with pytest.raises(RecognitionError, match="one label per row"):
        rec.probe(np.zeros((4, 2)), [0, 1, 0])
    model, svd = tiny_vit
    with pytest.raises(RecognitionError, match="out of range"):
        rec.image_features(model, svd, [Image.new("RGB", (8, 8))], [1, 7])
    assert rec.common_classes(["a", "b", "a", "c", "c"]).tolist() == [True, False, True, True, True]


def test_class_folders(tmp_path):
    for label, count in (("cat", 3), ("dog", 1)):
        (tmp_path / label).mkdir()
        for i in range(count):
            Image.new("RGB", (4, 4)).save(tmp_path / label / f"{i}.png")
    paths, labels = rec.class_folders(tmp_path, per_class=2)
    assert labels == ["cat", "cat", "dog"] and [p.name for p in paths] == ["0.png", "1.png", "0.png"]
    Image.new("RGB", (4, 4)).save(tmp_path / "stray.png")
    with pytest.raises(ImageError, match="not in a class subfolder"):
        rec.class_folders(tmp_path)


def test_probe_models_drops_lonely_classes_and_keys_every_feature_set(tiny_vit):
    model, svd = tiny_vit
    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(7)]
    results = rec.probe_models({"tiny": model}, {"tiny": svd}, images, list("aaabbbc"), [0, 2], batch_size=4)
    assert set(results) == {("tiny", "class token", None), ("tiny", "modes", 0), ("tiny", "modes", 2)}
    assert all(sorted(r.labels.tolist()) == list("aaabbb") for r in results.values())  # "c" has one image
