"""Optimal inputs of a QK mode over a collection of token sequences (sentences, utterances): §7's Fig 4.

The paper finds, for each mode n of a head, the images whose token pairs score highest on that mode's term
``(x_i . u_n) s_n (v_n . x_j)`` (paper §5, Fig 4). For sequences the search is exact and cheap: per sequence the
best pair is the larger of (largest query projection times largest key projection) and (smallest times smallest),
since the term is a product of two projections. The sign of the winning pair is kept, so a mode's two ends (both
projections positive, both negative) are told apart, as the ViT chapters' red/cyan pictures do.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pair:
    """The best token pair of one sequence on one mode: ``query`` and ``key`` token indices, the mode term
    ``score`` (non-negative) and ``sign`` (+1: both projections positive, -1: both negative)."""

    sequence: int
    query: int
    key: int
    score: float
    sign: int


def best_pair(tokens: torch.Tensor, u: torch.Tensor, s: float, v: torch.Tensor, valid: torch.Tensor | None = None,
              index: int = 0) -> Pair | None:
    """The token pair of one sequence ``tokens [T, d]`` (the attention's input) with the largest mode term;
    ``valid [T]`` (bool) limits both query and key to content tokens. None when no token is valid."""
    q = tokens.to(torch.float64) @ u.to(torch.float64)
    k = tokens.to(torch.float64) @ v.to(torch.float64)
    if valid is not None:
        if not valid.any():
            return None
        q, k = q.masked_fill(~valid, float("nan")), k.masked_fill(~valid, float("nan"))
    i_hi, j_hi = int(torch.nan_to_num(q, -torch.inf).argmax()), int(torch.nan_to_num(k, -torch.inf).argmax())
    i_lo, j_lo = int(torch.nan_to_num(q, torch.inf).argmin()), int(torch.nan_to_num(k, torch.inf).argmin())
    positive = float(q[i_hi].clamp_min(0) * k[j_hi].clamp_min(0)) * s
    negative = float((-q[i_lo]).clamp_min(0) * (-k[j_lo]).clamp_min(0)) * s
    if positive >= negative:
        return Pair(index, i_hi, j_hi, positive, 1)
    return Pair(index, i_lo, j_lo, negative, -1)


def top_pairs(sequences: Sequence[torch.Tensor], u: torch.Tensor, s: float, v: torch.Tensor, count: int = 5,
              valid: Sequence[torch.Tensor] | None = None) -> list[Pair]:
    """The ``count`` sequences whose best pair scores highest on the mode ``(u, s, v)``, best first."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    pairs = [best_pair(x, u, s, v, None if valid is None else valid[n], n) for n, x in enumerate(sequences)]
    pairs = [p for p in pairs if p is not None]
    return sorted(pairs, key=lambda p: p.score, reverse=True)[:count]


QUERY_COLOUR, KEY_COLOUR = "#f4a6a6", "#9be3ea"  # the red/cyan of the ViT chapters' mode pictures


def snippet_html(words: Sequence[str], query: int, key: int, context: int = 12) -> str:
    """One line of text with the query token on red and the key token on cyan (both colours where they are the
    same token), cut to ``context`` tokens either side of the pair."""
    start = max(0, min(query, key) - context)
    stop = min(len(words), max(query, key) + context + 1)
    parts = []
    for n in range(start, stop):
        word = html.escape(words[n])
        if n == query == key:
            parts.append(f'<b style="background:linear-gradient({QUERY_COLOUR} 50%,{KEY_COLOUR} 50%)">{word}</b>')
        elif n in (query, key):
            parts.append(f'<b style="background:{QUERY_COLOUR if n == query else KEY_COLOUR}">{word}</b>')
        else:
            parts.append(word)
    ends = ("… " if start > 0 else "", " …" if stop < len(words) else "")
    return ends[0] + " ".join(parts) + ends[1]
