"""Attention of the text and audio encoders: the maps the model itself computes, the token vectors each layer's
attention reads, and each family's weights as stacked per-head tensors and its hook sites (the adapters of the
attention reader, ``qklib.core.reader``: ``bert_attention``/``whisper_attention`` return the fields of its
AttentionWeights, ``bert_sites``/``whisper_sites`` those of its AttentionSites).

Conventions, as for the vision transformers: column vectors, ``q = W_q x + b_q`` with ``x`` the normalised token
the attention reads; head h owns rows ``h*r:(h+1)*r`` of W_q, W_k, W_v and the same columns of W_o; the logit of
query token i on key token j is ``scale * q_i . k_j`` with ``scale = 1/sqrt(r)``.

* BERT (post-LayerNorm): layer l reads the previous layer's output LayerNorm (``encoder.layer[l-1].output.
  LayerNorm``; the embeddings' LayerNorm for layer 0). One prefix token ([CLS]) and one trailing ([SEP]).
* Whisper's encoder (pre-LayerNorm): layer l reads its own ``self_attn_layer_norm`` of the residual stream; the
  key projection has no bias (zeros here); no special tokens.
"""

from __future__ import annotations

import contextlib
import math

import torch
import transformers
from torch import nn

from ..provenance import provenance
from ..reader import AttentionSites, register
from .logmel import N_FRAMES
from .text import TokenisedText
from .whisper import whisper_encoder_class

__all__ = ["attention_from_weights", "attention_inputs", "attention_weights", "bert_attention", "bert_sites",
           "model_attention", "whisper_attention", "whisper_sites"]


def _bert(model: nn.Module) -> nn.Module:
    inner = getattr(model, "bert", model)  # BertFor... wraps the encoder as .bert
    if not isinstance(inner, transformers.BertModel):
        raise TypeError(f"{type(model).__name__} is not a transformers BertModel; load a text model with "
                        "qklib.load_model('hf:sentence-transformers/all-MiniLM-L6-v2')")
    return inner


def _whisper(model: nn.Module) -> nn.Module:
    encoder_class = whisper_encoder_class()
    inner = model if isinstance(model, encoder_class) else getattr(model, "get_encoder", lambda: model)()
    if not isinstance(inner, encoder_class):
        raise TypeError(f"{type(model).__name__} is not a transformers Whisper encoder; load one with "
                        "qklib.load_model('hf:openai/whisper-tiny.en')")
    return inner


