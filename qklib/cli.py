"""The command line, declared here only: ``python -m qklib COMMAND`` (``--help`` lists the commands).

Every command that takes a model takes the same spellings (``NAME``, ``random:NAME``, ``hf:ORG/NAME``,
``--weights FILE``) and defaults to the embedded offline model. Bad input and damaged files end with
``error: ...`` on stderr and exit code 2, never a traceback; an interrupted search exits 130 and says how to
resume it; a closed pipe (``... | head -1``) ends quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from .book.paper_models import format_table, models_table
from .core.cluster import (KINDS, ClusterError, SlurmOptions, array_id, launch_folder, make_executor, parse_slurm_args,
                           wait)
from .core.images import image_files
from .core.loaders.official import IJEPA_PARTS, PREDICTOR_ARCH
from .core.messages import cli_syntax
from .core.models import DEFAULT_MODEL, RANDOM, ModelError, convert, load_model, model_name
from .core.provenance import provenance
from .core.svd import NULL_DRAWS, NULL_SEED, layer_null_band, null_band, qk_svd
from .search import MergeError, merge, parse_shard, search, shard_filename
from .search.checkpoint import DEFAULT_EVERY, DEFAULT_SECONDS, Checkpoint
from .search.cluster import Progress, ShardTask, failures, merge_shards, record_launch, shard_status, still_queued

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
    if getattr(args, "model_option", None) and args.model and args.model_option != args.model:
        raise ModelError(f"two models given: {args.model!r} and --model {args.model_option!r}; give one")
    args.model = getattr(args, "model_option", None) or args.model
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


def _models(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(models_table(), indent=1))
        return 0
    print(format_table(wide=args.wide))
    legend = ("loads as: a timm name (python -m qklib cosine NAME), or weights=FILE (python -m qklib cosine --weights "
              "FILE [--part predictor]); 'python -m qklib convert FILE --out model.safetensors' writes any of them once "
              "in timm's format. offline now: whether the weights are in the local cache (file: the authors' "
              "checkpoint is needed). bilinear: whether the score is exactly x_i^T W_q^T W_k x_j.")
    if not args.wide:
        legend = ("L x H x d_k: layers x heads x head dim. " + legend.replace("offline now:", "offline:")
                  + " --wide adds family, prefix tokens and bilinear; --json gives the table as data.")
    print("\n" + (legend if args.wide else textwrap.fill(legend, 100)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    out, model = convert(args.source, args.out, name=args.model, part=args.part, seed=args.seed)
    count = sum(t.numel() for t in model.state_dict().values())
    record = provenance(model)
    kind = "qklib's" if record.arch == PREDICTOR_ARCH else "timm's"
    print(f"wrote {out}: {model_name(model)} as {kind} '{record.arch}', {len(model.state_dict())} tensors, "
          f"{count:,} values")
    if record.kwargs:
        print(f"architecture arguments (in the file's metadata): {json.dumps(record.kwargs, sort_keys=True)}")
    for note in record.notes:
        print(f"note: {note}")
    print(f"load it with: python -m qklib cosine --weights {out}   (Python: qklib.load_model(weights={str(out)!r}))")
    return 0


def _search_paths(args) -> tuple[tuple[int, int] | None, Path, Path]:
    shard = parse_shard(args.shard)
    out = Path(args.out)
    out = out if out.suffix == ".npz" else out / shard_filename(shard)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".checkpoint")
    return shard, out, checkpoint


def _cli_search(args) -> int:
    if args.shards is not None:
        return _cli_search_sharded(args)
    if args.executor != "local" or args.wait:
        given = f"--executor {args.executor}" if args.executor != "local" else "--wait"
        raise ValueError(f"{given} acts on the shards of --shards N; give --shards N")
    shard, out, checkpoint_path = _search_paths(args)
    if args.checkpoint_every < 0 or args.checkpoint_seconds < 0:
        raise ValueError("--checkpoint-every and --checkpoint-seconds must be >= 0 (0 turns that trigger off)")
    checkpoint = Checkpoint(checkpoint_path, every=args.checkpoint_every, seconds=args.checkpoint_seconds)
    if args.resume:
        if checkpoint_path.exists():
            progress = checkpoint.read()[0]["progress"]
            print(f"found checkpoint {checkpoint_path}: {progress['done']} of {progress['total']} files done",
                  file=sys.stderr)
        else:
            print(f"no checkpoint at {checkpoint_path}: starting from the first file", file=sys.stderr)
    model = _load(args, device=args.device or "cpu")
    try:
        result = search(model, args.root, layers=args.layers, heads=args.heads, modes=args.modes, k=args.top_k,
                        batch_size=args.batch_size, shard=shard, progress=not args.no_progress, limit=args.limit,
                        checkpoint=checkpoint, resume=args.resume, out=out, precision=args.precision)
    except KeyboardInterrupt:
        where = (f"the last checkpoint is {checkpoint_path}; run the same command with --resume to continue"
                 if checkpoint_path.exists() else "no checkpoint was saved yet")
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130
    print(result.summary())
    if checkpoint.before.done:
        print(f"resumed from the checkpoint at {checkpoint.before.done} of {checkpoint.before.total} files "
              "(the checkpoint is removed)")
    print(f"saved {out}")
    if shard:
        print(f"when all {shard[1]} shards are done: python -m qklib search-merge {out.parent} --out {out.parent / 'search.npz'}")
    return 0


# A shard task saves its state at least this often on a cluster: below submitit's signal delay (90 s) before a
# preempted or timed-out task is killed, so that the requeued task loses at most this much work.
CLUSTER_CHECKPOINT_SECONDS = 30.0


def _shard_task(args) -> ShardTask:
    """The shard task of ``search --shards N`` from the command line's options, checked."""
    if args.shard:
        raise ValueError("give either --shard i/n (one shard, here) or --shards N (all N shards), not both")
    if Path(args.out).suffix == ".npz":
        raise ValueError(f"--shards N writes a folder of shard results (shard-I-of-N.npz and search.npz); "
                         f"--out {args.out} names a file: give a folder")
    if args.checkpoint:
        raise ValueError("--checkpoint names one file; with --shards N each shard keeps its checkpoint beside its result")
    if args.checkpoint_every < 0 or args.checkpoint_seconds < 0:
        raise ValueError("--checkpoint-every and --checkpoint-seconds must be >= 0 (0 turns that trigger off)")
    device = args.device or ("cuda" if args.gpus_per_task else "cpu")
    seconds = args.checkpoint_seconds
    if args.executor != "local":
        seconds = min(seconds, CLUSTER_CHECKPOINT_SECONDS) if seconds else CLUSTER_CHECKPOINT_SECONDS
    options = {"layers": args.layers, "heads": args.heads, "modes": args.modes, "k": args.top_k,
               "batch_size": args.batch_size, "limit": args.limit, "precision": args.precision}
    model = {"name": args.model, "weights": args.weights, "part": args.part, "seed": args.seed}
    return ShardTask(root=str(Path(args.root).expanduser().resolve()), out=str(Path(args.out).resolve()),
                     shards=args.shards, model=model, options=options, device=device,
                     checkpoint_every=args.checkpoint_every, checkpoint_seconds=seconds)


