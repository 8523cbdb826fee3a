"""qklib.core.datasets.ade20k: the three ADE20K layouts and plain images/ + objects/ folders, read into instance label
maps."""

import numpy as np
import pytest
from PIL import Image

from qklib.core.datasets import ade20k
from qklib.core.images import ImageError


def test_ade20k_layouts(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8))
    # full ADE20K: X.jpg + X_seg.png, class = R/10*256 + G, instance = B
    full = tmp_path / "full" / "images" / "ADE" / "validation" / "street"
    full.mkdir(parents=True)
    image.save(full / "ADE_val_00000001.jpg")
    seg = np.zeros((20, 30, 3), np.uint8)
    seg[:10, :, 0], seg[:10, :, 1], seg[:10, :, 2] = 10, 5, 1  # class 261, instance 1
    seg[10:, :15, 0], seg[10:, :15, 1], seg[10:, :15, 2] = 20, 3, 2  # class 515, instance 2
    Image.fromarray(seg).save(full / "ADE_val_00000001_seg.png")  # bottom-right stays unlabelled
    data = ade20k.load_ade20k(tmp_path / "full")
    assert data.kind == "full" and len(data) == 1
    labels = data[0].objects
    assert labels.shape == (20, 30) and labels[15, 25] == 0
    assert len(np.unique(labels[:10])) == 1 and labels[0, 0] != labels[15, 0] and labels[15, 0] > 0
    assert data[0].kinds == {int(labels[0, 0]): 261, int(labels[15, 0]): 515}  # the classes the files name
    # ADEChallengeData2016 + instance annotations: R = category, G = instance
    challenge = tmp_path / "ADEChallengeData2016"
    (challenge / "images" / "validation").mkdir(parents=True)
    (challenge / "annotations_instance" / "validation").mkdir(parents=True)
    image.save(challenge / "images" / "validation" / "ADE_val_1.jpg")
    inst = np.zeros((20, 30, 3), np.uint8)
    inst[:, :10, 0], inst[:, :10, 1] = 7, 1
    inst[:, 10:20, 0], inst[:, 10:20, 1] = 7, 2  # same class, another instance
    Image.fromarray(inst).save(challenge / "annotations_instance" / "validation" / "ADE_val_1.png")
    data = ade20k.load_ade20k(challenge)
    assert data.kind == "instance"
    labels = data[0].objects
    assert len(np.unique(labels)) == 3 and labels[0, 25] == 0 and labels[0, 0] != labels[0, 15]
    assert data[0].kinds == {int(labels[0, 0]): 7, int(labels[0, 15]): 7}  # two instances of one class
    # semantic maps only: one object per class
    semantic = tmp_path / "sem"
    (semantic / "images" / "validation").mkdir(parents=True)
    (semantic / "annotations" / "validation").mkdir(parents=True)
    image.save(semantic / "images" / "validation" / "a.jpg")
    Image.fromarray(np.repeat(np.array([[0, 4, 9]], np.uint8), 10, 1).repeat(20, 0)).save(
        semantic / "annotations" / "validation" / "a.png")
    data = ade20k.load_ade20k(semantic)
    assert data.kind == "semantic" and sorted(np.unique(data[0].objects)) == [0, 1, 2]
    assert data[0].kinds is None  # objects are classes already: no kinds beyond them
    with pytest.raises(ImageError, match="no ADE20K images"):
        ade20k.load_ade20k(tmp_path / "sem" / "images")
    with pytest.raises(ImageError, match="does not exist"):
        ade20k.load_ade20k(tmp_path / "nope")
