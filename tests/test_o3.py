"""qklib.core.datasets.o3: the O3 loader (configurable layout, errors that list what is missing) and the scene
generator."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image

from qklib.core.datasets.o3 import O3Error, O3Layout, generate_scenes, load_o3, render_scene


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("scenes"), 6, seed=3)


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic_and_prefix_stable(tmp_path):
    first = generate_scenes(tmp_path / "a", 5, seed=7)
    again = generate_scenes(tmp_path / "b", 3, seed=7)
    other = generate_scenes(tmp_path / "c", 3, seed=8)
    for one, two in zip(first[:3], again):
        assert one.id == two.id
        assert np.array_equal(np.asarray(one.image), np.asarray(two.image))
        assert np.array_equal(one.objects, two.objects)
        assert one.info["instances"] == two.info["instances"] and len(one.info["instances"]) == int(one.info["objects"])
        for folder in ("images", "objects"):  # the same seed writes the same bytes
            name = f"{folder}/{one.id}.png"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not np.array_equal(np.asarray(first[0].image), np.asarray(other[0].image))
    for name in ("images", "targ_images", "dist_images", "objects"):
        assert (tmp_path / "a" / name / "scene_00004.png").is_file()


def test_generated_masks_are_exact_and_label_map_consistent(scenes):
    features = set()
    for sample in scenes:
        assert sample.image.mode == "RGB" and sample.image.size == (224, 224)
        labels = sample.objects
        assert labels.dtype == np.uint8
        assert np.array_equal(sample.target, labels == 1)
        assert np.array_equal(sample.distractor, labels >= 2)
        assert sample.target.any() and sample.distractor.any()
        assert sorted(np.unique(labels[labels >= 2])) == list(range(2, int(labels.max()) + 1))  # 2.. one per distractor
        rgb = np.asarray(sample.image)
        # Exact masks: every object pixel carries its object's paint, one colour per object.
        for label in np.unique(labels[labels > 0]):
            assert len(np.unique(rgb[labels == label], axis=0)) == 1
        features.add(sample.info["feature"])
    assert features == {"colour", "shape", "size", "orientation"}


def _paint_hue(rgb, mask):
    return colorsys.rgb_to_hsv(*(rgb[mask][0] / 255))[0]


def _complex_moment(mask, order):
    """sum over the object's pixels of (z - centroid)^order, z = x + iy: its phase turns with the object."""
    ys, xs = np.nonzero(mask)
    z = (xs - xs.mean()) + 1j * (ys - ys.mean())
    return np.sum(z ** order)