def _slurm_options(args) -> SlurmOptions:
    return SlurmOptions(partition=args.partition, gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                        time_min=args.time, array_parallelism=args.array_parallelism, setup=list(args.slurm_setup),
                        extra=parse_slurm_args(args.slurm_arg), job_name="qklib-search")


def _merge_report(out: Path, shards: int) -> int:
    result, path = merge_shards(out, shards)
    print(result.summary())
    print(f"merged the {shards} shards into {path}")
    return 0


def _cli_search_sharded(args) -> int:
    """``search ROOT --shards N``: every shard without a result, here one after another (``--executor local``) or as
    one job array; then, when all N are there, their merge into OUT/search.npz."""
    task = _shard_task(args)
    options = _slurm_options(args) if args.executor != "local" else None  # checks the options before any work
    out = Path(task.out)
    status = shard_status(out, task.shards, task.root, args.top_k)
    for note in status.notes:
        print(f"note: {note}", file=sys.stderr)
    if not status.missing:
        print(f"all {task.shards} shards have a result in {out}")
        return _merge_report(out, task.shards)
    listed = ", ".join(str(i) for i in status.missing)
    if args.executor == "local":
        for index in status.missing:
            print(f"shard {index}/{task.shards} ...", file=sys.stderr, flush=True)
            task(index)
        return _merge_report(out, task.shards)
    running = still_queued(out, status.missing) if args.executor == "slurm" else {}
    if running:
        listed = ", ".join(f"{shard} (job {job})" for shard, job in sorted(running.items()))
        raise ValueError(f"shards {listed} are still queued or running from an earlier launch: wait for them "
                         f"(squeue -j {sorted(running.values())[0].split('_')[0]}) or scancel them, then run this again")
    out.mkdir(parents=True, exist_ok=True)
    folder = launch_folder(out / ".submitit")
    executor = make_executor(args.executor, folder, options)
    jobs = dict(zip(status.missing, executor.map_array(task, status.missing)))
    record_launch(folder, jobs)
    print(f"submitted job array {array_id(list(jobs.values()))}: shards {listed} of {task.shards} "
          f"({len(status.done)} already done); job files and logs in {folder}", flush=True)
    if not args.wait:
        print(f"follow it with: squeue -j {array_id(list(jobs.values()))}\nwhen it has finished, run this command "
              "again: it merges the shards into search.npz, or resubmits only the shards without a result (each "
              f"continues from its checkpoint); or merge by hand: python -m qklib search-merge {out} --out "
              f"{out / 'search.npz'}")
        return 0
    total = len(image_files(task.root)[: args.limit] if args.limit else image_files(task.root))
    try:
        states = wait(list(jobs.values()), poll_s=args.poll_seconds,
                      report=Progress(out, task.shards, task.root, jobs, total))
    except KeyboardInterrupt:
        print(f"\nstopped following; job array {array_id(list(jobs.values()))} keeps running (squeue shows it, "
              "scancel stops it); once it has ended, run this command again to merge", file=sys.stderr)
        return 130
    problems = failures(jobs, states, task.shards)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"{len(problems)} of {len(jobs)} shards did not finish; after fixing the cause, run the same command "
              "again: it resubmits only these shards, each continuing from its checkpoint", file=sys.stderr)
        return 1
    return _merge_report(out, task.shards)


