"""Benchmark of the optimal-image search (qklib.search): throughput against a bare batched forward pass of the
same model in the same run, and peak memory for a small and a large folder.

Goals: search at most 25% slower than the bare forward pass; peak memory that does not grow with the number of
images. Images are synthetic (random shapes and noise written as JPEG/PNG of varied sizes to a temp folder).

    .venv/bin/python tools/bench_search.py [--images 64] [--sizes 100,1000] [--batch-size 32]

``bench_search()`` returns the figures as a dict and prints them (the lead's ``make bench`` calls it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` synthetic photos-like images (noise plus random rectangles and ellipses) of varied size and format."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        base = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            box = (x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if index % 2 else draw.rectangle)(box, fill=colour)
        sub = folder / f"class{index % 10:02d}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"img{index:05d}.{'jpg' if index % 3 else 'png'}")
    return folder


def _bare_forward(model, root: Path, batch_size: int) -> float:
    """Seconds for the same streaming loader plus ``forward_features`` on every batch (no search)."""
    import torch

    from qklib.core.images import model_transform
    from qklib.core.images import open_rgb
    from qklib.core.stream import Stream
    from qklib.search import image_files

    names = image_files(root)
    stream = Stream(lambda p: open_rgb(root / names[p]), names, list(range(len(names))), model_transform(model), batch_size)
    start = time.perf_counter()
    with torch.no_grad():
        for _position, pixels, _consumed in stream:
            model.forward_features(pixels)
    return time.perf_counter() - start


def _preloaded(model, svd, root: Path, batch_size: int) -> tuple[float, float]:
    """Seconds for forward_features alone and for the search's forward + scoring + top-k, on decoded tensors."""
    import torch

    from qklib.core.images import to_pixels
    from qklib.core.models import info
    from qklib.core.images import open_rgb
    from qklib.core.extract import stream_layers
    from qklib.search import Features, RunningTopK, feature_scores, image_files

    names = image_files(root)
    pixels = to_pixels(model, [open_rgb(root / n) for n in names])
    features = Features.select(svd)
    prefix = info(model).prefix_tokens
    with torch.no_grad():
        start = time.perf_counter()
        for begin in range(0, len(pixels), batch_size):
            model.forward_features(pixels[begin : begin + batch_size])
        bare = time.perf_counter() - start
        start = time.perf_counter()
        top = RunningTopK(features.count, 8)
        for begin in range(0, len(pixels), batch_size):
            batch = pixels[begin : begin + batch_size]
            out = {}
            stream_layers(model, batch, features.layers, on_tokens=
                           lambda layer, x: out.__setitem__(layer, feature_scores(x[:, prefix:] @ features.projection[layer])))
            scores = torch.cat([out[layer] for layer in features.layers], 1)
            top.update(scores.reshape(len(batch), -1).T, torch.arange(begin, begin + len(batch)))
        searched = time.perf_counter() - start
    return bare, searched


_MEMORY_CHILD = """
import ctypes, gc, json, resource, sys, time
sys.path.insert(0, {root!r})
import qklib
from qklib.search import search


def peak_kib(reset=False):
    # VmHWM (peak resident set) can be reset on Linux >= 4.0 by writing 5 to clear_refs: that leaves the
    # model-loading peak out of the search's figure. Falls back to ru_maxrss where it cannot.
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        with open("/proc/self/status") as handle:
            return int(next(line for line in handle if line.startswith("VmHWM")).split()[1]), True
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False


model = qklib.load_model({model!r})
svd = qklib.qk_svd(model)
gc.collect()
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass
import threading


def resident_kib():
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith("VmRSS")).split()[1])


samples, done = [], threading.Event()


def poll():  # resident memory over time: a leak shows as a trend, allocator noise does not
    while not done.is_set():
        try:
            samples.append(resident_kib())
        except OSError:
            return
        done.wait(0.2)


before, resettable = peak_kib(reset=True)
poller = threading.Thread(target=poll, daemon=True)
poller.start()
start = time.perf_counter()
result = search(model, {folder!r}, k=8, batch_size={batch_size}, svd=svd, progress=False)
seconds = time.perf_counter() - start
done.set()
poller.join()
peak, _ = peak_kib()
tenth = max(1, len(samples) // 10)
print(json.dumps({{"peak_kib": peak, "before_kib": before, "resettable": resettable,
                  "images": result.n_images, "seconds": seconds,
                  "first_tenth_max_kib": max(samples[:tenth] or [0]), "last_tenth_max_kib": max(samples[-tenth:] or [0])}}))
"""


