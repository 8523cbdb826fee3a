"""Batches of decoded, preprocessed images for every streaming path, in a fixed order, with unreadable files
counted and skipped.

Decoding and preprocessing run off the main thread: in ``workers`` worker processes
(``torch.utils.data.DataLoader``, one batch per task, ``prefetch`` batches per worker in flight), or with
``workers=0`` in one background thread of this process. Either way the batches arrive in the order of
``positions``, and ``skipped`` lists the unreadable files in that order. On CUDA the batches are pinned and
copied with ``non_blocking``, so the copy overlaps the previous batch's compute.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .images import ImageError, open_rgb

Batch = tuple[torch.Tensor, torch.Tensor | None, int]  # (positions [b] long, pixels [b, 3, S, S] or None, files consumed)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(device: str | torch.device = "cpu") -> int:
    """Decoding processes for a device, from the CPU count.

    On CUDA the forward pass is fast and decoding is the bottleneck (~200 images/s per process for
    ImageNet-sized JPEGs): all CPUs but one (which drives the GPU), at most 16. On the CPU the forward pass
    itself needs the cores: one background thread up to 4 CPUs (measured on 2 shared cores: processes were no
    faster than the thread), then one process per 8 CPUs.
    """
    cpus = cpu_count()
    if torch.device(device).type == "cuda":
        return max(0, min(16, cpus - 1))
    return 0 if cpus <= 4 else max(1, cpus // 8)


@dataclass
class FileLoader:
    """``position -> PIL image`` of ``root / names[position]`` (picklable, for worker processes)."""

    root: Path
    names: list[str]

    def __call__(self, position: int):
        return open_rgb(Path(self.root) / self.names[position])


class _Batches(Dataset):
    """Item ``i``: the ``i``-th batch of positions, decoded: ``(positions, pixels or None, consumed, skipped)``."""

    def __init__(self, loader, names, positions, transform, batch_size):
        self.loader, self.names, self.positions = loader, names, positions
        self.transform, self.batch_size = transform, batch_size

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __getitem__(self, index: int):
        chunk = self.positions[index * self.batch_size : (index + 1) * self.batch_size]
        kept, pixels, skipped = [], [], []
        for position in chunk:
            try:
                pixels.append(self.transform(self.loader(position)))
                kept.append(position)
            except ImageError as error:
                skipped.append((self.names[position], str(error)))
        return torch.tensor(kept, dtype=torch.long), torch.stack(pixels) if pixels else None, len(chunk), skipped


def _as_is(item):
    return item


@dataclass
class Stream:
    """Batches of ``(positions [b] long, pixels [b, 3, S, S] or None, files consumed)``, on ``device``.

    ``workers``: decoding processes (None: :func:`default_workers` for ``device``; 0: one background
    thread). At most ``prefetch`` batches (per worker) wait in memory. ``skipped`` collects
    ``(relative path, reason)`` of files that could not be read, in file order.
    """

    loader: Callable[[int], object]  # position -> PIL image (raises ImageError)
    names: list[str]
    positions: list[int]
    transform: Callable
    batch_size: int
    prefetch: int = 2
    skipped: list[tuple[str, str]] = field(default_factory=list)
    workers: int | None = None
    device: str | torch.device = "cpu"

    def __iter__(self) -> Iterator[Batch]:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        device = torch.device(self.device)
        workers = default_workers(device) if self.workers is None else self.workers
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0: decode in a background thread), got {workers}")
        batches = _Batches(self.loader, self.names, self.positions, self.transform, self.batch_size)
        pin = device.type == "cuda"
        source = self._threaded(batches, pin) if workers == 0 else self._processes(batches, workers, pin)
        try:
            for kept, pixels, consumed, skipped in source:
                self.skipped.extend((str(name), str(reason)) for name, reason in skipped)
                if pixels is not None:
                    kept = kept.to(device, non_blocking=True)
                    pixels = pixels.to(device, non_blocking=True)
                yield kept, pixels, consumed
        finally:
            source.close()

    def _processes(self, batches: _Batches, workers: int, pin: bool):
        loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                            pin_memory=pin, prefetch_factor=self.prefetch)
        iterator = iter(loader)
        try:
            yield from iterator
        finally:
            del iterator  # shuts the worker processes down when the consumer stops early

    def _threaded(self, batches: _Batches, pin: bool):
        box: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    box.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for index in range(len(batches)):
                    kept, pixels, consumed, skipped = batches[index]
                    if pin and pixels is not None:
                        kept, pixels = kept.pin_memory(), pixels.pin_memory()
                    if not put((kept, pixels, consumed, skipped)):
                        return
                put(None)
            except BaseException as error:  # surface loader bugs in the consumer
                put(error)

        thread = threading.Thread(target=work, daemon=True, name="qklib-stream-loader")
        thread.start()
        try:
            while True:
                item = box.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