def _cli_merge(args) -> int:
    files: list[Path] = []
    for item in args.shards:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("shard-*-of-*.npz"))
            if not found:
                raise FileNotFoundError(f"no shard-I-of-N.npz files in the folder {str(path)!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"shard {str(path)!r} does not exist (give shard .npz files or their folder)")
    result = merge(files, allow_partial=args.allow_partial)
    path = result.save(args.out)
    print(result.summary())
    print(f"merged {len(files)} shards into {path}")
    return 0


# One line per command for 'python -m qklib --help' (each command's --help has the details).
COMMANDS = {
    "models": "the paper's models and whether each loads offline now",
    "cosine": "per-layer weighted cosine of left/right singular vectors (§4)",
    "convert": "write any model qklib loads as one timm-format .safetensors",
    "search": "top-k optimal images of every singular mode in a folder (§5)",
    "search-merge": "merge 'search --shard i/n' results into the single-run result",
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<14}{text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m qklib", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="qklib: query-key interaction in vision transformers (Pan et al., NeurIPS 2024).\n\n"
                    f"commands:\n{listing}\n\n'python -m qklib COMMAND --help' shows a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands above")
    models = sub.add_parser("models", description=COMMANDS["models"] + ".")
    shape = models.add_mutually_exclusive_group()
    shape.add_argument("--wide", action="store_true", help="every column on one line per model (about 230 columns)")
    shape.add_argument("--json", action="store_true", help="the table as a JSON list, one object per model")
    models.set_defaults(run=_models)
    cosine = sub.add_parser("cosine", description="Per-layer weighted cosine between the left and right singular "
                            f"vectors of W_q^T W_k (paper §4). The model defaults to {DEFAULT_MODEL}.")
    _model_arguments(cosine, positional=True)
    cosine.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    cosine.add_argument("--random-init", action="store_true", help="the same as random:NAME (kept as an alias)")
    cosine.add_argument("--json", action="store_true", help="print one JSON object")
    cosine.set_defaults(run=_cosine)
    conv = sub.add_parser(
        "convert",
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


def _add_search(subparsers) -> None:
    cmd = subparsers.add_parser(
        "search", description="Score every image under ROOT for every chosen mode: max(0, max_i x_i.u) * max(0, max_j x_j.v) "
                    "and the sign-flipped feature, and keep the top-k. Indices are 0-based. The running state is "
                    "checkpointed next to the output; after an interruption, run the same command with --resume.")
    cmd.add_argument("root", help="image folder (ImageNet's val/<class>/<file> layout or any tree of images)")
    cmd.add_argument("--out", default="search-results",
                     help="output .npz file, or a folder for search.npz / shard-I-of-N.npz (default: search-results)")
    _model_arguments(cmd, positional=False)
    cmd.add_argument("--layers", default="all", help="layers to search, e.g. 'all', '0,5,11' or '3-6' (0-based)")
    cmd.add_argument("--heads", default="all", help="heads to search (0-based), default all")
    cmd.add_argument("--modes", default="all", help="modes to search (0-based, M0 = largest s_n), default all")
    cmd.add_argument("-k", "--top-k", type=int, default=8, help="images kept per feature (default 8)")
    cmd.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    cmd.add_argument("--shard", help="'i/n': score files i::n of the sorted list (0-based i); merge with search-merge")
    cmd.add_argument("--limit", type=int, help="score only the first LIMIT files of the sorted list")
    cmd.add_argument("--device", default=None, help="torch device (default cpu; cuda with --gpus-per-task)")
    cmd.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "tf32"],
                     help="forward pass precision (default fp32; tf32 acts on CUDA only; projections stay float32)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    cmd.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its checkpoint (same arguments; exactly the uninterrupted "
                          "result); without a checkpoint, start from the first file")
    cmd.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: the output file + '.checkpoint')")
    cmd.add_argument("--checkpoint-every", type=int, default=DEFAULT_EVERY, metavar="N",
                     help=f"save the running state every N images (default {DEFAULT_EVERY}; 0: off)")
    cmd.add_argument("--checkpoint-seconds", type=float, default=DEFAULT_SECONDS, metavar="T",
                     help=f"... and at least every T seconds (default {DEFAULT_SECONDS:g}; 0: off)")
    _add_cluster_options(cmd)
    cmd.set_defaults(run=_cli_search)

    merge_cmd = subparsers.add_parser("search-merge", description="Merge the shard results of 'search --shard i/n' into exactly the "
                                                  "single-run result. Every shard 0..n-1 must be present once.")
    merge_cmd.add_argument("shards", nargs="+", help="shard .npz files, or folders holding shard-I-of-N.npz")
    merge_cmd.add_argument("--out", required=True, help="merged result (.npz)")
    merge_cmd.add_argument("--allow-partial", action="store_true", help="merge even if some shards are missing")
    merge_cmd.set_defaults(run=_cli_merge)


