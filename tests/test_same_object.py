"""qklib.same_object: token coverage of objects and the same-object probability against a brute force."""

import numpy as np
import pytest
import torch
from PIL import Image

from qklib import ade20k, same_object
from qklib.o3 import generate_scenes
from qklib.core.extract import token_embeddings
from qklib.core.images import ImageError, to_pixels


@pytest.fixture(scope="module")
def tiny(tiny_vit):
    return tiny_vit


def _two_object_set(count, rng, size=64):
    items = []
    for i in range(count):
        array = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        labels = np.zeros((size, size), np.uint8)
        labels[4:28, 4:28] = 1
        labels[36:60, 36:60] = 2
        if i % 4 == 3:
            labels[labels == 2] = 0  # only one object: skipped
        array[labels == 1] = (220, 30, 30)
        array[labels == 2] = (30, 30, 220)
        items.append(ade20k.MaskedImage(f"im{i}", Image.fromarray(array), labels))
    return items


def test_token_coverage(tiny):
    model, _ = tiny
    labels = np.zeros((64, 64), np.uint8)
    labels[:16, :16] = 3  # exactly token 0 after the model's resize/crop (64 -> 71 -> centre 64)
    labels[40:, 40:] = 7
    labels[0, 63] = 9  # one pixel: too small, left out
    coverage, ids = same_object.token_coverage(model, labels)
    assert list(ids) == [3, 7]
    assert coverage.shape == (2, 16)
    assert np.all(coverage >= 0) and np.all(coverage <= 1)
    assert coverage.sum(0).max() <= 1 + 1e-6
    assert coverage[0, 0] > 0.7 and coverage[1, 15] == 1.0
    cropped = same_object.crop_labels(model, labels)
    assert cropped.shape == (64, 64) and set(np.unique(cropped)) <= {0, 3, 7, 9}
    with_background, ids = same_object.token_coverage(model, labels, background=True)
    assert list(ids) == [0, 3, 7] and np.allclose(with_background[1:], coverage)
    assert np.allclose(with_background.sum(0)[:15], 1.0) and with_background[0, 5] == 1.0


def test_background_as_an_object_keeps_one_object_images(tiny):
    model, svd = tiny
    data = _two_object_set(8, np.random.default_rng(1))
    result = same_object.same_object_probability(model, svd, data, k=2, batch_size=4, background=True)
    assert result.images_used == 8 and result.images_skipped == 0  # background + 1 or 2 objects
    chance = np.nanmean(result.chance)
    assert 1 / 3 - 1e-6 <= chance <= 1 / 2 + 1e-6


def test_same_object_probability(tiny):
    model, svd = tiny
    data = _two_object_set(12, np.random.default_rng(0))
    result = same_object.same_object_probability(model, svd, data, k=3, batch_size=5)
    assert result.images_used == 9 and result.images_skipped == 3
    assert result.same.shape == (3, 3, 64, 2) and result.per_layer.shape == (3,)
    assert np.all((result.per_layer >= 0) & (result.per_layer <= 1))
    assert np.allclose(result.chance_layer, 0.5)  # two objects everywhere
    # brute force for one feature: top-3 images by score, same-object indicator
    used = [d for d in data if len(np.unique(d.objects)) == 3]
    tokens = token_embeddings(model, to_pixels(model, [d.image for d in used]), layers=[1])[0][:, 1:].double()
    u, v = svd.U[1, 2, :, 4], svd.V[1, 2, :, 4]
    qp, kp = tokens @ u, tokens @ v  # [B, T]
    scores = qp.amax(1).clamp_min(0) * kp.amax(1).clamp_min(0)
    order = sorted(range(len(used)), key=lambda i: (-float(scores[i]), i))[:3]
    order = [i for i in order if scores[i] > 0]
    same = []
    for i in order:
        coverage, _ = same_object.token_coverage(model, used[i].objects)
        cov = torch.from_numpy(coverage).double()
        q_obj = ((cov @ qp[i]) / cov.sum(1)).argmax()
        k_obj = ((cov @ kp[i]) / cov.sum(1)).argmax()
        same.append(float(q_obj == k_obj))
    assert result.same[1, 2, 4, 0] == pytest.approx(np.mean(same))


def test_same_object_needs_masks(tiny):
    model, svd = tiny
    item = ade20k.MaskedImage("x", Image.new("RGB", (64, 64)), None)
    with pytest.raises(ImageError, match="no object label map"):
        same_object.same_object_probability(model, svd, [item])
    one = ade20k.MaskedImage("y", Image.new("RGB", (64, 64)), np.ones((64, 64), np.uint8))
    with pytest.raises(ImageError, match="two or more objects"):
        same_object.same_object_probability(model, svd, [one])


def test_generated_scenes_have_object_maps(tmp_path):
    data = generate_scenes(tmp_path / "scenes", 3, seed=1, size=64)
    assert len(data) == 3
    assert data[0].objects is not None and data[0].objects.max() >= 2
