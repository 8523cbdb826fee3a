"""The (layer, head, mode, sign) features a search scores, how their projections are read from the model, and the
optimal-image score of each.

A layer's projections ``x_i . u_n`` and ``x_i . v_n`` (``x_i``: normed tokens entering the block) are computed
one of two ways, with the same result up to float32 rounding:

* **direct** (the oracle, and the fallback): ``x @ [u columns | v columns]``, ``2 d`` multiply-adds per token
  and column;
* **from the model's own q and k** (default where the layer allows it): with ``W_q,h^T = Q_1 R_1`` (thin QR) and
  ``u_n = Q_1 a_n``, ``x . u_n = (W_q,h x)^T C_n`` with ``C_n = R_1^{-1} a_n``, the exact least-squares solution
  of ``W_q,h^T C_n = u_n`` (``u_n`` lies in the row space of ``W_q,h``); likewise for keys with ``W_k,h`` and
  ``v_n``. ``W_q,h x`` is the query the model computes anyway, read (bias removed) from the output of the
  layer's fused q/k/v Linear (``core.reader``'s ``fused_qk``): ``2 r`` multiply-adds per token and column
  instead of ``2 d``.

Rounding: the model's float32 query carries an error ~ eps (|W_q,h| |x| + |b_q,h|) that ``C_n`` multiplies by
``|C_n|``; relative to the direct projection's ~ eps |x| that is a factor
``gamma_n = |C_n| (sigma_max(W_q,h) + |b_q,h| / |x|)``. Columns with ``gamma_n > GAMMA_MAX`` (a few percent of a
trained model's modes, those in directions the query barely carries) and columns the weights cannot reproduce
(an SVD of another model) are projected directly; so are layers whose q and k cannot be read (no fused q/k/v
Linear, or one the attention module does not call).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..core.models import prefix_tokens
from ..core.reader import AttentionWeights, attention_sites, read_attention
from ..core.svd import QKSVD, one_thread
from .indices import parse_indices

GAMMA_MAX = 10.0  # read a column from q/k only if its rounding is at most ~10x the direct projection's
RESIDUAL_MAX = 1e-6  # |W^T C - u| / |u| (float64, on a random probe) above which u is not in W's row space
PRECISIONS = ("fp32", "bf16", "tf32")


@dataclass
class QKReader:
    """How one layer's projections are read from the output of its fused q/k/v Linear (``[B, T, 3 D]``).

    ``coeff_t``: ``[2 H', M', r]`` (the features' dtype), ``C^T`` per chosen head, queries then keys;
    ``offset``: ``[2 H', M', 1]``, the bias term ``-C^T b``. ``direct_index``: ``[n]`` columns of the ``2F`` layout
    (u columns then v columns, head-major) computed directly with ``direct [d, n]`` instead (None when none).
    """

    module: nn.Linear
    num_heads: int
    head_dim: int
    heads: torch.Tensor | None  # [2H'] rows of the [2H] (query heads, key heads) axis to keep, None for all
    coeff_t: torch.Tensor
    offset: torch.Tensor
    direct_index: torch.Tensor | None = None
    direct: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    def project(self, out: torch.Tensor, prefix: int, offset: bool = True) -> torch.Tensor:
        """``out [B, T_all, 3D]`` -> ``[2H', M', B, T]`` projections of the image tokens (``coeff_t``'s dtype):
        one batched product over heads, reading q and k in place (a strided view of ``out``), tokens last so
        that the extremes over tokens are contiguous reductions. ``offset=False``: without the bias term
        ``offset`` (a constant per column, which a caller taking extremes over tokens adds to those instead:
        rounding is monotone, so the result is the same)."""
        batch, tokens = out.shape[0], out.shape[1]
        qk = out.reshape(batch * tokens, -1)[:, : 2 * self.width].unflatten(-1, (-1, self.head_dim)).transpose(0, 1)
        if self.heads is not None:  # qk: [2H, B T_all, r], query heads then key heads
            qk = qk.index_select(0, self.heads)
        qk = qk.to(self.coeff_t.dtype)
        if offset:
            p = torch.baddbmm(self.offset, self.coeff_t, qk.mT)  # [2H', M', B T_all]
        else:
            p = torch.bmm(self.coeff_t, qk.mT)
        return p.view(p.shape[0], p.shape[1], batch, tokens)[..., prefix:]


@dataclass
class Features:
    """The (layer, head, mode, sign) features scored, and how to project on them.

    Features are laid out ``[layers, heads, modes, 2]`` (last axis: sign +1, -1) and flattened in that order.
    ``projection[l]``: ``[d, 2 * H' * M']`` float32 = columns u then v of the chosen heads and modes of layer l
    (the direct projection). ``readers[l]``: how layer l's projections are read from the model's q and k
    (layers without one are projected directly); empty unless :meth:`select` was given the model.
    """

    layers: list[int]
    heads: list[int]
    modes: list[int]
    projection: dict[int, torch.Tensor]
    readers: dict[int, QKReader] = field(default_factory=dict)

    @classmethod
    def select(cls, svd: QKSVD, layers=None, heads=None, modes=None, device="cpu", model: nn.Module | None = None,
               read_qk: bool = True, dtype: torch.dtype = torch.float32) -> "Features":
        """Choose features; with ``model`` (and ``read_qk``), read projections from its q and k where possible.
        ``dtype``: of the projections (float32; float64 for checks on a float64 model)."""
        layers = parse_indices(layers, svd.num_layers, "layers")
        heads = parse_indices(heads, svd.num_heads, "heads")
        modes = parse_indices(modes, svd.rank, "modes")
        u, v = svd.U, svd.V  # [L, H, d, r] -> [L', H', d, M'], copied only where a subset is chosen
        for axis, chosen, total in ((0, layers, svd.num_layers), (1, heads, svd.num_heads), (3, modes, svd.rank)):
            if chosen != list(range(total)):
                u, v = u.index_select(axis, torch.tensor(chosen)), v.index_select(axis, torch.tensor(chosen))
        projection = {}
        with one_thread():  # small copies, once per search
            for index, layer in enumerate(layers):  # columns u then v, head-major: [d, 2 H' M']
                both = torch.cat([u[index].permute(1, 0, 2).reshape(svd.dim, -1),
                                  v[index].permute(1, 0, 2).reshape(svd.dim, -1)], 1)
                projection[layer] = both.to(device=device, dtype=dtype)
        readers = {}
        if model is not None and read_qk:
            readers = qk_readers(model, layers, heads, u, v, projection, device, dtype)
        return cls(layers, heads, modes, projection, readers)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.layers), len(self.heads), len(self.modes), 2)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))

    @property
    def per_layer(self) -> int:
        return len(self.heads) * len(self.modes)

    # --- the forward pass -------------------------------------------------------------------------------

    def run(self, model: nn.Module, pixels: torch.Tensor,
            on_layer: Callable[[int, torch.Tensor, torch.Tensor | None], None], layers: list[int] | None = None) -> None:
        """One forward pass of ``pixels [B, 3, S, S]``, calling ``on_layer(layer, x [B, T, d], qkv [B, T, 3D] or
        None)`` for every chosen layer (``qkv``, the fused q/k/v output, where the layer has a reader), and stopping
        right after the last one: the rest of the network is not computed. A reader whose Linear was not called (an attention
        module that uses its weight otherwise) is dropped and that layer read directly."""
        layers = self.layers if layers is None else layers
        last, done, hooks = max(layers), set(), []
        sites = attention_sites(model)

        def call(layer, x, out):
            on_layer(layer, x.detach(), None if out is None else out.detach())
            done.add(layer)
            if layer == last:
                raise _Enough

        for layer in layers:
            if layer in self.readers:
                hooks.append(self.readers[layer].module.register_forward_hook(
                    lambda _m, args, out, layer=layer: call(layer, args[0], out)))
            else:
                hooks.append(sites.inputs[layer].register_forward_hook(
                    lambda _m, _args, out, layer=layer: call(layer, out, None)))
        try:
            with torch.no_grad():
                sites.forward(pixels)
        except _Enough:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        missing = [layer for layer in layers if layer not in done]
        if missing:
            if any(layer not in self.readers for layer in missing):
                raise RuntimeError(f"layers {missing}: the forward pass never ran the norm in front of their attention")
            for layer in missing:
                del self.readers[layer]
            self.run(model, pixels, on_layer, missing)

    def extremes(self, layer: int, x: torch.Tensor, qkv: torch.Tensor | None, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)``, each ``[B, 2F]``: min and max over image tokens of every u and v column of ``layer``."""
        with exact_float32(x.device):
            reader = self.readers.get(layer) if qkv is not None else None
            if reader is None:
                return _token_extremes(x, self.projection[layer], prefix)
            p = reader.project(qkv, prefix, offset=False)  # [2H', M', B, T]
            low, high = ((t + reader.offset).permute(2, 0, 1).reshape(t.shape[2], -1)  # [B, 2F]
                         for t in (p.amin(-1), p.amax(-1)))
            if reader.direct_index is not None:
                d_low, d_high = _token_extremes(x, reader.direct, prefix)
                low, high = low.index_copy(1, reader.direct_index, d_low), high.index_copy(1, reader.direct_index, d_high)
            return low, high

    def projected(self, layer: int, x: torch.Tensor, qkv: torch.Tensor | None, prefix: int) -> torch.Tensor:
        """``[B, T, 2F]``: every image token's projection on the u and v columns of ``layer``."""
        with exact_float32(x.device):
            reader = self.readers.get(layer) if qkv is not None else None
            if reader is None:
                return x[:, prefix:].to(self.projection[layer].dtype) @ self.projection[layer]
            p = reader.project(qkv, prefix)  # [2H', M', B, T]
            p = p.permute(2, 3, 0, 1).reshape(p.shape[2], p.shape[3], -1)
            if reader.direct_index is not None:
                p[..., reader.direct_index] = x[:, prefix:].to(reader.direct.dtype) @ reader.direct
            return p

    def project(self, model: nn.Module, pixels: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (query [B, T, H', M'], key [B, T, H', M'])}``: ``x_i . u_n`` and ``x_j . v_n`` of every image
        token for the chosen heads and modes, from one forward pass (for mode maps of many images at once)."""
        prefix = prefix_tokens(model)
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def on_layer(layer, x, qkv):
            p = self.projected(layer, x, qkv, prefix).unflatten(-1, (2, len(self.heads), len(self.modes)))
            out[layer] = (p[..., 0, :, :], p[..., 1, :, :])

        self.run(model, pixels, on_layer)
        return out

    def scores(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, count]`` optimal-image scores of every feature (layout ``[L', H', M', 2]`` flattened)."""
        prefix = prefix_tokens(model)
        per_layer: dict[int, torch.Tensor] = {}

        def on_layer(layer, x, qkv):
            per_layer[layer] = extreme_scores(*self.extremes(layer, x, qkv, prefix))  # [B, F, 2]

        self.run(model, pixels, on_layer)
        return torch.cat([per_layer[layer] for layer in self.layers], 1).flatten(1)


class _Enough(Exception):
    """Raised by the hook of the last layer needed: the rest of the forward pass is not."""


def qk_readers(model: nn.Module, layers: list[int], heads: list[int], u: torch.Tensor, v: torch.Tensor,
               projection: dict[int, torch.Tensor], device, dtype: torch.dtype = torch.float32) -> dict[int, QKReader]:
    """Readers of the chosen layers' projections on ``u``, ``v`` (``[L', H', d, M']`` float64: the chosen layers,
    heads and modes) from their fused qkv outputs, for the layers that have one (all at once, in float64).
    ``projection``: the direct projection matrices (:class:`Features`), whose columns the fallback uses.

    ``C`` solves ``W W^T C = W u`` (Cholesky; its rounding, ~eps cond(W)^2 in ``W^T C``, is far below float32's).
    A head whose Cholesky fails, or whose ``W^T C`` misses ``u`` on a random probe (an SVD of another model),
    has all its columns projected directly; so have columns with ``gamma > GAMMA_MAX`` (module docstring).
    """
    sites = attention_sites(model)
    found = []  # (index into layers, layer, fused Linear)
    for index, layer in enumerate(layers):
        module = sites.fused_qk[layer] if layer < len(sites.fused_qk) else None
        if module is not None and module.in_features == u.shape[2]:
            found.append((index, layer, module))
    num_heads, head_dim = sites.num_heads, sites.head_dim
    if not found or {module.out_features for _, _, module in found} != {3 * num_heads * head_dim}:
        return {}  # no fused q/k/v anywhere, or layers that differ: read those layers directly
    attention = read_attention(model)
    chosen = torch.tensor(heads)
    all_heads = heads == list(range(num_heads))
    probe = torch.randn(u.shape[-1], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coeffs, offsets, directs = [], [], []
    with one_thread():  # small float64 linear algebra, once per search, one layer at a time (contiguous, in cache)
        for index, layer, _ in found:
            # W_q and W_k per head: [2H', r, d], query heads then key heads; biases [2H', r]
            w = torch.cat([attention.wq[layer], attention.wk[layer]])
            b = torch.cat([attention.bq[layer], attention.bk[layer]])
            if not all_heads:
                keep = torch.cat([chosen, chosen + num_heads])
                w, b = w[keep], b[keep]
            scale = _norm_scale(attention, layer)
            parts = [_reader_coefficients(w[: len(heads)], b[: len(heads)], u[index], probe, scale),
                     _reader_coefficients(w[len(heads) :], b[len(heads) :], v[index], probe, scale)]
            coeffs.append(torch.cat([c for c, _, _ in parts]))  # [2H', M', r]
            offsets.append(torch.cat([o for _, o, _ in parts]))  # [2H', M', 1]
            directs.append(torch.cat([bad for _, _, bad in parts]))  # [2H', M']
    readers = {}
    for (_, layer, module), coeff, offset, direct in zip(found, coeffs, offsets, directs):
        mask = direct.flatten()  # [2H' M'] in the 2F layout order
        if bool(mask.all()):
            continue
        reader = QKReader(module=module, num_heads=num_heads, head_dim=head_dim,
                          heads=None if all_heads else torch.cat([chosen, chosen + num_heads]).to(device),
                          coeff_t=coeff.to(device, dtype), offset=offset.to(device, dtype))
        if bool(mask.any()):
            where = mask.nonzero().flatten().to(device)
            reader.direct_index = where
            reader.direct = projection[layer][:, where].contiguous()
        readers[layer] = reader
    return readers


def _reader_coefficients(w: torch.Tensor, b: torch.Tensor, target: torch.Tensor, probe: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one layer's query (or key) heads, ``w [H', r, d]``, ``b [H', r]`` and the columns ``target [H', d, M']``
    (u or v, float64): ``(C^T [H', M', r], -C^T b [H', M', 1], bad [H', M'])`` with ``C`` solving
    ``W W^T C = W target``, zeroed where ``bad`` (the column is projected directly; see :func:`qk_readers`)."""
    gram = w @ w.mT
    factor, info = torch.linalg.cholesky_ex(gram)
    c = torch.cholesky_solve(w @ target, factor)  # [H', r, M']
    expected = target @ probe
    missed = torch.linalg.vector_norm(w.mT @ (c @ probe) - expected, dim=(-2, -1))
    failed = (info != 0) | ~(missed <= RESIDUAL_MAX * torch.linalg.vector_norm(expected, dim=(-2, -1)))
    sigma = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()  # [H'] largest singular value of W
    gamma = torch.linalg.vector_norm(c, dim=-2) * (sigma + torch.linalg.vector_norm(b, dim=-1) / scale)[..., None]
    bad = failed[..., None] | ~(gamma <= GAMMA_MAX)  # [H', M']
    c = c.masked_fill(bad[..., None, :], 0.0)
    return c.mT, -(c.mT @ b.unsqueeze(-1)), bad


def _norm_scale(attention: AttentionWeights, layer: int) -> float:
    """About |x| for the output x = w * z + beta of the layer's LayerNorm (z: zero mean, unit variance over d):
    sqrt(|w|^2 + |beta|^2); sqrt(d) for a norm without parameters."""
    if attention.norm_gamma is None:
        return attention.dim**0.5
    return float(torch.linalg.vector_norm(torch.cat([attention.norm_gamma[layer], attention.norm_beta[layer]])))


def _token_extremes(x: torch.Tensor, columns: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` over the image tokens of ``x [B, T_all, d]`` projected on ``columns [d, n]``: each ``[B, n]``.
    (amin and amax on the last axis: torch's aminmax, and reductions over a middle axis, are far slower on the CPU.)"""
    p = (columns.mT @ x.to(columns.dtype).mT)[..., prefix:]  # [B, n, T]
    return p.amin(-1), p.amax(-1)


@contextmanager
def exact_float32(device: torch.device):
    """Projections in true float32 whatever the forward pass uses: autocast off, no TF32 matmuls on CUDA."""
    device = torch.device(device)
    autocast = torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()
    with autocast:
        if device.type != "cuda":
            yield
            return
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before


@contextmanager
def forward_precision(precision: str, device):
    """The forward pass in ``"fp32"`` (true float32, TF32 off), ``"tf32"`` (TF32 matmuls and convolutions on
    CUDA; on the CPU the same as fp32) or ``"bf16"`` (autocast to bfloat16). Projections stay float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def extreme_scores(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(low, high)`` ``[B, 2F]`` (min and max over tokens, u columns then v columns) -> ``[B, F, 2]`` scores."""
    f = high.shape[-1] // 2
    positive = high[:, :f].clamp_min(0) * high[:, f:].clamp_min(0)
    negative = (-low[:, :f]).clamp_min(0) * (-low[:, f:]).clamp_min(0)
    return torch.stack([positive, negative], -1)


def feature_scores(projected: torch.Tensor) -> torch.Tensor:
    """``projected [B, T, 2F]`` (image tokens on u columns then v columns) -> ``[B, F, 2]`` clipped scores."""
    return extreme_scores(projected.amin(1), projected.amax(1))
