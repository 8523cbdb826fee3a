"""The live explorers (qklib.present.explore): driven through their widgets' values, as a reader's clicks do."""

import html
import io
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

import qklib
from qklib.book import chapter
from qklib import search
from qklib.core.extract import record
from qklib.core.images import to_pixels
from qklib.analyses.preference import query_tokens, token_masks
from qklib.present.explore import explore, explore_attention, explore_ov, explore_spectrum
from qklib.present.render import mode_pictures


def upload_value(name: str, data: bytes) -> tuple[dict, ...]:
    """What ipywidgets' FileUpload holds after a browser upload of one file."""
    return ({"name": name, "type": "", "size": len(data), "content": memoryview(data), "last_modified": datetime.now(timezone.utc)},)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(picture) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(picture.value)).convert("RGB"))


def changes(box, picture: str, control: str, value) -> bool:
    """Set one control; whether the picture's bytes changed, with no error shown."""
    before = box.pictures[picture].value
    box.controls[control].value = value
    assert box.message.value == "", box.message.value
    return box.pictures[picture].value != before


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return chapter.scenes(tmp_path_factory.mktemp("scenes"), 2, seed=0, size=64)


# ------------------------------------------------------------------------------------------------- §3
def test_attention_explorer_follows_layer_head_and_query_token(tiny_vit, scenes, cat_photo):
    model, _ = tiny_vit
    box = explore_attention(model, scenes, {"cat": cat_photo}, size=64)
    assert box.message.value == "" and box.pictures["attention"].value
    grid = model.patch_embed.grid_size
    assert (box.controls["row"].max, box.controls["col"].max) == (grid[0] - 1, grid[1] - 1)
    for control, value in (("layer", 2), ("head", 1), ("row", (box.controls["row"].value + 1) % grid[0]),
                           ("col", (box.controls["col"].value + 1) % grid[1])):
        assert changes(box, "attention", control, value), f"moving {control} changed nothing"
    box.controls["image"].value = "cat"  # an image without masks: no outlines, no shares
    assert box.message.value == "" and "on the target" not in box.captions["caption"].value


def test_attention_explorer_puts_the_query_on_the_target_and_distractor(tiny_vit, scenes):
    model, _ = tiny_vit
    box = explore_attention(model, scenes, size=64)
    masks = token_masks(model, [scenes[0].target], [scenes[0].distractor])
    target, distractor = query_tokens(masks, 0.0)[0][0].tolist()
    grid_w = model.patch_embed.grid_size[1]
    box.controls["distractor"].click()
    assert (box.controls["row"].value, box.controls["col"].value) == divmod(int(distractor), grid_w)
    box.controls["target"].click()
    assert (box.controls["row"].value, box.controls["col"].value) == divmod(int(target), grid_w)
    # the caption's shares are the query's attention row (prefix dropped, renormalised) times the masks
    layer, head = box.controls["layer"].value, box.controls["head"].value
    probs = record(model, to_pixels(model, scenes[0].image), tokens=False, attention=True).attention[layer, 0, head]
    row = probs[1 + int(target), 1:].double()
    share = float(masks.target[0].double() @ (row / row.sum()))
    assert f"{share:.0%} on the target" in box.captions["caption"].value


# ------------------------------------------------------------------------------------------------- §4
def test_spectrum_explorer_redraws_for_layer_head_and_mode(tiny_vit):
    _, svd = tiny_vit
    box = explore_spectrum({"tiny": svd, "twin": svd})
    assert box.message.value == ""
    first = decoded(box.pictures["spectrum"])
    assert first.shape[1] > 600 and first.std() > 0  # three panels drawn
    for control, value in (("layer", 1), ("head", 2), ("mode", 5)):
        assert changes(box, "spectrum", control, value), f"moving {control} changed nothing"
    cos = float(svd.cos[1, 2, 5])
    assert "L1 H2 M5" in box.captions["caption"].value and f"{cos:+.3f}" in box.captions["caption"].value


