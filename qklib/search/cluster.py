"""A sharded search as one job array: every shard ``i/N`` a task that runs :func:`qklib.search.search` with
``shard=(i, N)``, a checkpoint and ``resume=True``, writing ``OUT/shard-i-of-N.npz``.

Files on disk are the source of truth. :func:`shard_status` reads ``OUT``: a shard with a readable result of this
split is done; every other shard (absent, failed, cancelled, a damaged file) is submitted again by the same command,
and continues from its checkpoint when it has one. A task killed by preemption or its time limit is requeued by
submitit (:meth:`ShardTask.checkpoint`) and continues from the checkpoint it saved at most
``checkpoint_seconds`` earlier, which is kept below Slurm's signal delay; a task cancelled with ``scancel``
loses at most as much. When all N results are present, :func:`merge_shards` writes ``OUT/search.npz``: exactly the
single-run result (``qklib.search.results.merge``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.cluster import failure, import_submitit, queued_tasks
from ..core.models import load_model
from .checkpoint import Checkpoint
from .results import READ_ERRORS, ResultError, SearchResult, load_result, merge, resolved_root, shard_filename
from .run import search


def checkpoint_path(result: Path) -> Path:
    """Where the search writing ``result`` keeps its running state (the CLI's default: ``RESULT.checkpoint``)."""
    return result.with_name(result.name + ".checkpoint")


@dataclass
class ShardTask:
    """One shard of a search as a picklable callable: ``task(i)`` searches shard ``i/shards`` of ``root`` and saves
    ``out/shard-i-of-N.npz``, resuming from its checkpoint. submitit calls :meth:`checkpoint` on preemption or
    timeout and requeues the returned submission, which resumes the same way.

    ``model``: :func:`qklib.load_model` arguments (``name``, ``weights``, ``part``, ``seed``); ``options``:
    :func:`qklib.search.search` arguments (``layers``, ``heads``, ``modes``, ``k``, ``batch_size``, ``limit``,
    ``precision``).
    """

    root: str
    out: str
    shards: int
    model: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    checkpoint_every: int = 10_000
    checkpoint_seconds: float = 30.0

    def result_path(self, index: int) -> Path:
        return Path(self.out) / shard_filename((index, self.shards))

    def __call__(self, index: int) -> dict:
        if not 0 <= index < self.shards:
            raise ValueError(f"shard {index} does not exist: shards are 0..{self.shards - 1}")
        out = self.result_path(index)
        model = load_model(device=self.device, **self.model)
        checkpoint = Checkpoint(checkpoint_path(out), every=self.checkpoint_every, seconds=self.checkpoint_seconds)
        result = search(model, self.root, shard=(index, self.shards), checkpoint=checkpoint, resume=True, out=out,
                        progress=False, **self.options)
        if checkpoint.before.done:  # in the job's log: a requeued or resubmitted shard continued, not restarted
            print(f"shard {index}/{self.shards}: resumed from its checkpoint at {checkpoint.before.done} of "
                  f"{checkpoint.before.total} files", flush=True)
        print(result.summary(), flush=True)
        return {"shard": index, "images": result.n_images, "skipped": result.skipped, "seconds": result.seconds}

    def checkpoint(self, index: int):
        """On preemption or timeout: the same shard again (it resumes from its checkpoint file)."""
        return import_submitit().helpers.DelayedSubmission(self, index)


@dataclass
class ShardStatus:
    """What ``OUT`` holds of an N-shard search: ``done`` {shard: result}, ``missing`` shards, ``notes`` on files
    that do not count (damaged), ``consumed`` {shard: files consumed so far} from results and checkpoints."""

    done: dict[int, SearchResult]
    missing: list[int]
    notes: list[str]
    consumed: dict[int, int]

    @property
    def files_consumed(self) -> int:
        return sum(self.consumed.values())


def checkpoint_done(path: Path) -> int:
    """Files consumed according to the checkpoint at ``path`` (0 when there is none or it cannot be read); reads only
    its small ``meta`` entry, so polling many shards on shared storage stays cheap."""
    if not path.is_file():
        return 0
    try:
        with np.load(path, allow_pickle=False) as data:
            return int(json.loads(str(data["meta"]))["progress"]["done"])
    except READ_ERRORS:
        return 0


def shard_status(out: str | Path, shards: int, root: str | Path, k: int | None = None) -> ShardStatus:
    """Which of the ``shards`` results of a search of ``root`` are in the folder ``out``.

    A result of another folder (or another ``k``) raises ValueError: ``out`` belongs to another search, and mixing
    them would merge into nonsense. A damaged result counts as missing (its shard runs again) and is noted.
    """
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    out, root = Path(out), resolved_root(str(root))
    status = ShardStatus({}, [], [], {})
    for index in range(shards):
        path = out / shard_filename((index, shards))
        status.consumed[index] = checkpoint_done(checkpoint_path(path))
        if not path.exists():
            status.missing.append(index)
            continue
        try:
            result = load_result(path)
        except ResultError as error:
            status.notes.append(f"{path.name} cannot be read and is searched again: {error}")
            status.missing.append(index)
            continue
        if resolved_root(result.root) != root or (k is not None and result.k != k) or result.shard != (index, shards):
            raise ValueError(f"{path} is a result of another search (folder {result.root!r}, k={result.k}, shard "
                             f"{result.shard}); give another --out, or delete that folder's results")
        status.done[index] = result
        status.consumed[index] = result.n_images + len(result.skipped)
    return status


def merge_shards(out: str | Path, shards: int) -> tuple[SearchResult, Path]:
    """Merge ``out/shard-i-of-N.npz`` (all N) into ``out/search.npz``: exactly the single-run result."""
    out = Path(out)
    result = merge([out / shard_filename((i, shards)) for i in range(shards)])
    return result, result.save(out / shard_filename(None))


class Progress:
    """Prints one line on stderr whenever the counts change: shards done, running, waiting, failed; files done and
    files per second since the launch."""

    def __init__(self, out: Path, shards: int, root: str, jobs: dict[int, object], total: int, stream=sys.stderr):
        self.out, self.shards, self.root, self.jobs, self.total = out, shards, root, jobs, total
        self.stream, self.start, self.last = stream, time.monotonic(), ""
        self.first = None

    def __call__(self, states: dict[int, str]) -> None:
        consumed = shard_status(self.out, self.shards, self.root).files_consumed
        self.first = consumed if self.first is None else self.first
        elapsed = max(time.monotonic() - self.start, 1e-9)
        counts = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        words = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
        counted = f"{len(self.jobs)} shard jobs: {words}; {consumed} of {self.total} images done"
        if counted != self.last:
            print(f"{counted}, {(consumed - self.first) / elapsed:.1f} images/s", file=self.stream, flush=True)
        self.last = counted


def failures(jobs: dict[int, object], states: dict[int, str], shards: int) -> list[str]:
    """One line per shard whose job did not complete: the shard, its job id, and why."""
    lines = []
    for position, (index, job) in enumerate(jobs.items()):
        state = states[position]
        if state != "COMPLETED":
            lines.append(f"shard {index}/{shards} (job {job.job_id}, {state}): {failure(job, state)}")
    return lines


LAUNCH_RECORD = "shards.json"  # in each launch's folder: {"array": id, "tasks": {task id: shard}}


def record_launch(folder: Path, jobs: dict[int, object]) -> None:
    """Write which job runs which shard into the launch's ``folder``, for :func:`still_queued`."""
    tasks = {str(job.job_id): index for index, job in jobs.items()}
    (Path(folder) / LAUNCH_RECORD).write_text(json.dumps({"tasks": tasks}))


def still_queued(out: str | Path, shards: list[int]) -> dict[int, str]:
    """``{shard: task id}`` of ``shards`` that an earlier launch into ``out`` still has queued or running in Slurm:
    submitting them again would run them twice."""
    launched: dict[str, int] = {}
    for record in sorted(Path(out).glob(f".submitit/*/{LAUNCH_RECORD}")):
        try:
            launched.update(json.loads(record.read_text())["tasks"])
        except (OSError, ValueError, KeyError):
            continue
    arrays = sorted({task.split("_")[0] for task, shard in launched.items() if shard in shards})
    queued = queued_tasks(arrays)
    return {shard: task for task, shard in launched.items() if shard in shards and task in queued}
