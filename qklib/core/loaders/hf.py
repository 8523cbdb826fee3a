"""Hugging Face ``transformers`` vision checkpoints (a model folder, or ``hf:ORG/NAME`` in the local HF cache)
converted to the matching timm architecture. ``transformers`` itself is not needed.

A folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read with
``weights_only=True``; sharded weights with their ``*.index.json``). Supported ``model_type``:

* ``vit`` (ViT, and DINO's ViTs), ``deit`` (distilled DeiT: class and distillation tokens), ``ijepa`` (no class
  token, mean pooling): blocks ``encoder.layer.i.{layernorm_before, attention.attention.{query,key,value},
  attention.output.dense, layernorm_after, intermediate.dense, output.dense}``, final ``layernorm``;
* ``dinov2``: the same attention with ``norm1``/``norm2``, ``mlp.fc1``/``mlp.fc2`` and layer scale
  ``layer_scale{1,2}.lambda1``;
* ``clip`` / ``clip_vision_model`` (the vision tower): ``embeddings.class_embedding [D]``,
  ``position_embedding`` (an Embedding), ``pre_layrnorm`` (sic), ``encoder.layers.i.self_attn.{q,k,v,out}_proj``,
  ``layer_norm1/2``, ``post_layernorm`` and ``visual_projection`` (bias-free).

Heads are kept (``classifier``, DeiT's two classifiers, CLIP's projection); ViT/I-JEPA poolers, mask tokens
and CLIP's text tower are left out. Every other tensor is an error: nothing is dropped silently.
Note on outputs: transformers' CLIP returns ``last_hidden_state`` before ``post_layernorm`` (it normalises the
pooled token only); timm applies that norm to every token in ``forward_features``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, snapshot_download

from .weights import Converted, ModelError, read_checkpoint

# (width, depth, heads) -> timm's size name, to name the architecture when the geometry is a standard one.
_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
          (1280, 32, 16): "huge"}
_ACTIVATIONS = {"gelu": None, "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
SUPPORTED = ("vit", "deit", "dinov2", "ijepa", "clip", "clip_vision_model")

# Per-block tensors, legacy (what save_pretrained writes and the hub holds) and transformers-5 module names.
VIT_BLOCK = {
    "layernorm_before": "norm1", "layernorm_after": "norm2", "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
VIT_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
            "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_CLIP_BLOCK = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_CLIP_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}


def cached_folder(repo_id: str) -> Path:
    """The snapshot folder of ``ORG/NAME`` in the local Hugging Face cache; never downloads."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ModelError(f"'hf:{repo_id}': expected hf:ORG/NAME, e.g. hf:facebook/dino-vitb16")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:
        raise ModelError(
            f"'hf:{repo_id}' is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); qklib never "
            f"downloads it. Where the hub is reachable run `hf download {repo_id}` (or load it once with "
            "transformers), or pass the model folder as weights=FOLDER",
        ) from error


def is_model_folder(path: str | Path) -> bool:
    return Path(path).expanduser().is_dir() and (Path(path).expanduser() / "config.json").is_file()


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json, state dict)`` of a Hugging Face model folder (``model.safetensors`` or ``pytorch_model.bin``,
    read with ``weights_only=True``, or their sharded form with an index): vision, text and speech folders alike."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{str(folder)!r}: cannot read config.json ({error})") from error
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_checkpoint(folder / shard)[0])
            return config, state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            content = read_checkpoint(folder / name)[0]
            if not isinstance(content, dict):
                raise ModelError(f"{str(folder / name)!r} does not hold a state dict")
            return config, content
    raise ModelError(f"{str(folder)!r} has a config.json but no model.safetensors or pytorch_model.bin")


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's resample codes in preprocessor_config.json


def _data_config(folder: Path) -> dict:
    """Mean, std, crop and interpolation from the folder's preprocessor_config.json (empty if it has none)."""
    try:
        config = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    if isinstance(config.get("image_mean"), list) and isinstance(config.get("image_std"), list):
        out["mean"], out["std"] = config["image_mean"], config["image_std"]
    if config.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[config["resample"]]
    size, crop = config.get("size"), config.get("crop_size")
    edge = size.get("shortest_edge") if isinstance(size, dict) else size if isinstance(size, int) else None
    crop = crop.get("height") if isinstance(crop, dict) else crop
    out["crop_pct"] = crop / edge if config.get("do_center_crop") and edge and crop else 1.0
    return out


def _prefix(state: dict[str, torch.Tensor], probe: str, candidates) -> str:
    for prefix in candidates:
        if prefix + probe in state:
            return prefix
    raise ModelError(f"no '{probe}' tensor under any of the prefixes {list(candidates)}; found "
                     f"{', '.join(list(state)[:5])}...")


