"""A running top-k per feature over a stream of images, of fixed size whatever the stream's length."""

from __future__ import annotations

import torch


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