def _shape_descriptor(mask):
    """Moments that neither rotation nor scale change: spread and the 2-, 3- and 4-fold symmetry magnitudes."""
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    spread = np.sum((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2) / area ** 2
    return np.array([spread] + [abs(_complex_moment(mask, k)) / area ** (1 + k / 2) for k in (2, 3, 4)])


def _feature_distance(feature, shape, rgb, one, two):
    """How far two objects (pixel masks) are apart in the feature that makes a scene's target odd."""
    if feature == "colour":
        gap = abs(_paint_hue(rgb, one) - _paint_hue(rgb, two))
        return min(gap, 1 - gap)
    if feature == "size":
        return abs(np.log(one.sum() / two.sum()))
    if feature == "orientation":
        order = 3 if shape == "triangle" else 2  # a triangle repeats every third of a turn, an ellipse or bar every half
        turn = np.angle(_complex_moment(one, order) / _complex_moment(two, order)) / order
        return abs(turn)
    return float(np.abs(_shape_descriptor(one) - _shape_descriptor(two)).max())


def test_distractors_are_distinguishable_instances_of_one_kind():
    for index in range(40):
        rgb, labels, info = render_scene(seed=1, index=index)
        distractors = [labels == label for label in range(2, int(labels.max()) + 1)]
        assert len(distractors) >= 3
        paints = [{tuple(c) for c in rgb[mask]} for mask in distractors]
        for i, first in enumerate(paints):  # pairwise distinguishable: no paint shared between two distractors
            assert len(first) == 1
            assert all(first.isdisjoint(second) for second in paints[i + 1:]), (index, i)
        # ... yet closer to each other than to the target in the feature that makes the target odd
        feature, shape, target = info["feature"], info["shape"], labels == 1
        within = max(_feature_distance(feature, shape, rgb, a, b) for i, a in enumerate(distractors)
                     for b in distractors[i + 1:])
        across = min(_feature_distance(feature, shape, rgb, target, d) for d in distractors)
        assert within < across, (index, feature, within, across)


def test_distractors_vary_in_shade_size_and_rotation_only_a_little():
    sizes, turns = [], []
    for index in range(16):
        rgb, labels, info = render_scene(seed=2, index=index)
        distractors = [labels == label for label in range(2, int(labels.max()) + 1)]
        areas = np.array([mask.sum() for mask in distractors])
        sizes.append(areas.max() / areas.min())
        if info["feature"] == "colour":  # the target keeps the kind's other attributes: its hue is far away
            hues = [_paint_hue(rgb, mask) for mask in distractors]
            assert max(hues) - min(hues) < 0.1 or max(hues) - min(hues) > 0.9  # one hue family (mod 1)
        if info["shape"] in ("ellipse", "bar"):
            angles = [np.angle(_complex_moment(mask, 2)) / 2 for mask in distractors]
            turns.append(max(abs(np.angle(np.exp(2j * (a - angles[0])))) / 2 for a in angles))
        assert [entry["label"] for entry in info["instances"]] == list(range(1, len(distractors) + 2))
    assert 1.05 < max(sizes) < 1.6  # instances differ in size, but by far less than a size target's factor 2+
    assert turns and 0.02 < max(turns) < np.radians(20)


def test_target_differs_from_distractors_in_its_feature():
    for index in range(8):
        rgb, labels, info = render_scene(seed=1, index=index)
        target_area = (labels == 1).sum()
        distractor_areas = [(labels == label).sum() for label in range(2, int(labels.max()) + 1)]
        if info["feature"] == "size":
            assert all(not 0.8 < target_area / area < 1.25 for area in distractor_areas)
        if info["feature"] == "shape":
            assert info["target_shape"] != info["shape"]
        else:
            assert info["target_shape"] == info["shape"]


def test_generator_will_not_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(O3Error, match="not empty"):
        generate_scenes(tmp_path, 2)


def test_regenerating_fewer_scenes_removes_the_stale_ones(tmp_path):
    generate_scenes(tmp_path, 4, seed=0)
    assert len(generate_scenes(tmp_path, 2, seed=0)) == 2
    assert len(load_o3(tmp_path)) == 2


# ---------------------------------------------------------------- loader


def test_loader_reads_o3_layout(tmp_path, write_o3):
    write_o3(tmp_path)
    samples = load_o3(tmp_path)
    assert [s.id for s in samples] == ["a", "b"]
    sample = samples[0]
    assert sample.image.size == (40, 30) and sample.target.shape == (30, 40)
    assert sample.target.sum() == 64 and sample.distractor.sum() == 100 and sample.objects is None


def test_loader_layout_is_configurable_and_limit_is_seeded(tmp_path, write_o3):
    layout = O3Layout(images="img", targets="t", distractors="d")
    write_o3(tmp_path, names=tuple("abcdef"), layout=layout)
    assert len(load_o3(tmp_path, layout)) == 6
    picked = [s.id for s in load_o3(tmp_path, layout, limit=3, seed=1)]
    assert picked == [s.id for s in load_o3(tmp_path, layout, limit=3, seed=1)] and len(picked) == 3
    assert [s.id for s in load_o3(tmp_path, layout, limit=2)] == ["a", "b"]


def test_loader_lists_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(O3Error) as error:
        load_o3(tmp_path)
    message = str(error.value)
    assert "targ_images/ (target masks)" in message and "dist_images/ (distractor masks)" in message
    assert "images/ (images)" not in message and "O3Layout" in message


def test_loader_lists_images_without_masks(tmp_path, write_o3):
    write_o3(tmp_path, names=("a", "b", "c"), skip_mask="b")
    with pytest.raises(O3Error, match=r"1 image\(s\) have no mask in targ_images/: b"):
        load_o3(tmp_path)


def test_loader_errors_for_missing_root_and_wrong_mask_size(tmp_path, write_o3):
    with pytest.raises(O3Error, match="does not exist"):
        load_o3(tmp_path / "nowhere")
    write_o3(tmp_path, names=("a",))
    Image.new("L", (10, 10)).save(tmp_path / "targ_images" / "a.png")
    with pytest.raises(O3Error, match="must have the image's size"):
        load_o3(tmp_path)[0]
    with pytest.raises(O3Error, match="relative to the O3 root"):
        O3Layout(images="/abs")
