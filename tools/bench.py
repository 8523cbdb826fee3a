"""`make bench`: speed and memory ratios, each measured within one run on this machine.

1. Exact QK SVD from thin factors (``qk_svd``) against a dense d x d SVD per head (what the authors' code
   does), for ViT-B/16 and ViT-L/16 geometry with random weights (timing does not depend on the values).
2. The optimal-image search against a bare forward pass, and its peak memory (tools/bench_search.py).

Usage: python tools/bench.py [--dense-heads N] [--skip-search]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from qklib.core.svd import qk_svd_from_weights, qk_weights  # noqa: E402


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_svd(arch: str, dense_heads: int | None) -> None:
    model = timm.create_model(arch, pretrained=False)
    weights = qk_weights(model)
    layers, heads, r, d = weights.wq.shape
    total = layers * heads
    fast = _best_of(lambda: qk_svd_from_weights(weights), repeats=3)

    flat_q = weights.wq.reshape(total, r, d)
    flat_k = weights.wk.reshape(total, r, d)
    count = total if dense_heads is None else min(dense_heads, total)

    def dense():
        for index in range(count):
            torch.linalg.svd(flat_q[index].T @ flat_k[index])

    dense_time = _best_of(dense, repeats=1) * total / count
    note = "all heads" if count == total else f"{count} heads timed, scaled to {total}"
    print(f"{arch}: L={layers} H={heads} d={d} d_k={r} ({total} heads)")
    print(f"  qk_svd, all heads, one batched call: {fast * 1e3:9.1f} ms")
    print(f"  dense d x d SVD per head ({note}):   {dense_time * 1e3:9.1f} ms")
    print(f"  ratio dense / qk_svd:                 {dense_time / fast:9.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-heads", type=int, default=24,
                        help="time the dense SVD on this many heads and scale to all (default 24; 0 = all heads)")
    parser.add_argument("--skip-search", action="store_true", help="only the SVD benchmark")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, CPU")
    for arch in ("vit_base_patch16_224", "vit_large_patch16_224"):
        bench_svd(arch, args.dense_heads or None)
    if not args.skip_search:
        bench_search_path = Path(__file__).with_name("bench_search.py")
        if bench_search_path.exists():
            sys.path.insert(0, str(bench_search_path.parent))
            from bench_search import bench_search

            bench_search()
        else:
            print("search benchmark: tools/bench_search.py not present")


if __name__ == "__main__":
    main()
