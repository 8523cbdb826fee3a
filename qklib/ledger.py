"""The claims ledger: each headline claim of the paper, and what this book's run says about it.

A claim (``CLAIMS``) is data: the paper's statement in our words, where the paper makes it, the chapter that
tests it, the models it is about, the data the paper measured it on, and the rule that decides whether one
model's measurement agrees. The measurements come from the run: each chapter glues one :class:`Record`
(:func:`attention_record`, :func:`cosine_record`, :func:`modes_record`) under the name in ``RECORD_NAMES``;
the book builder reads them back from the executed notebooks (:func:`read_records`), and :func:`assemble`
judges every claim on every model of the run that it concerns. Nothing in a verdict or a number is typed.

Which models a claim concerns: a claim about named models (the DINO, DeiT, huge ViT, SimMIM or I-JEPA models)
is judged only on those, recognised by their timm name or by the authors' checkpoint file
(:func:`paper_model`); a general claim is judged on every trained model of the run except the ones the paper
names as exceptions, whether or not it is one of the paper's 16. Random-init controls are never evidence. A
claim that no model of the run concerns is "not tested in this run", with what a test would need; it is judged
as soon as a run includes such a model (the chapters' ``models`` parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd

from .core.paper_models import EMBEDDED, IJEPA_FILE, IJEPA_PREDICTOR, PAPER_MODELS, PaperModel
from .core.svd import QKSVD, null_band
from .cosine import depth_profile
from .preference import GROUPS, grows_with_depth

FORMAT = 1  # the records' layout; a record of another format is refused
MIME = "application/vnd.qklib.ledger+json"  # a +json type: nbformat stores the glued record as JSON
RECORD_NAMES = {"s3_attention": "s3_ledger", "s4_cosine": "s4_ledger", "s5_modes": "s5_ledger"}
AGREES, DISAGREES, MIXED, NOT_TESTED, BY_EYE = "agrees", "disagrees", "mixed", "not tested in this run", "judged by eye"
BIAS_SHARE_MAX = 0.01  # "biases do not depend on the pair": no head's key-dependent score variance more than 1% from b_q
SAME_OBJECT_STEP = 0.02  # as §5's summary: a difference between the two halves smaller than this is "about the same"


class LedgerError(RuntimeError):
    """A chapter's record is missing or unreadable; the message names the file and what to run."""


# --- which model is which -------------------------------------------------------------------------------------

_KNOWN: tuple[PaperModel, ...] = (*PAPER_MODELS, IJEPA_PREDICTOR)
BY_LABEL = {m.label: m for m in (*_KNOWN, EMBEDDED)}
# The names ``qklib.core.paper_models.ijepa_encoder_predictor`` gives Fig S3's pair, whatever the file is called.
FIG_S3_PARTS = {"I-JEPA encoder": "I-JEPA ViT-H/14 encoder", "I-JEPA predictor": IJEPA_PREDICTOR.label}


def paper_model(label: str) -> str | None:
    """The paper's name (``PaperModel.label``) of a loaded model's label, or of the embedded model; None for any
    other model and for random-init controls. Recognised: the timm name (``vit_base_patch16_224.dino``), the
    authors' checkpoint file in a weights label (``beit_base_patch16_224 [simmim_pretrain__...pth]``), and the
    I-JEPA checkpoint's part (``... [IN1K-vit.h.14-300e.pth.tar, encoder]``)."""
    if is_control(label):
        return None
    name = label.split(" ", 1)[0]
    if name == EMBEDDED.timm_name:
        return EMBEDDED.label
    for model in _KNOWN:
        if model.timm_name and name == model.timm_name:
            return model.label
        if model.file and f"[{model.file}" in label and (model.part is None or f"{model.file}, {model.part}]" in label):
            return model.label
    if f"[{IJEPA_FILE}, encoder]" in label:
        return "I-JEPA ViT-H/14 encoder"
    return None


def is_control(label: str) -> bool:
    """Whether a model label is a random-init control (``arch (random init, seed N)``)."""
    return "(random init, seed " in label


# --- what each chapter records --------------------------------------------------------------------------------

