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
from dataclasses import dataclass
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


def _result(top: RunningTopK, names: list[str], features: Features, k: int, model: str, root: str,
            n_files: int, scored: int, skipped, shard, seconds: float, weights: str = "",
            listing: str = "") -> SearchResult:
    """The :class:`SearchResult` of a finished run: the running top-k brought to the host, its file positions
    turned into the names of the files it holds."""
    shape = (*features.shape, k)
    host = top.cpu()
    scores, index, files = compact(host.scores.reshape(shape), host.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=features.layers, heads=features.heads,
                        modes=features.modes, k=k, model=model, root=root, n_files=n_files, n_images=scored,
                        skipped=sorted(skipped), shard=shard, seconds=seconds, weights=weights, listing=listing)


@dataclass(frozen=True)
class _Listing:
    """The files a search scores: ``names``, the sorted image files under ``root`` (resolved to an absolute path),
    cut to the first ``limit``; ``part``, the parsed shard ``(i, n)`` or None; ``positions``, the indices into
    ``names`` this run scores, in order (``i::n`` of them for a shard)."""

    root: Path
    names: list[str]
    limit: int | None
    part: tuple[int, int] | None
    positions: list[int]


def _list_files(root: str | Path, limit: int | None, shard) -> _Listing:
    """The :class:`_Listing` of ``root``: ImageError when the folder does not exist or holds no image file, then
    ValueError for a ``limit`` below 1, then for a malformed ``shard``."""
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
    return _Listing(root, names, limit, part, positions)


def _stream(model: nn.Module, listing: _Listing, done: int, batch_size: int, workers: int | None, device) -> Stream:
    """The batches of ``listing``'s positions after the first ``done`` (those a checkpoint already holds)."""
    return Stream(FileLoader(listing.root, listing.names), listing.names, listing.positions[done:],
                  model_transform(model), batch_size, workers=workers, device=device)


def _set_up(pool: ThreadPoolExecutor, model: nn.Module, device, stream: _HeadStart | None, svd: QKSVD | None,
            layers, heads, modes, read_qk: bool, for_checkpoint: bool) -> tuple[Features, str | None]:
    """The chosen :class:`Features` (from ``svd``, or the SVD computed here) and the weights' sha256 (the result's
    provenance and part of a checkpoint's key), or None when it is to be hashed beside the search instead
    (:class:`_DigestBeside`).

    The setup runs in this thread, one-threaded; meanwhile ``pool`` hashes the weights when a checkpoint needs
    them for its key now (``for_checkpoint``) or when :func:`_digest_in_line` says so (hashlib releases the GIL),
    and ``stream``, when given, decodes its first batch. Should the setup fail, ``stream`` is closed (its decoding
    stopped) before the error propagates."""
    try:
        svd = svd if svd is not None else qk_svd(model)
        early = pool.submit(weights_digest, model) if for_checkpoint or _digest_in_line(device) else None
        features = Features.select(svd, layers, heads, modes, device=device, model=model, read_qk=read_qk)
        weights = early.result() if early is not None else None
    except BaseException:
        if stream is not None:
            stream.close()
        raise
    return features, weights


def _begin(saved: Checkpoint | None, resume: bool, model: nn.Module, weights: str, listing: _Listing,
           features: Features, k: int, batch_size: int, svd_digest: str) -> Progress:
    """checkpoint/resume: where the run starts. Without a checkpoint, at the first position. With one, the
    checkpoint is first checked against this run's inputs (:func:`run_key`; ``svd_digest``: the digest of a
    caller's SVD, or ``""``) and the run starts after what it holds; CheckpointError names the first input that
    differs, or refuses an existing checkpoint without ``resume``."""
    if saved is None:
        return Progress(total=len(listing.positions))
    key = run_key(model_name(model), weights, listing.root, listing.names, listing.limit, listing.part,
                  features.layers, features.heads, features.modes, k, batch_size, svd_digest)
    return saved.begin(key, listing.names, listing.positions, resume)


class _DigestBeside:
    """The weights' sha256, hashed in ``pool`` beside the search from the first batch of ``stream`` on (read the
    batches from :attr:`batches`). On an accelerator the host's cores are free while the device computes, and by
    the first batch the decoding processes are forked (never beside a running thread)."""

    def __init__(self, pool: ThreadPoolExecutor, model: nn.Module, stream: Stream):
        self.pool, self.model = pool, model
        self._future = None
        self.batches = _OnFirst(stream, self._start)

    def _start(self) -> None:
        self._future = self.pool.submit(weights_digest, self.model)

    def result(self) -> str:
        """The sha256, once the search is done (hashed now if there was no batch at all)."""
        return self._future.result() if self._future is not None else weights_digest(self.model)


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
    listing = _list_files(root, limit, shard)
    svd_digest = modes_digest(svd) if svd is not None and checkpoint is not None else ""
    device = next(model.parameters()).device
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    saved = Checkpoint.of(checkpoint) if checkpoint is not None else None
    if resume and saved is None:
        raise ValueError("resume=True needs checkpoint=PATH: the file the interrupted run saved its state to")
    with ThreadPoolExecutor(2, thread_name_prefix="qklib-search") as pool:
        # On the CPU with a decoding thread, the first batch decodes beside the setup (no worker processes to
        # fork beside running threads); with a checkpoint, the stream starts only after what it holds.
        head_start = saved is None and _decodes_in_thread(device, workers)
        stream = _HeadStart(_stream(model, listing, 0, batch_size, workers, device), pool) if head_start else None
        features, weights = _set_up(pool, model, device, stream, svd, layers, heads, modes, read_qk,
                                    for_checkpoint=saved is not None)
        before = _begin(saved, resume, model, weights, listing, features, k, batch_size, svd_digest)
        if stream is None:
            stream = _stream(model, listing, before.done, batch_size, workers, device)
        late = _DigestBeside(pool, model, stream) if weights is None else None
        start = time.perf_counter()
        top, scored = run(model, stream if late is None else late.batches, features, k, precision, progress,
                          len(listing.positions) - before.done, "search", saved)
        weights = weights if late is None else late.result()
    result = _result(top, listing.names, features, k, model_name(model), str(listing.root), len(listing.names),
                     before.scored + scored, before.skipped + stream.skipped, listing.part,
                     before.seconds + time.perf_counter() - start, weights, listing_digest(None, listing.names))
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
    return _result(top, names, features, k, model_name(model), "", len(names), scored, stream.skipped, None,
                   time.perf_counter() - start)
