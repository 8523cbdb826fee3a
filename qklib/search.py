"""Optimal images of singular modes (paper §5, Fig 4): stream an image folder through the model and keep,
for every chosen layer, head, mode and sign, the top-k images by the paper's score.

Score of an image for mode n of head (l, h), with x_i the normed image tokens entering block l:

    sign +1:  max(0, max_i  x_i . u_n) * max(0, max_j  x_j . v_n)
    sign -1:  max(0, max_i -x_i . u_n) * max(0, max_j -x_j . v_n)

The two signs are separate features of the same mode (SVD fixes u_n, v_n only up to a joint flip).
Clipping each maximum at zero means an image whose query and key maxima are both negative scores 0
instead of a spurious high product; images scoring 0 never enter a top-k.

Ordering is total and deterministic: score descending, then relative file path ascending (POSIX string
order). Shard ``i/n`` (0-based i) takes files ``i::n`` of the sorted list, so merging all n shards
(:func:`merge`) gives the single-run result: the same images in the same order, with scores equal up to
float32 rounding (the same image in a different batch can differ in the last bits).

Memory is O(features * k) for the running top-k plus one batch in flight; it does not grow with the number
of images. Python API: :func:`search`, :func:`search_images`, :func:`merge`, :func:`load_result`.
CLI: ``python -m qklib search ROOT`` and ``python -m qklib search-merge SHARDS... --out FILE``.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .extract import stream_layers
from .images import ImageError, list_images, open_rgb
from .svd import QKSVD

SIGNS = (1, -1)  # index 0 of the sign axis is +1, index 1 is -1
FORMAT_VERSION = 1


# --- which modes ---------------------------------------------------------------------------------------

def parse_indices(spec, count: int, what: str) -> list[int]:
    """``None``/``"all"`` -> all; ``"0,3,5"``, ``"2-5"``, an int or a list -> sorted unique 0-based indices."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(count))
    items: list[int] = []
    if isinstance(spec, int) and not isinstance(spec, bool):
        items = [spec]
    elif isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    low, high = part.split("-", 1) if not part.startswith("-") else (part, "")
                    items.extend(range(int(low), int(high) + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise ValueError(f"{what}: cannot read {part!r} in {spec!r}; use e.g. '0,3,5', '2-5' or 'all'") from None
    elif isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        items = list(spec)
    else:
        raise ValueError(f"{what}: expected 'all', a list of integers or a string like '0,3-5', got {spec!r}")
    bad = sorted({i for i in items if not 0 <= i < count})
    if bad:
        raise ValueError(f"{what} {bad} out of range: valid {what} are 0..{count - 1} (0-based)")
    if not items:
        raise ValueError(f"{what}: {spec!r} selects nothing")
    return sorted(set(items))


@dataclass
class Features:
    """The (layer, head, mode, sign) features scored, and their projection matrices.

    Features are laid out ``[layers, heads, modes, 2]`` (last axis: sign +1, -1) and flattened in that order.
    ``projection[l]``: ``[d, 2 * H' * M']`` float32 = columns u then v of the chosen heads and modes of layer l.
    """

    layers: list[int]
    heads: list[int]
    modes: list[int]
    projection: dict[int, torch.Tensor]

    @classmethod
    def select(cls, svd: QKSVD, layers=None, heads=None, modes=None, device="cpu") -> "Features":
        layers = parse_indices(layers, svd.num_layers, "layers")
        heads = parse_indices(heads, svd.num_heads, "heads")
        modes = parse_indices(modes, svd.rank, "modes")
        h, m = torch.tensor(heads), torch.tensor(modes)
        projection = {}
        for layer in layers:
            u = svd.U[layer][h][:, :, m]  # [H', d, M']
            v = svd.V[layer][h][:, :, m]
            both = torch.cat([u.permute(1, 0, 2).reshape(svd.dim, -1), v.permute(1, 0, 2).reshape(svd.dim, -1)], 1)
            projection[layer] = both.to(device=device, dtype=torch.float32).contiguous()
        return cls(layers, heads, modes, projection)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.layers), len(self.heads), len(self.modes), 2)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))

    @property
    def per_layer(self) -> int:
        return len(self.heads) * len(self.modes)


