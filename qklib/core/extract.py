"""What meets W_q and W_k inside the model: normed token embeddings and attention probabilities.

The token embeddings that enter a block's query and key projections are the block input after its LayerNorm.
The authors' code projected the un-normalised residual stream instead; the normed input is what the model really
multiplies by W_q and W_k.

Attention probabilities are read from the model's own softmax: fused attention kernels
(scaled_dot_product_attention) never materialise them, so they are switched off for the read and restored.
Where to hook either comes from the model family's adapter (``core.reader.attention_sites``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .models import prefix_tokens
from .reader import AttentionSites, attention_sites


@dataclass
class Record:
    """One forward pass, per layer.

    ``tokens``: ``[L, B, T, d]`` normed layer inputs (what W_q, W_k and W_v see), or None.
    ``attention``: ``[L, B, H, T, T]`` attention probabilities (rows: queries, columns: keys), or None.
    ``prefix_tokens``: how many of the T tokens come before the image tokens (CLS, distillation, registers).
    """

    tokens: torch.Tensor | None
    attention: torch.Tensor | None
    prefix_tokens: int


def _layers(sites: AttentionSites, layers) -> list[int]:
    count = len(sites.blocks)
    if layers is None:
        return list(range(count))
    chosen = [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < count]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has layers 0..{count - 1}")
    return chosen


@torch.no_grad()
def stream_layers(model: nn.Module, pixels: torch.Tensor, layers: list[int] | None = None,
                  on_tokens: Callable[[int, torch.Tensor], None] | None = None,
                  on_attention: Callable[[int, torch.Tensor], None] | None = None) -> None:
    """Run the model once on ``pixels [B, 3, S, S]``, calling ``on_tokens(layer, x [B, T, d])`` with the normed
    tokens entering each chosen layer's attention and ``on_attention(layer, p [B, H, T, T])`` with its attention
    probabilities, as they are computed (nothing is kept here). The pass stops after the last chosen block."""
    sites = attention_sites(model)
    chosen = _layers(sites, layers)
    handles = []
    for index in chosen:
        if on_tokens is not None:
            handles.append(sites.inputs[index].register_forward_hook(
                lambda _m, _i, out, index=index: on_tokens(index, out.detach())))
        if on_attention is not None:
            if sites.probabilities[index] is None:
                raise TypeError(f"layer {index}: this model's attention does not expose its probabilities "
                                f"({type(sites.blocks[index]).__name__}); attention maps need a module that outputs "
                                "the softmax")
            handles.append(sites.probabilities[index].register_forward_hook(
                lambda _m, _i, out, index=index: on_attention(index, out.detach())))

    def stop(_module, _inputs, _output):
        raise _Stop

    handles.append(sites.blocks[max(chosen)].register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        with sites.explicit_softmax() if on_attention is not None else nullcontext():
            sites.forward(pixels.to(device))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last block of interest has run."""


def record(model: nn.Module, pixels: torch.Tensor, tokens: bool = True, attention: bool = False,
           layers: list[int] | None = None) -> Record:
    """Run the model once on ``pixels [B, 3, S, S]`` and keep the requested per-layer tensors (on the CPU)."""
    chosen = _layers(attention_sites(model), layers)
    token_out: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}
    stream_layers(model, pixels, chosen,
                  on_tokens=(lambda i, x: token_out.__setitem__(i, x.float().cpu())) if tokens else None,
                  on_attention=(lambda i, p: attn_out.__setitem__(i, p.float().cpu())) if attention else None)
    if attention and len(attn_out) != len(chosen):
        raise RuntimeError("attention probabilities were not captured: the module that its family's adapter names "
                           "(core.reader) never ran")
    return Record(
        tokens=torch.stack([token_out[i] for i in chosen]) if tokens else None,
        attention=torch.stack([attn_out[i] for i in chosen]) if attention else None,
        prefix_tokens=prefix_tokens(model),
    )


def token_embeddings(model: nn.Module, pixels: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """``[L, B, T, d]`` normed token embeddings entering each chosen layer's attention (prefix tokens included)."""
    return record(model, pixels, tokens=True, attention=False, layers=layers).tokens


def attention_probs(model: nn.Module, pixels: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """``[L, B, H, T, T]`` attention probabilities the model computes (prefix tokens included)."""
    return record(model, pixels, tokens=False, attention=True, layers=layers).attention


def image_tokens(x: torch.Tensor, prefix_tokens: int, dim: int = -2) -> torch.Tensor:
    """Drop the prefix tokens along ``dim``."""
    return x.narrow(dim, prefix_tokens, x.shape[dim] - prefix_tokens)
