"""`make bench`: speed and memory ratios, each measured within one run on this machine.

1. Exact QK SVD from thin factors (``qk_svd``) against a dense d x d SVD per head (what the authors' code
   does), for ViT-B/16 and ViT-L/16 geometry: random weights (every factor's condition number ~2, so one
   Cholesky-QR pass suffices) and the same weights with condition number ~1e3 per factor, as trained models
   have (so the second pass runs). Both sides run with the same number of torch threads, by default 1: on a
   shared machine, multi-threaded LAPACK on these sizes mostly measures contention (measured on 2 cores shared
   with other jobs: the dense SVD 14x slower with 2 threads than with 1).
2. The optimal-image search against a bare forward pass, its peak memory, and on CUDA the GPU table
   (tools/bench_search.py).

Usage: python tools/bench.py [--dense-heads N] [--svd-threads 1,2] [--skip-search]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from qklib.core.svd import QKWeights, qk_svd_from_weights, qk_weights  # noqa: E402


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_svd(arch: str, dense_heads: int | None, threads: tuple[int, ...], repeats: int = 3) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    weights = qk_weights(model)
    layers, heads, r, d = weights.wq.shape
    total = layers * heads
    scale = torch.logspace(0, -3, r, dtype=torch.float64)[:, None]  # rows of each factor: cond ~1e3
    conditioned = QKWeights(wq=weights.wq * scale, wk=weights.wk * scale.flip(0))
    flat_q = weights.wq.reshape(total, r, d)
    flat_k = weights.wk.reshape(total, r, d)
    count = total if dense_heads is None else min(dense_heads, total)

    def dense():
        for index in range(count):
            torch.linalg.svd(flat_q[index].T @ flat_k[index])

    note = "all heads" if count == total else f"{count} heads timed, scaled to {total}"
    print(f"{arch}: L={layers} H={heads} d={d} d_k={r} ({total} heads); dense: {note}")
    rows = []
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            qk_svd_from_weights(weights)  # warm-up
            fast = _best_of(lambda: qk_svd_from_weights(weights), repeats)
            fast_conditioned = _best_of(lambda: qk_svd_from_weights(conditioned), repeats)
            dense_time = _best_of(dense, repeats=2) * total / count
            print(f"  {n} torch thread(s): dense SVD of every head {dense_time * 1e3:6.0f} ms | qk_svd {fast * 1e3:5.0f} ms "
                  f"(random weights, cond ~2: one Cholesky-QR pass) -> {dense_time / fast:5.0f}x (goal >= 100x) | "
                  f"qk_svd {fast_conditioned * 1e3:6.0f} ms (cond ~1e3: two passes) -> {dense_time / fast_conditioned:5.0f}x")
            rows.append({"arch": arch, "threads": n, "dense_s": dense_time, "fast_s": fast,
                         "fast_conditioned_s": fast_conditioned})
    finally:
        torch.set_num_threads(before)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-heads", type=int, default=12,
                        help="time the dense SVD on this many heads and scale to all (default 12; 0 = all heads)")
    parser.add_argument("--svd-threads", default="1",
                        help="torch thread counts for the SVD comparison, both sides alike, e.g. '1,2' (default 1)")
    parser.add_argument("--skip-search", action="store_true", help="only the SVD benchmark")
    args = parser.parse_args()
    threads = tuple(dict.fromkeys(int(n) for n in args.svd_threads.split(",")))
    print(f"torch {torch.__version__}; QK SVD in float64 on the CPU (timings: best of 3 for qk_svd, best of 2 for the dense SVD)")
    for arch in ("vit_base_patch16_224", "vit_large_patch16_224"):
        bench_svd(arch, args.dense_heads or None, threads)
    if not args.skip_search:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_search import main as bench_search_main

        bench_search_main([])


if __name__ == "__main__":
    main()
