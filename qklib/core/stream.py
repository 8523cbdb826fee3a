"""Batches of decoded, preprocessed images for every streaming path (search, same-object probability,
attention preference, anisotropy), in a fixed order, with unreadable files counted and skipped."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .images import ImageError


@dataclass
class Stream:
    """Batches of ``(positions [b] long, pixels [b, 3, S, S])`` decoded by one background thread.

    At most ``prefetch`` batches wait in memory. ``skipped`` collects ``(relative path, reason)`` of files
    that could not be read; ``done`` counts files consumed.
    """

    loader: Callable[[int], object]  # position -> PIL image (raises ImageError)
    names: list[str]
    positions: list[int]
    transform: Callable
    batch_size: int
    prefetch: int = 2
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
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
                for start in range(0, len(self.positions), self.batch_size):
                    chunk = self.positions[start : start + self.batch_size]
                    kept, pixels = [], []
                    for position in chunk:
                        try:
                            pixels.append(self.transform(self.loader(position)))
                            kept.append(position)
                        except ImageError as error:
                            self.skipped.append((self.names[position], str(error)))
                    if not put((torch.tensor(kept, dtype=torch.long),
                                torch.stack(pixels) if pixels else None, len(chunk))):
                        return
                put(None)
            except BaseException as error:  # surface loader bugs in the consumer
                put(error)

        thread = threading.Thread(target=work, daemon=True, name="qklib-search-loader")
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