class Record(dict):
    """One chapter's measurements for the ledger: ``{"format", "chapter", "data": {measure: description},
    "models": [{"label", "paper_model", "control", measure: {...}}]}``, JSON-safe (NaN becomes None).
    Glued with ``myst_nb.glue``, its JSON travels in the notebook under ``MIME``."""

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {MIME: dict(self), "text/plain": self.summary()}

    def _repr_pretty_(self, printer, cycle):
        printer.text(self.summary())

    def summary(self) -> str:
        labels = ", ".join(entry["label"] for entry in self["models"])
        return f"ledger record of {self['chapter']}: {labels}"


def _floats(values: Iterable) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, dtype=float).ravel()]


def _entry(label: str, **measures) -> dict:
    return {"label": label, "paper_model": paper_model(label), "control": is_control(label), **measures}


def _record(chapter: str, data: dict[str, str], entries: list[dict]) -> Record:
    return Record(format=FORMAT, chapter=chapter, data=data, models=entries)


def attention_record(means: pd.DataFrame, data: str,
                     variant: str = "most-covered query token, its own token removed") -> Record:
    """§3's record: per model, the mean same / different / background ratio per layer.

    ``means``: index layer, columns ``(model, group)`` (``qklib.present.attention.layer_means`` of the chapter's
    headline variant); ``data``: what was measured (e.g. "60 of 64 generated scenes")."""
    labels = list(dict.fromkeys(means.columns.get_level_values(0)))
    entries = [_entry(label, attention={"layers": [int(v) for v in means.index], "variant": variant,
                                        **{g: _floats(means[(label, g)]) for g in GROUPS}}) for label in labels]
    return _record("s3_attention", {"attention": data}, entries)


def cosine_record(relative: pd.DataFrame, bands: pd.DataFrame, effect: float, extra: Mapping[str, QKSVD] | None = None,
                  images: str = "photos", biases: pd.DataFrame | None = None) -> Record:
    """§4's record: per model, the layer weighted cosine (Fig 3) with its simulated null band and the effect size
    the chapter's verdict uses (``effect``, the single-cosine band), and the anisotropy baseline with its
    interval (Fig S4).

    ``relative``: ``qklib.cosine.relative_table``; ``bands``: ``qklib.cosine.null_band_table``; ``extra``: further
    decompositions without images (Fig S3's I-JEPA encoder and predictor), recorded with the single-cosine band of
    their own width as effect size (keys as ``qklib.core.paper_models.ijepa_encoder_predictor`` names them, which
    identify the model when its label does not); ``images``: what the baseline's photos are (e.g. "photos shipped
    in packages"); ``biases``: ``qklib.biases.layer_table`` on the same photos (the query-bias term's share of the
    key-dependent score variance per layer), or None."""
    entries = []
    for label, frame in relative.groupby("model", sort=False):
        frame = frame.sort_values("layer")
        band = bands[bands["model"] == label].sort_values("layer")["null_band"]
        measures = {}
        if biases is not None and label in set(biases["model"]):
            rows = biases[biases["model"] == label].sort_values("layer")
            measures["biases"] = {"share_median": _floats(rows["share_median"]), "share_high": _floats(rows["share_high"]),
                                  "layers": [int(v) for v in rows["layer"]]}
        entries.append(_entry(label, cosine={"weighted": _floats(frame["weighted_cosine"]), "null_band": _floats(band),
                                             "effect": float(effect)},
                              anisotropy={"weighted": _floats(frame["weighted_cosine"]),
                                          "baseline": _floats(frame["anisotropy_baseline"]),
                                          "low": _floats(frame["baseline_low"]),
                                          "high": _floats(frame["baseline_high"])}, **measures))
    for name, svd in (extra or {}).items():
        entry = _entry(svd.model or name, cosine={"weighted": _floats(svd.layer_weighted_cosine()), "null_band": None,
                                                  "effect": null_band(svd.dim)})
        entry["paper_model"] = entry["paper_model"] or FIG_S3_PARTS.get(name)  # a renamed checkpoint file
        entries.append(entry)
    first = relative.iloc[0]
    data = {"cosine": "the query-key weights",
            "anisotropy": f"{int(first['baseline_photos'])} {images} and crops of them "
                          f"({int(first['baseline_tokens'])} image tokens per layer)",
            "biases": f"{int(first['baseline_photos'])} {images}, every query and key token"}
    return _record("s4_cosine", data, entries)