def test_ov_explorer_redraws_for_layer_and_head(tiny_vit):
    model, _ = tiny_vit
    ov = qklib.ov_svd(model)
    box = explore_ov({"tiny": ov, "twin": ov})
    assert box.message.value == ""
    assert decoded(box.pictures["ov"]).std() > 0
    for control, value in (("layer", 1), ("head", 2)):
        assert changes(box, "ov", control, value), f"moving {control} changed nothing"
    copying = float(qklib.copying_scores(ov)[1, 2])
    assert "L1 H2" in box.captions["caption"].value and f"copying score {copying:.3f}" in box.captions["caption"].value


# ------------------------------------------------------------------------------------------------- §5
@pytest.fixture(scope="module")
def gallery(tmp_path_factory, cat_photo):
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    cat_photo.resize((96, 80)).save(root / "cat.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(root / f"noise{i}.png")
    return root


def test_mode_explorer_redraws_and_shows_optimal_images(tiny_vit, gallery):
    model, svd = tiny_vit
    found = search.search(model, gallery, layers=[1], heads=[0, 1], modes=[0, 1], k=2, svd=svd)
    images = {p.stem: p for p in sorted(gallery.glob("*.png"))}  # files, opened when first shown
    box = explore(model, svd, images, found, top=2, size=64, thumb=48)
    assert box.message.value == ""
    assert box.controls["layer"].value == 1  # starts on a searched layer
    assert box.pictures["optimal"].layout.display != "none"
    best = [name for name, _ in found.top(1, 0, 0, 1)]
    assert all(name.removesuffix(".png") in box.captions["optimal"].value for name in best)
    assert decoded(box.pictures["optimal"]).shape[1] == 2 * 48 + 2  # two thumbnails and the gap
    for control, value in (("head", 1), ("mode", 1), ("sign", -1), ("image", "noise1")):
        assert changes(box, "image", control, value), f"moving {control} changed nothing"
    # the picture is the mode's red/cyan rendering of that image, as the static figures draw it
    expected = mode_pictures(model, svd, [Image.open(images["noise1"]).convert("RGB")], 1, 1, 1, -1, size=64)[0]
    assert np.abs(decoded(box.pictures["image"]).astype(int) - expected).mean() < 6  # JPEG tolerance
    box.controls["mode"].value = 5  # not searched: the optimal row says so instead of showing stale images
    assert box.pictures["optimal"].layout.display == "none" and "was not searched" in box.captions["optimal"].value


def test_mode_explorer_takes_an_uploaded_image_and_refuses_a_text_file(tiny_vit, cat_photo):
    model, svd = tiny_vit
    box = explore(model, svd, {"cat": cat_photo}, size=64)
    upload = box.controls["upload"]
    before = box.pictures["image"].value
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    upload.value = upload_value("mine.png", png(noise))
    assert box.message.value == "" and box.controls["image"].value == "upload: mine.png"
    assert box.pictures["image"].value != before and upload.value == ()
    shown = box.pictures["image"].value
    upload.value = upload_value("notes.txt", b"these are not pixels\n")
    assert "Upload 'notes.txt' cannot be read as an image (not an image file)" in html.unescape(box.message.value)
    assert "Traceback" not in box.message.value
    assert box.pictures["image"].value == shown and box.controls["image"].value == "upload: mine.png"
    box.controls["mode"].value = 3  # the next redraw clears the message
    assert box.message.value == ""


def test_mode_explorer_on_the_embedded_model_matches_the_search(embedded_model, embedded_svd, cat_photo):
    photos = {"cat": cat_photo, "flat": Image.new("RGB", (224, 224), (120, 130, 140))}
    found = search.search_images(embedded_model, photos, layers=[3], heads=[2], modes=[0], k=1, svd=embedded_svd)
    box = explore(embedded_model, embedded_svd, photos, found, top=1)
    box.controls["head"].value = 2
    assert box.message.value == "" and box.pictures["optimal"].layout.display != "none"
    assert f"{found.top(3, 2, 0, 1)[0][0]} (" in box.captions["optimal"].value
    assert decoded(box.pictures["image"]).shape == (320, 320, 3) and 0 < box.seconds