def feature_scores(projected: torch.Tensor) -> torch.Tensor:
    """``projected [B, T, 2F]`` (image tokens on u columns then v columns) -> ``[B, F, 2]`` clipped scores."""
    low, high = torch.aminmax(projected, dim=1)  # [B, 2F] each
    f = projected.shape[-1] // 2
    positive = high[:, :f].clamp_min(0) * high[:, f:].clamp_min(0)
    negative = (-low[:, :f]).clamp_min(0) * (-low[:, f:]).clamp_min(0)
    return torch.stack([positive, negative], -1)


class RunningTopK:
    """Top-k per feature over a stream, ordered by (score descending, position ascending).

    ``position`` is the image's place in the sorted file list, so ties break by path. Scores <= 0 never
    enter. Memory: ``[features, k]`` scores and positions (plus an optional ``[features, k, width]`` payload),
    whatever the stream length.
    """

    def __init__(self, features: int, k: int, payload_dtype: torch.dtype | None = None, payload_width: int = 1):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.scores = torch.full((features, k), float("-inf"))
        self.position = torch.full((features, k), -1, dtype=torch.long)
        self.payload = None if payload_dtype is None else torch.zeros((features, k, payload_width), dtype=payload_dtype)

    def update(self, scores: torch.Tensor, position: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        """``scores [features, B]``, ``position [B]`` (long), ``payload [features, B, width]`` when the top-k
        carries one (values that travel with each kept image, e.g. per-image statistics)."""
        scores = scores.detach().float().cpu()
        scores = scores.masked_fill(~(scores > 0), float("-inf"))  # also drops NaN
        cand_s = torch.cat([self.scores, scores], 1)
        cand_p = torch.cat([self.position, position.cpu().long().expand(scores.shape[0], -1)], 1)
        order = torch.argsort(cand_p, dim=1, stable=True)
        order = order.gather(1, torch.argsort(cand_s.gather(1, order), dim=1, descending=True, stable=True))[:, : self.k]
        self.scores = cand_s.gather(1, order)
        self.position = cand_p.gather(1, order).masked_fill(self.scores == float("-inf"), -1)
        if self.payload is not None:
            if payload is None:
                raise ValueError("this RunningTopK carries a payload: pass payload=[features, B]")
            both = torch.cat([self.payload, payload.cpu().to(self.payload.dtype).reshape(*scores.shape, -1)], 1)
            self.payload = both.gather(1, order[..., None].expand(-1, -1, both.shape[-1]))


# --- images in ---------------------------------------------------------------------------------------

def image_files(root: str | Path) -> list[str]:
    """Relative POSIX paths of every image under ``root`` (any depth), sorted as strings: the order that
    shards split and that breaks score ties. Works for ImageNet's ``val/<wnid>/<file>.JPEG`` layout."""
    root = Path(root).expanduser()
    return sorted(p.relative_to(root).as_posix() for p in list_images(root))


def parse_shard(spec) -> tuple[int, int] | None:
    """``"i/n"`` (0-based i < n) or ``(i, n)`` -> ``(i, n)``; None stays None."""
    if spec is None or spec == "":
        return None
    try:
        if isinstance(spec, str):
            i_text, n_text = spec.split("/")
            index, count = int(i_text), int(n_text)
        else:
            index, count = (int(v) for v in spec)
    except (ValueError, TypeError):
        raise ValueError(f"shard {spec!r}: write it as 'i/n' with 0 <= i < n, e.g. '0/4' ... '3/4'") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {spec!r}: need 0 <= i < n (shards are 0-based: '0/{max(count, 1)}' is the first)")
    return index, count


@dataclass
class Stream:
    """Batches of ``(positions [b] long, pixels [b, 3, S, S])`` decoded by one background thread.

    At most ``prefetch`` batches wait in memory. ``skipped`` collects ``(relative path, reason)`` of files
    that could not be read; ``done`` counts files consumed.
    """

    loader: Callable[[int], object]  # position -> PIL image (raises ImageError)
    names: list[str]
    positions: list[int]
    transform: Callable
    batch_size: int
    prefetch: int = 2
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        box: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    box.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for start in range(0, len(self.positions), self.batch_size):
                    chunk = self.positions[start : start + self.batch_size]
                    kept, pixels = [], []
                    for position in chunk:
                        try:
                            pixels.append(self.transform(self.loader(position)))
                            kept.append(position)
                        except ImageError as error:
                            self.skipped.append((self.names[position], str(error)))
                    if not put((torch.tensor(kept, dtype=torch.long),
                                torch.stack(pixels) if pixels else None, len(chunk))):
                        return
                put(None)
            except BaseException as error:  # surface loader bugs in the consumer
                put(error)

        thread = threading.Thread(target=work, daemon=True, name="qklib-search-loader")
        thread.start()
        try:
            while True:
                item = box.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)