# transformers' defaults for what config.json may leave out (save_pretrained writes only non-default values).
_DEFAULT_EPS = {"vit": 1e-12, "deit": 1e-12, "ijepa": 1e-12, "dinov2": 1e-6, "clip": 1e-5}
_DEFAULT_ACT = {"clip": "quick_gelu"}


def _geometry(config: dict, kind: str, out: dict[str, torch.Tensor], prefix_tokens: int, what: str) -> dict:
    """timm kwargs: sizes from the tensors themselves, head count, norm eps and activation from config.json."""
    act = config.get("hidden_act", _DEFAULT_ACT.get(kind, "gelu"))
    if act not in _ACTIVATIONS:
        raise ModelError(f"{what}: hidden_act {act!r} is not one qklib maps to timm ({', '.join(_ACTIVATIONS)})")
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"):
        if key not in out:
            raise ModelError(f"{what}: no tensor for timm's {key}; the checkpoint is truncated or of another kind")
    width, channels, patch, _ = out["patch_embed.proj.weight"].shape
    if channels != 3:
        raise ModelError(f"{what}: the patch embedding takes {channels} channels; qklib's models take RGB images")
    tokens = out["pos_embed"].shape[1] - prefix_tokens
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ModelError(f"{what}: {tokens} position embeddings after {prefix_tokens} prefix tokens is not a square grid")
    depth = len({k.split(".")[1] for k in out if k.startswith("blocks.")})
    kwargs = {"img_size": grid * patch, "patch_size": patch, "embed_dim": width, "depth": depth,
              "num_heads": config.get("num_attention_heads", 12),
              "mlp_ratio": out["blocks.0.mlp.fc1.weight"].shape[0] / width,
              "qkv_bias": "blocks.0.attn.qkv.bias" in out, "norm_eps": config.get("layer_norm_eps", _DEFAULT_EPS[kind])}
    if width % kwargs["num_heads"]:
        raise ModelError(f"{what}: width {width} is not divisible by num_attention_heads {kwargs['num_heads']}")
    if _ACTIVATIONS[act]:
        kwargs["act_layer"] = _ACTIVATIONS[act]
    return kwargs


def _arch(kind: str, kwargs: dict, default: str) -> str:
    size = _SIZES.get((kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]))
    p, img = kwargs["patch_size"], kwargs["img_size"]
    name = {"vit": f"vit_{size}_patch{p}_{img}", "deit": f"deit_{size}_distilled_patch{p}_{img}",
            "dinov2": f"vit_{size}_patch{p}_dinov2", "ijepa": f"vit_{size}_patch{p}_gap_{img}",
            "clip": f"vit_{size}_patch{p}_clip_{'quickgelu_' if kwargs.get('act_layer') == 'quick_gelu' else ''}{img}"}[kind]
    return name if size and timm.is_model(name) else default


def block_tensors(state, prefix: str, plain: dict, qkv: dict, what: str) -> tuple[dict, set]:
    """Map ``{prefix}{i}.{module}.{weight|bias|lambda1}`` tensors to timm block keys (``plain``: module name to
    timm's; ``qkv``: module name to "q", "k" or "v", fused into ``attn.qkv``; DINOv2's ``layer_scaleN.lambda1``
    to ``lsN.gamma``). Returns ``(timm state, the keys used)``. Also the embedded model's converter (``imgfocus``)."""
    out, used, parts = {}, set(), {}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)\.(weight|bias|lambda1)$")
    for key, tensor in state.items():
        match = pattern.match(key)
        if match is None:
            continue
        index, module, kind = match[1], match[2], match[3]
        if kind == "lambda1" and module in ("layer_scale1", "layer_scale2"):
            out[f"blocks.{index}.ls{module[-1]}.gamma"] = tensor
        elif module in qkv:
            parts.setdefault((index, kind), {})[qkv[module]] = tensor
        elif module in plain:
            out[f"blocks.{index}.{plain[module]}.{kind}"] = tensor
        else:
            continue
        used.add(key)
    for (index, kind), found in parts.items():
        if set(found) != {"q", "k", "v"}:
            raise ModelError(f"{what}: block {index} has {kind}s for {sorted(found)} of q, k, v only")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([found["q"], found["k"], found["v"]])
    return out, used