def modes_record(label: str, same, control, ablation_rows: Sequence[dict], gallery_images: int, masked: str,
                 gallery: str = "default gallery",
                 variant: str = "same instance, background counted as one more object") -> Record:
    """§5's record for the chapter's model ``label``: same-object probability per layer with chance and the
    random-init control (``same``, ``control``: ``qklib.same_object.SameObject``), the ablation of the two mode
    rankings (``ablation_rows``: ``qklib.modes.ablation``), and how many images the optimal-image search scored.
    ``masked``: what the images with object masks are (e.g. "generated scenes"); ``gallery``: the searched folder."""
    rows = pd.DataFrame(list(ablation_rows))
    ablation = {"by_attention": float(rows["by_attention"].mean()), "by_paper_sum": float(rows["by_paper_sum"].mean()),
                "larger": float((rows["by_attention"] > rows["by_paper_sum"]).mean()), "cases": len(rows),
                "count": int(rows["count"].iloc[0])}
    entry = _entry(label, same_object={"layers": [int(v) for v in same.layers], "model": _floats(same.per_layer),
                                       "chance": _floats(same.chance_layer), "control": _floats(control.per_layer),
                                       "variant": variant},
                   ablation=ablation, optimal_images={"images": int(gallery_images)})
    layers = ", ".join(f"L{layer}" for layer in sorted(rows["layer"].unique()))
    data = {"same_object": f"{same.images_used + same.images_skipped} {masked} ({same.images_used} with two or more "
                          "objects)",
            "ablation": f"{rows['image'].nunique()} gallery images, every head of {layers}",
            "optimal_images": f"{int(gallery_images)} images ({gallery})"}
    return _record("s5_modes", data, [entry])


# --- the judges: one model's measurement -> (agrees, the number behind it) ----------------------------------

Judge = Callable[[dict], tuple[bool, str]]


def _same_leads_early(m: dict) -> tuple[bool, str]:
    same, different, background = (m[g][0] for g in GROUPS)
    return same >= max(different, background), (f"L0: same {same:.2f}, different {different:.2f}, "
                                                 f"background {background:.2f} ({m['variant']})")


def _grows(group: str) -> Judge:
    def judge(m: dict) -> tuple[bool, str]:
        values = m[group]
        grows, rising, slope = grows_with_depth(values)
        return grows, (f"{group} L0 {values[0]:.2f} → L{len(values) - 1} {values[-1]:.2f}, slope {slope:+.3f} per "
                       f"layer, {rising} of {len(values) - 1} steps rise")
    return judge


def _fig2_exception(m: dict) -> tuple[bool, str]:
    holds = [_same_leads_early(m)[0], _grows("different")(m)[0], _grows("background")(m)[0]]
    return sum(holds) < 3, f"{sum(holds)} of Fig 2's 3 observations hold"


