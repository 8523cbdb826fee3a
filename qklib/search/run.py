"""The streaming optimal-image search: one forward pass per batch, every chosen feature scored at once.

Per batch: decode (in worker processes, :class:`qklib.core.stream.Stream`), run the model up to the last chosen
layer's qkv, read every feature's projections from the model's own q and k (:mod:`.features`), update the running
top-k on the model's device. Nothing comes back to the host until the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..core.images import ImageError, image_files, model_transform
from ..core.models import model_name
from ..core.stream import Batch, FileLoader, Stream, default_workers
from ..core.svd import QKSVD, qk_svd
from .checkpoint import Checkpoint, Progress, listing_digest, modes_digest, run_key, weights_digest
from .features import Features, forward_precision
from .indices import parse_shard
from .results import SearchResult, compact
from .topk import RunningTopK


def run(model: nn.Module, batches: Iterable[Batch], features: Features, k: int, precision: str = "fp32",
        progress: bool = False, total: int | None = None, desc: str = "search",
        checkpoint: Checkpoint | None = None) -> tuple[RunningTopK, int]:
    """Score ``batches`` of ``(positions [b], pixels [b, 3, S, S] or None, files consumed)``: the running top-k
    (on the model's device) and the number of images scored. With ``checkpoint``, start from its saved top-k
    and save the state every N images or T seconds (it comes to the host only then)."""
    device = next(model.parameters()).device
    top = RunningTopK(features.count, k, device=device)
    if checkpoint is not None:  # checkpoint/resume: the saved running top-k, if any
        checkpoint.restore(top)
    done = 0
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
                if checkpoint is not None:  # checkpoint/resume: save every N images or T seconds
                    done += consumed
                    checkpoint.maybe_save(top, done, batches.skipped)
    finally:
        if bar is not None:
            bar.close()
    return top, scored


def _digest_in_line(device) -> bool:
    """Whether :func:`search` hashes the weights before the search (beside the one-threaded feature setup) rather
    than beside the search. On the CPU every core runs the forward pass, and a hashing thread beside torch's
    threads stalls them at each synchronisation: before (~0.05 s for ViT-S/14, ~1 s for ViT-L/16, mostly hidden
    behind the setup). On an accelerator the host's cores are free while the device computes: beside the search,
    from the first batch on."""
    return torch.device(device).type == "cpu"


def _decodes_in_thread(device, workers: int | None) -> bool:
    """Whether a search on ``device`` decodes in a background thread on the CPU (then it starts decoding before
    the feature setup; worker processes are forked only once no other thread runs)."""
    device = torch.device(device)
    return device.type == "cpu" and (default_workers(device) if workers is None else workers) == 0


class _HeadStart:
    """``stream`` (a :class:`Stream`) whose first batch is fetched in ``pool`` from construction on, so that
    decoding it overlaps what the caller does meanwhile; then the rest, in order. ``skipped`` passes through;
    :meth:`close` stops the decoding when the batches are not wanted after all."""

    def __init__(self, stream: Stream, pool: ThreadPoolExecutor):
        self.stream = stream
        self._batches = iter(stream)
        self._first = pool.submit(next, self._batches, None)  # a batch is a tuple, never None

    @property
    def skipped(self):
        return self.stream.skipped

    def __iter__(self):
        first = self._first.result()
        if first is None:
            return
        yield first
        yield from self._batches

    def close(self) -> None:
        self._first.exception()  # wait for the first fetch: a generator cannot be closed while it runs
        self._batches.close()


class _OnFirst:
    """``batches`` (a :class:`Stream`), calling ``hook()`` when the first batch arrives; ``skipped`` passes through
    (the checkpoint reads it between batches)."""

    def __init__(self, batches: Stream, hook):
        self.batches, self.hook = batches, hook

    @property
    def skipped(self):
        return self.batches.skipped

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            if index == 0:
                self.hook()
            yield batch


def _finish(top: RunningTopK, names: list[str], features: Features, k: int, model: str, root: str,
            n_files: int, scored: int, skipped, shard, seconds: float, weights: str = "",
            listing: str = "") -> SearchResult:
    shape = (*features.shape, k)
    host = top.cpu()
    scores, index, files = compact(host.scores.reshape(shape), host.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=features.layers, heads=features.heads,
                        modes=features.modes, k=k, model=model, root=root, n_files=n_files, n_images=scored,
                        skipped=sorted(skipped), shard=shard, seconds=seconds, weights=weights, listing=listing)


def search(model: nn.Module, root: str | Path, layers=None, heads=None, modes=None, k: int = 8,
           batch_size: int = 32, shard=None, svd: QKSVD | None = None, progress: bool = True,
           limit: int | None = None, checkpoint: Checkpoint | str | Path | None = None, resume: bool = False,
           out: str | Path | None = None, precision: str = "fp32", workers: int | None = None,
           read_qk: bool = True) -> SearchResult:
    """Top-``k`` images under ``root`` for every chosen (layer, head, mode, sign); see the module docstring.

    ``layers``/``heads``/``modes``: ``None``/``"all"``, a list or a string like ``"0,3-5"`` (0-based).
    ``shard``: ``"i/n"`` to score files ``i::n`` of the sorted list only (merge the n results with :func:`merge`).
    ``limit``: score only the first ``limit`` files of the sorted list (before sharding), for quick looks.
    ``precision``: the forward pass in ``"fp32"`` (default), ``"bf16"`` or ``"tf32"`` (projections stay float32).
    ``workers``: decoding processes (None: from the CPU count; 0: a background thread).
    ``read_qk``: read projections from the model's q and k (False: project the tokens directly, the oracle).

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
    svd_digest = modes_digest(svd) if svd is not None and checkpoint is not None else ""
    device = next(model.parameters()).device
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    saved = Checkpoint.of(checkpoint) if checkpoint is not None else None
    before = Progress(total=len(positions))
    if resume and saved is None:
        raise ValueError("resume=True needs checkpoint=PATH: the file the interrupted run saved its state to")

    def stream_from(done: int) -> Stream:
        return Stream(FileLoader(root, names), names, positions[done:], model_transform(model), batch_size,
                      workers=workers, device=device)

    with ThreadPoolExecutor(2, thread_name_prefix="qklib-search") as pool:
        # Beside the one-threaded feature setup (and the SVD, when it is computed here): on the CPU, decoding the
        # first batch when a thread decodes (no worker processes to fork beside running threads), and hashing
        # the weights (see _digest_in_line; hashlib releases the GIL). The weights' sha256 is the result's
        # provenance and part of a checkpoint's key (which needs it now, and the stream only after).
        stream = _HeadStart(stream_from(0), pool) if saved is None and _decodes_in_thread(device, workers) else None
        try:
            svd = svd if svd is not None else qk_svd(model)
            early = pool.submit(weights_digest, model) if saved is not None or _digest_in_line(device) else None
            features = Features.select(svd, layers, heads, modes, device=device, model=model, read_qk=read_qk)
            weights = early.result() if early is not None else None
        except BaseException:
            if stream is not None:
                stream.close()
            raise
        # checkpoint/resume: check the checkpoint against this run's inputs and start after what it holds
        if saved is not None:
            key = run_key(model_name(model), weights, root, names, limit, part, features.layers, features.heads,
                          features.modes, k, batch_size, svd_digest)
            before = saved.begin(key, names, positions, resume)
        if stream is None:
            stream = stream_from(before.done)
        # On an accelerator, the digest is hashed beside the search from the first batch on (the decoding processes
        # are forked by then, never beside a running thread): the host's cores are free while the device computes.
        pending = []

        def start_digest():
            pending.append(pool.submit(weights_digest, model))

        batches = stream if weights is not None else _OnFirst(stream, start_digest)
        start = time.perf_counter()
        top, scored = run(model, batches, features, k, precision, progress, len(positions) - before.done, "search",
                          saved)
        if weights is None:
            weights = pending[0].result() if pending else weights_digest(model)  # no batch at all: hash it now
    result = _finish(top, names, features, k, model_name(model), str(root), len(names), before.scored + scored,
                     before.skipped + stream.skipped, part, before.seconds + time.perf_counter() - start, weights,
                     listing_digest(None, names))
    if out is not None:
        result.save(out)
    if saved is not None:
        saved.finish()
    return result


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
