"""The streaming optimal-image search: one forward pass per batch, every chosen feature scored at once."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..core.extract import stream_layers
from ..core.images import ImageError, image_files, model_transform, open_rgb
from ..core.models import model_name, prefix_tokens
from ..core.stream import Stream
from ..core.svd import QKSVD, qk_svd
from .features import Features, feature_scores
from .indices import parse_shard
from .results import SearchResult, compact
from .topk import RunningTopK


def _run(model: nn.Module, svd: QKSVD, stream: Stream, features: Features, k: int, progress: bool,
         total: int, desc: str) -> tuple[RunningTopK, int]:
    prefix = prefix_tokens(model)
    device = next(model.parameters()).device
    top = RunningTopK(features.count, k)
    per_layer: dict[int, torch.Tensor] = {}

    def on_tokens(layer: int, x: torch.Tensor) -> None:
        projected = x[:, prefix:] @ features.projection[layer]  # [B, T, 2F]
        per_layer[layer] = feature_scores(projected)  # [B, H'M', 2]

    bar = None
    if progress:
        bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)
    scored = 0
    try:
        for position, pixels, consumed in stream:
            if pixels is not None:
                per_layer.clear()
                stream_layers(model, pixels.to(device), features.layers, on_tokens=on_tokens)
                scores = torch.cat([per_layer[layer] for layer in features.layers], 1)  # [B, F/2, 2]
                top.update(scores.reshape(scores.shape[0], -1).T, position)
                scored += len(position)
            if bar is not None:
                bar.update(consumed)
    finally:
        if bar is not None:
            bar.close()
    return top, scored


def _finish(top: RunningTopK, names: list[str], features: Features, k: int, model: str, root: str,
            n_files: int, scored: int, skipped, shard, seconds: float) -> SearchResult:
    shape = (*features.shape, k)
    scores, index, files = compact(top.scores.reshape(shape), top.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=features.layers, heads=features.heads,
                        modes=features.modes, k=k, model=model, root=root, n_files=n_files, n_images=scored,
                        skipped=sorted(skipped), shard=shard, seconds=seconds)


def search(model: nn.Module, root: str | Path, layers=None, heads=None, modes=None, k: int = 8,
           batch_size: int = 32, shard=None, svd: QKSVD | None = None, progress: bool = True,
           limit: int | None = None) -> SearchResult:
    """Top-``k`` images under ``root`` for every chosen (layer, head, mode, sign); see the module docstring.

    ``layers``/``heads``/``modes``: ``None``/``"all"``, a list or a string like ``"0,3-5"`` (0-based).
    ``shard``: ``"i/n"`` to score files ``i::n`` of the sorted list only (merge the n results with :func:`merge`).
    ``limit``: score only the first ``limit`` files of the sorted list (before sharding), for quick looks.
    """
    root = Path(root).expanduser()
    names = image_files(root)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        names = names[:limit]
    part = parse_shard(shard)
    positions = list(range(len(names)))
    if part:
        positions = positions[part[0] :: part[1]]
    svd = svd if svd is not None else qk_svd(model)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, heads, modes, device=device)
    stream = Stream(lambda p: open_rgb(root / names[p]), names, positions, model_transform(model), batch_size)
    start = time.perf_counter()
    top, scored = _run(model, svd, stream, features, k, progress, len(positions), "search")
    return _finish(top, names, features, k, model_name(model), str(root), len(names), scored, stream.skipped, part,
                   time.perf_counter() - start)


def search_images(model: nn.Module, images: Mapping[str, object], layers=None, heads=None, modes=None, k: int = 8,
                  batch_size: int = 32, svd: QKSVD | None = None, progress: bool = False) -> SearchResult:
    """Like :func:`search` over in-memory PIL images ``{name: image}`` (names play the role of paths)."""
    names = sorted(images)
    if not names:
        raise ImageError("search_images needs at least one image")
    svd = svd if svd is not None else qk_svd(model)
    features = Features.select(svd, layers, heads, modes, device=next(model.parameters()).device)
    stream = Stream(lambda p: images[names[p]].convert("RGB"), names, list(range(len(names))),
                    model_transform(model), batch_size)
    start = time.perf_counter()
    top, scored = _run(model, svd, stream, features, k, progress, len(names), "search")
    return _finish(top, names, features, k, model_name(model), "", len(names), scored, stream.skipped, None,
                   time.perf_counter() - start)