def _edge(count: int) -> int:
    """How many layers count as "the first" (or "the last") layers: a sixth, at least one."""
    return max(1, count // 6)


def _shape(m: dict) -> str:
    return depth_profile(np.asarray(m["weighted"], dtype=float), m["effect"])


def _curve(m: dict) -> str:
    values = np.asarray(m["weighted"], dtype=float)
    low = int(values.argmin())
    return (f"{_shape(m)}: L0 {values[0]:.2f}, lowest L{low} {values[low]:.2f}, last L{len(values) - 1} "
            f"{values[-1]:.2f} (a change counts beyond ±{m['effect']:.3f})")


def _shape_in(*shapes: str) -> Judge:
    return lambda m: (_shape(m) in shapes, _curve(m))


def _no_late_rise(m: dict) -> tuple[bool, str]:
    return _shape(m) != "concave", _curve(m)


def _middle_near_zero(m: dict) -> tuple[bool, str]:
    values = np.asarray(m["weighted"], dtype=float)
    edge = _edge(len(values))
    middle = np.arange(edge, len(values) - edge)
    if middle.size == 0:
        return False, f"only {len(values)} layers: no middle layers"
    layer = int(middle[np.abs(values[middle]).argmin()])
    inside = ""
    if m.get("null_band"):
        band = m["null_band"][layer]
        inside = f"; {'inside' if abs(values[layer]) <= band else 'outside'} its 95% null band ±{band:.3f}"
    return bool(abs(values[layer]) < m["effect"]), (
        f"closest to 0 among L{edge}–L{len(values) - edge - 1}: L{layer} {values[layer]:+.3f} "
        f"(≈ 0 within ±{m['effect']:.3f}{inside})")


def _high_everywhere(m: dict) -> tuple[bool, str]:
    values = np.asarray(m["weighted"], dtype=float)
    low = int(values.argmin())
    return bool(values.min() > m["effect"]), (f"lowest L{low} {values[low]:.2f}, mean {values.mean():.2f} "
                                              f"(high: above ±{m['effect']:.3f} in every layer)")


def _above_baseline(m: dict) -> tuple[bool, str]:
    weighted, high = np.asarray(m["weighted"], dtype=float), np.asarray(m["high"], dtype=float)
    early = _edge(len(weighted))
    above = int((weighted[:early] > high[:early]).sum())
    return above == early, (f"L0: {weighted[0]:.2f} against the baseline {m['baseline'][0]:.2f} "
                            f"[{m['low'][0]:.2f}, {m['high'][0]:.2f}] "
                            f"(relative {weighted[0] - m['baseline'][0]:+.2f}); "
                            f"above the interval in {above} of the first {early} layer(s)")


def _same_object_falls(m: dict) -> tuple[bool, str]:
    values, layers = np.asarray(m["model"], dtype=float), m["layers"]
    half = len(values) // 2
    early, late = float(np.nanmean(values[:half])), float(np.nanmean(values[half:]))
    return early - late >= SAME_OBJECT_STEP, (
        f"{early:.2f} in L{layers[0]}–L{layers[half - 1]}, {late:.2f} in L{layers[half]}–L{layers[-1]}; chance "
        f"{np.nanmean(np.asarray(m['chance'], dtype=float)):.2f}, random-init control "
        f"{np.nanmean(np.asarray(m['control'], dtype=float)):.2f} ({m['variant']}); every layer: "
        + ", ".join(f"L{layer} {value:.2f}" for layer, value in zip(layers, values)))


def _biases_negligible(m: dict) -> tuple[bool, str]:
    high, median = np.asarray(m["share_high"], dtype=float), np.asarray(m["share_median"], dtype=float)
    worst = int(high.argmax())
    return bool(high.max() <= BIAS_SHARE_MAX), (
        f"the query-bias term's share of the key-dependent score variance, median over heads per layer: "
        + ", ".join(f"L{layer} {value:.2f}" for layer, value in zip(m["layers"], median))
        + f"; largest single head {high[worst]:.2f} (L{m['layers'][worst]})")


def _paper_ranking(m: dict) -> tuple[bool, str]:
    return m["by_paper_sum"] >= m["by_attention"], (
        f"removing each head's top {m['count']} by the paper's sum changes attention by {m['by_paper_sum']:.3f} (mean "
        f"total variation), by the attention-weighted contribution {m['by_attention']:.3f}; the latter larger in "
        f"{m['larger']:.0%} of {m['cases']} image-head cases")


# --- the claims -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """One headline claim of the paper.

    ``about``: the paper's models it is about (``PaperModel.label``); empty for a claim about trained ViTs in
    general, which then concerns every trained model of a run except ``excludes``. ``measure``: the key of the
    chapter record's measurement it is judged on. ``paper_data``: what the paper measured it on (empty: the
    weights alone), with the chapter parameter that takes it. ``judge``: one model's measurement ->
    ``(agrees, the number behind it)``; None for a claim read by eye. ``parameter``: the chapter parameter that
    takes the models it needs; ``also``: another way to get them. Statements and criteria are MyST markdown."""

    key: str
    paper: str
    statement: str
    chapter: str
    measure: str
    criterion: str
    judge: Judge | None
    about: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    paper_data: str = ""
    parameter: str = "models"
    also: str = ""  # another way to get the models it needs

    def concerns(self, entry: Mapping) -> bool:
        """Whether one model entry of a chapter record is evidence for this claim."""
        if entry["control"] or self.measure not in entry:
            return False
        if self.about:
            return entry["paper_model"] in self.about
        return entry["paper_model"] not in self.excludes

    @property
    def needs(self) -> str:
        """The models (and how each loads) and the data that a test as the paper's needs."""
        if self.about:
            models = " or ".join(_loads(BY_LABEL[label], self.parameter) for label in self.about)
            wanted = f"{models} in {self.chapter}'s `{self.parameter}`" + (f", {self.also}" if self.also else "")
        else:
            wanted = "the paper's models (any of its 16; `python -m qklib models` says how each loads)"
        return wanted + (f"; data: {self.paper_data}" if self.paper_data else "; no data: the weights alone")


