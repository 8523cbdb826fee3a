"""The fast paths against their oracles: projections read from the model's q and k against the direct projection,
the Cholesky-QR QK SVD against a dense SVD, the worker-process loader against the background thread, bf16
against fp32 up to near-ties, and a search loop that never waits on the host."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import qklib
from qklib import search
from qklib.core.extract import token_embeddings
from qklib.core.images import model_transform, open_rgb, shipped_photos, to_pixels
from qklib.core.models import prefix_tokens
from qklib.core.provenance import relabel
from qklib.core.stream import FileLoader, Stream
from qklib.core.svd import QKWeights, qk_svd_from_weights
from qklib.search import features as features_module
from qklib.search.features import Features
from qklib.search.run import run
from qklib.search.topk import near_tie_gap

ROOT = Path(__file__).resolve().parents[1]


def _photo(rng, width, height):
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 images with some structure (noise, shapes, two real photos, crops), plus 2 unreadable files."""
    root = tmp_path_factory.mktemp("speed")
    rng = np.random.default_rng(5)
    photos = list(shipped_photos().values())
    for i in range(12):
        if i < 4:
            photo = photos[i % len(photos)]
            w, h = photo.size
            image = photo.crop((i * 7, i * 5, w - i * 9, h - i * 3))
        else:
            image = _photo(rng, int(rng.integers(60, 160)), int(rng.integers(60, 160)))
        (root / f"d{i % 3}").mkdir(exist_ok=True)
        image.save(root / f"d{i % 3}" / f"im{i:02d}.{'png' if i % 4 == 0 else 'jpg'}")
    (root / "d0" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "d1" / "empty.png").write_bytes(b"")
    return root


