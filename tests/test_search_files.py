"""Search files survive interruption and damage: atomic saves, checkpoint/resume equal to an uninterrupted
run (also after SIGKILL at random points), and a clear error (exit code 2 from the CLI) for every damaged,
mismatched or missing input."""

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from qklib import cli, load_model, search
from qklib.core.models import model_name
from qklib.core.provenance import relabel
from qklib.search.checkpoint import Checkpoint, CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 small random PNGs in two folders plus one unreadable file (skipped, also across a resume)."""
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(7)
    for i in range(40):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray((rng.random((24, 28, 3)) * 255).astype(np.uint8)).save(folder / f"im{i:02d}.png")
    (root / "b" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def small(tiny_vit):
    return tiny_vit  # 3-block random ViT at 64 px and its SVD (conftest)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-init vit_tiny_patch16_224 saved as safetensors: the CLI loads it with --model/--weights."""
    torch.manual_seed(3)
    model = timm.create_model(TINY, pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _same(a: search.SearchResult, b: search.SearchResult) -> None:
    """Same images in the same order with equal scores, and the same bookkeeping."""
    assert a.files == b.files
    assert np.array_equal(a.index, b.index)
    assert np.array_equal(a.scores, b.scores)
    assert (a.n_images, a.n_files, a.skipped, a.shard) == (b.n_images, b.n_files, b.skipped, b.shard)


class Crash(Exception):
    pass


class CrashingCheckpoint(Checkpoint):
    """Saves like a Checkpoint, then dies right after the save that reaches ``crash_at`` files."""

    crash_at = 0

    def maybe_save(self, top, consumed, skipped):
        saved = super().maybe_save(top, consumed, skipped)
        if saved and self.before.done + consumed >= self.crash_at:
            raise Crash
        return saved


# ---------------------------------------------------------------------------------------- resume in-process


def test_interrupted_and_resumed_equals_uninterrupted(small, images, tmp_path):
    model, svd = small
    args = dict(k=3, batch_size=3, svd=svd, progress=False)
    whole = search.search(model, images, **args)
    rng = random.Random(0)
    path = tmp_path / "run.ckpt"
    crashes = sorted(rng.sample(range(1, 34), 4))  # crash after the save that reaches each of these file counts
    for crash_at in crashes:
        checkpoint = CrashingCheckpoint(path, every=rng.choice([3, 6]), seconds=0)
        checkpoint.crash_at = crash_at
        with pytest.raises(Crash):
            search.search(model, images, checkpoint=checkpoint, resume=True, **args)
        assert path.is_file()
        assert Checkpoint(path).read()[0]["progress"]["done"] >= crash_at
    done = search.search(model, images, checkpoint=path, resume=True, out=tmp_path / "out.npz", **args)
    _same(done, whole)
    _same(search.load_result(tmp_path / "out.npz"), whole)
    assert not path.exists(), "a finished run removes its checkpoint"
    assert [name for name, _ in done.skipped] == ["b/broken.png"]


def test_checkpoint_refuses_other_inputs_and_names_them(small, images, tmp_path):
    model, svd = small
    path = tmp_path / "run.ckpt"
    checkpoint = CrashingCheckpoint(path, every=6, seconds=0)
    checkpoint.crash_at = 12
    base = dict(layers="0,1", heads="all", modes="0-9", k=3, batch_size=6, svd=svd, progress=False)
    with pytest.raises(Crash):
        search.search(model, images, checkpoint=checkpoint, **base)
    saved = path.read_bytes()
    with pytest.raises(CheckpointError, match="exists.*resume=True"):
        search.search(model, images, checkpoint=path, **base)  # never overwritten silently
    other = timm.create_model(TINY, pretrained=False, img_size=64, depth=3).eval()  # same name, other weights
    relabel(other, model_name(model))
    changes = {
        "layers": dict(layers="0"), "modes": dict(modes="0-8"), "k": dict(k=4), "batch size": dict(batch_size=3),
        "shard": dict(shard="0/2"), "limit": dict(limit=30),
    }
    for what, change in changes.items():
        with pytest.raises(CheckpointError, match=f"its {what} differs"):
            search.search(model, images, checkpoint=path, resume=True, **{**base, **change})
    with pytest.raises(CheckpointError, match=r"its weights \(sha256 of the model's parameters\) differs"):
        search.search(other, images, checkpoint=path, resume=True, **{**base, "svd": None})
    # a new image in the folder, then a changed file: the file list's digest differs
    extra = images / "a" / "zz_extra.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(extra)
    try:
        with pytest.raises(CheckpointError, match="number of image files differs"):
            search.search(model, images, checkpoint=path, resume=True, **base)
    finally:
        extra.unlink()
    target = images / "a" / "im01.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(CheckpointError, match=r"image files \(names, sizes, times\) differs"):
            search.search(model, images, checkpoint=path, resume=True, **base)
    finally:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.read_bytes() == saved, "a refused resume leaves the checkpoint alone"
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        search.search(model, images, resume=True, **base)
    result = search.search(model, images, checkpoint=path, resume=True, **base)
    assert result.n_images == 40 and not path.exists()


def test_checkpoint_keeps_a_payload_and_restores_onto_the_top_k(tmp_path):
    """The whole running state round-trips, payload included (the top-k of other streaming analyses)."""
    torch.manual_seed(0)
    top = search.RunningTopK(5, 3, payload_dtype=torch.float16, payload_width=2)
    top.update(torch.rand(5, 4), torch.arange(4), payload=torch.rand(5, 4, 2))
    checkpoint = Checkpoint(tmp_path / "p.ckpt", every=1, seconds=0)
    checkpoint.begin({"k": 3}, [f"f{i}" for i in range(8)], list(range(8)), resume=False)
    checkpoint.save(top, 4, [("f9", "never consumed")])
    again = Checkpoint(tmp_path / "p.ckpt")
    progress = again.begin({"k": 3}, [f"f{i}" for i in range(8)], list(range(8)), resume=True)
    assert (progress.done, progress.scored, progress.skipped) == (4, 4, [])  # only consumed skips are recorded
    fresh = search.RunningTopK(5, 3, payload_dtype=torch.float16, payload_width=2)
    again.restore(fresh)
    for name in ("scores", "position", "payload"):
        assert torch.equal(getattr(fresh, name), getattr(top, name)) and getattr(fresh, name).dtype == getattr(top, name).dtype
    plain = search.RunningTopK(5, 3)
    again = Checkpoint(tmp_path / "p.ckpt")
    again.begin({"k": 3}, [f"f{i}" for i in range(8)], list(range(8)), resume=True)
    with pytest.raises(CheckpointError, match="payload"):
        again.restore(plain)


# ------------------------------------------------------------------------------------- SIGKILL, from the CLI


def _cli(*args):
    return [sys.executable, "-m", "qklib", *args]


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(images, weights, tmp_path):
    """Kill the CLI search with SIGKILL at random points (seeded), resume each time: the uninterrupted result."""
    options = dict(layers="0,3", heads="0-2", modes="0-7", k=4, batch_size=2)
    once = search.search(load_model(TINY, weights=weights), images, progress=False, **options)  # uninterrupted
    common = ["search", str(images), "--model", TINY, "--weights", str(weights), "--no-progress", "--layers", "0,3",
              "--heads", "0-2", "--modes", "0-7", "-k", "4", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as this process
    out = tmp_path / "resumed.npz"
    checkpoint = Path(str(out) + ".checkpoint")
    resumable = [*common, "--out", str(out), "--resume", "--checkpoint-every", "2", "--checkpoint-seconds", "0"]
    rng = random.Random(2024)
    kills, reached = 0, []
    for wait_for in sorted(rng.sample(range(4, 21, 2), 3)):  # kill soon after the checkpoint reaches these counts
        process = subprocess.Popen(_cli(*resumable), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if checkpoint.exists() and Checkpoint(checkpoint).read()[0]["progress"]["done"] >= wait_for:
                time.sleep(rng.uniform(0.0, 0.03))  # anywhere: mid-batch, mid-save
                break
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        assert not out.exists()
        reached.append(Checkpoint(checkpoint).read()[0]["progress"]["done"])  # readable after every kill
    assert kills == 3 and reached == sorted(reached) and reached[-1] < 41
    final = subprocess.run(_cli(*resumable), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert final.returncode == 0, final.stderr
    assert f"found checkpoint {checkpoint}: {reached[-1]} of 41 files done" in final.stderr
    assert f"resumed from the checkpoint at {reached[-1]} of 41 files" in final.stdout
    assert not checkpoint.exists()
    _same(search.load_result(out), once)


_SAVE_AND_HANG = """
import sys, threading, time
import numpy as np
from qklib.search import load_result
old, new = sys.argv[1], sys.argv[2]
result = load_result(old)
result.n_images += 1
write, inside = np.savez_compressed, threading.Semaphore(0)
def hang(handle, **arrays):  # the whole new file goes to the temporary file, then the save hangs
    write(handle, **arrays)
    handle.flush()
    inside.release()
    time.sleep(120)
np.savez_compressed = hang
for target in (old, new):
    threading.Thread(target=result.save, args=(target,), daemon=True).start()
for _ in (old, new):
    inside.acquire(timeout=120)
print("both saving", flush=True)
time.sleep(120)
"""


def test_kill_during_save_leaves_the_old_file_or_none(small, images, tmp_path):
    model, svd = small
    old = search.search(model, images, layers=[0], k=2, svd=svd, progress=False).save(tmp_path / "old.npz")
    before = old.read_bytes()
    new = tmp_path / "new.npz"
    process = subprocess.Popen([sys.executable, "-c", _SAVE_AND_HANG, str(old), str(new)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "both saving\n"
    finally:
        process.kill()
        process.communicate()
    assert old.read_bytes() == before and search.load_result(old).n_images == 40
    assert not new.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert len(leftovers) == 2 and all(name.startswith((".old.npz.", ".new.npz.")) for name in leftovers)


# ------------------------------------------------------------------------------------ damaged and mismatched


@pytest.fixture(scope="module")
def shards(small, images, tmp_path_factory):
    model, svd = small
    folder = tmp_path_factory.mktemp("shards")
    args = dict(layers="0,2", heads="0,1", modes="0-5", k=3, svd=svd, progress=False)
    paths = [search.search(model, images, shard=f"{i}/3", **args).save(folder / search.shard_filename((i, 3)))
             for i in range(3)]
    return folder, paths, args


def _merge_cli(capsys, *args):
    code = cli.main(["search-merge", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _damage(path: Path, how: str, tmp_path: Path) -> Path:
    data = path.read_bytes()
    damaged = tmp_path / path.name
    if how == "empty":
        damaged.write_bytes(b"")
    elif how == "truncated to half":
        damaged.write_bytes(data[: len(data) // 2])
    elif how == "truncated by 10 bytes":
        damaged.write_bytes(data[:-10])
    elif how == "bytes flipped":  # inside a compressed member: CRC or inflate error
        array = bytearray(data)
        for i in range(200, 260):
            array[i] ^= 0xFF
        damaged.write_bytes(bytes(array))
    elif how == "text file":
        damaged.write_text("scores,index\n1,2\n")
    elif how == "no meta":
        with np.load(path) as content:
            np.savez(damaged, scores=content["scores"], index=content["index"])
    elif how == "meta not JSON":
        with np.load(path) as content:
            np.savez(damaged, **{**dict(content), "meta": np.array("{broken")})
    elif how == "wrong shape":
        with np.load(path) as content:
            np.savez(damaged, **{**dict(content), "scores": content["scores"][:1]})
    elif how == "index out of range":
        with np.load(path) as content:
            np.savez(damaged, **{**dict(content), "index": content["index"] + 1000})
    else:
        raise AssertionError(how)
    return damaged


DAMAGE = {  # each damage and (a regex of) its error; every message also names the file
    "empty": r"damaged or not a qklib file \(ValueError: empty file\)",
    "truncated to half": r"damaged or not a qklib file \(BadZipFile: ",
    "truncated by 10 bytes": r"damaged or not a qklib file \(BadZipFile: ",
    "bytes flipped": r"damaged or not a qklib file \((zlib\.error: Error -3 while decompressing|BadZipFile: Bad CRC)",
    "text file": r"damaged or not a qklib file \(ValueError: not a zip archive",
    "no meta": r"damaged or not a qklib file \(KeyError: 'meta'\)",
    "meta not JSON": r"damaged or not a qklib file \(JSONDecodeError: ",
    "wrong shape": r"is damaged: scores \(1, 2, 6, 2, 3\) / index \(2, 2, 6, 2, 3\) do not match layers x heads",
    "index out of range": r"is damaged: index refers to files outside 0\.\.\d+",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_shard_is_named_with_exit_code_2(shards, tmp_path, capsys, how):
    folder, paths, _ = shards
    damaged = _damage(paths[1], how, tmp_path)
    for other in (paths[0], paths[2]):
        (tmp_path / other.name).write_bytes(other.read_bytes())
    with pytest.raises(search.ResultError, match=DAMAGE[how]) as error:
        search.load_result(damaged)
    assert str(damaged) in str(error.value)
    code, out, err = _merge_cli(capsys, tmp_path, "--out", tmp_path / "merged.npz")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and str(damaged) in err and re.search(DAMAGE[how], err), err
    assert not (tmp_path / "merged.npz").exists()


def test_newer_format_and_foreign_files_are_refused(shards, tmp_path, capsys):
    folder, paths, _ = shards
    with np.load(paths[0]) as content:
        meta = json.loads(str(content["meta"]))
        np.savez(tmp_path / "newer.npz", **{**dict(content), "meta": np.array(json.dumps({**meta, "format": 99}))})
    with pytest.raises(search.ResultError, match="written by a newer qklib .format 99; this qklib reads format 1"):
        search.load_result(tmp_path / "newer.npz")
    code, _, err = _merge_cli(capsys, tmp_path / "newer.npz", paths[1], paths[2], "--out", tmp_path / "m.npz")
    assert code == 2 and "newer qklib" in err and "newer.npz" in err
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("readme.txt", "an unrelated zip")
    with pytest.raises(search.ResultError, match="damaged or not a qklib file"):
        search.load_result(tmp_path / "other.npz")
    checkpoint = Checkpoint(tmp_path / "c.ckpt", every=1)
    checkpoint.begin({}, ["x"], [0], resume=False)
    checkpoint.save(search.RunningTopK(2, 2), 1, [])
    with pytest.raises(search.ResultError, match="is a 'qklib search checkpoint', not a 'qklib search result'"):
        search.load_result(tmp_path / "c.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(checkpoint.path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="bad.ckpt.*damaged"):
        Checkpoint(tmp_path / "bad.ckpt").read()


def test_mismatched_shards_say_what_differs(small, images, shards, tmp_path, capsys):
    model, svd = small
    folder, paths, args = shards
    other_folder = tmp_path / "copy"
    other_folder.mkdir()
    for path in search.image_files(images):
        (other_folder / path.replace("/", "_")).write_bytes((images / path).read_bytes())
    other_weights = timm.create_model(TINY, pretrained=False, img_size=64, depth=3).eval()
    relabel(other_weights, model_name(model))
    renamed = timm.create_model(TINY, pretrained=False, img_size=64, depth=3).eval()
    renamed.load_state_dict(model.state_dict())
    relabel(renamed, "another model")
    cases = {
        "model": (renamed, images, {}),
        "weights": (other_weights, images, {"svd": None}),
        "layers": (model, images, {"layers": "0,1"}),
        "modes": (model, images, {"modes": "0-4"}),
        "k": (model, images, {"k": 2}),
        "folder": (model, other_folder, {}),
    }
    for what, (net, root, change) in cases.items():
        odd = search.search(net, root, shard="1/3", **{**args, **change}).save(tmp_path / what / "shard-1-of-3.npz")
        code, out, err = _merge_cli(capsys, paths[0], odd, paths[2], "--out", tmp_path / "m.npz")
        assert code == 2 and f"differ in {what}" in err, (what, err)
        assert "shard-0-of-3.npz" in err and "shard-1-of-3.npz" in err
    code, _, err = _merge_cli(capsys, paths[0], paths[2], "--out", tmp_path / "m.npz")
    assert code == 2 and "1 of 3 missing: 1/3 (shard-1-of-3.npz)" in err
    assert "--allow-partial" in err and "allow_partial" not in err
    with pytest.raises(search.MergeError, match=r"allow_partial=True"):
        search.merge([paths[0], paths[2]])
    code, _, err = _merge_cli(capsys, paths[0], paths[0], paths[1], paths[2], "--out", tmp_path / "m.npz")
    assert code == 2 and "exactly once, but got shard 0/3 in" in err
    half = search.search(model, images, shard="1/2", **args).save(tmp_path / "half" / "shard-1-of-2.npz")
    code, _, err = _merge_cli(capsys, paths[0], half, "--out", tmp_path / "m.npz")
    assert code == 2 and "different ways" in err and "(1/2)" in err and "(0/3)" in err
    code, out, _ = _merge_cli(capsys, paths[0], paths[2], "--allow-partial", "--out", tmp_path / "partial.npz")
    assert code == 0 and search.load_result(tmp_path / "partial.npz").n_images == sum(
        search.load_result(p).n_images for p in (paths[0], paths[2]))
    code, _, err = _merge_cli(capsys, tmp_path / "nowhere", "--out", tmp_path / "m.npz")
    assert code == 2 and "does not exist" in err


def test_roots_are_absolute_and_merge_compares_resolved_folders(small, images, tmp_path, monkeypatch):
    """A shard run on the absolute path and one on a relative path to the same folder merge, and
    ``result.path`` works from any working directory."""
    model, svd = small
    args = dict(layers=[1], modes="0-3", k=2, svd=svd, progress=False)
    whole = search.search(model, images, **args)
    monkeypatch.chdir(images.parent)
    relative = search.search(model, Path(images.name), shard="1/2", **args)
    monkeypatch.chdir(tmp_path)
    absolute = search.search(model, images, shard="0/2", **args)
    assert Path(relative.root).is_absolute() and relative.root == absolute.root == str(images.resolve())
    link = tmp_path / "link"
    link.symlink_to(images)
    via_link = search.search(model, link, shard="1/2", **args)
    monkeypatch.chdir(images.parent)
    typed = dataclasses.replace(relative, root=images.name)  # a result saved before roots were resolved
    monkeypatch.chdir(tmp_path)
    with pytest.raises(search.MergeError, match="differ in folder"):
        search.merge([absolute, typed])  # from here, 'files' is another (missing) folder
    monkeypatch.chdir(images.parent)
    for other in (relative, via_link, typed):
        merged = search.merge([absolute, other])
        assert merged.files == whole.files and np.array_equal(merged.index, whole.index)
    saved = merged.save(tmp_path / "merged.npz")
    monkeypatch.chdir("/")
    name, _ = search.load_result(saved).top(1, 0, 0)[0]
    assert search.load_result(saved).path(name).is_file()