def _loads(model: PaperModel, parameter: str) -> str:
    if model.timm_name:
        return f"`{model.timm_name}` (timm, from the Hugging Face hub)"
    if parameter == "models":
        return f"the authors' checkpoint `{model.file}` (as `{{'weights': PATH}}`)"
    return f"the authors' checkpoint `{model.file}`"


SIMMIM_PT, SIMMIM_FT = "SimMIM ViT-B/16 pretrain", "SimMIM ViT-B/16 fine-tuned"
IJEPA_ENCODER, IJEPA_PREDICTOR_LABEL = "I-JEPA ViT-H/14 encoder", IJEPA_PREDICTOR.label
DINO = ("DINO ViT-S/16", "DINO ViT-B/16")
DEIT = ("DeiT-Ti distilled", "DeiT-S distilled", "DeiT-B distilled")
CLASSIFICATION = ("ViT-B/16", "ViT-B/32-384", "ViT-L/16", "ViT-L/32-384")
O3 = "O3, the Odd-One-Out images with target and distractor masks (`o3_dir`)"
SHAPES = ("A curve's shape (`qklib.cosine.depth_profile`, as §4's summary judges it): *concave* when the mean of its "
          "first layers (a sixth, at least two) and its last layer both lie more than one random cosine's 95% spread "
          "above its lowest layer; *falling* when only the first do; *flat* when every layer lies within that spread "
          "of 0; *other* otherwise.")

