"""A running top-k per feature over a stream of images, of fixed size whatever the stream's length."""

from __future__ import annotations

import torch


class RunningTopK:
    """Top-k per feature over a stream, ordered by (score descending, position ascending).

    ``position`` is the image's place in the sorted file list, so ties break by path. Scores <= 0 never
    enter. Memory: ``[features, k]`` scores and positions (plus an optional ``[features, k, width]`` payload),
    whatever the stream length. The state lives on ``device`` (the model's): updates never copy to the host
    or wait for the device; :meth:`cpu` brings it back once, at the end or at a checkpoint.
    """

    def __init__(self, features: int, k: int, payload_dtype: torch.dtype | None = None, payload_width: int = 1,
                 device: str | torch.device = "cpu"):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.scores = torch.full((features, k), float("-inf"), device=device)
        self.position = torch.full((features, k), -1, dtype=torch.long, device=device)
        self.payload = (None if payload_dtype is None
                        else torch.zeros((features, k, payload_width), dtype=payload_dtype, device=device))

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def update(self, scores: torch.Tensor, position: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        """``scores [features, B]``, ``position [B]`` (long), ``payload [features, B, width]`` when the top-k
        carries one (values that travel with each kept image, e.g. per-image statistics). Inputs on another
        device are moved to the top-k's (asynchronously from pinned memory)."""
        device = self.device
        scores = scores.detach().to(device, torch.float32, non_blocking=True)
        scores = scores.masked_fill(~(scores > 0), float("-inf"))  # also drops NaN
        position = position.to(device, torch.long, non_blocking=True)
        cand_s = torch.cat([self.scores, scores], 1)
        cand_p = torch.cat([self.position, position.expand(scores.shape[0], -1)], 1)
        order = torch.argsort(cand_p, dim=1, stable=True)
        order = order.gather(1, torch.argsort(cand_s.gather(1, order), dim=1, descending=True, stable=True))[:, : self.k]
        self.scores = cand_s.gather(1, order)
        self.position = cand_p.gather(1, order).masked_fill(self.scores == float("-inf"), -1)
        if self.payload is not None:
            if payload is None:
                raise ValueError("this RunningTopK carries a payload: pass payload=[features, B]")
            payload = payload.detach().to(device, self.payload.dtype, non_blocking=True).reshape(*scores.shape, -1)
            both = torch.cat([self.payload, payload], 1)
            self.payload = both.gather(1, order[..., None].expand(-1, -1, both.shape[-1]))

    def cpu(self) -> "RunningTopK":
        """A copy of the state on the CPU (one transfer)."""
        out = RunningTopK.__new__(RunningTopK)
        out.k = self.k
        out.scores, out.position = self.scores.cpu(), self.position.cpu()
        out.payload = None if self.payload is None else self.payload.cpu()
        return out


def near_tie_gap(reference: torch.Tensor, top_scores: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """How far another run's top-k is from a reference run's, in units of each feature's top reference score.

    ``reference [N, F]``: every image's score per feature in the reference run (row = position);
    ``top_scores [F, k]``: the reference run's top-k scores; ``position [F, k]``: the other run's top-k positions
    (-1 where it kept fewer). Returns ``[F]``: ``max_j |s(p_j) - R_j| / R_0``, with ``s`` the reference scores,
    ``R`` the reference top-k scores and scores <= 0 (or missing) counted as 0. It is 0 when the other run's
    ranking is the reference's. A gap <= ``delta`` means that at every rank the other run's image scores, in
    the reference, within ``delta * R_0`` of the reference's image at that rank: the runs differ only among
    images whose reference scores are that close (near-ties), never by ranking a clearly worse image higher.
    0 for features where nothing scored above 0 in either run.
    """
    s = reference.T.gather(1, position.clamp_min(0)).clamp_min(0)
    s = torch.where(position >= 0, s, torch.zeros_like(s))
    r = top_scores.clamp_min(0)
    gap = (s - r).abs().amax(1) / r[:, 0]
    return torch.nan_to_num(gap, nan=0.0, posinf=float("inf"))
