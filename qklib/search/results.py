"""Search results on disk (one ``.npz``, readable without pickle) and the merge of shard results.

Every file is written atomically (temporary file, fsync, rename): an interrupted save leaves the old file or
none. A damaged, truncated or foreign file is refused with :class:`ResultError` naming it; shards that cannot
be merged (other model, weights, features, k or folder; a shard missing or given twice) with
:class:`MergeError`, which says which shard or which input differs.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.files import atomic_write
from .topk import RunningTopK

SIGNS = (1, -1)  # index 0 of the sign axis is +1, index 1 is -1
FORMAT_VERSION = 1  # fields added later (weights, listing) are optional, so format-1 readers still read new files
KIND = "qklib search result"


class ResultError(ValueError):
    """A result (or checkpoint) file that cannot be read: damaged, truncated, not qklib's, or of a newer format."""


class MergeError(ValueError):
    """Search results that cannot be merged. ``str(error)`` ends with the Python hint, ``cli_message`` with
    the command line's."""

    def __init__(self, problem: str, python_hint: str = "", cli_hint: str = ""):
        super().__init__(problem + (f"; {python_hint}" if python_hint else ""))
        self.cli_message = problem + (f"; {cli_hint}" if cli_hint else "")


# What np.load / zipfile / zlib / json raise on a truncated, corrupt or foreign file.
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, TypeError, UnicodeError)