# --- results -------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """Top-k images per feature.

    ``scores``: ``[L', H', M', 2, k]`` float32 (``-inf`` where fewer than k images scored > 0);
    ``index``: same shape, int64 into ``files`` (``-1`` where none). Sign axis: 0 is +1, 1 is -1.
    ``files``: relative POSIX paths (under ``root``) of the images that appear, sorted.
    ``n_files``: images in the whole folder; ``n_images``: images scored by this run (or all merged shards);
    ``skipped``: ``[(path, reason)]`` of unreadable files; ``shard``: ``(i, n)`` or None.
    """

    scores: np.ndarray
    index: np.ndarray
    files: list[str]
    layers: list[int]
    heads: list[int]
    modes: list[int]
    k: int
    model: str
    root: str
    n_files: int
    n_images: int
    skipped: list[tuple[str, str]]
    shard: tuple[int, int] | None = None
    seconds: float = 0.0

    def _slot(self, layer: int, head: int, mode: int, sign: int) -> tuple[int, int, int, int]:
        for value, chosen, what in ((layer, self.layers, "layer"), (head, self.heads, "head"), (mode, self.modes, "mode")):
            if value not in chosen:
                raise KeyError(f"{what} {value} was not searched (searched {what}s: {chosen})")
        if sign not in SIGNS:
            raise ValueError(f"sign must be +1 or -1, got {sign!r}")
        return self.layers.index(layer), self.heads.index(head), self.modes.index(mode), SIGNS.index(sign)

    def top(self, layer: int, head: int, mode: int, sign: int = 1) -> list[tuple[str, float]]:
        """``[(relative path, score)]`` best first; shorter than k when fewer images scored above 0."""
        slot = self._slot(layer, head, mode, sign)
        return [(self.files[i], float(s)) for i, s in zip(self.index[slot], self.scores[slot]) if i >= 0]

    def path(self, relative: str) -> Path:
        return Path(self.root) / relative

    def meta(self) -> dict:
        return {"format": FORMAT_VERSION, "layers": self.layers, "heads": self.heads, "modes": self.modes,
                "k": self.k, "model": self.model, "root": self.root, "n_files": self.n_files,
                "n_images": self.n_images, "skipped": [list(s) for s in self.skipped],
                "shard": list(self.shard) if self.shard else None, "seconds": self.seconds}

    def save(self, path: str | Path) -> Path:
        """One ``.npz`` (arrays plus a JSON ``meta`` string); readable without pickle."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:  # np.savez would append .npz to a name without it
            np.savez_compressed(handle, scores=self.scores, index=self.index,
                                files=np.array(self.files, dtype=str), meta=np.array(json.dumps(self.meta())))
        return path

    def summary(self) -> str:
        rate = f", {self.n_images / self.seconds:.1f} images/s" if self.seconds else ""
        part = f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard else ""
        lines = [f"{self.model}: scored {self.n_images} of {self.n_files} images under {self.root}{part}, "
                 f"skipped {len(self.skipped)}{rate}; top-{self.k} for {len(self.layers)} layers x "
                 f"{len(self.heads)} heads x {len(self.modes)} modes x 2 signs"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped[:5]]
        if len(self.skipped) > 5:
            lines.append(f"  ... and {len(self.skipped) - 5} more")
        return "\n".join(lines)


def load_result(path: str | Path) -> SearchResult:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search result {str(path)!r} does not exist; run 'python -m qklib search' first")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{str(path)!r} has result format {meta.get('format')!r}; this qklib reads {FORMAT_VERSION}")
        return SearchResult(
            scores=data["scores"], index=data["index"].astype(np.int64), files=[str(f) for f in data["files"]],
            layers=meta["layers"], heads=meta["heads"], modes=meta["modes"], k=meta["k"], model=meta["model"],
            root=meta["root"], n_files=meta["n_files"], n_images=meta["n_images"],
            skipped=[tuple(s) for s in meta["skipped"]], shard=tuple(meta["shard"]) if meta["shard"] else None,
            seconds=meta.get("seconds", 0.0))


