"""Running work as Slurm array jobs through submitit, the engine research clusters already use.

submitit is an optional dependency (``pip install qklib[slurm]``) and is imported only when a cluster executor is
made, so the default, local paths of the search and the book never need it. Two kinds of executor: ``"slurm"``
(sbatch job arrays, states from ``sacct``) and ``"submitit-local"`` (submitit's LocalExecutor: the same job files,
run in local subprocesses), which lets the machinery be tested where no Slurm runs. (submitit's DebugExecutor is
not offered: it opens a debugger on the first exception.)

Lessons from a real Slurm, built in here:

- every launch gets a fresh folder for submitit's job files (:func:`launch_folder`): job ids restart at 1 when a
  cluster's state is wiped, and a reused folder would hand back an old job's result for a new job's id;
- :func:`wait` never blocks on a job handle: it polls ``sacct`` once per round for all jobs, with a deadline, and
  a job Slurm's accounting never lists (an array task cancelled while pending) counts as lost after a grace time;
- the job states are Slurm's words (``COMPLETED``, ``FAILED``, ``CANCELLED``, ``TIMEOUT``, ``OUT_OF_MEMORY``...).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("slurm", "submitit-local")
UNFINISHED = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED", "SUSPENDED",
              "CONFIGURING", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
INSTALL_HINT = "submitit is not installed: pip install 'qklib[slurm]' (or submitit==1.5.4)"


class ClusterError(ValueError):
    """Cluster options that cannot work, or a cluster that cannot be reached; the message says what to do."""


@dataclass
class SlurmOptions:
    """What each array task asks Slurm for. ``time_min``: wall time per task (minutes); ``setup``: shell lines run
    before the task (``module load cuda``); ``extra``: further ``#SBATCH --key=value`` lines (``{"mem": "16G"}``);
    ``signal_delay_s``: Slurm sends the preemption/timeout signal this long before the kill (a task must save its
    state more often than that)."""

    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    time_min: int = 60
    array_parallelism: int | None = None
    setup: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    signal_delay_s: int = 90
    job_name: str = "qklib"


def parse_slurm_args(items: Sequence[str]) -> dict[str, str]:
    """``["mem=16G", "account=lab"]`` -> ``{"mem": "16G", "account": "lab"}`` (sbatch's long options, no dashes)."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ClusterError(f"--slurm-arg {item!r} is not KEY=VALUE (an sbatch option without its dashes, "
                               "e.g. mem=16G or account=mylab)")
        extra[key] = value
    return extra


def launch_folder(base: str | Path) -> Path:
    """A new folder under ``base`` for one launch's submitit files (never reused; see the module docstring)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(base) / f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def import_submitit():
    """submitit, or ClusterError saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise ClusterError(INSTALL_HINT) from None
    return submitit


def make_executor(kind: str, folder: str | Path, options: SlurmOptions | None = None):
    """A submitit executor of ``kind`` (see :data:`KINDS`) writing its job files to ``folder``."""
    if kind not in KINDS:
        raise ClusterError(f"unknown executor {kind!r}; choose one of {', '.join(KINDS)}")
    options = options or SlurmOptions()
    if options.time_min < 1 or options.gpus_per_task < 0 or options.cpus_per_task < 1:
        raise ClusterError(f"time must be >= 1 minute, gpus per task >= 0 and cpus per task >= 1; got "
                           f"{options.time_min}, {options.gpus_per_task}, {options.cpus_per_task}")
    if options.array_parallelism is not None and options.array_parallelism < 1:
        raise ClusterError(f"array parallelism must be >= 1, got {options.array_parallelism}")
    submitit = import_submitit()
    if kind == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=options.time_min)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=100)
    parameters = {"time": options.time_min, "cpus_per_task": options.cpus_per_task, "ntasks_per_node": 1,
                  "nodes": 1, "job_name": options.job_name, "signal_delay_s": options.signal_delay_s,
                  "setup": list(options.setup), "additional_parameters": dict(options.extra)}
    if options.partition:
        parameters["partition"] = options.partition
    if options.gpus_per_task:
        parameters["gpus_per_task"] = options.gpus_per_task
    if options.array_parallelism:
        parameters["array_parallelism"] = options.array_parallelism
    executor.update_parameters(**parameters)
    return executor


def array_id(jobs: Sequence) -> str:
    """The Slurm array id of jobs submitted together (``"123"`` for tasks ``123_0``, ``123_1``...)."""
    return str(jobs[0].job_id).split("_")[0] if jobs else ""


def refresh(jobs: Sequence) -> None:
    """One ``sacct`` call for all ``jobs`` (submitit otherwise polls at most every 10 minutes on long runs)."""
    if jobs and type(jobs[0]).__name__ == "SlurmJob":  # LocalExecutor jobs are read from their processes
        jobs[0].watcher.update()


