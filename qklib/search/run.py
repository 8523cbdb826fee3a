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
from .checkpoint import Checkpoint, Progress, listing_digest, run_key, tensor_digest, weights_digest
from .features import Features, feature_scores
from .indices import parse_shard
from .results import SearchResult, compact
from .topk import RunningTopK


def _run(model: nn.Module, svd: QKSVD, stream: Stream, features: Features, k: int, progress: bool,
         total: int, desc: str, checkpoint: Checkpoint | None = None) -> tuple[RunningTopK, int]:
    prefix = prefix_tokens(model)
    device = next(model.parameters()).device
    top = RunningTopK(features.count, k)
    if checkpoint is not None:  # checkpoint/resume: the saved running top-k, if any
        checkpoint.restore(top)
    done = 0
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
            if checkpoint is not None:  # checkpoint/resume: save every N images or T seconds
                done += consumed
                checkpoint.maybe_save(top, done, stream.skipped)
    finally:
        if bar is not None:
            bar.close()
    return top, scored


def _finish(top: RunningTopK, names: list[str], features: Features, k: int, model: str, root: str,
            n_files: int, scored: int, skipped, shard, seconds: float, weights: str = "",
            listing: str = "") -> SearchResult:
    shape = (*features.shape, k)
    scores, index, files = compact(top.scores.cpu().reshape(shape), top.position.cpu().reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=features.layers, heads=features.heads,
                        modes=features.modes, k=k, model=model, root=root, n_files=n_files, n_images=scored,
                        skipped=sorted(skipped), shard=shard, seconds=seconds, weights=weights, listing=listing)


def search(model: nn.Module, root: str | Path, layers=None, heads=None, modes=None, k: int = 8,
           batch_size: int = 32, shard=None, svd: QKSVD | None = None, progress: bool = True,
           limit: int | None = None, checkpoint: Checkpoint | str | Path | None = None, resume: bool = False,
           out: str | Path | None = None) -> SearchResult:
    """Top-``k`` images under ``root`` for every chosen (layer, head, mode, sign); see the module docstring.

    ``layers``/``heads``/``modes``: ``None``/``"all"``, a list or a string like ``"0,3-5"`` (0-based).
    ``shard``: ``"i/n"`` to score files ``i::n`` of the sorted list only (merge the n results with :func:`merge`).
    ``limit``: score only the first ``limit`` files of the sorted list (before sharding), for quick looks.
    The result's ``root`` is ``root`` resolved to an absolute path.

    Interruption (see ``qklib.search.checkpoint``): ``checkpoint`` is a file where the running state is
    saved atomically every 10,000 images or 120 s (a :class:`~qklib.search.checkpoint.Checkpoint` sets other
    intervals). ``resume=True`` continues from it and gives exactly the uninterrupted run's result (same
    batch size and device); a checkpoint of other inputs (model, weights, folder or its files, limit, shard,
    layers, heads, modes, k, batch size) is refused with a
    :class:`~qklib.search.checkpoint.CheckpointError` naming the input that differs, and so is an existing
    checkpoint without ``resume=True`` (it is never silently overwritten). ``out``: save the result there
    (atomically) before the finished run removes its checkpoint. Example::

        search(model, "/data/val", out="val.npz", checkpoint="val.ckpt", resume=True)  # rerun until it returns
    """
    root = Path(root).expanduser().resolve()
    names = image_files(root)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        names = names[:limit]
    part = parse_shard(shard)
    positions = list(range(len(names)))
    if part:
        positions = positions[part[0] :: part[1]]
    svd_digest = tensor_digest(svd.U, svd.S, svd.V) if svd is not None and checkpoint is not None else ""
    svd = svd if svd is not None else qk_svd(model)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, heads, modes, device=device)
    weights = weights_digest(model)
    # checkpoint/resume: check the checkpoint against this run's inputs and start after what it holds
    saved = Checkpoint.of(checkpoint) if checkpoint is not None else None
    before = Progress(total=len(positions))
    if saved is not None:
        key = run_key(model_name(model), weights, root, names, limit, part, features.layers, features.heads,
                      features.modes, k, batch_size, svd_digest)
        before = saved.begin(key, names, positions, resume)
    elif resume:
        raise ValueError("resume=True needs checkpoint=PATH: the file the interrupted run saved its state to")
    stream = Stream(lambda p: open_rgb(root / names[p]), names, positions[before.done :], model_transform(model),
                    batch_size)
    start = time.perf_counter()
    top, scored = _run(model, svd, stream, features, k, progress, len(positions) - before.done, "search", saved)
    result = _finish(top, names, features, k, model_name(model), str(root), len(names), before.scored + scored,
                     before.skipped + stream.skipped, part, before.seconds + time.perf_counter() - start, weights,
                     listing_digest(None, names))
    if out is not None:
        result.save(out)
    if saved is not None:
        saved.finish()
    return result


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
