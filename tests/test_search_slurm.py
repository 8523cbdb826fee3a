"""``search --shards N``: every shard without a result, here (``--executor local``) or as one job array through
submitit (``--executor slurm``, on a real single-node Slurm: tests marked ``slurm``, see conftest's slurm_cluster)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qklib import cli, load_model, search
from qklib.core.cluster import ClusterError, SlurmOptions, make_executor, parse_slurm_args, wait
from qklib.search.cluster import ShardTask, checkpoint_done, checkpoint_path, shard_status

ROOT = Path(__file__).resolve().parents[1]
MODEL = "random:vit_tiny_patch16_224"  # random init: no download; 12 blocks, a shard runs for a few seconds
COMMON = ["--model", MODEL, "--no-progress", "-k", "4", "--batch-size", "4"]
# Four times the work per image: a shard that is killed mid-run must still be running a moment after its checkpoint.
SLOWER = "random:vit_small_patch16_224"


def write_images(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` random 40 x 40 PNGs in four class folders, plus one damaged file ``c1/broken.png``."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    (root / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def assert_same(merged: search.SearchResult, single: search.SearchResult) -> None:
    """The same images in the same order, scores equal up to float32 rounding, the same bookkeeping."""
    assert merged.files == single.files
    assert np.array_equal(merged.index, single.index)
    finite = np.isfinite(single.scores)
    assert np.array_equal(finite, np.isfinite(merged.scores))
    assert np.allclose(merged.scores[finite], single.scores[finite], rtol=1e-5, atol=1e-6)
    assert (merged.n_images, merged.n_files, merged.skipped) == (single.n_images, single.n_files, single.skipped)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """80 images and a damaged one, and the single-run result of the options every test here uses."""
    root = write_images(tmp_path_factory.mktemp("images"), 80)
    single = search.search(load_model(MODEL), root, k=4, batch_size=4, progress=False)
    return root, single


# ------------------------------------------------------------------------------------- without Slurm


def test_local_shards_equal_one_run_and_never_import_submitit(data, tmp_path):
    """--executor local (the default) runs the missing shards here and merges them; submitit is never imported."""
    root, single = data
    out = tmp_path / "out"
    code = (f"import sys; from qklib.cli import main; code = main({['search', str(root), '--out', str(out), '--shards', '3', *COMMON]!r}); "
            "assert 'submitit' not in sys.modules, 'submitit was imported'; sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "merged the 3 shards" in run.stdout and "skipped c1/broken.png" in run.stdout
    assert_same(search.load_result(out / "search.npz"), single)
    # The same command again: nothing is missing, nothing runs again, the merge is the same.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    assert cli.main(["search", str(root), "--out", str(out), "--shards", "3", *COMMON]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")} == before


def test_shard_status_reads_the_folder(data, tmp_path):
    """Done, missing, damaged (missing, noted) and a foreign result (refused) are told apart from the files."""
    root, _ = data
    task = ShardTask(root=str(root), out=str(tmp_path), shards=4, model={"name": MODEL},
                     options={"k": 4, "batch_size": 4, "limit": 12})
    task(0)
    (tmp_path / "shard-2-of-4.npz").write_bytes(b"PK\x03\x04 damaged")
    status = shard_status(tmp_path, 4, root, k=4)
    assert sorted(status.done) == [0] and status.missing == [1, 2, 3]
    assert len(status.notes) == 1 and "shard-2-of-4.npz" in status.notes[0]
    assert status.consumed[0] == 3  # files 0, 4, 8 of the first 12
    with pytest.raises(ValueError, match="another search"):
        shard_status(tmp_path, 4, root, k=8)
    with pytest.raises(ValueError, match="another search"):
        shard_status(tmp_path, 4, tmp_path, k=4)
    assert checkpoint_done(tmp_path / "nothing.checkpoint") == 0


@pytest.mark.parametrize(
    "argv, message",
    [(["--shards", "2", "--shard", "0/2"], "not both"),
     (["--shards", "2", "--out", "x.npz"], "give a folder"),
     (["--executor", "slurm"], "give --shards N"),
     (["--shards", "2", "--executor", "slurm", "--slurm-arg", "mem"], "not KEY=VALUE"),
     (["--shards", "2", "--executor", "slurm", "--time", "0"], "time must be >= 1 minute"),
     (["--shards", "0"], "--shards must be >= 1")])
def test_cli_refuses_bad_cluster_options(data, tmp_path, capsys, argv, message):
    root, _ = data
    out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
    assert cli.main(["search", str(root), *out, *COMMON, *argv]) == 2
    assert message in capsys.readouterr().err


def test_slurm_args_and_options():
    assert parse_slurm_args(["mem=16G", "--account=lab", "qos=high"]) == {"mem": "16G", "account": "lab", "qos": "high"}
    with pytest.raises(ClusterError, match="KEY=VALUE"):
        parse_slurm_args(["=3"])
    with pytest.raises(ClusterError, match="unknown executor"):
        make_executor("pbs", "/nonexistent", SlurmOptions())


def test_submitit_local_executor_reports_a_failing_shard(data, tmp_path):
    """Through submitit's LocalExecutor (no Slurm): a shard whose task raises is reported with its error's message,
    and the others finish; the wait polls, it never blocks on a job handle."""
    pytest.importorskip("submitit")
    root, _ = data
    task = ShardTask(root=str(root), out=str(tmp_path / "out"), shards=2, model={"name": MODEL},
                     options={"k": 4, "batch_size": 4, "limit": 8})
    checkpoint_path(task.result_path(1)).parent.mkdir(parents=True)
    checkpoint_path(task.result_path(1)).write_bytes(b"damaged checkpoint")
    executor = make_executor("submitit-local", tmp_path / "jobs", SlurmOptions(time_min=5))
    jobs = executor.map_array(task, [0, 1])
    states = wait(jobs, poll_s=0.5, timeout_s=300)
    assert states == {0: "COMPLETED", 1: "FAILED"}
    from qklib.search.cluster import failures

    lines = failures(dict(zip([0, 1], jobs)), states, 2)
    assert len(lines) == 1 and lines[0].startswith("shard 1/2") and "shard-1-of-2.npz.checkpoint" in lines[0]
    assert "is damaged" in lines[0]


# ------------------------------------------------------------------------------------- on a real Slurm


def _qklib(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "qklib", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_four_shards_equal_one_run_and_name_the_damaged_image(slurm_cluster, data, tmp_path):
    """A 4-shard search as one Slurm job array with --wait: progress lines, then exactly the single-run result; the
    damaged image is skipped as in the single run and named in the report."""
    root, single = data
    out = tmp_path / "out"
    run = _qklib("search", str(root), "--out", str(out), "--shards", "4", "--executor", "slurm", "--wait",
                 "--time", "10", "--poll-seconds", "2", *COMMON)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "submitted job array" in run.stdout and "shards 0, 1, 2, 3 of 4" in run.stdout
    assert "images/s" in run.stderr and "4 completed" in run.stderr
    assert "skipped c1/broken.png: image" in run.stdout and "cannot be read as an image" in run.stdout
    assert_same(search.load_result(out / "search.npz"), single)


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_cancelled_shard_is_resubmitted_and_resumes(slurm_cluster, data, tmp_path, capsys):
    """Mid-run, shard 0 is preempted (SIGUSR2, Slurm's warning before a kill) and shard 1 cancelled (scancel): shard 0
    requeues itself and continues from its checkpoint; the same command again resubmits only shard 1, which continues
    from its checkpoint; the merge equals the single run."""
    root, _ = data
    single = search.search(load_model(SLOWER), root, k=4, batch_size=4, progress=False)
    out = tmp_path / "out"
    args = ["search", str(root), "--out", str(out), "--shards", "2", "--executor", "slurm", "--time", "10",
            "--checkpoint-every", "2", "--poll-seconds", "2", *COMMON, "--model", SLOWER]
    first = _qklib(*args)
    assert first.returncode == 0, first.stderr
    array = first.stdout.split("submitted job array ")[1].split(":")[0]
    checkpoints = [checkpoint_path(out / f"shard-{i}-of-2.npz") for i in range(2)]
    deadline = time.monotonic() + 240
    # Each shard is hit as soon as its checkpoint holds 4 files. Shard 0: SIGUSR2. Shard 1: its processes are killed
    # with SIGKILL at once (as by a lost node or the OOM killer), then scancel'ed: scancel alone sends SIGCONT and
    # SIGTERM, which submitit ignores, and a fast shard finishes before the SIGKILL that follows KillWait.
    waiting = {0, 1}
    while waiting and time.monotonic() < deadline:
        for shard in [s for s in waiting if checkpoint_done(checkpoints[s]) >= 4]:
            waiting.discard(shard)
            if shard == 0:
                subprocess.run(["scancel", "--signal=USR2", f"{array}_0"], check=True)
            else:
                assert _kill_task(out / ".submitit", 1), "found no process of task 1"
                subprocess.run(["scancel", f"{array}_1"])
        time.sleep(0.02)
    assert not waiting, f"shards {sorted(waiting)} never saved a checkpoint"
    while not _pending(array) and time.monotonic() < deadline:  # shard 0 requeued; Slurm holds it for a while
        time.sleep(0.2)
    assert cli.main(args) == 2  # meanwhile the same command submits nothing, not even the cancelled shard 1
    refused = capsys.readouterr().err  # shard 1 may still be listed while Slurm finishes killing it
    assert f"shards 0 (job {array}_0)" in refused and "are still queued or running from an earlier launch" in refused
    states = _follow(array, deadline)
    assert states["0"] == "COMPLETED" and states["1"] in ("CANCELLED", "FAILED")
    assert not (out / "shard-1-of-2.npz").exists()
    log = (next(out.glob(f".submitit/*/{array}_0_0_log.out"))).read_text()
    assert "Caught signal SIGUSR2" in log and "shard 0/2: resumed from its checkpoint at" in log
    done_before = checkpoint_done(checkpoints[1])
    assert 4 <= done_before < 40  # shard 1 has 40 of the 81 files
    again = _qklib(*args, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "shards 1 of 2 (1 already done)" in again.stdout
    logs = sorted(out.glob(".submitit/*/*_0_log.out"), key=lambda p: p.stat().st_mtime)
    assert f"resumed from its checkpoint at {done_before} of 40 files" in logs[-1].read_text()
    assert_same(search.load_result(out / "search.npz"), single)


def _kill_task(folder: Path, task: int) -> list[int]:
    """SIGKILL the processes of array task ``task`` whose command line names the launch folder under ``folder`` (this
    machine is the cluster's only node); returns their PIDs."""
    killed = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(folder).encode() in command and f"SLURM_ARRAY_TASK_ID={task}".encode() in environ:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
            except (OSError, ValueError):
                pass
    return killed


def _pending(array: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", array, "-t", "PENDING", "-o", "%i"], capture_output=True,
                               text=True).stdout.strip())


def _follow(array: str, deadline: float) -> dict[str, str]:
    """The final state of each task of ``array`` ({task: state}); a task requeued by a preemption starts again at once
    (Slurm would hold it for about two minutes)."""
    states = {}
    while time.monotonic() < deadline:
        if _pending(array):
            subprocess.run(["scontrol", "update", f"JobId={array}", "StartTime=now"], capture_output=True)
        lines = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", array], capture_output=True,
                               text=True).stdout.splitlines()
        states = {job.split("_")[-1]: state.split()[0] for job, state in (line.split("|") for line in lines if line)}
        if states and all(state in ("COMPLETED", "CANCELLED", "FAILED") for state in states.values()):
            return states
        time.sleep(1)
    return states