def _random_vit(arch, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    relabel(model, f"{arch} (test)")
    return model


# --- 1. projections from q and k ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["embedded", "vit_base_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_projection_from_qk_equals_direct_in_float64(which, embedded_model, monkeypatch):
    """Every column read from q/k (no direct fallback), float64 end to end: equal to x @ [U | V] to 1e-6."""
    if which == "embedded":
        model = embedded_model
    else:  # random init at a small image size: the per-layer geometry (d, heads, head dim) is the real one
        model = _random_vit(which, img_size=64)
    svd = qklib.qk_svd(model)
    monkeypatch.setattr(features_module, "GAMMA_MAX", float("inf"))
    model64 = model.to(torch.float64)
    try:
        pixels = to_pixels(model, list(shipped_photos().values())[:2]).double()
        chosen = Features.select(svd, heads="0,2", modes="0-5,40", model=model64, dtype=torch.float64)
        full = Features.select(svd, model=model64, dtype=torch.float64)
        assert set(full.readers) == set(full.layers), "every layer of a timm ViT with fused qkv has a reader"
        assert all(r.direct_index is None for r in full.readers.values())
        prefix = prefix_tokens(model)
        assert prefix == (2 if "distilled" in which else 1)
        for features in (chosen, full):
            got = {}

            def on_layer(layer, x, qkv, features=features):
                assert qkv is not None
                got[layer] = (features.projected(layer, x, qkv, prefix), x[:, prefix:] @ features.projection[layer])

            features.run(model64, pixels, on_layer)
            assert sorted(got) == features.layers
            for layer, (fast, direct) in got.items():
                assert fast.shape == direct.shape == (2, direct.shape[1], 2 * features.per_layer)
                assert fast.dtype == torch.float64
                error = float((fast - direct).abs().max() / direct.abs().max())
                assert error < 1e-6, f"{which} layer {layer}: relative error {error:.1e}"
    finally:
        model.to(torch.float32)


def test_projection_float32_close_to_float64_oracle(embedded_model):
    """The default float32 path (with the direct fallback for ill-conditioned columns) stays near the direct
    projection's own float32 error, per column."""
    model, svd = embedded_model, qklib.qk_svd(embedded_model)
    features = Features.select(svd, model=model)
    fallback = sum(len(r.direct_index) for r in features.readers.values() if r.direct_index is not None)
    assert 0 < fallback < 0.15 * features.count, "a trained model has a few ill-conditioned columns"
    pixels = to_pixels(model, list(shipped_photos().values())[:3])
    errors = []

    def on_layer(layer, x, qkv):
        fast = features.projected(layer, x, qkv, 1).double()
        exact = x[:, 1:].double() @ features.projection[layer].double()
        errors.append(float(((fast - exact).abs().amax((0, 1)) / exact.abs().amax((0, 1))).max()))

    features.run(model, pixels, on_layer)
    assert len(errors) == 12 and max(errors) < 2e-5, errors


def test_extremes_add_the_bias_term_after_the_reduction(embedded_model):
    """extremes() takes min and max over tokens of the products without the bias term and adds it after: float
    rounding is monotone, so that is bitwise min and max of the products plus the term (checked on a model with
    biases, on layers with and without direct columns)."""
    model, svd = embedded_model, qklib.qk_svd(embedded_model)
    features = Features.select(svd, model=model)
    pixels = to_pixels(model, list(shipped_photos().values())[:3])
    checked = []

    def on_layer(layer, x, qkv):
        reader = features.readers[layer]
        assert reader.offset.abs().amax() > 0  # DINOv2's qkv has biases: the term is not zero
        low, high = features.extremes(layer, x, qkv, 1)
        p = reader.project(qkv, 1, offset=False) + reader.offset[..., None]  # [2H', M', B, T]
        torch.testing.assert_close(p, reader.project(qkv, 1), rtol=1e-6, atol=1e-5)
        read = torch.ones(low.shape[1], dtype=torch.bool)
        if reader.direct_index is not None:
            read[reader.direct_index] = False
        for got, want in ((low, p.amin(-1)), (high, p.amax(-1))):
            assert torch.equal(got[:, read], want.permute(2, 0, 1).reshape(got.shape)[:, read])
        checked.append(reader.direct_index is not None)

    features.run(model, pixels, on_layer)
    assert len(checked) == 12 and any(checked) and not all(checked)


def test_project_gives_query_and_key_maps(tiny_vit):
    model, svd = tiny_vit
    pixels = to_pixels(model, list(shipped_photos().values())[:2])
    features = Features.select(svd, layers=[1], heads=[2], modes=[0, 3], model=model)
    query, key = features.project(model, pixels)[1]
    tokens = token_embeddings(model, pixels, layers=[1])[0, :, 1:]  # [B, T, d]
    assert query.shape == key.shape == (2, tokens.shape[1], 1, 2)
    torch.testing.assert_close(query[..., 0, :], tokens @ svd.U[1, 2][:, [0, 3]].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(key[..., 0, :], tokens @ svd.V[1, 2][:, [0, 3]].float(), rtol=1e-4, atol=1e-5)


def test_unreadable_qkv_falls_back_to_direct(tiny_vit):
    """An attention module that uses its qkv weight without calling the Linear: the reader is dropped, the
    layer read directly, and the result equals the oracle."""
    model, svd = tiny_vit
    pixels = to_pixels(model, list(shipped_photos().values())[:2])
    oracle = Features.select(svd, model=model, read_qk=False).scores(model, pixels)
    attn = model.blocks[1].attn
    original = attn.qkv
    attn.qkv = _CalledByWeight(original)
    try:
        features = Features.select(svd, model=model)
        assert 1 in features.readers
        attn.qkv.linear = None  # now the forward uses the weight directly: the hook cannot fire
        got = features.scores(model, pixels)
        assert 1 not in features.readers and 0 in features.readers and 2 in features.readers
        torch.testing.assert_close(got, oracle, rtol=1e-4, atol=1e-6)
    finally:
        attn.qkv = original


class _CalledByWeight(torch.nn.Linear):
    """A qkv Linear that, once ``linear`` is None, is bypassed (as BEiT-style attention does with F.linear)."""

    def __init__(self, original):
        super().__init__(original.in_features, original.out_features)
        self.load_state_dict(original.state_dict())
        self.linear = True

    def forward(self, x):
        return super().forward(x)

    def __call__(self, x):
        if self.linear is None:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return super().__call__(x)


def test_search_from_qk_equals_oracle_search(embedded_model, folder):
    model, svd = embedded_model, qklib.qk_svd(embedded_model)
    fast = search.search(model, folder, k=3, batch_size=5, svd=svd, progress=False)
    oracle = search.search(model, folder, k=3, batch_size=5, svd=svd, progress=False, read_qk=False)
    assert fast.n_images == oracle.n_images == 12 and len(fast.skipped) == 2
    assert fast.files == oracle.files
    assert np.array_equal(fast.index, oracle.index)
    finite = np.isfinite(oracle.scores)
    assert np.array_equal(finite, np.isfinite(fast.scores))
    np.testing.assert_allclose(fast.scores[finite], oracle.scores[finite], rtol=1e-4)


# --- 2. the QK SVD --------------------------------------------------------------------------------------

def _check_exact(weights: QKWeights, svd) -> None:
    """Against the dense d x d matrices and a dense SVD of some heads: 1e-10 relative."""
    dense = weights.wq.transpose(-1, -2) @ weights.wk  # [L, H, d, d]
    rebuilt = (svd.U * svd.S.unsqueeze(-2)) @ svd.V.transpose(-1, -2)
    error = (rebuilt - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)
    assert error.max() < 1e-10, f"reconstruction {error.max():.1e}"
    eye = torch.eye(svd.rank, dtype=torch.float64)
    for basis in (svd.U, svd.V):
        assert (basis.transpose(-1, -2) @ basis - eye).abs().max() < 1e-10
    layers, heads = svd.S.shape[:2]
    for layer, head in {(0, 0), (layers - 1, heads - 1), (layers // 2, heads // 2)}:
        s = np.linalg.svd(dense[layer, head].numpy(), compute_uv=False)[: svd.rank]
        assert np.abs(svd.S[layer, head].numpy() - s).max() < 1e-10 * s[0]
    assert torch.all(svd.S[..., :-1] >= svd.S[..., 1:])


def _spy_qr(monkeypatch):
    calls = []
    original = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("case", ["random_vit_b", "embedded", "ill_conditioned", "rank_deficient"])
def test_qk_svd_exact_against_dense(case, embedded_model, monkeypatch):
    """One Cholesky pass (random ViT-B, cond ~2), two (trained, cond ~1e4; synthetic cond 1e6), and Householder
    QR where Cholesky fails (rank-deficient W_q): all exact to 1e-10."""
    if case == "embedded":
        weights = qklib.qk_weights(embedded_model)
    else:
        weights = qklib.qk_weights(_random_vit("vit_base_patch16_224", img_size=32, depth=2))
        if case == "ill_conditioned":
            weights.wq = weights.wq * torch.logspace(0, -6, weights.wq.shape[-2], dtype=torch.float64)[:, None]
        if case == "rank_deficient":
            weights.wq[:, :, 5] = 0
    calls = _spy_qr(monkeypatch)
    svd = qk_svd_from_weights(weights)
    assert bool(calls) == (case == "rank_deficient"), "Householder QR only where Cholesky-QR cannot work"
    _check_exact(weights, svd)


# --- 3. the loader --------------------------------------------------------------------------------------

def test_worker_processes_same_batches_and_skips_as_thread(tiny_vit, folder):
    model, _ = tiny_vit
    names = search.image_files(folder)
    positions = list(range(len(names)))[1:]  # not starting at 0: positions, not list indices, are reported

    def collect(workers):
        stream = Stream(FileLoader(folder, names), names, positions, model_transform(model), 4, workers=workers)
        return [(p.tolist(), None if x is None else x.clone(), n) for p, x, n in stream], stream.skipped

    thread, thread_skipped = collect(0)
    procs, procs_skipped = collect(2)
    assert [b[0] for b in thread] == [b[0] for b in procs] and [b[2] for b in thread] == [b[2] for b in procs]
    assert sum(b[2] for b in thread) == len(positions)
    for a, b in zip(thread, procs):
        assert torch.equal(a[1], b[1])
    assert names[0] == "d0/broken.jpg"  # left out by positions[1:]
    assert thread_skipped == procs_skipped and [n for n, _ in thread_skipped] == ["d1/empty.png"]
    # a consumer that stops early does not hang, and the next stream starts afresh
    stream = Stream(FileLoader(folder, names), names, positions, model_transform(model), 2, workers=2)
    for _batch in stream:
        break
    one = search.search(model, folder, k=2, batch_size=3, svd=tiny_vit[1], progress=False, workers=0)
    two = search.search(model, folder, k=2, batch_size=3, svd=tiny_vit[1], progress=False, workers=2)
    assert np.array_equal(one.index, two.index) and one.skipped == two.skipped and one.n_images == two.n_images


def test_bad_loader_settings(tiny_vit, folder):
    model, svd = tiny_vit
    with pytest.raises(ValueError, match="workers must be >= 0"):
        search.search(model, folder, svd=svd, progress=False, workers=-1)
    with pytest.raises(ValueError, match="precision must be one of"):
        search.search(model, folder, svd=svd, progress=False, precision="fp16")


def test_search_loop_never_waits_on_the_host(tiny_vit, folder, monkeypatch):
    """No .cpu(), .item(), .tolist() or .numpy() between batches: the top-k stays on the model's device."""
    model, svd = tiny_vit
    names = search.image_files(folder)
    batches = list(Stream(FileLoader(folder, names), names, list(range(len(names))), model_transform(model), 3, workers=0))
    features = Features.select(svd, model=model)
    for method in ("cpu", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, _forbidden(method))
    top, scored = run(model, batches, features, k=2)
    monkeypatch.undo()
    assert scored == 12 and top.scores.shape == (features.count, 2)
    expected = search.search(model, folder, k=2, batch_size=3, svd=svd, progress=False)
    assert torch.equal(top.cpu().position.reshape(expected.index.shape) >= 0, torch.from_numpy(expected.index >= 0))


def _forbidden(method):
    def fail(*_args, **_kwargs):
        raise AssertionError(f"Tensor.{method} called inside the search loop")
    return fail


# --- 4. precision ---------------------------------------------------------------------------------------

NEAR_TIE = 0.05  # of the feature's top fp32 score; bf16 keeps 8 significant bits, and errors grow over 12 blocks


def test_bf16_top_k_agrees_with_fp32_up_to_near_ties(embedded_model, folder):
    """Near-tie (qklib.search.topk.near_tie_gap): bf16 may rank differently only images whose fp32 scores are
    within 5% of the feature's top fp32 score of each other."""
    model, svd = embedded_model, qklib.qk_svd(embedded_model)
    fp32 = search.search(model, folder, layers="0,5,11", k=4, batch_size=6, svd=svd, progress=False)
    bf16 = search.search(model, folder, layers="0,5,11", k=4, batch_size=6, svd=svd, progress=False, precision="bf16")
    assert fp32.files and bf16.n_images == fp32.n_images
    names = search.image_files(folder)
    readable = [n for n in names if n not in {s for s, _ in fp32.skipped}]
    features = Features.select(svd, layers="0,5,11", model=model)
    every = torch.zeros(len(names), features.count)  # fp32 score of every image, row = position
    pixels = to_pixels(model, [open_rgb(folder / n) for n in readable])
    every[[names.index(n) for n in readable]] = features.scores(model, pixels)

    def positions(result):
        table = np.array([names.index(result.files[i]) if i >= 0 else -1 for i in result.index.reshape(-1)])
        return torch.from_numpy(table.reshape(-1, result.k))

    gap = near_tie_gap(every, torch.from_numpy(fp32.scores.reshape(-1, fp32.k)), positions(bf16))
    assert float(near_tie_gap(every, torch.from_numpy(fp32.scores.reshape(-1, fp32.k)), positions(fp32)).max()) < 1e-5
    assert float(gap.max()) <= NEAR_TIE, f"bf16 ranks an image {float(gap.max()):.3f} of the top score below fp32's"
    identical = (positions(fp32) == positions(bf16)).all(1).float().mean()
    assert identical > 0.5, f"only {identical:.0%} of features have the same top-k"
    assert not np.array_equal(fp32.scores, bf16.scores), "bf16 must really change the forward pass"
    tf32 = search.search(model, folder, layers="0", k=4, batch_size=6, svd=svd, progress=False, precision="tf32")
    assert np.array_equal(tf32.index, fp32.index[:1])  # on the CPU tf32 is plain fp32


def test_cli_precision_flag(folder, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qklib", *args], capture_output=True, text=True, cwd=ROOT)

    common = ["--layers", "0", "--modes", "0-3", "-k", "2", "--no-progress", "--out", str(tmp_path / "r.npz")]
    done = cli("search", str(folder), "--precision", "bf16", *common)
    assert done.returncode == 0, done.stderr
    assert search.load_result(tmp_path / "r.npz").n_images == 12
    bad = cli("search", str(folder), "--precision", "fp16", *common)
    assert bad.returncode == 2 and "--precision" in bad.stderr


@pytest.mark.slow
def test_gpu_benchmark_code_path_runs_on_cpu():
    """tools/bench_search.py's CUDA table, run on the CPU with a tiny folder: the code path works end to end."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_search
    finally:
        sys.path.remove(str(ROOT / "tools"))
    rows = bench_search.bench_gpu(images=6, batch_size=3, repeats=1, archs=(("ViT-Ti/16", "vit_tiny_patch16_224"),),
                                  device="cpu", workers=1, quiet=True)
    (row,) = rows
    assert row["images"] == 6 and all(row[f"{key}_images_per_s"] > 0 for key in ("bare_decoded", "loader", "bare_disk", "search"))
    assert 0 <= row["bf16_max_gap"] <= bench_search.NEAR_TIE and 0 < row["bf16_identical_features"] <= 1