CLAIMS: tuple[Claim, ...] = (
    Claim("s3-same-early", "§3, Fig 2", "In early layers a token attends most to its own object (same-object "
          "attention dominates).", "s3_attention", "attention",
          "same-object attention is the largest of the three groups in layer 0 (raw ratios, as Fig 2 plots them)",
          _same_leads_early,
          excludes=(SIMMIM_PT,), paper_data=O3),
    Claim("s3-different-grows", "§3, Fig 2", "Attention to different objects grows with depth.", "s3_attention",
          "attention", "the least-squares slope over layers is positive and the last layer lies above the first",
          _grows("different"), excludes=(SIMMIM_PT,), paper_data=O3),
    Claim("s3-background-grows", "§3, Fig 2", "Attention to the background grows with depth.", "s3_attention",
          "attention", "the least-squares slope over layers is positive and the last layer lies above the first",
          _grows("background"), excludes=(SIMMIM_PT,), paper_data=O3),
    Claim("s3-simmim-exception", "§3, Fig 2", "SimMIM-pretrain is the exception to the three observations above.",
          "s3_attention", "attention", "fewer than all three of the observations above hold for it", _fig2_exception,
          about=(SIMMIM_PT,), paper_data=O3),
    Claim("s4-biases", "§4 (formulation)", "The biases can be left out of the analysis: they do not depend on the pair of tokens.",
          "s4_cosine", "biases", f"no head's query-bias term (`b_q · W_k x_j`, which depends on the key and survives the "
          f"softmax) carries more than {BIAS_SHARE_MAX:.0%} of the score's variance over keys", _biases_negligible,
          paper_data="natural images (`image_dir`)"),
    Claim("s4-early-high-falls", "§4.2, Fig 3", "The weighted cosine between `u_n` and `v_n` is high in early layers "
          "and falls with depth.", "s4_cosine", "cosine", "the curve is *concave* or *falling*",
          _shape_in("concave", "falling"), excludes=(IJEPA_PREDICTOR_LABEL,)),
    Claim("s4-middle-zero", "§4.2, Fig 3", "It is close to zero in some middle layers.", "s4_cosine", "cosine",
          "a layer outside the first and last sixth lies within one random cosine's 95% spread of 0",
          _middle_near_zero, excludes=(IJEPA_PREDICTOR_LABEL,)),
    Claim("s4-concave-simmim", "§4.2, Fig 3", "SimMIM-pretrain's curve rises again in the last layers (concave).",
          "s4_cosine", "cosine", "the curve is *concave*", _shape_in("concave"), about=(SIMMIM_PT,)),
    Claim("s4-concave-dino", "§4.2, Fig 3", "The DINO models' curves rise again in the last layers (concave).",
          "s4_cosine", "cosine", "the curve is *concave*", _shape_in("concave"), about=DINO),
    Claim("s4-concave-deit", "§4.2, Fig 3", "The DeiT models' curves rise again in the last layers (concave).",
          "s4_cosine", "cosine", "the curve is *concave*", _shape_in("concave"), about=DEIT),
    Claim("s4-concave-huge", "§4.2, Fig 3", "The huge ViT's curve rises again in the last layers (concave), although "
          "it is trained for classification.", "s4_cosine", "cosine", "the curve is *concave*",
          _shape_in("concave"), about=("ViT-H/14",)),
    Claim("s4-classification-falls", "§4.2, Fig 3", "The other classification-trained ViTs (B and L) fall without a "
          "late rise.", "s4_cosine", "cosine", "the curve is *falling*", _shape_in("falling"),
          about=CLASSIFICATION),
    Claim("s4-simmim-finetuned-falls", "§4.2, Fig 3", "SimMIM fine-tuned falls like the classification-trained "
          "models (no late rise).", "s4_cosine", "cosine", "the curve is *falling*", _shape_in("falling"),
          about=(SIMMIM_FT,)),
    Claim("s4-ijepa-encoder", "§4.2, Fig 3, S3", "The I-JEPA encoder shows no late rise.", "s4_cosine", "cosine",
          "the curve is not *concave*", _no_late_rise, about=(IJEPA_ENCODER,),
          also=f"or the authors' checkpoint `{IJEPA_FILE}` in s4_cosine's `ijepa_checkpoint`"),
    Claim("s4-ijepa-predictor", "§4.2, Fig S3", "The I-JEPA predictor's weighted cosine is high in every layer.",
          "s4_cosine", "cosine", "every layer lies above one random cosine's 95% spread (for the predictor's width)",
          _high_everywhere, about=(IJEPA_PREDICTOR_LABEL,), parameter="ijepa_checkpoint"),
    Claim("s4-anisotropy", "§4.2, Fig S4", "The high cosine is not just anisotropy: it remains relative to the "
          "cosine between token embeddings of different images.", "s4_cosine", "anisotropy",
          "in the first sixth of the layers the weighted cosine lies above the upper end of the baseline's 95% "
          "interval", _above_baseline, excludes=(IJEPA_PREDICTOR_LABEL,),
          paper_data="natural images (`image_dir`)"),
    Claim("s5-semantic", "§5, Fig 1, 4, S5–S16", "Singular modes are semantically interpretable: a mode's optimal "
          "images share the feature its query and key maps pick out.", "s5_modes", "optimal_images",
          "a reading of pictures; the §5 chapter shows the optimal images of modes chosen by a rule",
          None, paper_data="ImageNet validation images (`image_dir`)"),
    Claim("s5-same-object-depth", "§5, Fig 6", "A mode's query and key features fall on the same object more often in "
          "early layers than in late ones.", "s5_modes", "same_object",
          f"P(same object) is higher, by at least {SAME_OBJECT_STEP}, in the first half of the layers than in the "
          "second", _same_object_falls, paper_data="ADE20K, every object segmented (`ade20k_dir`)"),
    Claim("s5-fig5-ranking", "§5, Fig 5, S17–S19", "An image's modes ordered by their contribution to the attention "
          "score (summed over token pairs) are the modes that shape its attention.", "s5_modes", "ablation",
          "removing each head's top modes by the paper's sum changes the attention rows at least as much as "
          "removing as many modes ranked by their attention-weighted, key-centred contribution", _paper_ranking,
          paper_data="any image (`image_dir`, `walkthrough_image`)"),
)

CHAPTERS: tuple[str, ...] = tuple(dict.fromkeys(claim.chapter for claim in CLAIMS))


