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

Long runs survive interruption: results are written atomically, and ``search(..., checkpoint=PATH,
resume=True)`` (CLI: ``--resume``) continues a killed run from its last checkpoint with exactly the
uninterrupted result (``qklib.search.checkpoint``). Damaged files raise :class:`ResultError` (or
:class:`CheckpointError`), shards that do not fit together :class:`MergeError`, each naming the file or input.
"""

from ..core.images import image_files
from .checkpoint import Checkpoint, CheckpointError
from .features import Features, feature_scores
from .indices import parse_indices, parse_shard
from .results import FORMAT_VERSION, SIGNS, MergeError, ResultError, SearchResult, load_result, merge, shard_filename
from .run import search, search_images
from .topk import RunningTopK

__all__ = [
    "FORMAT_VERSION", "SIGNS", "Checkpoint", "CheckpointError", "Features", "MergeError", "ResultError",
    "RunningTopK", "SearchResult", "feature_scores", "image_files",
    "load_result", "merge", "parse_indices", "parse_shard", "search", "search_images", "shard_filename",
]
