"""The (layer, head, mode, sign) features a search scores, and the optimal-image score of each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.svd import QKSVD
from .indices import parse_indices


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
