"""Checkpoints of a running search, so that a killed search continues where it stopped.

The running top-k state (``[features, k]`` scores and positions, plus any payload) is small and of fixed
size. Every ``every`` images or ``seconds`` seconds (whichever comes first) it is written, moved to the CPU,
to one ``.npz`` file atomically (temporary file, fsync, rename), with how far the run got and everything
the run depends on (:func:`run_key`). A resumed run checks that key, restores the state and continues with
the next batch: batches are cut from the same list at the same boundaries, so the result equals an
uninterrupted run's exactly (same images, same order, same scores; on the same device). A finished run
removes its checkpoint.

Python: ``search(model, root, checkpoint="run.ckpt", resume=True)``; CLI: ``python -m qklib search ROOT
--resume`` (the checkpoint sits next to the output unless ``--checkpoint PATH``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.digest import listing_digest, modes_digest, tensor_digest, weights_digest  # noqa: F401 (re-exported)
from ..core.files import atomic_write
from .results import check_format, read_npz
from .topk import RunningTopK

KIND = "qklib search checkpoint"
FORMAT_VERSION = 1
DEFAULT_EVERY = 10_000  # images
DEFAULT_SECONDS = 120.0
STATE = ("scores", "position", "payload")  # RunningTopK tensors saved and restored (payload when present)

# Names of the run's inputs in messages, in the order they are checked.
INPUTS = {
    "model": "model", "weights": "weights (sha256 of the model's parameters)", "svd": "QK SVD passed as svd=",
    "root": "image folder", "limit": "limit", "shard": "shard", "n_files": "number of image files",
    "files": "image files (names, sizes, times)", "layers": "layers", "heads": "heads", "modes": "modes", "k": "k",
    "batch_size": "batch size",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run: damaged, of other inputs, or one that would be overwritten."""


def run_key(model: str, weights: str, root: Path, names: list[str], limit, shard, layers, heads, modes, k: int,
            batch_size: int, svd: str = "") -> dict:
    """Everything a search's result depends on, as JSON values (``svd``: digest of a caller's QK SVD, or ``""``
    when it is computed from the weights)."""
    return {"model": model, "weights": weights, "svd": svd, "root": str(root), "n_files": len(names),
            "files": listing_digest(root, names), "limit": limit, "shard": list(shard) if shard else None,
            "layers": list(layers), "heads": list(heads), "modes": list(modes), "k": k, "batch_size": batch_size}