def convert_folder(folder: str | Path, source: str | None = None) -> Converted:
    """A transformers model folder as a timm architecture, its kwargs and state dict."""
    folder = Path(folder).expanduser()
    source = source or folder.name
    config, state = read_folder(folder)
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise ModelError(f"{str(folder)!r}: config.json says model_type {kind!r}; qklib converts Hugging Face "
                         f"{', '.join(SUPPORTED)} models (hierarchical models such as Swin have no global attention)")
    if kind in ("clip", "clip_vision_model"):
        converted = _convert_clip(config, state, source)
        converted.data_config = _data_config(folder)
        return converted
    what = f"{source} ({kind})"
    if kind == "dinov2" and config.get("use_swiglu_ffn"):
        raise ModelError(f"{what}: SwiGLU feed-forward (DINOv2 giant) is not supported")
    base = _prefix(state, "embeddings.patch_embeddings.projection.weight", ("", f"{kind}.", "vit.", "model."))
    inner = {k[len(base):]: v for k, v in state.items() if k.startswith(base)}
    outer = {k: v for k, v in state.items() if not k.startswith(base)}
    encoder = "encoder.layer." if any(k.startswith("encoder.layer.") for k in inner) else "layers."
    out, used = block_tensors(inner, encoder, VIT_BLOCK, VIT_QKV, what)
    simple = {"embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
              "embeddings.position_embeddings": "pos_embed", "embeddings.patch_embeddings.projection.weight":
              "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    dropped = {"embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias"}
    for key, tensor in inner.items():
        if key in simple:
            out[simple[key]] = tensor
        elif key not in dropped and key not in used:
            raise ModelError(f"{what}: unexpected tensor {base}{key}; qklib does not know this layout")
    kwargs = _geometry(config, kind, out, {"deit": 2, "ijepa": 0}.get(kind, 1), what)
    heads = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
    num_classes = 0
    for key, tensor in outer.items():
        module, _, kind_ = key.rpartition(".")
        if module not in heads:
            raise ModelError(f"{what}: unexpected tensor {key}; qklib does not know this layout")
        out[f"{heads[module]}.{kind_}"] = tensor
        num_classes = tensor.shape[0]
    kwargs["num_classes"] = num_classes
    if kind == "deit" and "dist_token" not in out:
        raise ModelError(f"{what}: no distillation token; qklib converts the distilled DeiT (two prefix tokens)")
    if kind == "deit" and num_classes and "head_dist.weight" not in out:
        raise ModelError(f"{what}: a DeiT classifier without its distillation classifier; save DeiTModel or "
                         "DeiTForImageClassificationWithTeacher")
    if kind == "dinov2":
        kwargs["init_values"] = config.get("layerscale_value", 1.0)  # any value: the file's lambda1 replace it
    defaults = {"vit": "vit_base_patch16_224", "deit": "deit_base_distilled_patch16_224",
                "dinov2": "vit_base_patch14_dinov2", "ijepa": "vit_huge_patch14_gap_224"}
    notes = ["the pooler (not part of the token features) was left out"] if "pooler.dense.weight" in inner else []
    return Converted(_arch(kind, kwargs, defaults[kind]), kwargs, out, source, notes, _data_config(folder))


def _convert_clip(config: dict, state: dict[str, torch.Tensor], source: str) -> Converted:
    what = f"{source} (CLIP vision tower)"
    vision = config.get("vision_config", config) if config["model_type"] == "clip" else config
    base = _prefix(state, "embeddings.class_embedding", ("vision_model.", ""))
    inner = {k[len(base):]: v for k, v in state.items() if k.startswith(base)}
    out, used = block_tensors(inner, "encoder.layers.", _CLIP_BLOCK, _CLIP_QKV, what)
    simple = {"embeddings.patch_embedding.weight": "patch_embed.proj.weight", "pre_layrnorm.weight": "norm_pre.weight",
              "pre_layrnorm.bias": "norm_pre.bias", "post_layernorm.weight": "norm.weight",
              "post_layernorm.bias": "norm.bias"}
    for key, tensor in inner.items():
        if key in simple:
            out[simple[key]] = tensor
        elif key == "embeddings.class_embedding":
            out["cls_token"] = tensor.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = tensor[None]
        elif key != "embeddings.position_ids" and key not in used:
            raise ModelError(f"{what}: unexpected tensor {base}{key}; qklib does not know this layout")
    kwargs = _geometry(vision, "clip", out, 1, what)
    kwargs["num_classes"] = 0
    projection = state.get("visual_projection.weight")
    if projection is not None:
        out["head.weight"] = projection
        out["head.bias"] = torch.zeros(projection.shape[0], dtype=projection.dtype)  # CLIP's projection has no bias
        kwargs["num_classes"] = projection.shape[0]
    quick = kwargs.get("act_layer") == "quick_gelu"
    return Converted(_arch("clip", kwargs, "vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224"),
                     kwargs, out, source)