def _heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``[H * r, d]`` -> ``[H, r, d]`` float64 (head h's rows)."""
    return weight.detach().to("cpu", torch.float64).reshape(heads, weight.shape[0] // heads, weight.shape[1])


def _bias(linear: nn.Linear, heads: int) -> torch.Tensor:
    """``[H, r]`` float64: the Linear's bias per head, zeros where it has none."""
    rows = linear.weight.shape[0]
    bias = linear.bias if linear.bias is not None else torch.zeros(rows)
    return bias.detach().to("cpu", torch.float64).reshape(heads, rows // heads)


def _stacked(layers: list[dict], extra: dict) -> dict:
    out = {key: torch.stack([layer[key] for layer in layers]) for key in layers[0]}
    return {**out, **extra}


def _projections(query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear, heads: int) -> dict:
    """One layer's per-head tensors: wq, wk, wv ``[H, r, d]``, bq, bk, bv ``[H, r]``, wo ``[H, d, r]``, bo ``[d]``."""
    wo = output.weight.detach().to("cpu", torch.float64)
    d, width = wo.shape
    bo = output.bias.detach().to("cpu", torch.float64) if output.bias is not None else torch.zeros(d, dtype=torch.float64)
    return {"wq": _heads(query.weight, heads), "wk": _heads(key.weight, heads), "wv": _heads(value.weight, heads),
            "bq": _bias(query, heads), "bk": _bias(key, heads), "bv": _bias(value, heads),
            "wo": wo.reshape(d, heads, width // heads).permute(1, 0, 2).contiguous(),
            "bo": bo}


def _norm(norm: nn.LayerNorm) -> dict:
    return {"norm_gamma": norm.weight.detach().to("cpu", torch.float64),
            "norm_beta": norm.bias.detach().to("cpu", torch.float64)}


def _has_bias(query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear) -> dict[str, bool]:
    return {name: linear.bias is not None for name, linear in zip("qkvo", (query, key, value, output))}


def _bert_norms(bert: nn.Module) -> list[nn.Module]:
    """The LayerNorm whose output each layer's attention reads (post-LN: the previous layer's output norm)."""
    return [bert.embeddings.LayerNorm] + [layer.output.LayerNorm for layer in bert.encoder.layer[:-1]]


def bert_attention(model: nn.Module) -> dict:
    """A BERT encoder's attention as the fields of the reader's AttentionWeights, stacked float64: ``wq, wk, wv
    [L, H, r, d]``, ``bq, bk, bv [L, H, r]``, ``wo [L, H, d, r]``, ``bo [L, d]``, ``norm_gamma, norm_beta [L, d]``
    (the LayerNorm whose output layer l reads: the embeddings' for l = 0, else layer l-1's output LayerNorm),
    ``norm_position`` ``"post"``, ``scale`` (1/sqrt(r)), ``special_tokens`` 1 ([CLS] at 0; the [SEP] that ends
    the sequence is marked by ``TokenisedText.word_ids == -1``), ``has_bias`` and ``model`` (the label)."""
    bert = _bert(model)
    heads = bert.config.num_attention_heads
    layers = []
    for layer, norm in zip(bert.encoder.layer, _bert_norms(bert)):
        linears = (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                   layer.attention.output.dense)
        layers.append({**_projections(*linears, heads), **_norm(norm)})
    r = layers[0]["wq"].shape[1]
    return _stacked(layers, {"norm_position": "post", "scale": 1.0 / math.sqrt(r), "special_tokens": 1,
                             "has_bias": _has_bias(*linears), "model": _label(model)})


def whisper_attention(model: nn.Module) -> dict:
    """Whisper's encoder attention in the same form as ``bert_attention`` (``bk`` zeros and ``has_bias["k"]``
    False: Whisper's key projection has no bias); ``norm_gamma, norm_beta``: each layer's own
    ``self_attn_layer_norm``; ``norm_position`` ``"pre"``; ``special_tokens`` 0."""
    encoder = _whisper(model)
    heads = encoder.config.encoder_attention_heads
    layers = []
    for layer in encoder.layers:
        linears = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj)
        layers.append({**_projections(*linears, heads), **_norm(layer.self_attn_layer_norm)})
    r = layers[0]["wq"].shape[1]
    return _stacked(layers, {"norm_position": "pre", "scale": 1.0 / math.sqrt(r), "special_tokens": 0,
                             "has_bias": _has_bias(*linears), "model": _label(model)})


def _label(model: nn.Module) -> str:
    record = provenance(model)
    return record.label if record is not None else type(model).__name__


def bert_sites(model: nn.Module) -> dict:
    """The fields of the reader's AttentionSites for a BERT encoder: ``inputs[l]`` the LayerNorm whose output
    layer l reads, ``blocks[l]`` the layer, ``forward(input_ids [B, T])``; eager attention computes its softmax
    in a function, not a module (``probabilities`` None), and q and k are separate Linears (``fused_qk`` None)."""
    bert = _bert(model)
    count = len(bert.encoder.layer)
    return {"num_heads": bert.config.num_attention_heads,
            "head_dim": bert.config.hidden_size // bert.config.num_attention_heads, "qk_norm": False,
            "blocks": tuple(bert.encoder.layer), "inputs": tuple(_bert_norms(bert)), "probabilities": (None,) * count,
            "fused_qk": (None,) * count, "forward": lambda input_ids: bert(input_ids=input_ids),
            "explicit_softmax": contextlib.nullcontext}


def whisper_sites(model: nn.Module) -> dict:
    """``bert_sites`` for Whisper's encoder: ``inputs[l]`` is layer l's ``self_attn_layer_norm``,
    ``forward(features [B, 80, 3000])``."""
    encoder = _whisper(model)
    count = len(encoder.layers)
    return {"num_heads": encoder.config.encoder_attention_heads,
            "head_dim": encoder.config.d_model // encoder.config.encoder_attention_heads, "qk_norm": False,
            "blocks": tuple(encoder.layers), "inputs": tuple(layer.self_attn_layer_norm for layer in encoder.layers),
            "probabilities": (None,) * count, "fused_qk": (None,) * count, "forward": lambda features: encoder(features),
            "explicit_softmax": contextlib.nullcontext}


def attention_weights(model: nn.Module) -> dict:
    """``bert_attention`` or ``whisper_attention``, whichever family ``model`` is."""
    if isinstance(getattr(model, "bert", model), transformers.BertModel):
        return bert_attention(model)
    return whisper_attention(model)


def _call(model: nn.Module, inputs, **flags):
    """Run a text model on a TokenisedText or Whisper's encoder on ``[80, 3000]`` log-mel features (batch of 1)."""
    if isinstance(inputs, TokenisedText):
        bert = _bert(model)
        ids = inputs.input_ids[None].to(bert.device)
        return bert(input_ids=ids, attention_mask=torch.ones_like(ids), **flags)
    encoder = _whisper(model)
    features = torch.as_tensor(inputs, dtype=torch.float32)
    if features.shape != (encoder.config.num_mel_bins, N_FRAMES):
        raise ValueError(f"Whisper's encoder takes [{encoder.config.num_mel_bins}, {N_FRAMES}] log-mel features "
                         f"(30 s; log_mel pads shorter audio), got {tuple(features.shape)}")
    return encoder(features[None].to(encoder.conv1.weight.device), **flags)


@torch.no_grad()
def model_attention(model: nn.Module, inputs) -> torch.Tensor:
    """``[L, H, T, T]`` float32: the attention maps the model computes itself (``output_attentions=True``, eager
    attention), for a TokenisedText (BERT) or ``[80, 3000]`` log-mel features (Whisper; T = 1500). Rows: queries."""
    output = _call(model, inputs, output_attentions=True)
    if not output.attentions or output.attentions[0] is None:
        raise RuntimeError("the model returned no attention maps; load it through qklib.load_model (eager attention)")
    return torch.stack([maps[0] for maps in output.attentions]).float().cpu()


@torch.no_grad()
def attention_inputs(model: nn.Module, inputs) -> torch.Tensor:
    """``[L, T, d]`` float32: the token vectors each layer's self-attention reads (after the LayerNorm in front of
    it), captured from the forward pass."""
    modules = ([layer.attention.self for layer in _bert(model).encoder.layer] if isinstance(inputs, TokenisedText)
               else [layer.self_attn for layer in _whisper(model).layers])
    captured: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"])[0].detach().float().cpu())

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(modules):
        raise RuntimeError(f"attention_inputs: captured {len(captured)} attention inputs for {len(modules)} layers")
    return torch.stack(captured)


def attention_from_weights(weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    """``[L, H, T, T]`` float64: ``softmax_j(scale * (W_q x_i + b_q) . (W_k x_j + b_k))`` from an adapter's
    ``weights`` and the tokens each layer reads (``tokens [L, T, d]``, ``attention_inputs``), no mask."""
    x = tokens.to(torch.float64)
    queries = torch.einsum("lhrd,ltd->lhtr", weights["wq"], x) + weights["bq"][:, :, None, :]
    keys = torch.einsum("lhrd,ltd->lhtr", weights["wk"], x) + weights["bk"][:, :, None, :]
    return torch.softmax(weights["scale"] * queries @ keys.transpose(-1, -2), dim=-1)


def _is_bert(model: nn.Module) -> bool:
    return isinstance(getattr(model, "bert", model), transformers.BertModel)


def _is_whisper_encoder(model: nn.Module) -> bool:
    try:
        _whisper(model)
    except TypeError:
        return False
    return True


# The two families join the one reader of attention weights, so qk_svd, ov_svd and composition_scores take them.
register("bert", _is_bert, bert_attention, lambda model: AttentionSites(**bert_sites(model)))
register("whisper-encoder", _is_whisper_encoder, whisper_attention,
         lambda model: AttentionSites(**whisper_sites(model)))
