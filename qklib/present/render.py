"""Pictures of token maps: a mode's query map in red and key map in cyan over the photo (paper Fig 1, 4, 5),
percentile normalisation as the authors drew them, thumbnails, mosaics and JPEG bytes for static pages."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..analyses.modes import mode_maps
from ..core.extract import token_embeddings
from ..core.images import display_crop, to_pixels
from ..core.models import info
from ..core.svd import QKSVD

# The authors normalised each map between these percentiles before drawing it.
LOW_PERCENTILE = 30.0
HIGH_PERCENTILE = 95.0


def normalize_map(values, low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE) -> np.ndarray:
    """Map values to [0, 1] between their ``low`` and ``high`` percentiles (clipped), as the authors drew them.

    A constant map becomes all zeros.
    """
    values = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    lo, hi = np.percentile(values, [low, high])
    if not hi > lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def upsample(map01: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``[rows, cols]`` -> ``[H, W]`` by bilinear interpolation (token centres on pixel centres)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    tensor = torch.as_tensor(np.asarray(map01, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def red_cyan(photo: np.ndarray, query01: np.ndarray, key01: np.ndarray, dim: float = 0.45) -> np.ndarray:
    """Draw a query map in red and a key map in cyan over a photo: white where both are high.

    ``photo``: ``[H, W, 3]`` uint8 (the crop the model sees, ``qklib.images.display_crop``).
    ``query01``, ``key01``: maps in [0, 1] on the token grid (or already at ``H x W``); they are upsampled.
    Colour = (query, key, key); it is laid over a dimmed grey copy of the photo with opacity max(query, key),
    so a pure query region is red (255, 0, 0), a pure key region cyan (0, 255, 255), both white, neither the
    dimmed photo. Returns ``[H, W, 3]`` uint8.
    """
    photo = np.asarray(photo)
    if photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"photo must be [H, W, 3], got shape {photo.shape}")
    height, width = photo.shape[:2]
    query = upsample(query01, (height, width))
    key = upsample(key01, (height, width))
    grey = photo.astype(np.float32).mean(-1, keepdims=True) / 255.0 * dim
    colour = np.stack([query, key, key], -1)
    alpha = np.maximum(query, key)[..., None]
    out = grey * (1 - alpha) + colour * alpha
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def render_mode(photo: np.ndarray, query: torch.Tensor | np.ndarray, key: torch.Tensor | np.ndarray,
                low: float = LOW_PERCENTILE, high: float = HIGH_PERCENTILE) -> np.ndarray:
    """Red/cyan picture of one image's raw query and key maps, each normalised between its own percentiles."""
    return red_cyan(photo, normalize_map(query, low, high), normalize_map(key, low, high))


def thumbnail(array: np.ndarray, size: int = 112) -> np.ndarray:
    """Square ``size`` px copy of an ``[H, W, 3]`` uint8 picture (for pages that must stay small)."""
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.LANCZOS))


def mode_pictures(model, svd: QKSVD, images, layer: int, head: int, mode: int, sign: int = 1,
                  size: int | None = None, tokens: torch.Tensor | None = None,
                  position: tuple | None = None) -> list[np.ndarray]:
    """Red/cyan pictures of one mode for a list of PIL images (tokens computed unless given as ``[B, T, d]``).
    ``position``: ``(query_mean, key_mean)``, the mode's per-position mean maps (``[N]``, sign +1;
    :func:`qklib.analyses.modes.position_shares`), subtracted first: the pictures then show the content part of the
    maps, what position alone does not explain."""
    meta = info(model)
    if tokens is None:
        tokens = token_embeddings(model, to_pixels(model, list(images)), layers=[layer])[0]
    query, key = mode_maps(svd, tokens, layer, head, mode, meta.prefix_tokens, sign, meta.grid)
    if position is not None:
        query, key = (m - sign * torch.as_tensor(np.asarray(mean), dtype=m.dtype).reshape(m.shape[-2:])
                      for m, mean in zip((query, key), position))
    pictures = [render_mode(display_crop(model, image), q, k) for image, q, k in zip(images, query, key)]
    return [thumbnail(p, size) for p in pictures] if size else pictures


def mosaic(pictures: list[np.ndarray], columns: int, gap: int = 2, fill: int = 255) -> np.ndarray:
    """Tile equally sized ``[h, w, 3]`` pictures row by row, ``columns`` per row, with a ``gap`` px border."""
    if not pictures:
        raise ValueError("mosaic needs at least one picture")
    height, width = pictures[0].shape[:2]
    rows = -(-len(pictures) // columns)
    out = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), fill, np.uint8)
    for index, picture in enumerate(pictures):
        row, col = divmod(index, columns)
        out[row * (height + gap) : row * (height + gap) + height, col * (width + gap) : col * (width + gap) + width] = picture
    return out


def jpeg_bytes(array: np.ndarray, quality: int = 80) -> bytes:
    """JPEG-encoded ``[H, W, 3]`` uint8 (photos with colour maps are ~5x smaller than PNG)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