def _add_cluster_options(cmd) -> None:
    """``search --shards N`` and the job array's options (Slurm through submitit; see README "On a Slurm cluster")."""
    group = cmd.add_argument_group(
        "all shards at once", "--shards N searches every shard that has no result in the --out folder yet (files on "
        "disk decide: the same command again runs only the missing or failed shards, each continuing from its "
        "checkpoint), then merges them into OUT/search.npz")
    group.add_argument("--shards", type=int, metavar="N", help="split the files into N shards (0..N-1)")
    group.add_argument("--executor", default="local", choices=["local", *KINDS],
                       help="local: the shards one after another in this process (default); slurm: one job array "
                            "through submitit (pip install 'qklib[slurm]'); submitit-local: submitit's local "
                            "subprocesses, for testing without Slurm")
    group.add_argument("--wait", action="store_true", help="follow the jobs (shards done, images/s), then merge")
    group.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    group.add_argument("--gpus-per-task", type=int, default=0, metavar="G", help="GPUs per shard (default 0)")
    group.add_argument("--cpus-per-task", type=int, default=1, metavar="C", help="CPU cores per shard (default 1)")
    group.add_argument("--time", type=int, default=60, metavar="MINUTES", help="time limit per shard (default 60); "
                       "a shard that runs out is requeued and continues from its checkpoint")
    group.add_argument("--array-parallelism", type=int, metavar="K", help="at most K shards run at once")
    group.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                       help="shell line run before each shard, e.g. 'module load cuda' (repeatable)")
    group.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="an sbatch option without its dashes, e.g. mem=16G or account=lab (repeatable)")
    group.add_argument("--poll-seconds", type=float, default=10.0, metavar="S", help=argparse.SUPPRESS)


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): send further output to /dev/null and end quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured)
        pass
    return 141  # 128 + SIGPIPE, as a tool killed by the closed pipe would exit


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except MergeError as error:
        print(f"error: {error.cli_message}", file=sys.stderr)
        return 2
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModelError as error:
        print(f"error: {cli_syntax(error.cli)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # ModelError, ImageError, ResultError, CheckpointError, FileNotFoundError
        print(f"error: {cli_syntax(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
