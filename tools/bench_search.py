"""Benchmark of the optimal-image search (qklib.search) against a bare batched forward pass of the same model on
the same images, measured in one run.

CPU table (always): the embedded default model; from disk (the same loader for both) and on decoded tensors;
peak resident memory of a search over 100 and 1000 images in a fresh process. CUDA table (when
``torch.cuda.is_available()``): ViT-S/14 (the default's geometry), ViT-B/16 and ViT-L/16 with random weights at
batch 128: images/s of the bare forward on decoded tensors, of the bare forward from disk with the same loader, of
the loader alone and of the search; peak GPU memory; and the bf16 search's agreement with fp32.

Images are synthetic (noise plus random shapes, JPEG and PNG of varied sizes) in a temporary folder.

    .venv/bin/python tools/bench_search.py [--images 96] [--batch-size 16] [--repeats 9] [--gpu-only] [--cpu-only]

``bench_search()`` returns the CPU figures as a dict and prints them (``make bench`` calls it), ``bench_gpu()``
the CUDA ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qklib  # noqa: E402
from qklib.core.images import image_files, model_transform  # noqa: E402
from qklib.core.stream import FileLoader, Stream, cpu_count, default_workers  # noqa: E402
from qklib.search import search  # noqa: E402
from qklib.search.features import Features, forward_precision  # noqa: E402
from qklib.search.run import run  # noqa: E402
from qklib.search.topk import near_tie_gap  # noqa: E402

GPU_ARCHS = (("ViT-S/14", qklib.DEFAULT_MODEL), ("ViT-B/16", "vit_base_patch16_224"), ("ViT-L/16", "vit_large_patch16_224"))
NEAR_TIE = 0.05  # bf16 vs fp32: top-k may differ only among images within 5% of the feature's top score


def write_images(folder: Path, count: int, seed: int = 0, width=(200, 400), height=(200, 400),
                 processes: int = 1) -> Path:
    """``count`` synthetic photo-like images (noise plus random rectangles and ellipses) of varied size and format
    (the same files whatever ``processes`` writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    if processes > 1 and count > 64:
        parts = [range(start, min(count, start + 64)) for start in range(0, count, 64)]
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_part, [(folder, part, seed, width, height) for part in parts]))
    else:
        _write_part((folder, range(count), seed, width, height))
    return folder


def _write_part(job) -> None:
    folder, indices, seed, width, height = job
    for index in indices:
        rng = np.random.default_rng([seed, index])
        w, h = int(rng.integers(*width)), int(rng.integers(*height))
        base = (rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if index % 2 else draw.rectangle)(box, fill=colour)
        sub = folder / f"class{index % 10:02d}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"img{index:05d}.{'jpg' if index % 3 else 'png'}")


# --- the timed variants (each returns seconds; every one ends with the device idle) -------------------------

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stream(model, root: Path, batch_size: int, workers: int | None) -> Stream:
    names = image_files(root)
    return Stream(FileLoader(root, names), names, list(range(len(names))), model_transform(model), batch_size,
                  workers=workers, device=_device(model))


def decoded(model, root: Path, batch_size: int, workers: int | None) -> list:
    """Every batch decoded once and kept on the model's device (for the forward-only figures)."""
    batches = list(_stream(model, root, batch_size, workers))
    _sync(_device(model))
    return batches


def bare_decoded(model, batches, precision: str = "fp32", clock=time.perf_counter) -> float:
    """``forward_features`` over already decoded batches."""
    device = _device(model)
    _sync(device)
    start = clock()
    with torch.no_grad(), forward_precision(precision, device):
        for _position, pixels, _consumed in batches:
            model.forward_features(pixels)
    _sync(device)
    return clock() - start


def bare_disk(model, root: Path, batch_size: int, workers: int | None) -> float:
    """The search's loader (same batches, same workers) plus ``forward_features`` on every batch."""
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _position, pixels, _consumed in _stream(model, root, batch_size, workers):
            model.forward_features(pixels)
    _sync(device)
    return time.perf_counter() - start


def loader_alone(model, root: Path, batch_size: int, workers: int | None) -> float:
    """The loader with no model: decode, preprocess and copy to the device."""
    device = _device(model)
    start = time.perf_counter()
    for _batch in _stream(model, root, batch_size, workers):
        pass
    _sync(device)
    return time.perf_counter() - start


