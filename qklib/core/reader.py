"""One reader of attention weights: every supported model family turned into one stacked description.

Analyses never look inside a model's attention modules. They call :func:`read_attention`, which returns an
:class:`AttentionWeights` (every layer's and head's W_q, W_k, W_v, W_o with their biases, the LayerNorm the
attention reads, LayerScale, q/k norms, and how many special tokens lead the sequence), and, where they hook a
forward pass (token embeddings, attention maps, the search's q/k read-out), :func:`attention_sites`, which says
which modules to hook. Both pick the model's family from one registry (:func:`register`): adding a model family is
one adapter, a ``matches`` test and a ``read`` function returning the fields of :class:`AttentionWeights` as a
dict (and, for families whose forward passes qklib hooks, a ``sites`` function).

The layout follows TransformerLens's stacked weights, in column-vector convention as everywhere in qklib: for
layer l, head h and a token x (the LayerNorm output, a column vector of width d)::

    q = wq[l, h] @ x + bq[l, h]        k = wk[l, h] @ x + bk[l, h]        v = wv[l, h] @ x + bv[l, h]
    score = scale * q . k              out = sum_h wo[l, h] @ (sum_j a_ij v_j) + bo[l]

Families registered here: ``timm-vit`` (timm's VisionTransformer and the variants qklib loads: DeiT, DINOv2 with
registers and LayerScale, BEiT/SimMIM with q_bias and relative position bias, EVA with separate q/k/v and rotary
embeddings, q/k-normed ViTs; Hugging Face ViT, DINOv2 and CLIP folders are converted to it on loading, see
``core.hf``) and ``ijepa-predictor`` (I-JEPA's predictor: timm blocks without class token or patch embedding).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .loaders.official import IJepaPredictor
from .provenance import provenance

__all__ = ["AttentionSites", "AttentionWeights", "attention_sites", "describe_unreadable", "family_of", "families",
           "read_attention", "register"]

NORM_POSITIONS = ("pre", "post")


@dataclass(frozen=True)
class AttentionWeights:
    """Every layer's and head's attention weights, stacked; float64 on the CPU.

    Shapes: L layers, H heads, d model width, r head width.

    ``wq``, ``wk``, ``wv``: ``[L, H, r, d]``, the head's rows of each projection (``q = wq[l, h] @ x + bq[l, h]``).
    ``bq``, ``bk``, ``bv``: ``[L, H, r]``, zeros where the model has none. ``wo``: ``[L, H, d, r]``, the head's
    columns of the output projection; ``bo``: ``[L, d]``.
    ``norm_gamma``, ``norm_beta``: ``[L, d]``, the affine part of the LayerNorm whose output x the attention reads
    (``x = gamma * z + beta``, z standardised), or None where the model has no readable one; ``norm_position``:
    ``"pre"`` (the norm sits in front of the attention in the same block: timm ViT, Whisper) or ``"post"`` (the
    previous block's output norm: BERT). ``scale``: the softmax scale (``1/sqrt(r)`` unless the model says
    otherwise). ``special_tokens``: class, distillation and register tokens in front of the content tokens.

    Optional: ``layer_scale`` ``[L, d]`` (LayerScale on the attention's output before it joins the residual stream;
    ones in layers without one, None where no layer has one); ``qk_norm`` (q and k are normalised per head before
    the score, so ``W_q^T W_k`` is not exactly the bilinear form of the scores), with the norms' affine parts
    ``q_norm_gamma`` .. ``k_norm_beta`` ``[L, r]`` where readable; ``rope`` (rotary position embeddings on q and k)
    and ``rel_pos_bias`` (a learned position bias added to every score), which make the form inexact likewise;
    ``head_norm`` (a norm between the heads' outputs and W_o, so OV is not exactly linear); ``family`` (the
    adapter's name), ``model`` (a label), ``has_bias`` (``{"q", "k", "v", "o"}``: whether each bias is learned).
    """

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    bq: torch.Tensor
    bk: torch.Tensor
    bv: torch.Tensor
    wo: torch.Tensor
    bo: torch.Tensor
    norm_gamma: torch.Tensor | None
    norm_beta: torch.Tensor | None
    norm_position: str
    scale: float
    special_tokens: int
    layer_scale: torch.Tensor | None = None
    qk_norm: bool = False
    q_norm_gamma: torch.Tensor | None = None
    q_norm_beta: torch.Tensor | None = None
    k_norm_gamma: torch.Tensor | None = None
    k_norm_beta: torch.Tensor | None = None
    rope: bool = False
    rel_pos_bias: bool = False
    head_norm: bool = False
    family: str = ""
    model: str = ""
    has_bias: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers, heads, r, d = self.wq.shape
        expected = {"wq": (layers, heads, r, d), "wk": (layers, heads, r, d), "wv": (layers, heads, r, d),
                    "bq": (layers, heads, r), "bk": (layers, heads, r), "bv": (layers, heads, r),
                    "wo": (layers, heads, d, r), "bo": (layers, d), "norm_gamma": (layers, d),
                    "norm_beta": (layers, d), "layer_scale": (layers, d), "q_norm_gamma": (layers, r),
                    "q_norm_beta": (layers, r), "k_norm_gamma": (layers, r), "k_norm_beta": (layers, r)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is None and name not in ("wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo"):
                continue
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"AttentionWeights.{name}: expected shape {shape} (L, H, r, d = {layers}, {heads}, "
                                 f"{r}, {d}), got {found}; the adapter {self.family or '(unnamed)'} must stack it so")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if (self.norm_gamma is None) != (self.norm_beta is None):
            raise ValueError("norm_gamma and norm_beta go together: both tensors, or both None")

    def norm_affine(self, option: str = "fold_gamma") -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm_gamma, norm_beta)``, for an ``option`` that folds them in; TypeError saying what to do where the
        model has no readable LayerNorm in front of its attention."""
        if self.norm_gamma is None:
            raise TypeError(f"{option} needs the LayerNorm whose output the attention reads (its gamma), and this "
                            f"{self.family or 'model'} has none with a [{self.dim}] weight in every layer; use "
                            f"{option}=False (the raw weights) for this model")
        return self.norm_gamma, self.norm_beta

    @property
    def num_layers(self) -> int:
        return self.wq.shape[0]

    @property
    def num_heads(self) -> int:
        return self.wq.shape[1]

    @property
    def head_dim(self) -> int:
        return self.wq.shape[2]

    @property
    def dim(self) -> int:
        return self.wq.shape[3]


@dataclass(frozen=True)
class AttentionSites:
    """Where a forward pass shows what the attention of each of the L layers reads and computes.

    ``inputs[l]``: the module whose output ``[B, T, d]`` is the token x that layer l's attention reads (its
    LayerNorm). ``probabilities[l]``: the module whose output ``[B, H, T, T]`` is the attention's softmax, inside
    ``explicit_softmax()`` (fused kernels never materialise it), or None. ``fused_qk[l]``: a Linear called as a
    module whose output ``[B, T, >= 2 H r]`` holds every head's query in columns ``[0, H r)`` and key in
    ``[H r, 2 H r)`` (head-major, biases ``bq``, ``bk`` of :class:`AttentionWeights` included), or None.
    ``blocks[l]``: the whole layer (a hook on it can end a pass after layer l). ``forward(pixels)`` runs the
    network's token stack on model input.
    """

    num_heads: int
    head_dim: int
    qk_norm: bool
    blocks: tuple[nn.Module, ...]
    inputs: tuple[nn.Module, ...]
    probabilities: tuple[nn.Module | None, ...]
    fused_qk: tuple[nn.Linear | None, ...]
    forward: Callable[[torch.Tensor], object]
    explicit_softmax: Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class _Adapter:
    family: str
    matches: Callable[[nn.Module], bool]
    read: Callable[[nn.Module], dict]
    sites: Callable[[nn.Module], AttentionSites] | None


_ADAPTERS: dict[str, _Adapter] = {}


def register(family: str, matches: Callable[[nn.Module], bool], read: Callable[[nn.Module], dict],
             sites: Callable[[nn.Module], AttentionSites] | None = None) -> None:
    """Add a model family: ``matches(model)`` says whether a model belongs to it (from its structure alone: it may
    be on the meta device), ``read(model)`` returns the fields of :class:`AttentionWeights` as a dict, and
    ``sites(model)`` (optional) the :class:`AttentionSites` that forward-pass hooks need. Families are tried in the
    order registered; registering a family again replaces it in place."""
    if not isinstance(family, str) or not family:
        raise ValueError(f"a family needs a non-empty name, got {family!r}")
    _ADAPTERS[family] = _Adapter(family, matches, read, sites)


def families() -> list[str]:
    """The registered families, in the order they are tried."""
    return list(_ADAPTERS)


def family_of(model: nn.Module) -> str | None:
    """The first registered family that matches ``model``, or None."""
    return next((adapter.family for adapter in _ADAPTERS.values() if adapter.matches(model)), None)


def _adapter(model: nn.Module) -> _Adapter:
    family = family_of(model)
    if family is None:
        raise TypeError(f"{describe_unreadable(model)}; qklib reads the attention of {', '.join(_ADAPTERS)} "
                        "models (a new family needs an adapter: qklib.core.reader.register)")
    return _ADAPTERS[family]


def read_attention(model: nn.Module) -> AttentionWeights:
    """The model's attention weights, stacked (:class:`AttentionWeights`), by its family's adapter."""
    adapter = _adapter(model)
    fields = adapter.read(model)
    return AttentionWeights(**{"family": adapter.family, **fields})


def attention_sites(model: nn.Module) -> AttentionSites:
    """The modules a forward-pass hook needs (:class:`AttentionSites`), by the model's family's adapter."""
    adapter = _adapter(model)
    if adapter.sites is None:
        raise TypeError(f"qklib reads the weights of {adapter.family} models but does not hook their forward pass "
                        "(token embeddings, attention maps); use the weight analyses (qk_svd, ov_svd) only")
    return adapter.sites(model)


def describe_unreadable(model: nn.Module) -> str:
    """Why no registered family reads ``model``, in one phrase (for error messages)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        for index, block in enumerate(blocks):
            if _timm_attention(block) is None:
                return (f"block {index} ({type(block).__name__}) has no global self-attention with readable "
                        "query/key projections")
    return f"{type(model).__name__} has no transformer 'blocks' of a family qklib reads"


# --- timm ViT (and the I-JEPA predictor, built from timm blocks) ------------------------------------------------

_SEPARATE = (("q", "k", "v"), ("q_proj", "k_proj", "v_proj"))
_OUTPUT = ("proj", "o_proj", "out_proj")


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    found = getattr(module, name, None)
    return found if isinstance(found, nn.Linear) else None


def _timm_attention(block: nn.Module) -> nn.Module | None:
    """The block's self-attention module when its query/key projections are readable (a fused ``qkv`` Linear or
    separate ``q``/``k``/``v`` or ``q_proj``/``k_proj``/``v_proj`` Linears) and it says its head count."""
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "num_heads"):
        return None
    if _linear(attn, "qkv") is not None or any(all(_linear(attn, n) for n in names) for names in _SEPARATE):
        return attn
    return None


def _matches_timm(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0
            and all(_timm_attention(block) is not None for block in blocks))


def _as64(tensor: torch.Tensor | None, size: int) -> torch.Tensor:
    if tensor is None:
        return torch.zeros(size, dtype=torch.float64)
    return tensor.detach().to("cpu", torch.float64)


def _timm_projections(attn: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
    """``([W_q, W_k, W_v] each [D, d] (views of the module's weight), [b_q, b_k, b_v] each [D] float64, learned?)``
    of a timm attention module:
    a fused ``qkv`` Linear (rows [0, D) W_q, [D, 2D) W_k, [2D, 3D) W_v) with its own bias, or BEiT's/EVA's
    ``q_bias``/``v_bias`` beside a bias-free one (the key bias fixed at zero); or separate Linears."""
    qkv = _linear(attn, "qkv")
    if qkv is not None:
        weight = qkv.weight.detach()
        width = weight.shape[0] // 3
        weights = [weight[:width], weight[width : 2 * width], weight[2 * width :]]
        if qkv.bias is not None:
            bias = _as64(qkv.bias, 3 * width)
            return weights, [bias[:width], bias[width : 2 * width], bias[2 * width :]], [True] * 3
        separate = [getattr(attn, f"{n}_bias", None) for n in "qkv"]
        separate = [b if isinstance(b, torch.Tensor) else None for b in separate]
        learned = [isinstance(b, nn.Parameter) for b in separate]
        return weights, [_as64(b, width) for b in separate], learned
    layers = next([_linear(attn, n) for n in names] for names in _SEPARATE if all(_linear(attn, n) for n in names))
    return ([layer.weight.detach() for layer in layers],
            [_as64(layer.bias, layer.out_features) for layer in layers], [layer.bias is not None for layer in layers])


def _affine(norm: nn.Module | None, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(gamma, beta)`` ``[size]`` float64 of a norm with a ``[size]`` weight (beta zero without a bias), else None."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,):
        return None
    return _as64(weight, size), _as64(getattr(norm, "bias", None), size)


def _stack_or_none(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(value is None for value in values) else torch.stack(values)


def _timm_layer(index: int, block: nn.Module) -> dict:
    """One block's weights in the per-layer shapes of :class:`AttentionWeights` (without the L axis); the four
    projections as views of the module's weights, converted once when stacked (:func:`_stack64`)."""
    attn = _timm_attention(block)
    heads = int(attn.num_heads)
    (wq, wk, wv), (bq, bk, bv), learned = _timm_projections(attn)
    (d_attn, d), output = wq.shape, next((_linear(attn, n) for n in _OUTPUT if _linear(attn, n)), None)
    if d_attn % heads:
        raise ValueError(f"block {index}: attention width {d_attn} is not divisible by {heads} heads")
    if output is None or output.weight.shape != (d, d_attn):
        raise TypeError(f"block {index}: no output projection ('proj', 'o_proj' or 'out_proj' Linear, [{d}, {d_attn}])"
                        " beside the value projection")
    r = d_attn // heads
    wo = output.weight.detach()
    norm = _affine(getattr(block, "norm1", None), d)
    scale = getattr(getattr(block, "ls1", None), "gamma", None)
    scale = getattr(block, "gamma_1", None) if scale is None else scale
    q_norm, k_norm = (getattr(attn, name, None) for name in ("q_norm", "k_norm"))
    normed = any(n is not None and not isinstance(n, nn.Identity) for n in (q_norm, k_norm))
    head_norm = getattr(attn, "norm", None)  # timm's scale_norm: a LayerNorm between the heads and W_O
    return {
        "wq": wq.reshape(heads, r, d), "wk": wk.reshape(heads, r, d), "wv": wv.reshape(heads, r, d),
        "bq": bq.reshape(heads, r), "bk": bk.reshape(heads, r), "bv": bv.reshape(heads, r),
        "wo": wo.reshape(d, heads, r).transpose(0, 1), "bo": _as64(output.bias, d),
        "norm": norm, "layer_scale": _as64(scale, d) if isinstance(scale, torch.Tensor) and scale.shape == (d,) else None,
        "qk_norm": normed, "q_norm": _affine(q_norm, r), "k_norm": _affine(k_norm, r),
        "head_norm": isinstance(head_norm, nn.Module) and not isinstance(head_norm, nn.Identity),
        "scale": float(getattr(attn, "scale", r**-0.5)), "has_bias": learned + [output.bias is not None],
        "rel_pos_bias": getattr(attn, "relative_position_bias_table", None) is not None,
    }


def _stack64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[L, ...]`` float64 on the CPU from L equal-shaped tensors of any dtype and device, each converted as it is
    copied in (one pass over the weights, not a float64 copy per layer and then a stacked one)."""
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float64)
    for index, tensor in enumerate(tensors):
        out[index].copy_(tensor)
    return out


def _read_timm(model: nn.Module, special_tokens: int) -> dict:
    """The timm adapter: every block's attention (:func:`_timm_layer`), stacked."""
    layers = [_timm_layer(index, block) for index, block in enumerate(model.blocks)]
    if len({tuple(layer["wq"].shape) for layer in layers}) != 1:
        raise ValueError("blocks differ in head count or width; stacked analysis needs a uniform transformer")
    stacked = {name: _stack64([layer[name] for layer in layers]) for name in ("wq", "wk", "wv", "bq", "bk", "bv",
                                                                               "wo", "bo")}
    norms = [layer["norm"] for layer in layers]
    scales = [layer["layer_scale"] for layer in layers]
    d = stacked["bo"].shape[1]
    layer_scale = None if all(s is None for s in scales) else torch.stack(
        [torch.ones(d, dtype=torch.float64) if s is None else s for s in scales])
    q_norms, k_norms = [layer["q_norm"] for layer in layers], [layer["k_norm"] for layer in layers]
    affine = {}
    for prefix, found in (("norm", norms), ("q_norm", q_norms), ("k_norm", k_norms)):
        complete = all(n is not None for n in found)
        affine[f"{prefix}_gamma"] = torch.stack([n[0] for n in found]) if complete else None
        affine[f"{prefix}_beta"] = torch.stack([n[1] for n in found]) if complete else None
    if not any(layer["qk_norm"] for layer in layers):
        affine.update(q_norm_gamma=None, q_norm_beta=None, k_norm_gamma=None, k_norm_beta=None)
    return {**stacked, **affine, "norm_position": "pre", "scale": layers[0]["scale"], "special_tokens": special_tokens,
            "layer_scale": layer_scale, "qk_norm": any(layer["qk_norm"] for layer in layers),
            "rope": getattr(model, "rope", None) is not None,
            "rel_pos_bias": getattr(model, "rel_pos_bias", None) is not None or any(
                layer["rel_pos_bias"] for layer in layers),
            "head_norm": any(layer["head_norm"] for layer in layers),
            "model": provenance(model).label if provenance(model) else type(model).__name__,
            "has_bias": dict(zip("qkvo", (any(layer["has_bias"][i] for layer in layers) for i in range(4)), strict=True))}


def _timm_sites(model: nn.Module) -> AttentionSites:
    """Hooks of a timm ViT: ``norm1`` (the tokens the attention reads), ``attn.attn_drop`` (it receives the softmax;
    identity in eval mode), the fused ``qkv`` Linear where its own bias is the q/k bias (BEiT's and EVA's q_bias
    variants call its weight functionally, so they have none), ``forward_features`` for the pass."""
    blocks = tuple(model.blocks)
    attentions = [_timm_attention(block) for block in blocks]
    for index, block in enumerate(blocks):
        if not isinstance(getattr(block, "norm1", None), nn.Module):
            raise TypeError(f"block {index} ({type(block).__name__}) has no 'norm1' in front of its attention")
    first = attentions[0]
    qkv = _linear(first, "qkv")
    width = qkv.out_features // 3 if qkv is not None else next(
        _linear(first, names[0]) for names in _SEPARATE if _linear(first, names[0])).out_features
    heads = int(first.num_heads)
    probabilities = tuple(attn.attn_drop if isinstance(getattr(attn, "attn_drop", None), nn.Module) else None
                          for attn in attentions)
    fused = tuple(_linear(attn, "qkv") if not isinstance(getattr(attn, "q_bias", None), torch.Tensor) else None
                  for attn in attentions)
    qk_norm = any(not isinstance(getattr(attn, n, nn.Identity()), nn.Identity)
                  for attn in attentions for n in ("q_norm", "k_norm"))

    @contextmanager
    def explicit_softmax():
        saved = [(attn, attn.fused_attn) for attn in attentions if hasattr(attn, "fused_attn")]
        for attn, _flag in saved:
            attn.fused_attn = False
        try:
            yield
        finally:
            for attn, flag in saved:
                attn.fused_attn = flag

    return AttentionSites(num_heads=heads, head_dim=int(getattr(first, "head_dim", None) or width // heads),
                          qk_norm=qk_norm, blocks=blocks, inputs=tuple(block.norm1 for block in blocks),
                          probabilities=probabilities, fused_qk=fused, forward=model.forward_features,
                          explicit_softmax=explicit_softmax)


register("ijepa-predictor", lambda model: isinstance(model, IJepaPredictor), lambda model: _read_timm(model, 0),
         _timm_sites)
register("timm-vit", _matches_timm, lambda model: _read_timm(model, int(getattr(model, "num_prefix_tokens", 1))),
         _timm_sites)
