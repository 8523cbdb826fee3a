"""Statistics on token embeddings that the cosine analysis is compared with.

Anisotropy baseline (the paper's Fig S4): token embeddings of a trained transformer share a common
direction, so even unrelated tokens have a positive cosine. Per layer, take the centre image token of
each image (the normed embedding that enters qkv) and average the cosine over all pairs of different
images. The paper's "relative cosine" is the weighted u.v cosine minus this baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from .core.extract import token_embeddings
from .core.models import info


def centre_token_index(model: nn.Module) -> int:
    """Index (prefix tokens included) of the image token at the centre of the token grid."""
    geometry = info(model)
    rows, cols = geometry.grid
    return geometry.prefix_tokens + (rows // 2) * cols + cols // 2


def mean_pairwise_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """``[..., N, d] -> [...]``: mean cosine over the N(N-1) ordered pairs of different vectors."""
    n = vectors.shape[-2]
    if n < 2:
        raise ValueError("the anisotropy baseline needs at least two images")
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    off_diagonal = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (n * (n - 1))


def anisotropy_baseline(model: nn.Module, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``[L]``: per layer, the mean cosine between centre-token embeddings of different images.

    ``pixels``: ``[N, 3, S, S]`` model input, N >= 2.
    """
    centre = centre_token_index(model)
    per_batch = [token_embeddings(model, pixels[i : i + batch_size])[:, :, centre] for i in range(0, len(pixels), batch_size)]
    centre_tokens = torch.cat(per_batch, dim=1)  # [L, N, d]
    return mean_pairwise_cosine(centre_tokens)
