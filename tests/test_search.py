"""Optimal-image search: equals brute force, shards + merge equal one run, signs, bad files, CLI."""

import copy
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qklib
from qklib import search
from qklib.core.extract import token_embeddings
from qklib.core.images import MAX_ASPECT, ImageError, open_rgb, to_pixels
from qklib.search import run as search_run
from qklib.search.checkpoint import weights_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_vit):
    return tiny_vit


def _photo(rng, width, height, mode="RGB"):
    array = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    return image.convert(mode) if mode != "RGB" else image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 readable images in two sub-folders (RGB, greyscale, RGBA, palette, 16-bit, odd sizes) plus 3 bad files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i in range(8):
        _photo(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120))).save(root / "a" / f"img{i}.jpg")
    _photo(rng, 70, 50, "L").save(root / "b" / "grey.png")
    _photo(rng, 64, 64, "RGBA").save(root / "b" / "rgba.png")
    _photo(rng, 64, 64, "P").save(root / "b" / "palette.png")
    _photo(rng, 7, 300).save(root / "b" / "strip.png")  # extreme aspect ratio
    _photo(rng, 1, 1).save(root / "b" / "one_pixel.png")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(root / "b" / "deep16.png")
    (root / "b" / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    (root / "b" / "empty.png").write_bytes(b"")
    good = root / "a" / "img0.jpg"
    (root / "b" / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    (root / "b" / "notes.txt").write_text("not an image")
    return root


BAD = {"b/corrupt.jpg", "b/empty.png", "b/truncated.jpg"}


def _brute_force(model, svd, root, names, k):
    """Every image alone, float64 maps, scores by the definition, sorted by (score desc, path asc)."""
    meta = qklib.info(model)
    rows = {}
    for name in names:
        try:
            image = open_rgb(root / name)
        except ImageError:
            continue
        tokens = token_embeddings(model, to_pixels(model, image)).to(torch.float64)[:, 0, meta.prefix_tokens:]  # [L, T, d]
        q = torch.einsum("ltd,lhdr->lhrt", tokens, svd.U)
        v = torch.einsum("ltd,lhdr->lhrt", tokens, svd.V)
        positive = q.amax(-1).clamp_min(0) * v.amax(-1).clamp_min(0)
        negative = (-q).amax(-1).clamp_min(0) * (-v).amax(-1).clamp_min(0)
        rows[name] = torch.stack([positive, negative], -1)  # [L, H, r, 2]
    best = {}
    L, H, R, _ = next(iter(rows.values())).shape
    for slot in np.ndindex(L, H, R, 2):
        ranked = sorted(((float(s[slot]), n) for n, s in rows.items() if float(s[slot]) > 0), key=lambda t: (-t[0], t[1]))
        best[slot] = ranked[:k]
    return best, len(rows)


def test_top_k_equals_brute_force(tiny, folder):
    model, svd = tiny
    k = 3
    result = search.search(model, folder, k=k, batch_size=4, svd=svd, progress=False)
    names = search.image_files(folder)
    expected, readable = _brute_force(model, svd, folder, names, k)
    assert result.n_images == readable == len(names) - len(BAD)
    assert {n for n, _ in result.skipped} == BAD
    assert result.scores.shape == (3, 3, 64, 2, k)
    for slot, ranked in expected.items():
        got = result.top(*[result.layers[slot[0]], result.heads[slot[1]], result.modes[slot[2]]], sign=(1, -1)[slot[3]])
        assert [n for n, _ in got] == [n for _, n in ranked], slot
        assert np.allclose([s for _, s in got], [s for s, _ in ranked], rtol=1e-4, atol=1e-5)


def test_subset_matches_full_run(tiny, folder):
    model, svd = tiny
    full = search.search(model, folder, k=2, batch_size=5, svd=svd, progress=False)
    part = search.search(model, folder, layers="1-2", heads=[0, 2], modes="3,7", k=2, batch_size=3, svd=svd, progress=False)
    assert part.scores.shape == (2, 2, 2, 2, 2)
    for layer in (1, 2):
        for head in (0, 2):
            for mode in (3, 7):
                for sign in (1, -1):
                    a, b = part.top(layer, head, mode, sign), full.top(layer, head, mode, sign)
                    assert [n for n, _ in a] == [n for n, _ in b]
                    assert np.allclose([s for _, s in a], [s for _, s in b], rtol=1e-5)
    with pytest.raises(KeyError, match="was not searched"):
        part.top(0, 0, 3)


def test_shards_plus_merge_equal_one_run(tiny, folder, tmp_path):
    model, svd = tiny
    single = search.search(model, folder, k=4, batch_size=4, svd=svd, progress=False)
    paths = [search.search(model, folder, k=4, batch_size=2, shard=f"{i}/3", svd=svd, progress=False)
             .save(tmp_path / search.shard_filename((i, 3))) for i in range(3)]
    merged = search.merge(list(reversed(paths)))  # order of the shards does not matter
    assert merged.files == single.files
    assert np.array_equal(merged.index, single.index)
    finite = np.isfinite(single.scores)
    assert np.array_equal(finite, np.isfinite(merged.scores))
    assert np.allclose(merged.scores[finite], single.scores[finite], rtol=1e-5)
    assert merged.n_images == single.n_images and merged.skipped == single.skipped and merged.shard is None
    # shards partition the files
    parts = [search.load_result(p) for p in paths]
    assert sum(p.n_images for p in parts) == single.n_images
    with pytest.raises(ValueError, match="exactly once"):
        search.merge(paths[:2])
    with pytest.raises(ValueError, match="exactly once"):
        search.merge([paths[0], paths[0], paths[1]])
    assert search.merge(paths[:2], allow_partial=True).n_images == parts[0].n_images + parts[1].n_images
    with pytest.raises(ValueError, match="not a shard"):
        search.merge([single, *parts])
    other_k = search.search(model, folder, k=2, shard="0/3", svd=svd, progress=False)
    with pytest.raises(ValueError, match="differ in k"):
        search.merge([other_k, parts[1], parts[2]])


def test_ties_break_by_path_and_zero_scores_never_enter():
    top = search.RunningTopK(features=2, k=3)
    # feature 0: ties between positions 5 and 1 (path order: 1 first); feature 1: only zeros and negatives
    top.update(torch.tensor([[2.0, 2.0], [0.0, -1.0]]), torch.tensor([5, 7]))
    top.update(torch.tensor([[2.0, 3.0], [0.0, float("nan")]]), torch.tensor([1, 2]))
    assert top.position[0].tolist() == [2, 1, 5]
    assert top.scores[0].tolist() == [3.0, 2.0, 2.0]
    assert top.position[1].tolist() == [-1, -1, -1]
    assert torch.isinf(top.scores[1]).all()
    # memory is [features, k] whatever the number of updates
    for start in range(0, 1000, 50):
        top.update(torch.rand(2, 50), torch.arange(start + 10, start + 60))
    assert top.scores.shape == (2, 3) and top.position.shape == (2, 3)


def test_sign_handling():
    # tokens x 2 features: u-column then v-column per feature; B = 1, T = 3
    projected = torch.tensor([[[-1.0, -2.0, -3.0, -0.5],   # feature 0: all projections negative,
                               [-2.0, -1.0, -4.0, -0.2],   # feature 1: u positive somewhere, v negative
                               [-3.0, 0.5, -5.0, -0.1]]])
    scores = search.feature_scores(projected)  # [B, F, 2]
    # feature 0: u = col 0, v = col 2. +: max u = -1, max v = -3 -> both clipped -> 0 (no spurious (-1)*(-3) = 3)
    assert scores[0, 0, 0].item() == 0.0
    # -: max(-u) = 3, max(-v) = 5 -> 15
    assert scores[0, 0, 1].item() == pytest.approx(15.0)
    # feature 1: u = col 1 (max 0.5), v = col 3 (max -0.1) -> + clipped to 0; -: max(-u) = 2, max(-v) = 0.5 -> 1
    assert scores[0, 1, 0].item() == 0.0
    assert scores[0, 1, 1].item() == pytest.approx(1.0)


def test_sign_flip_swaps_features(tiny, folder):
    """Flipping (u, v) -> (-u, -v) of every mode swaps the two sign features exactly."""
    model, svd = tiny
    flipped = qklib.QKSVD(S=svd.S, U=-svd.U, V=-svd.V, model=svd.model)
    a = search.search(model, folder, layers=[0], k=3, svd=svd, progress=False)
    b = search.search(model, folder, layers=[0], k=3, svd=flipped, progress=False)
    assert np.array_equal(a.index[..., 0, :], b.index[..., 1, :])
    assert np.allclose(a.scores[..., 0, :], b.scores[..., 1, :], equal_nan=True)


def test_bad_inputs(tiny, folder, tmp_path):
    model, svd = tiny
    with pytest.raises(ImageError, match="no image files"):
        search.search(model, tmp_path, svd=svd, progress=False)
    with pytest.raises(ImageError, match="does not exist"):
        search.search(model, tmp_path / "missing", svd=svd, progress=False)
    for spec in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            search.parse_shard(spec)
    assert search.parse_shard("2/5") == (2, 5) and search.parse_shard(None) is None
    with pytest.raises(ValueError, match="out of range"):
        search.search(model, folder, layers=[7], svd=svd, progress=False)
    with pytest.raises(ValueError, match="cannot read"):
        search.parse_indices("1,x", 5, "modes")
    assert search.parse_indices("0, 2-4", 6, "heads") == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="k must be"):
        search.search(model, folder, k=0, svd=svd, progress=False)
    # every odd file either loads or is skipped with its reason; strips are cropped before resizing
    strip = open_rgb(folder / "b" / "strip.png")
    assert max(strip.size) <= MAX_ASPECT * min(strip.size)
    deep = np.asarray(open_rgb(folder / "b" / "deep16.png"))
    assert deep.dtype == np.uint8 and deep.min() < 50 and deep.max() > 200  # rescaled, not saturated
    with pytest.raises(ImageError):
        open_rgb(folder / "b" / "truncated.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        search.load_result(tmp_path / "nothing.npz")


def test_save_load_round_trip(tiny, folder, tmp_path):
    model, svd = tiny
    result = search.search(model, folder, layers=[2], k=2, svd=svd, progress=False)
    path = result.save(tmp_path / "r")  # suffix added
    assert path.name == "r.npz"
    back = search.load_result(path)
    assert back.files == result.files and np.array_equal(back.index, result.index)
    assert np.array_equal(back.scores, result.scores) and back.skipped == result.skipped
    assert back.top(2, 1, 0) == result.top(2, 1, 0)
    assert "skipped 3" in back.summary()


def test_search_images_in_memory_equals_the_search_of_the_same_files(tiny, tmp_path):
    model, svd = tiny
    rng = np.random.default_rng(3)
    images = {f"im{i}": _photo(rng, 64, 64) for i in range(5)}
    for name, image in images.items():
        image.save(tmp_path / f"{name}.png")  # lossless: the same pixels
    in_memory = search.search_images(model, images, layers=[0], k=2, svd=svd)
    on_disk = search.search(model, tmp_path, layers=[0], k=2, svd=svd, progress=False)
    assert in_memory.n_images == 5
    for head, mode, sign in ((0, 0, 1), (1, 5, -1), (2, 63, 1)):
        memory_top = [(name, round(score, 4)) for name, score in in_memory.top(0, head, mode, sign)]
        disk_top = [(name[: -len(".png")], round(score, 4)) for name, score in on_disk.top(0, head, mode, sign)]
        assert memory_top == disk_top


def test_cli_search_shards_and_merge(folder, tmp_path):
    """The CLI on the embedded model, one layer and a few modes: shards + search-merge equal one run."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qklib", *args], capture_output=True, text=True, cwd=ROOT)

    common = ["--layers", "3", "--heads", "0,1", "--modes", "0-3", "-k", "3", "--no-progress", "--batch-size", "5"]
    done = cli("search", str(folder), "--out", str(tmp_path / "one"), *common)
    assert done.returncode == 0, done.stderr
    assert "skipped 3" in done.stdout
    for i in range(2):
        done = cli("search", str(folder), "--out", str(tmp_path / "shards"), "--shard", f"{i}/2", *common)
        assert done.returncode == 0, done.stderr
    done = cli("search-merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged.npz"))
    assert done.returncode == 0, done.stderr
    one, merged = search.load_result(tmp_path / "one" / "search.npz"), search.load_result(tmp_path / "merged.npz")
    assert merged.files == one.files and np.array_equal(merged.index, one.index)
    bad = cli("search", str(folder), "--shard", "2/2", "--out", str(tmp_path / "x"), *common)
    assert bad.returncode == 2 and "shard" in bad.stderr
    bad = cli("search", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), *common)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = cli("search-merge", str(tmp_path / "one" / "search.npz"), "--out", str(tmp_path / "y.npz"))
    assert bad.returncode == 2 and "not a shard" in bad.stderr


def test_the_first_batch_is_decoded_beside_the_setup_with_the_same_result(tiny, folder, monkeypatch):
    """On the CPU with a decoding thread, search() starts decoding the first batch before the feature setup (the
    setup here waits until a file is decoded: 10 s at most); the result equals a search that
    decodes after the setup; a setup that fails stops the decoding (no loader thread left)."""
    model, svd = tiny
    decoded = threading.Event()
    load, select = search_run.FileLoader.__call__, search_run.Features.select

    def loader(self, position):
        decoded.set()
        return load(self, position)

    def waiting_select(*args, **kwargs):
        waited.append(decoded.wait(timeout=patience))
        return select(*args, **kwargs)

    monkeypatch.setattr(search_run.FileLoader, "__call__", loader)
    monkeypatch.setattr(search_run.Features, "select", waiting_select)
    waited, patience = [], 10
    early = search.search(model, folder, svd=svd, k=3, batch_size=4, progress=False, workers=0)
    assert waited == [True]
    monkeypatch.setattr(search_run, "_decodes_in_thread", lambda device, workers: False)
    decoded.clear()
    waited, patience = [], 1
    late = search.search(model, folder, svd=svd, k=3, batch_size=4, progress=False, workers=0)
    assert waited == [False]  # the control: without the head start nothing is decoded during the setup
    assert np.array_equal(early.scores, late.scores) and np.array_equal(early.index, late.index)
    assert early.files == late.files and early.skipped == late.skipped and len(early.skipped) == len(BAD)
    monkeypatch.undo()
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="layers") as caught:
        search.search(model, folder, svd=svd, layers="99", batch_size=4, progress=False, workers=0)
    # checked while the traceback (and with it the search's frame and its stream) is alive: stopped by search()
    assert caught.traceback and not [t for t in set(threading.enumerate()) - before if t.is_alive()]


def test_the_result_records_the_weights_digest_with_and_without_a_checkpoint(tiny, folder, tmp_path, monkeypatch):
    """The digest is hashed before the search (beside the setup: on the CPU, or for a checkpoint) or beside it (on
    an accelerator, forced here): the same sha256 every way, and it tells the weights apart."""
    model, svd = tiny
    expected = weights_digest(model)
    plain = search.search(model, folder, svd=svd, layers=[0], k=2, batch_size=4, progress=False, workers=0)
    assert plain.weights == expected
    monkeypatch.setattr(search_run, "_digest_in_line", lambda device: False)  # hashed in a thread from batch one
    threaded = search.search(model, folder, svd=svd, layers=[0], k=2, batch_size=4, progress=False, workers=0)
    assert threaded.weights == expected
    saved = search.search(model, folder, svd=svd, layers=[0], k=2, batch_size=4, progress=False, workers=0,
                          checkpoint=tmp_path / "run.ckpt")
    assert saved.weights == expected
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight[0, 0] += 1e-6  # one weight, slightly: another digest
    assert weights_digest(other) != expected
