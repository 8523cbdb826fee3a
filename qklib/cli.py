"""The command line, declared here only: ``python -m qklib models | cosine | convert | search | search-merge``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core.images import ImageError
from .core.models import DEFAULT_MODEL, RANDOM, ModelError, convert, load_model, model_name
from .core.official import IJEPA_PARTS, PREDICTOR_ARCH
from .core.paper_models import format_table
from .core.svd import NULL_DRAWS, NULL_SEED, layer_null_band, null_band, qk_svd
from .search import merge, parse_shard, search, shard_filename


MODEL_HELP = ("model: a timm 'arch.tag', 'random:NAME' (the seeded random-init control of NAME's architecture) or "
              f"'hf:ORG/NAME' (a Hugging Face checkpoint in the local HF cache); default {DEFAULT_MODEL}, or with "
              "--weights the architecture the file names")


def _model_arguments(parser: argparse.ArgumentParser, positional: bool) -> None:
    """The model-loading options every command shares: NAME, --weights, --part, --seed."""
    if positional:
        parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    else:
        parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--weights", help="a weights file (.safetensors/.pt/.pth/.pth.tar in timm's format, written by "
                                          "'convert', or an official I-JEPA or SimMIM checkpoint) or a Hugging Face "
                                          "model folder")
    parser.add_argument("--part", choices=IJEPA_PARTS, help="which network of an official I-JEPA checkpoint (default encoder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random:NAME (default 0)")


def _load(args: argparse.Namespace, device: str = "cpu"):
    name = args.model
    if getattr(args, "random_init", False):
        name = name or DEFAULT_MODEL
        name = name if name.startswith(RANDOM) else RANDOM + name
    return load_model(name, weights=args.weights, part=args.part, seed=args.seed, device=device)


def _cosine(args: argparse.Namespace) -> int:
    model = _load(args)
    svd = qk_svd(model)
    layers = svd.layer_weighted_cosine()
    folded = qk_svd(model, fold_gamma=True).layer_weighted_cosine()
    band = null_band(svd.dim)
    layer_band = layer_null_band(svd, draws=NULL_DRAWS, seed=NULL_SEED)
    if args.json:
        out = {
            "model": svd.model,
            "layers": layers.tolist(),
            "heads": svd.weighted_cosine().tolist(),
            "unweighted_layers": svd.layer_unweighted_cosine().tolist(),
            "null_band": band,
            "layer_null_band": layer_band.tolist(),
            "layer_null_band_draws": NULL_DRAWS,
            "layer_null_band_seed": NULL_SEED,
            "layers_gamma_folded": folded.tolist(),
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{svd.model}: weighted cosine between left and right singular vectors, mean over {svd.num_heads} heads")
    print(f"null band of one cosine (95%, random unit vectors in R^{svd.dim}, S1's line): +-{band:.4f}")
    print(f"null band of the layer mean (95%, Haar-random U, V with each head's own s_n, {NULL_DRAWS} draws, "
          f"seed {NULL_SEED}): per layer below")
    for note in svd.notes:
        print(f"note: {note}")
    denom = max(svd.num_layers - 1, 1)
    print("                            raw (paper)  gamma folded  null band")
    for index, (value, fold, half) in enumerate(zip(layers.tolist(), folded.tolist(), layer_band.tolist())):
        print(f"layer {index:2d}  (depth {index / denom:.2f})   {value:+.4f}      {fold:+.4f}     +-{half:.4f}")
    return 0


def _models(_args: argparse.Namespace) -> int:
    print(format_table())
    print("\nloads as: a timm name (python -m qklib cosine NAME), or weights=FILE (python -m qklib cosine --weights FILE "
          "[--part predictor]); 'python -m qklib convert FILE --out model.safetensors' writes any of them once in "
          "timm's format. bilinear: whether the score is exactly x_i^T W_q^T W_k x_j. offline now: whether the "
          "weights are in the local cache (file: the authors' checkpoint is needed).")
    return 0


def _convert(args: argparse.Namespace) -> int:
    out, model = convert(args.source, args.out, name=args.model, part=args.part, seed=args.seed)
    count = sum(t.numel() for t in model.state_dict().values())
    kind = "qklib's" if model.qklib_arch == PREDICTOR_ARCH else "timm's"
    print(f"wrote {out}: {model_name(model)} as {kind} '{model.qklib_arch}', {len(model.state_dict())} tensors, "
          f"{count:,} values")
    if model.qklib_kwargs:
        print(f"architecture arguments (in the file's metadata): {json.dumps(model.qklib_kwargs, sort_keys=True)}")
    for note in getattr(model, "qklib_notes", []):
        print(f"note: {note}")
    print(f"load it with: python -m qklib cosine --weights {out}   (Python: qklib.load_model(weights={str(out)!r}))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qklib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the paper's models and whether each loads offline now")
    models.set_defaults(run=_models)
    cosine = sub.add_parser("cosine", help="per-layer weighted cosine between left and right singular vectors")
    _model_arguments(cosine, positional=True)
    cosine.add_argument("--random-init", action="store_true", help="same as random:NAME")
    cosine.add_argument("--json", action="store_true", help="print one JSON object")
    cosine.set_defaults(run=_cosine)
    conv = sub.add_parser(
        "convert", help="write any model qklib loads as one timm-format .safetensors (architecture in its metadata)",
        description="SOURCE: a weights file (official I-JEPA .pth.tar, official SimMIM .pth, timm state dict), a Hugging "
                    "Face model folder, or a name (hf:ORG/NAME, random:NAME, a timm name). The output loads with "
                    "--weights alone.")
    conv.add_argument("source", help="weights file, Hugging Face model folder, or model name")
    conv.add_argument("--out", required=True, help="output .safetensors file")
    conv.add_argument("--model", help="timm architecture of a plain state dict that does not name one")
    conv.add_argument("--part", choices=IJEPA_PARTS, help="which network of an official I-JEPA checkpoint (default encoder)")
    conv.add_argument("--seed", type=int, default=0, help="seed of random:NAME (default 0)")
    conv.set_defaults(run=_convert)
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
                        batch_size=args.batch_size, shard=shard, progress=not args.no_progress, limit=args.limit)
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
    except ModelError as error:
        print(f"error: {error.cli}", file=sys.stderr)
        return 2
    except (ImageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