def read_npz(path: Path, what: str, error: type[ValueError] = ResultError) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of the ``.npz`` at ``path`` (read fully, so CRC errors show now) and its JSON ``meta``.

    Raises ``error`` naming the file when it is not a readable ``.npz`` with a JSON object under ``meta``.
    """
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
        if start != b"PK\x03\x04":  # every .npz is a zip archive (np.load would try to unpickle anything else)
            raise ValueError("empty file" if not start else "not a zip archive, which every .npz is")
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict):
            raise ValueError("its meta is not a JSON object")
    except READ_ERRORS as problem:
        kind = type(problem).__name__
        kind = f"{type(problem).__module__}.{kind}" if kind == "error" else kind  # zlib.error
        raise error(f"{what} {str(path)!r} is damaged or not a qklib file ({kind}: {str(problem)[:160]}); "
                    "delete it and run again what wrote it") from None
    return arrays, meta


def check_format(path: Path, meta: dict, kind: str, version: int, error: type[ValueError] = ResultError) -> None:
    """Refuse a file of another kind, or of a format newer than ``version``."""
    found_kind = meta.get("kind", KIND)  # format-1 results written before 'kind' existed are results
    if found_kind != kind:
        raise error(f"{str(path)!r} is a {found_kind!r}, not a {kind!r}")
    found = meta.get("format")
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise error(f"{kind} {str(path)!r} is damaged: its format version is {found!r}")
    if found > version:
        raise error(f"{kind} {str(path)!r} was written by a newer qklib (format {found}; this qklib reads format "
                    f"{version} and older): upgrade qklib to read it")


@dataclass
class SearchResult:
    """Top-k images per feature.

    ``scores``: ``[L', H', M', 2, k]`` float32 (``-inf`` where fewer than k images scored > 0);
    ``index``: same shape, int64 into ``files`` (``-1`` where none). Sign axis: 0 is +1, 1 is -1.
    ``files``: relative POSIX paths (under ``root``) of the images that appear, sorted.
    ``n_files``: images in the whole folder; ``n_images``: images scored by this run (or all merged shards);
    ``skipped``: ``[(path, reason)]`` of unreadable files; ``shard``: ``(i, n)`` or None.
    ``root``: the folder, resolved to an absolute path when searched (so :meth:`path` works from any working
    directory; ``""`` for :func:`~qklib.search.search_images`). ``weights``: sha256 of the model's parameters;
    ``listing``: sha256 of the searched file list (both ``""`` when unknown, e.g. in older files).
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
    weights: str = ""
    listing: str = ""

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
        """The image file ``relative`` (a name from :meth:`top` or ``files``): ``root / relative``."""
        return Path(self.root) / relative

    def meta(self) -> dict:
        return {"kind": KIND, "format": FORMAT_VERSION, "layers": self.layers, "heads": self.heads,
                "modes": self.modes, "k": self.k, "model": self.model, "root": self.root, "n_files": self.n_files,
                "n_images": self.n_images, "skipped": [list(s) for s in self.skipped],
                "shard": list(self.shard) if self.shard else None, "seconds": self.seconds,
                "weights": self.weights, "listing": self.listing}

    def save(self, path: str | Path) -> Path:
        """One ``.npz`` (arrays plus a JSON ``meta`` string), readable without pickle, written atomically:
        if the process dies while saving, ``path`` keeps its old content (or stays absent)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        with atomic_write(path) as handle:  # np.savez would append .npz to a name without it
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_result(meta: dict, arrays: dict[str, np.ndarray]) -> str | None:
    """What is inconsistent in a result file's content, or None."""
    for name in ("scores", "index", "files"):
        if name not in arrays:
            return f"the array {name!r} is missing"
    for key in ("layers", "heads", "modes"):
        if not isinstance(meta.get(key), list) or not meta[key] or not all(_is_int(v) for v in meta[key]):
            return f"{key} is {meta.get(key)!r}, not a list of indices"
    for key in ("k", "n_files", "n_images"):
        if not _is_int(meta.get(key)) or meta[key] < 0:
            return f"{key} is {meta.get(key)!r}, not a count"
    for key in ("model", "root"):
        if not isinstance(meta.get(key), str):
            return f"{key} is {meta.get(key)!r}, not a string"
    skipped = meta.get("skipped")
    if not isinstance(skipped, list) or not all(isinstance(s, list) and len(s) == 2 for s in skipped):
        return "the list of skipped files is malformed"
    shard = meta.get("shard")
    if shard is not None and not (isinstance(shard, list) and len(shard) == 2 and all(_is_int(v) for v in shard)
                                  and 0 <= shard[0] < shard[1]):
        return f"shard is {shard!r}, not [i, n] with 0 <= i < n"
    shape = (len(meta["layers"]), len(meta["heads"]), len(meta["modes"]), 2, meta["k"])
    scores, index, files = arrays["scores"], arrays["index"], arrays["files"]
    if scores.shape != shape or index.shape != shape:
        return f"scores {scores.shape} / index {index.shape} do not match layers x heads x modes x 2 x k = {shape}"
    if scores.dtype.kind != "f" or index.dtype.kind not in "iu" or files.ndim != 1 or files.dtype.kind != "U":
        return f"unexpected array types (scores {scores.dtype}, index {index.dtype}, files {files.dtype})"
    if index.size and not (-1 <= index.min() and index.max() < len(files)):
        return f"index refers to files outside 0..{len(files) - 1}"
    return None


def load_result(path: str | Path) -> SearchResult:
    """Read a result written by :meth:`SearchResult.save` (or ``python -m qklib search``/``search-merge``).

    Raises FileNotFoundError when ``path`` does not exist and :class:`ResultError` (naming the file) when it
    is truncated, corrupt, not a search result, or written by a newer qklib.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search result {str(path)!r} does not exist; run 'python -m qklib search' first")
    arrays, meta = read_npz(path, "search result")
    check_format(path, meta, KIND, FORMAT_VERSION)
    problem = _check_result(meta, arrays)
    if problem:
        raise ResultError(f"search result {str(path)!r} is damaged: {problem}; delete it and run the search again")
    return SearchResult(
        scores=arrays["scores"], index=arrays["index"].astype(np.int64), files=[str(f) for f in arrays["files"]],
        layers=meta["layers"], heads=meta["heads"], modes=meta["modes"], k=meta["k"], model=meta["model"],
        root=meta["root"], n_files=meta["n_files"], n_images=meta["n_images"],
        skipped=[tuple(s) for s in meta["skipped"]], shard=tuple(meta["shard"]) if meta["shard"] else None,
        seconds=float(meta.get("seconds", 0.0)), weights=str(meta.get("weights", "")),
        listing=str(meta.get("listing", "")))


def compact(scores: torch.Tensor, position: torch.Tensor, names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Keep only the referenced files, re-indexed in sorted order (so index order is path order)."""
    used = sorted({names[p] for p in position[position >= 0].tolist()})
    lookup = {name: i for i, name in enumerate(used)}
    index = np.array([lookup[names[p]] if p >= 0 else -1 for p in position.reshape(-1).tolist()], dtype=np.int64)
    return scores.numpy().astype(np.float32), index.reshape(tuple(position.shape)), used


def resolved_root(root: str) -> str:
    """``root`` as an absolute, resolved path (``""`` stays ``""``): what merging compares."""
    return str(Path(root).expanduser().resolve()) if root else ""


def _check_mergeable(parts: list[SearchResult], labels: list[str], allow_partial: bool) -> None:
    first = parts[0]
    compared = {"model": lambda r: r.model, "layers": lambda r: r.layers, "heads": lambda r: r.heads,
                "modes": lambda r: r.modes, "k": lambda r: r.k, "folder": lambda r: resolved_root(r.root),
                "number of files": lambda r: r.n_files}
    for label, other in zip(labels[1:], parts[1:]):
        for what, get in compared.items():
            if get(other) != get(first):
                raise MergeError(f"cannot merge: {labels[0]} and {label} differ in {what} "
                                 f"({get(first)!r} vs {get(other)!r})")
        for what, attribute in (("weights (sha256 of the parameters)", "weights"), ("file list", "listing")):
            a, b = getattr(first, attribute), getattr(other, attribute)
            if a and b and a != b:
                raise MergeError(f"cannot merge: {labels[0]} and {label} differ in {what} ({a[:12]}... vs {b[:12]}...)")
    if allow_partial:
        return
    full = [label for label, part in zip(labels, parts) if part.shard is None]
    if full:
        raise MergeError(f"cannot merge: {', '.join(full)} is not a shard (it was a full run); pass only shard results")
    counts = sorted({part.shard[1] for part in parts})
    if len(counts) > 1:
        listed = ", ".join(f"{label} ({part.shard[0]}/{part.shard[1]})" for label, part in zip(labels, parts))
        raise MergeError(f"cannot merge: the shards split the files in different ways: {listed}")
    n = counts[0]
    seen: dict[int, list[str]] = {}
    for label, part in zip(labels, parts):
        seen.setdefault(part.shard[0], []).append(label)
    twice = {i: where for i, where in seen.items() if len(where) > 1}
    if twice:
        listed = "; ".join(f"shard {i}/{n} in {' and '.join(where)}" for i, where in sorted(twice.items()))
        raise MergeError(f"cannot merge: expected shards 0..{n - 1} exactly once, but got {listed}")
    missing = [i for i in range(n) if i not in seen]
    if missing:
        listed = ", ".join(f"{i}/{n} ({shard_filename((i, n))})" for i in missing)
        runs = ", ".join(f"{i}/{n}" for i in missing)
        raise MergeError(f"cannot merge: expected shards 0..{n - 1} exactly once; {len(missing)} of {n} missing: {listed}",
                         python_hint=f"search with shard= {runs}, or allow_partial=True merges the shards present",
                         cli_hint=f"run 'python -m qklib search ... --shard I/N' for {runs}, or pass --allow-partial "
                                  "to merge the shards present")


def merge(results: Sequence[SearchResult | str | Path], allow_partial: bool = False) -> SearchResult:
    """Merge shard results into the single-run result: top-k over the union, ties broken by path.

    Every shard must come from the same model (name and weights), folder (compared as resolved absolute
    paths) and file list, features and k, and shards ``0..n-1`` must all be present exactly once
    (``allow_partial=True`` merges whatever is given). Raises :class:`MergeError` naming the shards that
    differ, are missing or repeat, and :class:`ResultError` for a damaged file.
    """
    parts = [r if isinstance(r, SearchResult) else load_result(r) for r in results]
    if not parts:
        raise MergeError("merge needs at least one search result")
    labels = [Path(r).name if not isinstance(r, SearchResult) else f"result {i}" for i, r in enumerate(results)]
    if len(set(labels)) < len(labels):  # same file names in different folders: say which folder
        labels = [str(r) if not isinstance(r, SearchResult) else f"result {i}" for i, r in enumerate(results)]
    _check_mergeable(parts, labels, allow_partial)
    first = parts[0]
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
    scores, index, files = compact(top.scores.reshape(shape), top.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=first.layers, heads=first.heads,
                        modes=first.modes, k=first.k, model=first.model, root=resolved_root(first.root),
                        n_files=first.n_files, n_images=sum(p.n_images for p in parts),
                        skipped=sorted(s for p in parts for s in p.skipped), shard=None,
                        seconds=sum(p.seconds for p in parts), weights=first.weights, listing=first.listing)


def shard_filename(shard: tuple[int, int] | None) -> str:
    return "search.npz" if shard is None else f"shard-{shard[0]}-of-{shard[1]}.npz"