def _peak_memory(model_name: str, folder: Path, batch_size: int) -> dict:
    """Search a folder in a fresh process and report its peak resident memory (ru_maxrss)."""
    code = _MEMORY_CHILD.format(root=str(ROOT), model=model_name, folder=str(folder), batch_size=batch_size)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_search(images: int = 32, sizes: tuple[int, ...] = (100, 1000), batch_size: int = 32,
                 repeats: int = 2, model_name: str | None = None, quiet: bool = False,
                 save: str | Path | None = ROOT / "executed" / "bench_search.json") -> dict:
    """Run the benchmark; print and return ``{"overhead": ..., "memory": {N: MiB}, ...}``.

    The figures are also written to ``save`` (JSON), where the §5 chapter's closing note reads them.

    Throughput: ``images`` synthetic images, all layers, heads and modes, k = 8, best of ``repeats`` runs of
    each variant (interleaved, so load from other processes hits both alike).
    """
    import torch

    import qklib
    from qklib.search import search

    name = model_name or qklib.DEFAULT_MODEL
    model = qklib.load_model(name)
    svd = qklib.qk_svd(model)
    out: dict = {"model": name, "threads": torch.get_num_threads(), "batch_size": batch_size, "images": images}
    with tempfile.TemporaryDirectory(prefix="qklib-bench-") as tmp:
        folder = write_images(Path(tmp) / "throughput", images)
        _bare_forward(model, folder, batch_size)  # warm-up (allocator, oneDNN kernels)
        bare, searched, bare_pre, searched_pre = [], [], [], []
        for _ in range(repeats):
            bare.append(_bare_forward(model, folder, batch_size))
            searched.append(search(model, folder, k=8, batch_size=batch_size, svd=svd, progress=False).seconds)
            pre = _preloaded(model, svd, folder, batch_size)
            bare_pre.append(pre[0])
            searched_pre.append(pre[1])
        out.update(
            bare_images_per_s=images / min(bare), search_images_per_s=images / min(searched),
            overhead=min(searched) / min(bare) - 1,
            preloaded_bare_images_per_s=images / min(bare_pre), preloaded_search_images_per_s=images / min(searched_pre),
            preloaded_overhead=min(searched_pre) / min(bare_pre) - 1,
        )
        memory = {}
        for count in sizes:
            probe = _peak_memory(name, write_images(Path(tmp) / f"mem{count}", count, seed=count), batch_size)
            memory[count] = {"peak_mib": probe["peak_kib"] / 1024, "before_search_mib": probe["before_kib"] / 1024,
                             "search_only": probe["resettable"],
                             "first_tenth_max_mib": probe["first_tenth_max_kib"] / 1024,
                             "last_tenth_max_mib": probe["last_tenth_max_kib"] / 1024,
                             "images_per_s": probe["images"] / probe["seconds"]}
        out["memory"] = memory
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        Path(save).write_text(json.dumps(out, indent=1))
    if not quiet:
        print(f"search benchmark ({name}, {out['threads']} torch threads, batch {batch_size}, all "
              f"{svd.num_layers} layers x {svd.num_heads} heads x {svd.rank} modes x 2 signs, k = 8)")
        print(f"  from disk, {images} images: bare forward {out['bare_images_per_s']:.2f} img/s, search "
              f"{out['search_images_per_s']:.2f} img/s -> overhead {100 * out['overhead']:+.1f}% (goal <= 25%)")
        print(f"  decoded tensors: bare forward {out['preloaded_bare_images_per_s']:.2f} img/s, search core "
              f"{out['preloaded_search_images_per_s']:.2f} img/s -> overhead {100 * out['preloaded_overhead']:+.1f}%")
        for count, figures in memory.items():
            scope = "during the search (VmHWM reset after model load)" if figures["search_only"] else "of the process"
            print(f"  peak resident memory {scope}, {count:5d} images: {figures['peak_mib']:.0f} MiB "
                  f"(resident before the search {figures['before_search_mib']:.0f} MiB; {figures['images_per_s']:.2f} img/s)")
            print(f"    resident memory, max over the first tenth of the run {figures['first_tenth_max_mib']:.0f} MiB, "
                  f"over the last tenth {figures['last_tenth_max_mib']:.0f} MiB")
        if len(sizes) >= 2:
            low, high = memory[min(sizes)]["peak_mib"], memory[max(sizes)]["peak_mib"]
            print(f"  peak growth from {min(sizes)} to {max(sizes)} images: {high - low:+.0f} MiB "
                  f"({100 * (high / low - 1):+.1f}%; goal: no growth; the peak of a longer run also samples more "
                  "allocator noise, so compare the first and last tenth above)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images for the throughput comparison")
    parser.add_argument("--sizes", default="100,1000", help="folder sizes for the peak-memory probes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    figures = bench_search(images=args.images, sizes=sizes, batch_size=args.batch_size, repeats=args.repeats)
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
