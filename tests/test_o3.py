"""qklib.o3: the O3 loader (configurable layout, errors that list what is missing) and the scene generator."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qklib.o3 import O3Error, O3Layout, generate_scenes, load_o3, render_scene


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


def test_target_differs_from_distractors_in_its_feature():
    for index in range(8):
        rgb, labels, info = render_scene(seed=1, index=index)
        target_colour = rgb[labels == 1][0]
        distractor_colour = rgb[labels == 2][0]
        target_area, distractor_area = (labels == 1).sum(), (labels == 2).sum()
        if info["feature"] == "colour":
            assert not np.array_equal(target_colour, distractor_colour)
        else:
            assert np.array_equal(target_colour, distractor_colour)
        if info["feature"] == "size":
            assert not 0.8 < target_area / distractor_area < 1.25
        if info["feature"] == "shape":
            assert info["target_shape"] != info["shape"]


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
