"""The streaming optimal-image search: one forward pass per batch, every chosen feature scored at once.

Per batch: decode (in worker processes, :class:`qklib.core.stream.Stream`), run the model up to the last chosen
layer's qkv, read every feature's projections from the model's own q and k (:mod:`.features`), update the running
top-k on the model's device. Nothing comes back to the host until the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn
from tqdm import tqdm

from ..core.images import ImageError, image_files, model_transform
from ..core.models import model_name
from ..core.stream import Batch, FileLoader, Stream
from ..core.svd import QKSVD, qk_svd
from .features import Features, forward_precision
from .indices import parse_shard
from .results import SearchResult, compact
from .topk import RunningTopK


def run(model: nn.Module, batches: Iterable[Batch], features: Features, k: int, precision: str = "fp32",
        progress: bool = False, total: int | None = None, desc: str = "search") -> tuple[RunningTopK, int]:
    """Score ``batches`` of ``(positions [b], pixels [b, 3, S, S] or None, files consumed)``: the running top-k
    (on the model's device) and the number of images scored."""
    device = next(model.parameters()).device
    top = RunningTopK(features.count, k, device=device)
    scored = 0
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False) if progress else None
    try:
        with forward_precision(precision, device):
            for position, pixels, consumed in batches:
                if pixels is not None:
                    top.update(features.scores(model, pixels).T, position)  # [count, b]
                    scored += len(position)
                if bar is not None:
                    bar.update(consumed)
                # Here, between batches, (top, scored) is the complete state of the files consumed so far.
    finally:
        if bar is not None:
            bar.close()
    return top, scored


def _finish(top: RunningTopK, names: list[str], features: Features, k: int, model: str, root: str,
            n_files: int, scored: int, skipped, shard, seconds: float) -> SearchResult:
    shape = (*features.shape, k)
    host = top.cpu()
    scores, index, files = compact(host.scores.reshape(shape), host.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=features.layers, heads=features.heads,
                        modes=features.modes, k=k, model=model, root=root, n_files=n_files, n_images=scored,
                        skipped=sorted(skipped), shard=shard, seconds=seconds)


def search(model: nn.Module, root: str | Path, layers=None, heads=None, modes=None, k: int = 8,
           batch_size: int = 32, shard=None, svd: QKSVD | None = None, progress: bool = True,
           limit: int | None = None, precision: str = "fp32", workers: int | None = None,
           read_qk: bool = True) -> SearchResult:
    """Top-``k`` images under ``root`` for every chosen (layer, head, mode, sign); see the module docstring.

    ``layers``/``heads``/``modes``: ``None``/``"all"``, a list or a string like ``"0,3-5"`` (0-based).
    ``shard``: ``"i/n"`` to score files ``i::n`` of the sorted list only (merge the n results with :func:`merge`).
    ``limit``: score only the first ``limit`` files of the sorted list (before sharding), for quick looks.
    ``precision``: the forward pass in ``"fp32"`` (default), ``"bf16"`` or ``"tf32"`` (projections stay float32).
    ``workers``: decoding processes (None: from the CPU count; 0: a background thread).
    ``read_qk``: read projections from the model's q and k (False: project the tokens directly, the oracle).
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
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    svd = svd if svd is not None else qk_svd(model)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, heads, modes, device=device, model=model, read_qk=read_qk)
    stream = Stream(FileLoader(root, names), names, positions, model_transform(model), batch_size,
                    workers=workers, device=device)
    start = time.perf_counter()
    top, scored = run(model, stream, features, k, precision, progress, len(positions))
    return _finish(top, names, features, k, model_name(model), str(root), len(names), scored, stream.skipped, part,
                   time.perf_counter() - start)


def search_images(model: nn.Module, images: Mapping[str, object], layers=None, heads=None, modes=None, k: int = 8,
                  batch_size: int = 32, svd: QKSVD | None = None, progress: bool = False, precision: str = "fp32",
                  read_qk: bool = True) -> SearchResult:
    """Like :func:`search` over in-memory PIL images ``{name: image}`` (names play the role of paths)."""
    names = sorted(images)
    if not names:
        raise ImageError("search_images needs at least one image")
    svd = svd if svd is not None else qk_svd(model)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, heads, modes, device=device, model=model, read_qk=read_qk)
    stream = Stream(lambda p: images[names[p]].convert("RGB"), names, list(range(len(names))),
                    model_transform(model), batch_size, workers=0, device=device)  # in memory: no processes
    start = time.perf_counter()
    top, scored = run(model, stream, features, k, precision, progress, len(names))
    return _finish(top, names, features, k, model_name(model), "", len(names), scored, stream.skipped, None,
                   time.perf_counter() - start)
