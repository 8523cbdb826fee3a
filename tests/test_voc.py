"""qklib.core.datasets.voc: a tiny Pascal VOC folder written here, read back exactly, and folders in the wrong layout
refused."""

import numpy as np
import pytest
from PIL import Image

import qklib
from qklib.core.images import ImageError
from qklib.analyses.segmentation import datasets, foreground_iou, miou
from qklib.core.datasets.voc import VOC_CLASSES, VOID, load_voc


def _palette_png(path, indices):
    """A VOC-style palette PNG: the pixel values are indices, the palette only colours them."""
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[1:21] = np.random.default_rng(0).integers(0, 256, (20, 3))
    palette[255] = (224, 224, 192)  # VOC's void colour
    image.putpalette(palette.ravel().tolist())
    image.save(path)


def write_voc(root, count=3, size=(40, 48)):
    """``count`` images: two objects each (a cat = 8 and a dog = 12 in the class map), a void border around the
    first, and the split files; returns the truth ``{id: (objects, classes)}`` with void as VOID."""
    for name in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / name).mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(count):
        key = f"2007_{i:06d}"
        objects = np.zeros(size, np.int64)
        objects[4:16, 4 + i: 20 + i] = 1
        objects[22:36, 24:44] = 2
        objects[3, 3:21 + i] = 255  # void border above object 1
        classes = np.where(objects == 1, 8, np.where(objects == 2, 12, objects))
        Image.fromarray((np.random.default_rng(i).random((*size, 3)) * 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{key}.jpg")
        _palette_png(root / "SegmentationObject" / f"{key}.png", objects)
        _palette_png(root / "SegmentationClass" / f"{key}.png", classes)
        truth[key] = (np.where(objects == 255, VOID, objects), np.where(classes == 255, VOID, classes))
    keys = sorted(truth)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(keys[1:]) + "\n")
    (root / "ImageSets/Segmentation/train.txt").write_text(keys[0] + "\n")
    return truth


def test_a_voc_folder_reads_back_exactly(tmp_path):
    truth = write_voc(tmp_path)
    voc = load_voc(tmp_path)
    assert voc.ids == sorted(truth) and len(voc) == 3
    for sample in voc:
        objects, classes = truth[sample.id]
        assert sample.image.size == (48, 40) and sample.image.mode == "RGB"
        assert np.array_equal(sample.objects, objects) and np.array_equal(sample.classes, classes)
        assert sample.kinds == {1: VOC_CLASSES.index("cat"), 2: VOC_CLASSES.index("dog")}
        assert sample.void.sum() == (objects == VOID).sum() > 0
    assert load_voc(tmp_path, split="val").ids == sorted(truth)[1:]
    assert load_voc(tmp_path, split="train", limit=5).ids == sorted(truth)[:1]
    assert len(load_voc(tmp_path, limit=2)) == 2 and len(voc[0:2]) == 2


def test_voc_samples_feed_the_segmenter_and_metrics_with_void_ignored(tmp_path, embedded_model):
    write_voc(tmp_path, count=1)
    sample = load_voc(tmp_path)[0]
    labels = qklib.segment(embedded_model, sample.image, 3, "grid")
    assert labels.shape == sample.objects.shape
    perfect = np.where(sample.objects == VOID, 7, sample.objects)  # anything on void pixels is not scored
    assert miou(perfect, sample.objects) == 1.0
    assert foreground_iou(perfect, sample.objects).tolist() == [1.0, 1.0]


def test_folders_in_the_wrong_layout_are_refused(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_voc(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(ImageError, match=r"not a Pascal VOC folder: missing JPEGImages/, SegmentationObject/, "
                                         r"SegmentationClass/ \(found images/\); point at the folder of one VOC year"):
        load_voc(tmp_path)
    year = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc(year, count=1)
    with pytest.raises(ImageError, match="VOC2012'?: point at that folder"):
        load_voc(tmp_path)
    with pytest.raises(ImageError, match=r"no split 'test'.*splits there: train, val"):
        load_voc(year, split="test")


def test_incomplete_folders_and_bad_masks_are_refused(tmp_path):
    truth = write_voc(tmp_path)
    first, second, third = sorted(truth)
    (tmp_path / "SegmentationClass" / f"{second}.png").unlink()
    with pytest.raises(ImageError, match=f"incomplete: 1 id\\(s\\) without a mask in SegmentationClass/: {second}"):
        load_voc(tmp_path)
    (tmp_path / "JPEGImages" / f"{third}.jpg").unlink()
    with pytest.raises(ImageError, match=f"without an image in JPEGImages/: {third}"):
        load_voc(tmp_path, split="val")
    rgb = tmp_path / "SegmentationObject" / f"{first}.png"
    Image.open(rgb).convert("RGB").save(rgb)
    with pytest.raises(ImageError, match="RGB picture, not a palette PNG"):
        load_voc(tmp_path, split="train")[0]
    small = np.zeros((10, 10), np.uint8)
    _palette_png(rgb, small)
    with pytest.raises(ImageError, match="object mask of .* is 10x10 px but its image is 48x40"):
        load_voc(tmp_path, split="train")[0]
    with pytest.raises(ImageError, match="limit must be >= 1"):
        load_voc(tmp_path, split="train", limit=0)


def test_the_chapters_datasets_hold_the_scenes_and_each_folder_given(tmp_path):
    write_voc(tmp_path / "voc", count=2)
    found = datasets(tmp_path / "results", 2, seed=1, voc_dir=tmp_path / "voc", max_images=1)
    assert list(found) == ["2 generated scenes (seed 1)", "Pascal VOC (1 at most)"]
    assert len(found["2 generated scenes (seed 1)"]) == 2 and len(found["Pascal VOC (1 at most)"]) == 1
    assert found["2 generated scenes (seed 1)"][0].objects.max() >= 4  # exact instance masks
