"""qklib.present.render: percentile normalisation, the red/cyan picture of a mode, mosaics and JPEG bytes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from qklib.core.extract import token_embeddings
from qklib.core.images import display_crop, to_pixels
from qklib.present import render


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
    tiled = render.mosaic([out, out[::-1], out], columns=2, gap=2, fill=7)
    assert tiled.shape == (130, 130, 3)
    assert np.array_equal(tiled[:64, 66:], out[::-1]) and np.array_equal(tiled[66:, :64], out)
    assert (tiled[64:66] == 7).all() and (tiled[66:, 66:] == 7).all()  # gaps and the empty slot


def test_mode_pictures_draw_the_modes_own_projections(embedded_model, embedded_svd, cat_photo):
    pictures = render.mode_pictures(embedded_model, embedded_svd, [cat_photo], 10, 3, 0)
    flipped = render.mode_pictures(embedded_model, embedded_svd, [cat_photo], 10, 3, 0, sign=-1)
    small = render.mode_pictures(embedded_model, embedded_svd, [cat_photo], 10, 3, 0, size=112)
    # the oracle: project the image tokens (CLS dropped) on u_0 and v_0 directly, 16 x 16 grid
    tokens = token_embeddings(embedded_model, to_pixels(embedded_model, cat_photo), layers=[10])[0, 0, 1:].double()
    query = (tokens @ embedded_svd.U[10, 3, :, 0]).reshape(16, 16)
    key = (tokens @ embedded_svd.V[10, 3, :, 0]).reshape(16, 16)
    crop = display_crop(embedded_model, cat_photo)
    assert np.array_equal(pictures[0], render.red_cyan(crop, render.normalize_map(query), render.normalize_map(key)))
    assert np.array_equal(flipped[0], render.red_cyan(crop, render.normalize_map(-query), render.normalize_map(-key)))
    assert not np.array_equal(pictures[0], flipped[0])
    assert np.array_equal(small[0], render.thumbnail(pictures[0], 112))
    # the per-position mean maps taken out (sign +1 means, applied to either sign)
    mean_q, mean_k = np.linspace(-1, 1, 256), np.linspace(1, -1, 256)
    content = render.mode_pictures(embedded_model, embedded_svd, [cat_photo], 10, 3, 0, sign=-1,
                                   position=(mean_q, mean_k))
    expected = render.red_cyan(crop, render.normalize_map(-(query - torch.tensor(mean_q).reshape(16, 16))),
                               render.normalize_map(-(key - torch.tensor(mean_k).reshape(16, 16))))
    assert np.array_equal(content[0], expected)


def test_jpeg_bytes_decode_to_the_picture():
    rng = np.random.default_rng(0)
    picture = np.kron(rng.integers(0, 255, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(render.jpeg_bytes(picture, quality=95))))
    assert decoded.shape == picture.shape and np.abs(decoded.astype(int) - picture).mean() < 10  # chroma subsampling