def _outcome(job) -> tuple[str, object] | None:
    """``(outcome, result or traceback text)`` from the job's result file, or None while there is none."""
    if not job.paths.result_pickle.exists():
        return None
    submitit = import_submitit()
    try:
        return submitit.core.utils.pickle_load(job.paths.result_pickle)
    except Exception as problem:  # noqa: BLE001 - an unreadable result file is a failure to report
        return "error", f"its result file {job.paths.result_pickle} cannot be read ({type(problem).__name__})"


def job_state(job) -> str:
    """Slurm's state word for ``job`` from the last :func:`refresh` (``COMPLETED`` or ``FAILED`` as soon as its result
    file is written). A LocalExecutor job is ``RUNNING`` while its process runs."""
    outcome = _outcome(job)
    if outcome is not None:
        return "FAILED" if outcome[0] == "error" else "COMPLETED"
    if type(job).__name__ == "LocalJob":
        state = job.get_info().get("jobState", "UNKNOWN")
        return {"RUNNING": "RUNNING", "INTERRUPTED": "CANCELLED"}.get(state, "FAILED")
    return str(job.watcher.get_state(job.job_id, mode="cache")).split()[0].upper()


def wait(jobs: Sequence, poll_s: float = 5.0, timeout_s: float | None = None, lost_after_s: float = 120.0,
         report: Callable[[dict[int, str]], None] | None = None) -> dict[int, str]:
    """Poll ``jobs`` until every one has finished: ``{index in jobs: final state}``. Never blocks on a handle.

    Every ``poll_s`` seconds: one ``sacct`` call, each job's state, ``report(states)``. A job that Slurm's accounting
    has not listed for ``lost_after_s`` seconds is ``"LOST"`` (an array task cancelled while still pending never
    reaches ``sacct``). ``timeout_s``: raise TimeoutError after that long, naming the unfinished jobs.
    """
    start = time.monotonic()
    unknown_since: dict[int, float] = {}
    while True:
        refresh(jobs)
        states = {index: job_state(job) for index, job in enumerate(jobs)}
        now = time.monotonic()
        for index, state in states.items():
            if state != "UNKNOWN":
                unknown_since.pop(index, None)
            elif now - unknown_since.setdefault(index, now) > lost_after_s:
                states[index] = "LOST"
        if report is not None:
            report(states)
        if all(state not in UNFINISHED for state in states.values()):
            return states
        if timeout_s is not None and now - start > timeout_s:
            waiting = ", ".join(f"{jobs[i].job_id} ({s})" for i, s in states.items() if s in UNFINISHED)
            raise TimeoutError(f"jobs still unfinished after {timeout_s:.0f} s: {waiting}")
        time.sleep(poll_s)


def failure(job, state: str) -> str:
    """Why ``job`` (in final ``state``) failed, in one line: the exception it raised (the last line of its traceback),
    or what Slurm did to it with the last line of its error log."""
    outcome = _outcome(job)
    if outcome is not None and outcome[0] == "error":
        lines = [line for line in str(outcome[1]).splitlines() if line.strip()]
        return lines[-1].strip() if lines else "failed"
    what = {"CANCELLED": "cancelled", "TIMEOUT": "out of time", "OUT_OF_MEMORY": "out of memory",
            "NODE_FAIL": "its node failed", "LOST": "never listed by Slurm's accounting (cancelled while pending?)",
            "PREEMPTED": "preempted"}.get(state, f"ended {state} without a result")
    try:
        log = [line for line in job.paths.stderr.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        log = []
    return what + (f"; its log ends: {log[-1].strip()[:200]}" if log else "")


@dataclass
class Command:
    """A command line to run as a cluster task (picklable): ``argv`` in ``cwd`` with ``env`` added. The task's
    stdout and stderr go to the job's log; a nonzero exit raises RuntimeError ending with the command's last error
    line, which :func:`failure` reports."""

    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""

    def __call__(self) -> int:
        run = subprocess.run(self.argv, cwd=self.cwd, env={**os.environ, **self.env}, stdout=sys.stdout,
                             stderr=subprocess.PIPE, text=True)
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            lines = [line for line in run.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"{self.label or self.argv[0]} exited with {run.returncode}: "
                               f"{lines[-1].strip() if lines else 'no error output'}")
        return 0


def run_command(command: Command) -> int:
    """``command()``: what an array of :class:`Command` maps over (``executor.map_array(run_command, commands)``)."""
    return command()


def queued_tasks(array_ids: Sequence[str]) -> set[str]:
    """The tasks (``"123_4"``) of the arrays ``array_ids`` that Slurm still has queued or running (``squeue``)."""
    if not array_ids:
        return set()
    try:
        run = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(array_ids)], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as problem:
        raise ClusterError(f"squeue did not answer ({problem}); is this a Slurm login node?") from None
    # squeue exits 1 for ids it no longer knows (all finished long ago): nothing queued then.
    return {line.strip() for line in run.stdout.splitlines() if line.strip()}