def _show(value) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        text = repr(value[:12] + "...")
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Progress:
    """How far a checkpointed run got: ``done`` of ``total`` files consumed, ``scored`` of them scored,
    ``skipped`` [(path, reason)] among them, ``seconds`` spent."""

    done: int = 0
    total: int = 0
    scored: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Checkpoint:
    """Where and how often a search saves its running state: every ``every`` images or ``seconds`` seconds,
    whichever comes first (0 turns that trigger off; both 0: never saved, only resumed from).

    Used by :func:`qklib.search.search`: :meth:`begin` (check or create), :meth:`restore` (into the new
    top-k), :meth:`maybe_save` once per batch, :meth:`finish` (remove the file) once the result is safe.
    """

    path: Path
    every: int = DEFAULT_EVERY
    seconds: float = DEFAULT_SECONDS
    key: dict = field(default_factory=dict, repr=False)
    before: Progress = field(default_factory=Progress, repr=False)

    def __post_init__(self):
        self.path = Path(self.path)
        if self.every < 0 or self.seconds < 0:
            raise ValueError(f"checkpoint intervals must be >= 0 (0: off), got every={self.every}, seconds={self.seconds}")
        self._arrays: dict[str, np.ndarray] = {}
        self._names: list[str] = []
        self._positions: list[int] = []
        self._last_done = 0
        self._last_time = time.monotonic()
        self._started = time.perf_counter()

    @classmethod
    def of(cls, value: "Checkpoint | str | Path") -> "Checkpoint":
        return value if isinstance(value, Checkpoint) else cls(Path(value))

    def read(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The saved ``meta`` and state arrays; CheckpointError naming the file when it cannot be read."""
        arrays, meta = read_npz(self.path, "checkpoint", CheckpointError)
        check_format(self.path, meta, KIND, FORMAT_VERSION, CheckpointError)
        try:
            progress = meta["progress"]
            Progress(done=int(progress["done"]), total=int(progress["total"]), scored=int(progress["scored"]),
                     skipped=[(str(a), str(b)) for a, b in progress["skipped"]], seconds=float(progress["seconds"]))
            if not isinstance(meta["key"], dict) or "scores" not in arrays or "position" not in arrays:
                raise ValueError("no key or state arrays")
        except (KeyError, TypeError, ValueError) as problem:
            raise CheckpointError(f"checkpoint {str(self.path)!r} is damaged ({type(problem).__name__}: {problem}); "
                                  "delete it to start the search over") from None
        return meta, arrays

    def begin(self, key: dict, names: list[str], positions: list[int], resume: bool) -> Progress:
        """Check (``resume=True``) or refuse to overwrite an existing checkpoint; returns where to start.

        ``names``: the sorted file list; ``positions``: the positions this run scores, in order. Raises
        CheckpointError naming the first input that differs from the checkpoint's.
        """
        self.key = json.loads(json.dumps(key))
        self._names, self._positions = names, positions
        self._last_time, self._started = time.monotonic(), time.perf_counter()
        self.before = Progress(total=len(positions))
        if not self.path.exists():
            return self.before
        if not resume:
            raise CheckpointError(
                f"a checkpoint of an interrupted search exists at {str(self.path)!r}; continue it with "
                "resume=True, or delete it to start over")
        meta, arrays = self.read()
        saved = meta["key"]
        for name in [*INPUTS, *sorted((set(saved) | set(self.key)) - set(INPUTS))]:
            if saved.get(name) != self.key.get(name):
                raise CheckpointError(
                    f"checkpoint {str(self.path)!r} belongs to another search: its {INPUTS.get(name, name)} "
                    f"differs (checkpoint: {_show(saved.get(name))}, this run: {_show(self.key.get(name))}); "
                    "run with the checkpoint's inputs, or delete it to start over")
        progress = meta["progress"]
        self.before = Progress(done=int(progress["done"]), total=int(progress["total"]),
                               scored=int(progress["scored"]), skipped=[tuple(s) for s in progress["skipped"]],
                               seconds=float(progress["seconds"]))
        if self.before.total != len(positions) or not 0 <= self.before.done <= len(positions):
            raise CheckpointError(f"checkpoint {str(self.path)!r} is damaged: it has {self.before.done} of "
                                  f"{self.before.total} files done, this run has {len(positions)}; delete it")
        self._arrays = arrays
        self._last_done = self.before.done
        return self.before

    def restore(self, top: RunningTopK) -> None:
        """Load the saved state (if any) into a fresh ``top``, on ``top``'s device and dtypes."""
        if not self._arrays:  # nothing saved: a fresh start
            return
        for name in STATE:
            current = getattr(top, name, None)
            saved = self._arrays.get(name)
            if current is None and saved is None:
                continue
            if current is None or saved is None or tuple(saved.shape) != tuple(current.shape):
                raise CheckpointError(f"checkpoint {str(self.path)!r} holds a top-k {name} of shape "
                                      f"{None if saved is None else saved.shape}, this run needs "
                                      f"{None if current is None else tuple(current.shape)}; delete it")
            setattr(top, name, torch.from_numpy(saved).to(device=current.device, dtype=current.dtype))
        self._arrays = {}

    def maybe_save(self, top: RunningTopK, consumed: int, skipped: list[tuple[str, str]]) -> bool:
        """Call once per batch, after the top-k update: saves when ``every`` images or ``seconds`` have passed.

        ``consumed``: files consumed by this run so far (read or skipped); ``skipped``: the loader's list of
        skipped files (it may run ahead of ``consumed``; only those already consumed are recorded).
        """
        done = self.before.done + consumed
        due_images = self.every and done - self._last_done >= self.every
        due_time = self.seconds and time.monotonic() - self._last_time >= self.seconds
        if not (due_images or due_time):
            return False
        self.save(top, done, skipped)
        return True

    def save(self, top: RunningTopK, done: int, skipped: list[tuple[str, str]]) -> None:
        """Write the state after ``done`` files of this run's positions (absolute count), atomically."""
        consumed = {self._names[p] for p in self._positions[self.before.done : done]}
        new = [tuple(s) for s in list(skipped) if s[0] in consumed]
        progress = {"done": done, "total": len(self._positions), "scored": done - len(self.before.skipped) - len(new),
                    "skipped": [list(s) for s in self.before.skipped + new],
                    "seconds": self.before.seconds + time.perf_counter() - self._started}
        meta = {"kind": KIND, "format": FORMAT_VERSION, "key": self.key, "progress": progress}
        arrays = {name: getattr(top, name).detach().to("cpu").numpy() for name in STATE
                  if getattr(top, name, None) is not None}
        with atomic_write(self.path) as handle:
            np.savez(handle, meta=np.array(json.dumps(meta)), **arrays)
        self._last_done, self._last_time = done, time.monotonic()

    def finish(self) -> None:
        """Remove the checkpoint: the run it belongs to is complete (and its result saved)."""
        self.path.unlink(missing_ok=True)
