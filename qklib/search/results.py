"""Search results on disk (one ``.npz``, readable without pickle) and the merge of shard results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .topk import RunningTopK

SIGNS = (1, -1)  # index 0 of the sign axis is +1, index 1 is -1
FORMAT_VERSION = 1


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
        """The image file of ``relative`` (a name from :meth:`top`)."""
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
    """A :class:`SearchResult` saved by :meth:`SearchResult.save` (or by ``python -m qklib search``)."""
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


def compact(scores: torch.Tensor, position: torch.Tensor, names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Keep only the referenced files, re-indexed in sorted order (so index order is path order)."""
    used = sorted({names[p] for p in position[position >= 0].tolist()})
    lookup = {name: i for i, name in enumerate(used)}
    index = np.array([lookup[names[p]] if p >= 0 else -1 for p in position.reshape(-1).tolist()], dtype=np.int64)
    return scores.numpy().astype(np.float32), index.reshape(tuple(position.shape)), used


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
    scores, index, files = compact(top.scores.reshape(shape), top.position.reshape(shape), names)
    return SearchResult(scores=scores, index=index, files=files, layers=first.layers, heads=first.heads,
                        modes=first.modes, k=first.k, model=first.model, root=first.root, n_files=first.n_files,
                        n_images=sum(p.n_images for p in parts), skipped=sorted(s for p in parts for s in p.skipped),
                        shard=None, seconds=sum(p.seconds for p in parts))


def shard_filename(shard: tuple[int, int] | None) -> str:
    return "search.npz" if shard is None else f"shard-{shard[0]}-of-{shard[1]}.npz"
