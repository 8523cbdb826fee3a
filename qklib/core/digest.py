"""What "the same inputs" means for every cache key, checkpoint and saved result: sha256 digests, in one format.

A search's checkpoint and result, a chapter's cached result and the book builder's record of a chapter's inputs
each record digests of what they were computed from, and refuse (or recompute) when a digest differs. All of
them come from here, so that one input gives one digest wherever it is recorded:

* :func:`weights_digest`: a model's parameters and buffers (names, dtypes, shapes, bytes);
* :func:`tensor_digest` and :func:`modes_digest`: tensors' bytes, a QK SVD's modes;
* :func:`file_digest`: a file's bytes (a weights file);
* :func:`listing_digest`: a file listing (names, and with a root each file's size and modification time,
  never its bytes: a gallery of thousands of photos is listed in milliseconds).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .svd import QKSVD

__all__ = ["file_digest", "listing_digest", "modes_digest", "tensor_digest", "weights_digest"]


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes): what 'same weights' means here."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy; GIL released
    return digest.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' bytes (CPU copies), e.g. a QK SVD's U, S, V."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def modes_digest(svd: QKSVD) -> str:
    """sha256 of a QK SVD's ``U``, ``S`` and ``V``: what a checkpoint's or a cached result's key records of the modes
    scored (it changes with the weights, the basis options and the modes' sign convention)."""
    return tensor_digest(svd.U, svd.S, svd.V)


def file_digest(path: str | Path | None) -> str:
    """sha256 of a file's bytes ('' for None): what a cache key records for a weights file."""
    if not path:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing_digest(root: str | Path | None, names: list[str]) -> str:
    """sha256 of a list of file names (relative to ``root``, in the given order); with ``root``, also of each
    file's size and modification time, so that an edited or replaced file changes it without being read."""
    lines = []
    for name in names:
        if root is None:
            lines.append(name)
        else:
            stat = (Path(root) / name).stat()
            lines.append(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