def search_disk(model, svd, root: Path, batch_size: int, workers: int | None, precision: str = "fp32", k: int = 8):
    """The whole ``qklib.search.search`` call (feature setup, loader, forward, scoring, top-k, result)."""
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    result = search(model, root, k=k, batch_size=batch_size, svd=svd, progress=False, workers=workers,
                    precision=precision)
    _sync(device)
    return time.perf_counter() - start, result


def setup(model, svd) -> tuple[float, Features]:
    """The search's one-time feature setup (projection matrices, q/k coefficients): seconds and the features."""
    start = time.perf_counter()
    features = Features.select(svd, device=_device(model), model=model)
    _sync(_device(model))
    return time.perf_counter() - start, features


def search_decoded(model, features, batches, k: int = 8, clock=time.perf_counter) -> float:
    """Forward, scoring and top-k (to the host at the end) on already decoded batches: the search minus the
    loader and minus the one-time setup (timed by :func:`setup`)."""
    device = _device(model)
    _sync(device)
    start = clock()
    top, _ = run(model, batches, features, k)
    top.cpu()
    _sync(device)
    return clock() - start


def paired_decoded(model, features, batches, rounds: int, clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """Per round, seconds of the bare forward and of the search over ``batches``, timed batch by batch back to
    back in alternating order (so that load from other processes hits both sides of every pair alike)."""
    bare, searched = [], []
    for round_ in range(rounds):
        b = s = 0.0
        for batch in batches:
            if round_ % 2 == 0:
                b += bare_decoded(model, [batch], clock=clock)
            s += search_decoded(model, features, [batch], clock=clock)
            if round_ % 2 == 1:
                b += bare_decoded(model, [batch], clock=clock)
        bare.append(b)
        searched.append(s)
    return bare, searched


def all_scores(model, svd, batches) -> torch.Tensor:
    """``[N, count]`` fp32 scores of every image (row = position) for every feature, for near-tie checks."""
    features = Features.select(svd, device=_device(model), model=model)
    rows = [features.scores(model, pixels) for _position, pixels, _consumed in batches if pixels is not None]
    return torch.cat(rows)


# --- peak resident memory in a fresh process --------------------------------------------------------------

_MEMORY_CHILD = """
import ctypes, gc, json, sys, threading, time
sys.path.insert(0, {root!r})
import qklib
from qklib.search import search

model = qklib.load_model({model!r})
svd = qklib.qk_svd(model)
gc.collect()
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass


def status(key):
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith(key)).split()[1])


with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM: leave the model-loading peak out
    handle.write("5")
before = status("VmRSS")
samples, done = [], threading.Event()


def poll():  # resident memory over time: a leak shows as a trend, allocator noise does not
    while not done.is_set():
        samples.append(status("VmRSS"))
        done.wait(0.1)


poller = threading.Thread(target=poll, daemon=True)
poller.start()
start = time.perf_counter()
result = search(model, {folder!r}, layers={layers!r}, k=8, batch_size={batch_size}, svd=svd, progress=False)
seconds = time.perf_counter() - start
done.set()
poller.join()
tenth = max(1, len(samples) // 10)
print(json.dumps({{"peak_kib": status("VmHWM"), "before_kib": before, "images": result.n_images, "seconds": seconds,
                  "first_tenth_max_kib": max(samples[:tenth]), "last_tenth_max_kib": max(samples[-tenth:])}}))
"""


def peak_memory(model_name: str, folder: Path, batch_size: int, layers) -> dict:
    """Search a folder in a fresh process: peak resident memory during the search (VmHWM reset after loading)."""
    code = _MEMORY_CHILD.format(root=str(ROOT), model=model_name, folder=str(folder), batch_size=batch_size,
                                layers=layers)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the two tables ---------------------------------------------------------------------------------------

def bench_search(images: int = 96, sizes: tuple[int, ...] = (100, 1000), batch_size: int = 16, repeats: int = 9,
                 model_name: str | None = None, memory_layers: str = "0", quiet: bool = False,
                 save: str | Path | None = ROOT / "executed" / "bench_search.json") -> dict:
    """The CPU table: print and return ``{"overhead": ..., "preloaded_overhead": ..., "memory": {N: ...}, ...}``.

    Throughput: ``images`` synthetic images, all layers, heads and modes, k = 8; after a warm-up pass,
    ``repeats`` rounds, each timing the bare forward and the search back to back in alternating order (on
    decoded tensors batch by batch); the overhead is the median over rounds of search / bare, the images/s the
    best round's. From disk: the whole ``search()`` call (its one-time setup included, which on the CPU runs beside
    the first batch's decoding) against the same loader plus ``forward_features``. Decoded tensors: the search's
    loop against ``forward_features`` on the same batches; the setup is timed on its own. Memory: a search of
    layers ``memory_layers`` (all heads and modes) over ``sizes`` images, each in a fresh process. The figures are
    also written to ``save`` (JSON).
    """
    name = model_name or qklib.DEFAULT_MODEL
    model = qklib.load_model(name)
    svd = qklib.qk_svd(model)
    workers = default_workers("cpu")
    out: dict = {"model": name, "device": "cpu", "threads": torch.get_num_threads(), "batch_size": batch_size,
                 "images": images, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="qklib-bench-") as tmp:
        folder = write_images(Path(tmp) / "throughput", images)
        batches = decoded(model, folder, batch_size, workers)
        setup_s, features = setup(model, svd)
        bare_decoded(model, batches[:1])  # warm-up (allocator, oneDNN kernels)
        search_decoded(model, features, batches[:1])
        times: dict[str, list[float]] = {key: [] for key in ("bare_disk", "search_disk", "bare_decoded", "search_decoded",
                                                            "loader", "setup")}
        for round_ in range(repeats):
            # Each pair is timed back to back, in alternating order, so that load from other processes
            # (seconds long) hits both sides alike.
            first_bare = round_ % 2 == 0
            pair = [lambda: bare_disk(model, folder, batch_size, workers),
                    lambda: search_disk(model, svd, folder, batch_size, workers)[0]]
            measured = [fn() for fn in (pair if first_bare else pair[::-1])]
            times["bare_disk"].append(measured[0 if first_bare else 1])
            times["search_disk"].append(measured[1 if first_bare else 0])
            times["loader"].append(loader_alone(model, folder, batch_size, workers))
            times["setup"].append(setup(model, svd)[0])
        times["bare_decoded"], times["search_decoded"] = paired_decoded(model, features, batches, repeats)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the work itself: one thread, process CPU time (robust to other processes' load)
        try:
            work = paired_decoded(model, features, batches[:1], repeats, clock=time.process_time)
        finally:
            torch.set_num_threads(threads)
        out["work_overhead"] = float(np.median([s / b for b, s in zip(*work)])) - 1
        out["work_overhead_rounds"] = [s / b - 1 for b, s in zip(*work)]
        best = {key: min(values) for key, values in times.items()}
        ratio = {key: float(np.median([s / b for s, b in zip(times[f"search_{key}"], times[f"bare_{key}"])]))
                 for key in ("disk", "decoded")}
        out.update(
            bare_images_per_s=images / best["bare_disk"], search_images_per_s=images / best["search_disk"],
            overhead=ratio["disk"] - 1, overhead_of_best=best["search_disk"] / best["bare_disk"] - 1,
            preloaded_bare_images_per_s=images / best["bare_decoded"],
            preloaded_search_images_per_s=images / best["search_decoded"],
            preloaded_overhead=ratio["decoded"] - 1,
            preloaded_overhead_of_best=best["search_decoded"] / best["bare_decoded"] - 1,
            loader_images_per_s=images / best["loader"], setup_s=best["setup"], seconds=times,
        )
        memory = {}
        for count in sizes:
            probe = peak_memory(name, write_images(Path(tmp) / f"mem{count}", count, seed=count), batch_size, memory_layers)
            memory[count] = {"peak_mib": probe["peak_kib"] / 1024, "before_search_mib": probe["before_kib"] / 1024,
                             "first_tenth_max_mib": probe["first_tenth_max_kib"] / 1024,
                             "last_tenth_max_mib": probe["last_tenth_max_kib"] / 1024,
                             "images_per_s": probe["images"] / probe["seconds"]}
        out["memory"] = memory
        out["memory_layers"] = memory_layers
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        Path(save).write_text(json.dumps(out, indent=1))
    if not quiet:
        loader = "1 background thread" if workers == 0 else f"{workers} worker processes"
        print(f"search benchmark, CPU ({name}, {out['threads']} torch threads, {cpu_count()} CPUs, decoding: {loader}; "
              f"{images} images, batch {batch_size}, all {svd.num_layers} layers x {svd.num_heads} heads x {svd.rank} "
              f"modes x 2 signs, k = 8; {repeats} rounds after a warm-up, each pair back to back in alternating order)")
        print(f"  from disk:       bare forward {out['bare_images_per_s']:6.2f} img/s, search "
              f"{out['search_images_per_s']:6.2f} img/s (best rounds); search / bare, median over rounds: "
              f"{100 * out['overhead']:+5.1f}% (goal <= 5%; best vs best {100 * out['overhead_of_best']:+.1f}%; the "
              f"search's one-time setup, {out['setup_s']:.2f} s alone, included: it runs beside the first batch's "
              f"decoding and the weights' hashing)")
        print(f"  decoded tensors: bare forward {out['preloaded_bare_images_per_s']:6.2f} img/s, search "
              f"{out['preloaded_search_images_per_s']:6.2f} img/s (best rounds); search / bare, median over rounds: "
              f"{100 * out['preloaded_overhead']:+5.1f}% (best vs best {100 * out['preloaded_overhead_of_best']:+.1f}%; "
              f"setup excluded); the loader alone: {out['loader_images_per_s']:.0f} img/s")
        ratios = ", ".join(f"{100 * (s / b - 1):+.0f}%" for s, b in zip(times["search_disk"], times["bare_disk"]))
        ratios_pre = ", ".join(f"{100 * (s / b - 1):+.0f}%" for s, b in zip(times["search_decoded"], times["bare_decoded"]))
        print(f"  per round, from disk: {ratios}; decoded: {ratios_pre}")
        rounds = ", ".join(f"{100 * r:+.1f}%" for r in out["work_overhead_rounds"])
        print(f"  the work itself (1 torch thread, process CPU time, the first batch of decoded tensors, paired): "
              f"search / bare {100 * out['work_overhead']:+.1f}%, median over rounds ({rounds})")
        print("  (the search stops after the last layer's qkv: it skips that block's attention and MLP and the final norm)")
        for count, figures in memory.items():
            print(f"  peak resident memory, search of layer(s) {memory_layers} (all heads and modes), {count:5d} images: "
                  f"{figures['peak_mib']:.0f} MiB (before the search {figures['before_search_mib']:.0f} MiB; max over "
                  f"the first / last tenth of the run {figures['first_tenth_max_mib']:.0f} / "
                  f"{figures['last_tenth_max_mib']:.0f} MiB; {figures['images_per_s']:.1f} img/s)")
        if len(sizes) >= 2:
            low, high = memory[min(sizes)]["peak_mib"], memory[max(sizes)]["peak_mib"]
            print(f"  peak growth from {min(sizes)} to {max(sizes)} images: {high - low:+.0f} MiB "
                  f"({100 * (high / low - 1):+.1f}%; goal: flat)")
    return out


def bench_gpu(images: int = 2048, batch_size: int = 128, repeats: int = 2, archs=GPU_ARCHS, device: str = "cuda",
              workers: int | None = None, quiet: bool = False) -> list[dict]:
    """The CUDA table (also runs on ``device="cpu"`` for a quick check of the code path): per architecture, with
    random weights, images/s of the bare forward on decoded tensors, the loader alone, the bare forward from disk
    with the same loader and the search (fp32, the whole call); its one-time setup; peak GPU memory of the search;
    the bf16 search's agreement with fp32 (identical top-k lists, and the largest near-tie gap)."""
    workers = default_workers(device) if workers is None else workers
    rows = []
    with tempfile.TemporaryDirectory(prefix="qklib-bench-gpu-") as tmp:
        folder = write_images(Path(tmp) / "images", images, width=(380, 460), height=(340, 410), processes=cpu_count())
        names = image_files(folder)
        for label, arch in archs:
            model = qklib.random_control(arch, device=device)  # the default's geometry for ViT-S/14 (224 px)
            svd = qklib.qk_svd(model)
            batches = decoded(model, folder, batch_size, workers)
            bare_decoded(model, batches[:1])  # warm-up
            times: dict[str, list[float]] = {key: [] for key in ("bare_decoded", "loader", "bare_disk", "search", "setup")}
            peak = float("nan")
            for _ in range(repeats):
                times["bare_decoded"].append(bare_decoded(model, batches))
                times["loader"].append(loader_alone(model, folder, batch_size, workers))
                times["bare_disk"].append(bare_disk(model, folder, batch_size, workers))
                times["setup"].append(setup(model, svd)[0])
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, fp32 = search_disk(model, svd, folder, batch_size, workers)
                times["search"].append(seconds)
                if device == "cuda":
                    peak = torch.cuda.max_memory_allocated() / 2**20
            _, bf16 = search_disk(model, svd, folder, batch_size, workers, precision="bf16")
            reference = all_scores(model, svd, batches)
            top_scores = torch.from_numpy(fp32.scores.reshape(-1, fp32.k)).to(reference.device)
            position_fp32, position_bf16 = _positions(fp32, names), _positions(bf16, names)
            gap = near_tie_gap(reference, top_scores, position_bf16.to(reference.device))
            identical = (position_fp32 == position_bf16).all(1).float().mean()
            best = {key: min(values) for key, values in times.items()}
            row = {"model": label, "arch": arch, "images": images, "batch_size": batch_size, "workers": workers,
                   **{f"{key}_images_per_s": images / value for key, value in best.items() if key != "setup"},
                   "setup_s": best["setup"], "peak_gpu_mib": peak, "bf16_identical_features": float(identical),
                   "bf16_max_gap": float(gap.max()), "bf16_features_beyond_near_tie": int((gap > NEAR_TIE).sum())}
            rows.append(row)
            del model, batches, reference
            if device == "cuda":
                torch.cuda.empty_cache()
    if not quiet:
        name = torch.cuda.get_device_name() if device == "cuda" else device
        print(f"search benchmark, {name}, {cpu_count()} CPUs ({images} JPEG/PNG images of about 420 x 375 px, batch "
              f"{batch_size}, fp32, random weights, all layers x heads x modes x 2 signs, k = 8; decoding: {workers} "
              f"worker processes; best of {repeats})")
        print("  | model | bare forward, decoded | loader alone | bare forward from disk | search from disk (setup) | "
              "search vs bare from disk | the same, setup excluded | bare from disk vs decoded | peak GPU memory, search |")
        print("  |---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"  | {row['model']} | {row['bare_decoded_images_per_s']:,.0f} img/s | {row['loader_images_per_s']:,.0f} img/s | "
                  f"{row['bare_disk_images_per_s']:,.0f} img/s | {row['search_images_per_s']:,.0f} img/s ({row['setup_s']:.2f} s) | "
                  f"{100 * (row['bare_disk_images_per_s'] / row['search_images_per_s'] - 1):+.1f}% time | "
                  f"{100 * ((images / row['search_images_per_s'] - row['setup_s']) * row['bare_disk_images_per_s'] / images - 1):+.1f}% time | "
                  f"{100 * (row['bare_decoded_images_per_s'] / row['bare_disk_images_per_s'] - 1):+.1f}% time | "
                  f"{row['peak_gpu_mib']:,.0f} MiB |")
        for row in rows:
            print(f"  bf16 vs fp32, {row['model']}: {100 * row['bf16_identical_features']:.1f}% of features with identical "
                  f"top-k; largest near-tie gap {row['bf16_max_gap']:.2e} of the feature's top fp32 score "
                  f"({row['bf16_features_beyond_near_tie']} features beyond {NEAR_TIE:g})")
    return rows


def _positions(result, names: list[str]) -> torch.Tensor:
    """``[F, k]`` positions (into ``names``) of a result's top-k, -1 where none."""
    lookup = {name: i for i, name in enumerate(names)}
    mapped = np.array([lookup[result.files[i]] if i >= 0 else -1 for i in result.index.reshape(-1)], dtype=np.int64)
    return torch.from_numpy(mapped.reshape(-1, result.k))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96,
                        help="images for the CPU throughput comparison (enough that the one-time setup, ~0.1 s for "
                             "the default model, is a small share, as in a real search)")
    parser.add_argument("--sizes", default="100,1000", help="folder sizes for the peak-memory probes")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the CPU table (the CUDA table uses 128)")
    parser.add_argument("--repeats", type=int, default=9,
                        help="rounds of the CPU table (from disk, one pair of runs varies by up to about ±20%% on a 2-core VM)")
    parser.add_argument("--gpu-images", type=int, default=2048, help="images for the CUDA table")
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--model", default=None, help="model of the CPU table (default: the embedded model)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    figures = {}
    if not args.gpu_only:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s)
        figures["cpu"] = bench_search(images=args.images, sizes=sizes, batch_size=args.batch_size, repeats=args.repeats,
                                      model_name=args.model)
    if torch.cuda.is_available() and not args.cpu_only:
        figures["cuda"] = bench_gpu(images=args.gpu_images)
    elif not args.cpu_only:
        print("CUDA table: no CUDA device here (torch.cuda.is_available() is False)")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