# --- reading the records back, and the ledger ---------------------------------------------------------------

def record_from_notebook(path: str | Path, chapter: str) -> dict:
    """The record ``chapter`` glued in its executed notebook ``path`` (raises :class:`LedgerError`)."""
    path, name = Path(path), RECORD_NAMES[chapter]
    if not path.is_file():
        raise LedgerError(f"{path} is missing: the claims ledger is built from every chapter's executed notebook; "
                          f"execute {chapter} first (tools/build_book.py --only {chapter}, or make book)")
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            glued = output.get("metadata", {}).get("scrapbook", {})
            if glued.get("name") != name:
                continue
            record = output.get("data", {}).get(glued.get("mime_prefix", "") + MIME)
            if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("chapter") != chapter:
                raise LedgerError(f"{path}: the glued {name!r} is not a format-{FORMAT} ledger record of {chapter}; "
                                  f"execute the chapter again (tools/build_book.py --only {chapter})")
            return record
    raise LedgerError(f"{path} holds no glued {name!r} record: it was executed by a version of {chapter} that did not "
                      f"record its claims; execute it again (tools/build_book.py --only {chapter})")


def read_records(executed: str | Path, chapters: Sequence[str] = CHAPTERS) -> dict[str, dict]:
    """``{chapter: record}`` from ``executed/<chapter>.ipynb`` for every chapter the claims cite."""
    return {chapter: record_from_notebook(Path(executed) / f"{chapter}.ipynb", chapter) for chapter in chapters}


@dataclass(frozen=True)
class Evidence:
    """One model's measurement for one claim: ``agrees`` is None for a claim read by eye."""

    chapter: str
    model: str
    paper_model: str | None
    data: str
    number: str
    agrees: bool | None


@dataclass(frozen=True)
class Row:
    """One claim of the ledger with its verdict (``AGREES``, ``DISAGREES``, ``MIXED``,
    ``NOT_TESTED`` or ``BY_EYE``) and the evidence behind it."""

    claim: Claim
    verdict: str
    evidence: tuple[Evidence, ...]

    @property
    def agreeing(self) -> int:
        return sum(bool(e.agrees) for e in self.evidence)


def verdict(evidence: Sequence[Evidence]) -> str:
    """All judged models agree: agrees; none: disagrees; some: mixed; no model: not tested; no judge: by eye."""
    judged = [e.agrees for e in evidence if e.agrees is not None]
    if not evidence:
        return NOT_TESTED
    if not judged:
        return BY_EYE
    return AGREES if all(judged) else DISAGREES if not any(judged) else MIXED


def assemble(records: Mapping[str, Mapping], claims: Sequence[Claim] = CLAIMS) -> list[Row]:
    """One :class:`Row` per claim, judged on every model of the chapters' ``records`` that it concerns
    (``{chapter: record}``, as :func:`read_records` returns; a claim's chapter missing is a :class:`LedgerError`)."""
    missing = [c for c in dict.fromkeys(claim.chapter for claim in claims) if c not in records]
    if missing:
        raise LedgerError(f"no record of {', '.join(missing)}: the claims ledger needs every chapter its claims cite "
                          f"({', '.join(dict.fromkeys(c.chapter for c in claims))}); execute "
                          + " and ".join(missing) + " first")
    rows = []
    for claim in claims:
        record = records[claim.chapter]
        if record.get("format") != FORMAT:
            raise LedgerError(f"the record of {claim.chapter} has format {record.get('format')!r}, not {FORMAT}: "
                              "execute the chapter again")
        evidence = []
        for entry in record["models"]:
            if not claim.concerns(entry):
                continue
            measured = entry[claim.measure]
            agrees, number = claim.judge(measured) if claim.judge else (None, _by_eye(measured))
            evidence.append(Evidence(claim.chapter, entry["label"], entry["paper_model"],
                                     record["data"].get(claim.measure, ""), number,
                                     None if agrees is None else bool(agrees)))
        rows.append(Row(claim, verdict(evidence), tuple(evidence)))
    return rows


def _by_eye(m: dict) -> str:
    return f"optimal images of every mode and sign over {m['images']} images, drawn for the modes a rule picks"
