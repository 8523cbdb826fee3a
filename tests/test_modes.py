"""§5 modes: maps, red/cyan rendering, mode contributions, same-object probability, ADE20K masks, the chapter."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qklib
from qklib import ade20k, modes, o3, same_object
from qklib.present import render
from qklib.core.extract import token_embeddings
from qklib.core.images import ImageError, to_pixels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_vit):
    return tiny_vit


@pytest.fixture(scope="module")
def tiny_tokens(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    return token_embeddings(model, to_pixels(model, images))  # [L, B, T, d]


# --- maps and contributions ------------------------------------------------------------------------------

def test_maps_are_the_projections(tiny, tiny_tokens):
    model, svd = tiny
    x = tiny_tokens[1]  # [B, T, d]
    query, key = modes.mode_maps(svd, x, 1, 2, 5)
    assert query.shape == key.shape == (2, 4, 4)
    expected = x[:, 1:].double() @ svd.U[1, 2, :, 5]
    assert torch.allclose(query.reshape(2, -1), expected)
    flipped_q, flipped_k = modes.mode_maps(svd, x, 1, 2, 5, sign=-1)
    assert torch.allclose(flipped_q, -query) and torch.allclose(flipped_k, -key)
    # agrees with the per-mode terms of qklib.mode_scores
    terms = qklib.mode_scores(svd, 1, 2, x[0, 1:], x[0, 1:])  # [r, Tq, Tk]
    outer = query[0].reshape(-1, 1) * svd.S[1, 2, 5] * key[0].reshape(1, -1)
    assert torch.allclose(terms[5], outer)
    with pytest.raises(IndexError, match="mode 64 out of range"):
        modes.mode_maps(svd, x, 1, 2, 64)
    with pytest.raises(ValueError, match="sign"):
        modes.mode_maps(svd, x, 1, 2, 0, sign=0)


def test_contributions_sum_to_the_bias_free_score(tiny, tiny_tokens):
    model, svd = tiny
    for layer in range(3):
        x = tiny_tokens[layer].double()  # [B, T, d]
        contrib = modes.mode_contributions(svd, x, layer)  # [B, H, r]
        w = model.blocks[layer].attn.qkv.weight.detach().double()  # [3D, d]
        d_attn = w.shape[0] // 3
        heads = model.blocks[layer].attn.num_heads
        image = x[:, 1:]
        q = (image @ w[:d_attn].T).reshape(2, -1, heads, d_attn // heads)  # no bias
        k = (image @ w[d_attn: 2 * d_attn].T).reshape(2, -1, heads, d_attn // heads)
        total = torch.einsum("bihc,bjhc->bh", q, k)  # sum over all image-token pairs
        assert torch.allclose(contrib.sum(-1), total, rtol=1e-8, atol=1e-8)
        # and each term is the sum over pairs of mode_scores
        terms = qklib.mode_scores(svd, layer, 1, image[0], image[0]).sum((1, 2))
        assert torch.allclose(contrib[0, 1], terms)
    with_prefix = modes.mode_contributions(svd, tiny_tokens[0], 0, include_prefix=True)
    assert not torch.allclose(with_prefix, modes.mode_contributions(svd, tiny_tokens[0], 0))


def test_top_modes_rank_by_contribution_and_show_the_present_sign(tiny, tiny_tokens):
    _, svd = tiny
    x = tiny_tokens[2][0]
    ranked = modes.top_modes(svd, x, 2, 1, count=6)
    contrib = modes.mode_contributions(svd, x, 2)[1]
    assert [r.mode for r in ranked] == torch.argsort(contrib, descending=True)[:6].tolist()
    assert all(a.contribution >= b.contribution for a, b in zip(ranked, ranked[1:]))
    assert sum(abs(r.share) for r in ranked) <= 1 + 1e-9
    for r in ranked:
        query, _ = modes.mode_maps(svd, x, 2, 1, r.mode, sign=r.sign)
        assert float(query.sum()) >= 0
        assert r.label == modes.mode_label(2, 1, r.mode, r.sign)


def test_labels():
    assert modes.mode_label(6, 4, 1) == "L6 H4 M1"
    assert modes.mode_label(6, 4, 1, -1) == "L6 H4 M1-"
    assert modes.parse_label("L10 H3 M0") == (10, 3, 0, 1)
    assert modes.parse_label("L1H2M3-") == (1, 2, 3, -1)
    with pytest.raises(ValueError, match="write it as"):
        modes.parse_label("layer 3 head 2")


# --- rendering --------------------------------------------------------------------------------------------

def test_normalize_map_percentiles():
    values = np.arange(100, dtype=float).reshape(10, 10)
    out = render.normalize_map(values)
    lo, hi = np.percentile(values, [30, 95])
    assert out.min() == 0 and out.max() == 1
    assert out.flat[50] == pytest.approx((50 - lo) / (hi - lo))
    assert (render.normalize_map(np.ones((4, 4))) == 0).all()
    with pytest.raises(ValueError):
        render.normalize_map(values, low=90, high=10)


def test_red_cyan_shapes_and_colours():
    photo = np.full((64, 64, 3), 200, np.uint8)
    query = np.zeros((4, 4))
    key = np.zeros((4, 4))
    query[0, :] = 1  # top row: query only
    key[3, :] = 1  # bottom row: key only
    query[:, 3] = key[:, 3] = 1  # right column: both
    out = render.red_cyan(photo, query, key)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[2, 20]) == (255, 0, 0)  # red
    assert tuple(out[61, 20]) == (0, 255, 255)  # cyan
    assert tuple(out[30, 61]) == (255, 255, 255)  # white
    centre = out[30, 20]  # neither: dimmed grey photo
    assert centre[0] == centre[1] == centre[2] and centre[0] == round(200 * 0.45)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        render.red_cyan(np.zeros((8, 8)), query, key)
    rendered = render.render_mode(np.zeros((28, 28, 3), np.uint8), torch.randn(2, 2), torch.randn(2, 2))
    assert rendered.shape == (28, 28, 3)
    assert render.thumbnail(out, 16).shape == (16, 16, 3)
    assert render.mosaic([out, out, out], columns=2, gap=2).shape == (130, 130, 3)
    assert render.jpeg_bytes(out)[:2] == b"\xff\xd8"


def test_mode_pictures_on_the_embedded_model(embedded_model, embedded_svd, cat_photo, tmp_path):
    pictures = render.mode_pictures(embedded_model, embedded_svd, [cat_photo], 10, 3, 0)
    assert pictures[0].shape == (224, 224, 3)
    small = render.mode_pictures(embedded_model, embedded_svd, [cat_photo], 10, 3, 0, size=112)
    assert small[0].shape == (112, 112, 3)
    Image.fromarray(pictures[0]).save(tmp_path / "cat_L10_H3_M0.png")  # for a look by eye when debugging


# --- same-object probability -------------------------------------------------------------------------------

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


def test_same_object_probability(tiny):
    model, svd = tiny
    data = _two_object_set(12, np.random.default_rng(0))
    result = same_object.same_object_probability(model, svd, data, k=3, batch_size=5)
    assert result.images_used == 9 and result.images_skipped == 3
    assert result.same.shape == (3, 3, 64, 2) and result.per_layer.shape == (3,)
    assert np.all((result.per_layer >= 0) & (result.per_layer <= 1))
    assert np.allclose(result.chance_layer, 0.5)  # two objects everywhere
    # brute force for one feature: top-3 images by score, same-object indicator
    meta = qklib.info(model)
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
    assert meta.prefix_tokens == 1


def test_same_object_needs_masks(tiny):
    model, svd = tiny
    item = ade20k.MaskedImage("x", Image.new("RGB", (64, 64)), None)
    with pytest.raises(ImageError, match="no object label map"):
        same_object.same_object_probability(model, svd, [item])
    one = ade20k.MaskedImage("y", Image.new("RGB", (64, 64)), np.ones((64, 64), np.uint8))
    with pytest.raises(ImageError, match="two or more objects"):
        same_object.same_object_probability(model, svd, [one])


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
    # semantic maps only: one object per class
    semantic = tmp_path / "sem"
    (semantic / "images" / "validation").mkdir(parents=True)
    (semantic / "annotations" / "validation").mkdir(parents=True)
    image.save(semantic / "images" / "validation" / "a.jpg")
    Image.fromarray(np.repeat(np.array([[0, 4, 9]], np.uint8), 10, 1).repeat(20, 0)).save(
        semantic / "annotations" / "validation" / "a.png")
    data = ade20k.load_ade20k(semantic)
    assert data.kind == "semantic" and sorted(np.unique(data[0].objects)) == [0, 1, 2]
    with pytest.raises(ImageError, match="no ADE20K images"):
        ade20k.load_ade20k(tmp_path / "sem" / "images")
    with pytest.raises(ImageError, match="does not exist"):
        ade20k.load_ade20k(tmp_path / "nope")


def test_generated_scenes_have_object_maps(tmp_path):
    data = o3.generate_scenes(tmp_path / "scenes", 3, seed=1, size=64)
    assert len(data) == 3
    assert data[0].objects is not None and data[0].objects.max() >= 2


# --- the chapter ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_chapter_runs_with_small_parameters(tmp_path, run_chapter):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.random((50, 70, 3)) * 255).astype(np.uint8)).save(images / f"im{i}.png")
    (images / "broken.jpg").write_bytes(b"no")
    parameters = dict(results_dir=str(tmp_path / "results"), models=["random:vit_tiny_patch16_224"],
                      image_dir=str(images), walkthrough_image="im3", n_scenes=6, top_k=2, layers=[0, 11],
                      heads=[0, 2], explorer_modes=1, featured=["L0 H0 M0", "L11 H2 M1-"], seed=2)
    nb, error = run_chapter("s5_modes", **parameters)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "\n".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    page = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "Scored 5 of 6 images" in markdown and "skipped 1" in markdown and "broken.jpg" in markdown
    assert "L11 H2 M1-" in page and "What we found" not in markdown  # the heading is markdown, not output
    assert "Read by eye" not in markdown and "Readings by eye exist only" in markdown  # default run only
    assert str(tmp_path) not in markdown + page  # no machine path in the page
    glued = {o["metadata"]["scrapbook"]["name"] for o in outputs if "scrapbook" in o.get("metadata", {})}
    assert {"s5_early", "s5_trend", "s5_top_share", "s5_seconds", "s5_walk_name"} <= glued
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    sliders = [w["state"] for w in state.values() if w["model_name"] == "SelectionSliderModel"]
    assert len(sliders) == 5  # explorer: layer, head, mode; walkthrough: layer, head
    assert sorted(tuple(s["_options_labels"]) for s in sliders) == sorted(
        [("L0", "L11"), ("H0", "H2"), ("M0",), ("L0", "L11"), ("H0", "H2")])  # the values, not positions
    assert (tmp_path / "results" / "s5_search.npz").is_file()
    # a second run reuses the saved search (its key matches); a different top_k does not
    key = (tmp_path / "results" / "s5_search.npz.key.json").read_text()
    nb, error = run_chapter("s5_modes", **{**parameters, "top_k": 3})
    assert error is None, error
    assert (tmp_path / "results" / "s5_search.npz.key.json").read_text() != key


@pytest.mark.slow
def test_walkthrough_image_names_an_image_of_image_dir(tmp_path, run_chapter):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "cat_05.png")
    nb, error = run_chapter("s5_modes", results_dir=str(tmp_path / "results"), models=["random:vit_tiny_patch16_224"],
                            image_dir=str(images), walkthrough_image="chelsea", n_scenes=6, featured=["L0 H0 M0"])
    assert error is not None and "'chelsea' is neither an image of the gallery" in str(error)
    assert "cat_05" in str(error)  # the message lists what the folder holds


@pytest.mark.slow
@pytest.mark.parametrize("parameters, message", [
    ({"models": ["vit_bse_patch16_224"]}, "unknown model 'vit_bse_patch16_224'"),
    ({"image_dir": "/no/such/folder"}, "folder '/no/such/folder' does not exist"),
    ({"top_k": 0}, "'top_k' must be an integer >= 1"),
    ({"featured": ["layer 3"]}, "parameter 'featured'"),
    ({"device": "cuda:7"}, "device"),
    ({"layers": [12]}, "out of range"),
    ({"featured": ["L3 H9 M0"]}, "is outside the model"),
])
def test_wrong_parameters_stop_before_any_computation(tmp_path, run_chapter, parameters, message):
    nb, error = run_chapter("s5_modes", results_dir=str(tmp_path / "results"), **parameters)
    assert error is not None and message in str(error)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    failing = next(i for i, c in enumerate(code_cells) if any(o.output_type == "error" for o in c.outputs))
    # parameters, injected parameters, the checking cell; checks against the model's size in the loading cell
    assert failing <= 2 or (failing == 3 and message in ("out of range", "is outside the model"))