def _compact(scores: torch.Tensor, position: torch.Tensor, names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Keep only the referenced files, re-indexed in sorted order (so index order is path order)."""
    used = sorted({names[p] for p in position[position >= 0].tolist()})
    lookup = {name: i for i, name in enumerate(used)}
    index = np.array([lookup[names[p]] if p >= 0 else -1 for p in position.reshape(-1).tolist()], dtype=np.int64)
    return scores.numpy().astype(np.float32), index.reshape(tuple(position.shape)), used


# --- the search ----------------------------------------------------------------------------------------

def _run(model: nn.Module, svd: QKSVD, stream: Stream, features: Features, k: int, progress: bool,
         total: int, desc: str) -> tuple[RunningTopK, int]:
    from .models import info

    prefix = info(model).prefix_tokens
    device = next(model.parameters()).device
    top = RunningTopK(features.count, k)
    per_layer: dict[int, torch.Tensor] = {}

    def on_tokens(layer: int, x: torch.Tensor) -> None:
        projected = x[:, prefix:] @ features.projection[layer]  # [B, T, 2F]
        per_layer[layer] = feature_scores(projected)  # [B, H'M', 2]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)
    scored = 0
    try:
        for position, pixels, consumed in stream:
            if pixels is not None:
                per_layer.clear()
                stream_layers(model, pixels.to(device), features.layers, on_tokens=on_tokens)
                scores = torch.cat([per_layer[layer] for layer in features.layers], 1)  # [B, F/2, 2]
                top.update(scores.reshape(scores.shape[0], -1).T, position)
                scored += len(position)
            if bar is not None:
                bar.update(consumed)
    finally:
        if bar is not None:
            bar.close()
    return top, scored


def _finish(top: RunningTopK, names: list[str], features: Features, k: int, model: str, root: str,
            n_files: int, scored: int, skipped, shard, seconds: float) -> SearchResult:
    shape = (*features.shape, k)
    scores, index, files = _compact(top.scores.reshape(shape), top.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=features.layers, heads=features.heads,
                        modes=features.modes, k=k, model=model, root=root, n_files=n_files, n_images=scored,
                        skipped=sorted(skipped), shard=shard, seconds=seconds)


def search(model: nn.Module, root: str | Path, layers=None, heads=None, modes=None, k: int = 8,
           batch_size: int = 32, shard=None, svd: QKSVD | None = None, progress: bool = True,
           limit: int | None = None) -> SearchResult:
    """Top-``k`` images under ``root`` for every chosen (layer, head, mode, sign); see the module docstring.

    ``layers``/``heads``/``modes``: ``None``/``"all"``, a list or a string like ``"0,3-5"`` (0-based).
    ``shard``: ``"i/n"`` to score files ``i::n`` of the sorted list only (merge the n results with :func:`merge`).
    ``limit``: score only the first ``limit`` files of the sorted list (before sharding), for quick looks.
    """
    from .images import model_transform
    from .svd import model_name, qk_svd

    root = Path(root).expanduser()
    names = image_files(root)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        names = names[:limit]
    part = parse_shard(shard)
    positions = list(range(len(names)))
    if part:
        positions = positions[part[0] :: part[1]]
    svd = svd if svd is not None else qk_svd(model)
    device = next(model.parameters()).device
    features = Features.select(svd, layers, heads, modes, device=device)
    stream = Stream(lambda p: open_rgb(root / names[p]), names, positions, model_transform(model), batch_size)
    start = time.perf_counter()
    top, scored = _run(model, svd, stream, features, k, progress, len(positions), "search")
    return _finish(top, names, features, k, model_name(model), str(root), len(names), scored, stream.skipped, part,
                   time.perf_counter() - start)


def search_images(model: nn.Module, images: Mapping[str, object], layers=None, heads=None, modes=None, k: int = 8,
                  batch_size: int = 32, svd: QKSVD | None = None, progress: bool = False) -> SearchResult:
    """Like :func:`search` over in-memory PIL images ``{name: image}`` (names play the role of paths)."""
    from .images import model_transform
    from .svd import model_name, qk_svd

    names = sorted(images)
    if not names:
        raise ImageError("search_images needs at least one image")
    svd = svd if svd is not None else qk_svd(model)
    features = Features.select(svd, layers, heads, modes, device=next(model.parameters()).device)
    stream = Stream(lambda p: images[names[p]].convert("RGB"), names, list(range(len(names))),
                    model_transform(model), batch_size)
    start = time.perf_counter()
    top, scored = _run(model, svd, stream, features, k, progress, len(names), "search")
    return _finish(top, names, features, k, model_name(model), "", len(names), scored, stream.skipped, None,
                   time.perf_counter() - start)


def merge(results: Sequence[SearchResult | str | Path], allow_partial: bool = False) -> SearchResult:
    """Merge shard results into the single-run result: top-k over the union, ties broken by path.

    Every shard must come from the same model, folder listing, features and k, and shards ``0..n-1`` must
    all be present exactly once (``allow_partial=True`` merges whatever is given).
    """
    parts = [r if isinstance(r, SearchResult) else load_result(r) for r in results]
    if not parts:
        raise ValueError("merge needs at least one search result")
    first = parts[0]
    for other in parts[1:]:
        for attribute in ("model", "layers", "heads", "modes", "k", "n_files", "root"):
            if getattr(other, attribute) != getattr(first, attribute):
                raise ValueError(f"cannot merge: results differ in {attribute} "
                                 f"({getattr(first, attribute)!r} vs {getattr(other, attribute)!r})")
    shards = [p.shard for p in parts]
    if not allow_partial:
        if any(s is None for s in shards):
            raise ValueError("cannot merge: a result is not a shard (it was a full run); pass only shard results")
        counts = {s[1] for s in shards}
        seen = sorted(s[0] for s in shards)
        if len(counts) != 1 or seen != list(range(next(iter(counts)))):
            raise ValueError(f"cannot merge: expected shards 0..n-1 of one n exactly once, got "
                             f"{', '.join(f'{i}/{n}' for i, n in shards)} (allow_partial=True to merge anyway)")
    names = sorted({name for p in parts for name in p.files})
    lookup = {name: i for i, name in enumerate(names)}
    shape = first.scores.shape
    features = int(np.prod(shape[:-1]))
    top = RunningTopK(features, first.k)
    for part in parts:
        mapped = np.array([lookup[part.files[i]] if i >= 0 else -1 for i in part.index.reshape(-1)], dtype=np.int64)
        scores = torch.from_numpy(part.scores.reshape(features, -1).copy())
        position = torch.from_numpy(mapped.reshape(features, -1))
        # Each shard's candidates enter as one block per feature (positions differ per feature row).
        candidates_s = torch.cat([top.scores, scores], 1)
        candidates_p = torch.cat([top.position, position], 1)
        order = torch.argsort(candidates_p.masked_fill(candidates_p < 0, len(names)), dim=1, stable=True)
        order = order.gather(1, torch.argsort(candidates_s.gather(1, order), dim=1, descending=True, stable=True))
        order = order[:, : first.k]
        top.scores = candidates_s.gather(1, order)
        top.position = candidates_p.gather(1, order).masked_fill(top.scores == float("-inf"), -1)
    scores, index, files = _compact(top.scores.reshape(shape), top.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=first.layers, heads=first.heads,
                        modes=first.modes, k=first.k, model=first.model, root=first.root, n_files=first.n_files,
                        n_images=sum(p.n_images for p in parts), skipped=sorted(s for p in parts for s in p.skipped),
                        shard=None, seconds=sum(p.seconds for p in parts))


# --- command line ----------------------------------------------------------------------------------------

def shard_filename(shard: tuple[int, int] | None) -> str:
    return "search.npz" if shard is None else f"shard-{shard[0]}-of-{shard[1]}.npz"


def _cli_search(args) -> int:
    from .models import load_model

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


def add_cli(subparsers) -> None:
    """Register ``search`` and ``search-merge`` on the ``python -m qklib`` command line."""
    from .models import DEFAULT_MODEL

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
