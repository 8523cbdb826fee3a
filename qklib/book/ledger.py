"""The claims ledger: each headline claim of the paper, and what this book's run says about it.

A claim (``CLAIMS``) is data: the paper's statement in our words, where the paper makes it, the chapter that
tests it, the models it is about, the data the paper measured it on, and the rule that judges one model's
measurement: a statistic with its 95% bootstrap interval compared with a named threshold (``THRESHOLDS``), so
each model agrees, disagrees or is borderline (``qklib.core.stats.decide``). The measurements come from the run: each
chapter glues one :class:`Record` (:func:`attention_record`, :func:`cosine_record`, :func:`modes_record`,
:func:`question_record`) under the name in ``RECORD_NAMES``; the book builder reads them back from the executed
notebooks (:func:`read_records`), and :func:`assemble` judges every claim on every model of the run that it
concerns. Nothing in a verdict or a number is typed. ``QUESTIONS`` are the paper's open questions that the
book's second part answers, judged by the same machinery ("Beyond the paper").

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

from ..analyses.crossmodal import Pass, stacked
from ..analyses.object_contrast import grouping_score
from ..analyses.preference import GROUPS, image_curves, per_area
from ..analyses.units import curves as unit_curves, early_minus_late, first_half_mean, pooled_heads
from ..core.stats import (AGREES, BORDERLINE, DISAGREES, NOT_TESTED, RESAMPLES, Interval, bootstrap, bootstrap_curve,
                          bootstrap_slope, combine, decide, decide_within, permutation_band, rank_correlation)
from ..core.svd import QKSVD, null_band
from .paper_models import EMBEDDED, IJEPA_FILE, IJEPA_PREDICTOR, PAPER_MODELS, PaperModel

FORMAT = 2  # the records' layout; a record of another format is refused
MIME = "application/vnd.qklib.ledger+json"  # a +json type: nbformat stores the glued record as JSON
RECORD_NAMES = {"s3_attention": "s3_ledger", "s4_cosine": "s4_ledger", "s5_modes": "s5_ledger",
                "s6_values": "s6_ledger", "s7_modalities": "s7_ledger", "s8_segmentation": "s8_ledger"}
MIXED, BY_EYE = "mixed", "judged by eye"
RANKINGS = {"by_random": "random modes", "by_paper_sum": "the paper's sum", "by_singular_value": "singular value",
            "by_attention": "attention-weighted"}  # the four mode rankings of §5's ablation, in the page's order

# The thresholds every verdict compares its interval with, each with its reason (the ledger page lists them).
CHANCE_RATIO = 1.0
LEVEL_STEP = 0.005
BIAS_SHIFT_MAX = 0.05
UNIT_EXCESS = 1.05  # §7: the least excess of the own unit over shifted units that counts as grouping
THRESHOLDS = {
    "chance (per unit area)": (CHANCE_RATIO, "attention spread uniformly over the key tokens gives every region "
                               "exactly its area's share, a ratio of 1 to chance"),
    "slope": (0.0, "a curve grows with depth when the least-squares slope of its layer means is positive"),
    "effect (one random cosine)": ("±0.100 for d = 384, ±0.071 for d = 768", "a difference smaller than the 95% "
                                   "spread of the cosine between two random unit vectors in R^d could arise between "
                                   "unrelated directions, so it does not count as a change or as non-zero"),
    "bias shift": (BIAS_SHIFT_MAX, "dropping a term that moves each query's attention by less than 5% of its "
                   "mass (total variation) changes no conclusion drawn from attention maps"),
    "difference": (0.0, "a fall, or a gain over random modes, holds when its interval lies above 0"),
    "excess over shifted units": (UNIT_EXCESS, "attention counts as grouping by word when the own word gets at least "
                                  "5% more attention per unit area, relative to other words, than a shifted word "
                                  "does; a smaller excess, however sure, is position doing nearly all the work"),
    "display step": (LEVEL_STEP, "only for counting the rising steps of a curve in the text; no verdict uses it"),
}


class LedgerError(RuntimeError):
    """A chapter's record is missing or unreadable; the message names the file and what to run."""


# --- which model is which -------------------------------------------------------------------------------------

_KNOWN: tuple[PaperModel, ...] = (*PAPER_MODELS, IJEPA_PREDICTOR)
BY_LABEL = {m.label: m for m in (*_KNOWN, EMBEDDED)}
# The names ``qklib.book.paper_models.ijepa_encoder_predictor`` gives Fig S3's pair, whatever the file is called.
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


def attention_record(table: pd.DataFrame, chance: pd.DataFrame, data: str, resamples: int = RESAMPLES, seed: int = 0,
                     variant: str = "most-covered query token, its own token removed") -> Record:
    """§3's record: per model, each group's ratio per image and layer (mean over heads) and each image's chance
    level for the same key set, from which the ledger computes attention per unit area and its intervals.

    ``table``: the headline variant's rows of ``qklib.analyses.preference.measure`` (every model); ``chance``: the first
    model's ``Preference.chance`` (per image, with the ``*_removed`` columns for the headline variant); ``data``:
    what was measured (e.g. "60 of 64 generated scenes"); ``resamples``, ``seed``: the bootstrap's."""
    suffix = "_removed" if "removed" in variant else ""
    by_image = chance.set_index("image")
    entries = []
    for label, rows in table.groupby("model", sort=False):
        images, curves = {}, {}
        for group in GROUPS:
            images[group], values = image_curves(rows, group)
            curves[group] = [_floats(curve) for curve in values]
        order = images["same"]
        entries.append(_entry(label, attention={
            "layers": sorted(int(v) for v in rows["layer"].unique()), "variant": variant, "images": curves,
            "chance": {g: _floats(by_image.loc[order, g + suffix]) for g in GROUPS},
            "resamples": int(resamples), "seed": int(seed)}))
    return _record("s3_attention", {"attention": data}, entries)


def cosine_record(relative: pd.DataFrame, bands: pd.DataFrame, effect: float, svds: Mapping[str, QKSVD],
                  folded: Mapping[str, QKSVD] | None = None, extra: Mapping[str, QKSVD] | None = None,
                  images: str = "photos", biases: Mapping[str, np.ndarray] | None = None,
                  resamples: int = RESAMPLES, seed: int = 0) -> Record:
    """§4's record: per model, every head's weighted cosine per layer in the raw basis (Fig 3; the paper's) and
    with the norm's gamma folded in, the simulated null band of the layer mean, the effect size the verdicts use
    (``effect``: one random cosine's 95% spread for the model's width), the anisotropy baseline with its
    interval (Fig S4), and what dropping the query-bias term does to attention.

    ``relative``: ``qklib.analyses.cosine.relative_table``; ``bands``: ``qklib.analyses.cosine.null_band_table``;
    ``svds`` and ``folded``: the models' raw and gamma-folded decompositions; ``extra``: further decompositions without
    images (Fig S3's I-JEPA encoder and predictor, keyed as ``qklib.book.paper_models.ijepa_encoder_predictor`` names
    them), judged with the single-cosine band of their own width; ``biases``: ``{label: [L, images]}`` from
    ``qklib.analyses.biases.attention_shift`` (the mean over heads and queries of each image's attention change)."""
    entries = []
    for label, frame in relative.groupby("model", sort=False):
        frame = frame.sort_values("layer")
        band = bands[bands["model"] == label].sort_values("layer")["null_band"]
        measures = {}
        if biases is not None and label in biases:
            measures["biases"] = {"shift": [_floats(layer) for layer in np.asarray(biases[label])],
                                  "resamples": int(resamples), "seed": int(seed)}
        entries.append(_entry(label, cosine=_cosine_measure(svds[label], (folded or {}).get(label), effect,
                                                            _floats(band), resamples, seed),
                              anisotropy={"weighted": _floats(frame["weighted_cosine"]),
                                          "baseline": _floats(frame["anisotropy_baseline"]),
                                          "low": _floats(frame["baseline_low"]),
                                          "high": _floats(frame["baseline_high"])}, **measures))
    for name, svd in (extra or {}).items():
        entry = _entry(svd.model or name, cosine=_cosine_measure(svd, None, null_band(svd.dim), None, resamples, seed))
        entry["paper_model"] = entry["paper_model"] or FIG_S3_PARTS.get(name)  # a renamed checkpoint file
        entries.append(entry)
    first = relative.iloc[0]
    data = {"cosine": "the query-key weights",
            "anisotropy": f"{int(first['baseline_photos'])} {images} and crops of them "
                          f"({int(first['baseline_tokens'])} image tokens per layer)",
            "biases": f"{int(first['baseline_photos'])} {images}, every query and key token"}
    return _record("s4_cosine", data, entries)


def _cosine_measure(svd: QKSVD, folded: QKSVD | None, effect: float, band, resamples: int, seed: int) -> dict:
    heads = svd.weighted_cosine().numpy()
    return {"heads": [_floats(layer) for layer in heads], "weighted": _floats(heads.mean(axis=1)),
            "folded": None if folded is None else [_floats(layer) for layer in folded.weighted_cosine().numpy()],
            "null_band": band, "effect": float(effect), "resamples": int(resamples), "seed": int(seed)}


def modes_record(label: str, same, control, ablation_rows: Sequence[dict], gallery_images: int, masked: str,
                 gallery: str = "default gallery", natural_gallery: bool = False,
                 variant: str = "same instance, background counted as one more object", resamples: int = RESAMPLES,
                 seed: int = 0, mismatched=None) -> Record:
    """§5's record for the chapter's model ``label``: same-object probability per head and layer with chance and
    the random-init control (``same``, ``control``: ``qklib.analyses.same_object.SameObject``), the ablation of four
    mode rankings per image-head case (``ablation_rows``: ``qklib.analyses.modes.ablation``), and how many images the
    optimal-image search scored (``natural_gallery``: whether they include a folder of natural images, the data
    the paper's reading of optimal images needs). ``masked``: what the images with object masks are (e.g.
    "generated scenes"); ``gallery``: the searched folder; ``mismatched``: the same statistic with every key
    direction paired with another mode's (``qklib.analyses.same_object.mismatched``), a stronger null, or None."""
    rows = pd.DataFrame(list(ablation_rows))
    ablation = {"cases": {name: _floats(rows[name]) for name in RANKINGS}, "count": int(rows["count"].iloc[0]),
                "resamples": int(resamples), "seed": int(seed)}
    entry = _entry(label, same_object={"layers": [int(v) for v in same.layers],
                                       "heads": [_floats(layer) for layer in np.asarray(same.per_head)],
                                       "chance": _floats(same.chance_layer), "control": _floats(control.per_layer),
                                       "mismatched": None if mismatched is None else _floats(mismatched.per_layer),
                                       "variant": variant, "resamples": int(resamples), "seed": int(seed)},
                   ablation=ablation, optimal_images={"images": int(gallery_images), "natural": bool(natural_gallery)})
    layers = ", ".join(f"L{layer}" for layer in sorted(rows["layer"].unique()))
    data = {"same_object": f"{same.images_used + same.images_skipped} {masked} ({same.images_used} with two or more "
                          "objects)",
            "ablation": f"{rows['image'].nunique()} gallery images, every head of {layers}",
            "optimal_images": f"{int(gallery_images)} images ({gallery})"}
    return _record("s5_modes", data, [entry])


def question_record(chapter: str, data: Mapping[str, str], measures: Mapping[str, Mapping[str, dict]]) -> Record:
    """A "Beyond the paper" chapter's record: ``measures`` maps each model label to ``{measure: {...}}`` (JSON-safe
    numbers, intervals as ``qklib.core.stats.Interval.as_dict``), ``data`` each measure to what it was measured on."""
    return _record(chapter, dict(data), [_entry(label, **per_model) for label, per_model in measures.items()])


def modalities_record(svds: Mapping[str, tuple[QKSVD, QKSVD]], units: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      data: Mapping[str, str], unit: str = "word", resamples: int = RESAMPLES, seed: int = 0) -> Record:
    """§7's record: per text or speech model (and control), the per-head weighted cosines in the raw and the
    gamma-folded basis, and the same-unit attention sums per input with their shifted-units null
    (``qklib.analyses.units``; heads pooled), from which the ledger judges §7's "Beyond the paper" questions."""
    entries = []
    for label, (svd, folded) in svds.items():
        sums, null = units[label]
        measure = {"sums": pooled_heads(sums).tolist(), "null": pooled_heads(null).tolist(), "unit": unit,
                   "resamples": int(resamples), "seed": int(seed)}
        entries.append(_entry(label, cosine=_cosine_measure(svd, folded, null_band(svd.dim), None, resamples, seed),
                              same_unit=measure))
    return _record("s7_modalities", dict(data), entries)



def crossmodal_record(svds: Mapping[str, QKSVD], folded: Mapping[str, QKSVD], passes: Mapping[str, Sequence[Pass]],
                      texts: int, utterances: int, resamples: int = RESAMPLES, seed: int = 0) -> Record:
    """:func:`modalities_record` of §7's text and speech models from their passes
    (``qklib.analyses.crossmodal.all_passes``), with word units; ``texts`` and ``utterances`` count the inputs."""
    return modalities_record(
        {label: (svds[label], folded[label]) for label in passes},
        {label: stacked(passes[label], "word") for label in passes},
        {"cosine": "the query-key weights", "same_unit": f"{texts} pydoc snippets (text) and {utterances} eSpeak NG "
                                                         "utterances of the same prose (speech)"},
        resamples=resamples, seed=seed)

# --- the judges: one model's measurement -> its outcome, the statistic and its interval ------------------------

@dataclass(frozen=True)
class Judgement:
    """One model's outcome for one claim (``AGREES``, ``DISAGREES`` or ``BORDERLINE``), the decisive statistic's
    interval (None for a claim read by eye) and the numbers behind it in words."""

    outcome: str
    number: str
    interval: Interval | None = None


Judge = Callable[[dict], Judgement | None]


def _array(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _matrix(rows) -> np.ndarray:
    return np.asarray([_array(row) for row in rows], dtype=float)


def _boot(m: dict) -> dict:
    return {"resamples": int(m.get("resamples", RESAMPLES)), "seed": int(m.get("seed", 0))}


def _attention(m: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return ({g: _matrix(m["images"][g]) for g in GROUPS}, {g: _array(m["chance"][g]) for g in GROUPS})


def _same_leads_early(m: dict) -> Judgement:
    curves, chances = _attention(m)
    area = per_area(curves, chances, 0, **_boot(m))
    outcome = decide(area["dominance"], CHANCE_RATIO)
    return Judgement(outcome, "L0, attention per unit area (× chance): " + ", ".join(
        f"{g} {area[g].text(2)}" for g in GROUPS) + f"; same ÷ the larger other {area['dominance'].text(2)} "
        f"({m['variant']}; {len(chances['same'])} images)", area["dominance"])


def _grows(group: str) -> Judge:
    def judge(m: dict) -> Judgement:
        curves = _attention(m)[0][group]
        slope = bootstrap_slope(curves, **_boot(m))
        mean = np.nanmean(curves, axis=0)
        rising = int((np.diff(mean) > LEVEL_STEP).sum())
        return Judgement(decide(slope, 0.0), f"slope {slope.text(4)} per layer; every layer: "
                         + " ".join(f"{v:.2f}" for v in mean) + f" (L0 → L{len(mean) - 1}; {rising} of "
                         f"{len(mean) - 1} steps rise)", slope)
    return judge


def _fig2_exception(m: dict) -> Judgement:
    parts = [_same_leads_early(m).outcome, _grows("different")(m).outcome, _grows("background")(m).outcome]
    held, failed = parts.count(AGREES), parts.count(DISAGREES)
    outcome = AGREES if failed else DISAGREES if held == 3 else BORDERLINE
    return Judgement(outcome, f"of Fig 2's 3 observations {held} hold, {failed} fail, "
                              f"{parts.count(BORDERLINE)} borderline")


def _edge(count: int) -> int:
    """How many layers count as "the first" (or "the last") layers: a sixth, at least one."""
    return max(1, count // 6)


def _first(count: int) -> int:
    """The first layers of a shape judgement: a sixth, at least two (as ``qklib.analyses.cosine.depth_profile``)."""
    return max(2, count // 6)


def _shape_parts(m: dict) -> tuple[Interval, Interval, int]:
    """``(drop, rise, lowest layer)``: the mean of the first layers minus the lowest layer, and the last layer
    minus the lowest, each with its interval over heads (resampled within each layer)."""
    heads = _matrix(m["heads"])
    low, first = int(np.nanargmin(np.nanmean(heads, axis=1))), _first(len(heads))
    drop = bootstrap_curve(heads, lambda c: c[:, :first].mean(axis=1) - c[:, low], **_boot(m))
    rise = bootstrap_curve(heads, lambda c: c[:, -1] - c[:, low], **_boot(m))
    return drop, rise, low


def _curve(m: dict, drop: Interval, rise: Interval, low: int) -> str:
    values = _array(m["weighted"])
    return (f"first {_first(len(values))} layers − lowest (L{low}) {drop.text()}, last − lowest {rise.text()} "
            f"(intervals over heads; a change counts beyond {m['effect']:.3f}); every layer: "
            + " ".join(f"{v:.2f}" for v in values))


def _falls(m: dict) -> Judgement:
    drop, rise, low = _shape_parts(m)
    return Judgement(decide(drop, m["effect"]), _curve(m, drop, rise, low), drop)


def _concave(m: dict) -> Judgement:
    drop, rise, low = _shape_parts(m)
    return Judgement(combine([decide(drop, m["effect"]), decide(rise, m["effect"])]), _curve(m, drop, rise, low),
                     rise)


def _falls_without_rise(m: dict) -> Judgement:
    drop, rise, low = _shape_parts(m)
    return Judgement(combine([decide(drop, m["effect"]), decide(rise, m["effect"], holds_above=False)]),
                     _curve(m, drop, rise, low), rise)


def _no_late_rise(m: dict) -> Judgement:
    drop, rise, low = _shape_parts(m)
    return Judgement(decide(rise, m["effect"], holds_above=False), _curve(m, drop, rise, low), rise)


def _closest_middle(heads: np.ndarray, m: dict) -> tuple[int, Interval, str]:
    edge = _edge(len(heads))
    middle = np.arange(edge, len(heads) - edge)
    layer = int(middle[np.abs(np.nanmean(heads[middle], axis=1)).argmin()])
    interval = bootstrap_curve(heads, lambda c: c[:, layer], **_boot(m))
    return layer, interval, decide_within(interval, m["effect"])


def _middle_near_zero(m: dict) -> Judgement:
    heads = _matrix(m["heads"])
    edge = _edge(len(heads))
    if len(heads) - 2 * edge <= 0:
        return Judgement(DISAGREES, f"only {len(heads)} layers: no middle layers")
    layer, interval, outcome = _closest_middle(heads, m)
    text = (f"closest to 0 among L{edge}–L{len(heads) - edge - 1}: L{layer} {interval.text()} (interval over heads; "
            f"≈ 0 within ±{m['effect']:.3f}) → {outcome}")
    if m.get("folded"):
        f_layer, f_interval, f_outcome = _closest_middle(_matrix(m["folded"]), m)
        text += f"; with the norm's gamma folded in: L{f_layer} {f_interval.text()} → {f_outcome}"
        if f_outcome != outcome:
            return Judgement(BORDERLINE, text + " (the two bases disagree: the verdict depends on the basis)", interval)
    return Judgement(outcome, text, interval)


def _high_everywhere(m: dict) -> Judgement:
    heads = _matrix(m["heads"])
    lowest = bootstrap_curve(heads, lambda c: c.min(axis=1), **_boot(m))
    return Judgement(decide(lowest, m["effect"]), f"the lowest layer's weighted cosine {lowest.text()} (interval "
                     f"over heads; high: above {m['effect']:.3f}); mean {np.nanmean(heads):.2f}", lowest)


def _above_baseline(m: dict) -> Judgement:
    weighted, baseline = _array(m["weighted"]), _array(m["baseline"])
    low, high = _array(m["low"]), _array(m["high"])
    early = _edge(len(weighted))
    relative = Interval(float(weighted[:early].mean() - baseline[:early].mean()),
                        float(weighted[:early].mean() - high[:early].mean()),
                        float(weighted[:early].mean() - low[:early].mean()), 0)
    return Judgement(decide(relative, 0.0), f"first {early} layer(s): weighted cosine {weighted[:early].mean():.2f} "
                     f"minus the baseline {baseline[:early].mean():.2f} [{low[:early].mean():.2f}, "
                     f"{high[:early].mean():.2f}] = relative {relative.text(2)} (interval from the baseline's, over "
                     "photos)", relative)


def _same_object_falls(m: dict) -> Judgement:
    heads, layers = _matrix(m["heads"]), m["layers"]
    half = len(heads) // 2
    drop = bootstrap_curve(heads, lambda c: np.nanmean(c[:, :half], axis=1) - np.nanmean(c[:, half:], axis=1),
                           **_boot(m))
    values = np.nanmean(heads, axis=1)
    return Judgement(decide(drop, 0.0), (
        f"L{layers[0]}–L{layers[half - 1]} minus L{layers[half]}–L{layers[-1]}: {drop.text()} (interval over heads); "
        f"every layer: " + " ".join(f"{v:.2f}" for v in values) + f"; chance "
        f"{np.nanmean(_array(m['chance'])):.2f}, random-init control {np.nanmean(_array(m['control'])):.2f}"
        + _mismatched(m) + f" ({m['variant']})"), drop)


def _mismatched(m: dict) -> str:
    if not m.get("mismatched"):
        return ""
    values = _array(m["mismatched"])
    return (f", mismatched-mode null (each query direction with another mode's key direction) "
            f"{np.nanmin(values):.2f}–{np.nanmax(values):.2f}")


def _biases_negligible(m: dict) -> Judgement:
    shift = _matrix(m["shift"])  # [L, images]
    intervals = [bootstrap(layer, **_boot(m)) for layer in shift]
    worst = int(np.argmax([i.estimate for i in intervals]))
    return Judgement(decide(intervals[worst], BIAS_SHIFT_MAX, holds_above=False), (
        "attention moved by dropping the key-salience term b_q · W_k x_j (total variation per query, mean over heads "
        "and queries, interval over photos): " + ", ".join(f"L{layer} {i.estimate:.2f}"
                                                           for layer, i in enumerate(intervals))
        + f"; largest L{worst} {intervals[worst].text(2)}"), intervals[worst])


def _paper_ranking(m: dict) -> Judgement:
    cases = {name: _array(m["cases"][name]) for name in RANKINGS}
    gain = bootstrap(cases["by_paper_sum"] - cases["by_random"], **_boot(m))
    versus_s = bootstrap(cases["by_paper_sum"] - cases["by_singular_value"], **_boot(m))
    means = ", ".join(f"{RANKINGS[name]} {bootstrap(values, **_boot(m)).text()}" for name, values in cases.items())
    beats = float((cases["by_paper_sum"] > cases["by_random"]).mean())
    return Judgement(decide(gain, 0.0), (
        f"mean change of the attention rows (total variation) when each head's top {m['count']} modes are removed: "
        f"{means}; the paper's ranking minus random {gain.text()}, larger in {beats:.0%} of {len(cases['by_random'])} "
        f"image-head cases; minus singular value alone {versus_s.text()}"), gain)


def _composes(m: dict) -> Judgement:
    shares = {kind: (int(counts["beyond"]), int(counts["pairs"])) for kind, counts in m["kinds"].items()}
    pooled = np.concatenate([np.r_[np.ones(b), np.zeros(n - b)] for b, n in shares.values()])
    share = bootstrap(pooled, **_boot(m))
    return Judgement(decide(share, m["chance"]), (
        "share of head pairs whose composition score exceeds every draw of its Haar null, pooled over Q, K and V: "
        f"{share.text()} against chance {m['chance']:.3f}; per kind " + ", ".join(
            f"{kind.upper()} {b / n:.1%} of {n}" for kind, (b, n) in shares.items())), share)


def _above_haar_null(m: dict, measured: str, null_name: str) -> Judgement:
    """The mean over heads (``m["heads"]``) against the 97.5th percentile of its Haar null's draws (``m["null"]``);
    ``measured`` words the statistic before its interval (``{heads}`` becomes the number of heads)."""
    heads, null = _array(m["heads"]), _array(m["null"])
    mean = bootstrap(heads, **_boot(m))
    high = float(np.percentile(null, 97.5))
    return Judgement(decide(mean, high), (
        f"{measured.format(heads=len(heads))}, {mean.text()}; {null_name} {float(np.mean(null)):.3f}, 97.5th "
        f"percentile {high:.3f}"), mean)


def _copies(m: dict) -> Judgement:
    return _above_haar_null(m, "copying score, mean over {heads} heads", "Haar null (spectra kept, directions random)")


def _reads_keys(m: dict) -> Judgement:
    return _above_haar_null(
        m, "share of a QK mode's key feature inside its own head's OV read subspace, mean over modes and {heads} heads",
        f"a random direction {m['chance']:.3f}; Haar null (read directions random)")


def _groups(m: dict) -> Judgement:
    delta, uniform = _matrix(m["images"]), _matrix(m["uniform"])  # [images, L]
    first = _first(delta.shape[1])
    change = bootstrap(delta[:, :first].mean(axis=1), **_boot(m))
    beyond = bootstrap((delta - uniform)[:, :first].mean(axis=1), **_boot(m))
    control = ("" if not m.get("control") else
               f"; random-init control {np.nanmean(_matrix(m['control'])[:, :first]):+.4f}")
    return Judgement(combine([decide(change, 0.0), decide(beyond, 0.0)]), (
        f"first {first} layers, change of within- minus between-object cosine by one head's output (mean over "
        f"heads, interval over {len(delta)} images) {change.text(4)}; minus the same head attending uniformly "
        f"{beyond.text(4)}{control}; every layer: " + " ".join(f"{v:+.3f}" for v in np.nanmean(delta, axis=0))),
        change)


def _groupers_copy(m: dict) -> Judgement:
    attention, cosine, copying = _array(m["attention"]), _array(m["weighted_cosine"]), _array(m["copying"])
    score = grouping_score(attention, cosine)
    rho = rank_correlation(score, copying, **_boot(m))
    band = permutation_band(score, copying, draws=m["permutations"], seed=m.get("seed", 0))
    layered = permutation_band(score, copying, draws=m["permutations"], seed=m.get("seed", 0), groups=m["layers"])
    parts = {"same-object attention": attention, "weighted cosine": cosine}
    return Judgement(decide(rho, 0.0), (
        f"Spearman correlation over {len(copying)} heads between grouping (mean rank of same-object attention and "
        f"weighted cosine) and copying score {rho.text(2)}; no association (copying shuffled over heads) "
        f"[{band[0]:.2f}, {band[1]:.2f}], shuffled within layers [{layered[0]:.2f}, {layered[1]:.2f}]; each alone: "
        + ", ".join(f"{name} {rank_correlation(v, copying, **_boot(m)).text(2)}" for name, v in parts.items())), rho)


def _segments(m: dict) -> Judgement:
    against = Interval.from_dict(m["against_kmeans"])
    score = lambda key: Interval.from_dict(m[key]).text()  # noqa: E731 (a local formatter)
    return Judgement(decide(against, 0.0), (
        f"mIoU after Hungarian matching, modes at L{m['modes_layer']} {score('modes')} against k-means on the same "
        f"tokens {score('kmeans_score')}: difference {against.text()}; the best other method, {m['best_baseline']} "
        f"L{m['best_baseline_layer']}, {score('best_score')} (modes minus it "
        f"{Interval.from_dict(m['against_best']).text()}); the grid {score('grid_score')} (modes minus it "
        f"{Interval.from_dict(m['against_grid']).text()}); {m['images']} images"),
        against)


def _unit_arrays(m: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(m["sums"], dtype=float), np.asarray(m["null"], dtype=float)


def _unit_curve(m: dict) -> str:
    sums, null = _unit_arrays(m)
    excess = unit_curves(sums, null)["excess"]
    return "every layer's excess: " + " ".join(f"{v:.2f}" for v in excess) + f" ({len(sums)} inputs, unit: {m['unit']})"


def _unit_early(m: dict) -> Judgement:
    sums, null = _unit_arrays(m)
    early = first_half_mean(sums, null, "excess", **_boot(m))
    return Judgement(decide(early, UNIT_EXCESS), f"first half of the layers: excess {early.text()} (counts beyond "
                     f"{UNIT_EXCESS}); " + _unit_curve(m), early)


def _unit_falls(m: dict) -> Judgement:
    sums, null = _unit_arrays(m)
    fall = early_minus_late(sums, null, "excess", **_boot(m))
    return Judgement(decide(fall, 0.0), f"first half minus second half of the excess {fall.text()}; "
                     + _unit_curve(m), fall)


def judge_model(record: Mapping, label: str) -> dict[str, Judgement]:
    """Every general claim (about no named model) of the record's chapter judged on the model ``label`` of the
    record, whatever the model: a chapter's own summary states the ledger's verdicts with its rules."""
    entry = next((e for e in record["models"] if e["label"] == label), None)
    if entry is None:
        raise LedgerError(f"the record of {record['chapter']} has no model {label!r}")
    return {claim.key: claim.judge(entry[claim.measure]) for claim in CLAIMS
            if claim.chapter == record["chapter"] and claim.judge and not claim.about and claim.measure in entry}


def judge_questions(record: Mapping, label: str, keys: Sequence[str] | None = None) -> dict[str, Judgement]:
    """The open questions (``QUESTIONS``; ``keys``: only these) of the record's chapter judged on the model
    ``label``, as the ledger's "Beyond the paper" table judges them: a chapter states these answers itself."""
    entry = next((e for e in record["models"] if e["label"] == label), None)
    if entry is None:
        raise LedgerError(f"the record of {record['chapter']} has no model {label!r}")
    return {question.key: question.judge(entry[question.measure]) for question in QUESTIONS
            if question.chapter == record["chapter"] and question.measure in entry
            and (keys is None or question.key in keys)}


def _semantic(m: dict) -> Judgement | None:
    """Read by eye where the gallery has natural images; else the claim is not tested (None)."""
    if not m.get("natural"):
        return None
    return Judgement(BY_EYE, f"optimal images of every mode and sign over {m['images']} images, drawn for the modes "
                             "a rule picks")


# --- the claims -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """One headline claim of the paper.

    ``about``: the paper's models it is about (``PaperModel.label``); empty for a claim about trained ViTs in
    general, which then concerns every trained model of a run except ``excludes``. ``measure``: the key of the
    chapter record's measurement it is judged on. ``paper_data``: what the paper measured it on (empty: the
    weights alone), with the chapter parameter that takes it. ``judge``: one model's measurement ->
    ``(agrees, the number behind it)``; None for a claim read by eye. ``parameter``: the chapter parameter that
    takes the models it needs; ``also``: another way to get them. ``criterion`` states the rule in words,
    ``statistic`` what it is computed on and ``null`` what chance would give. Statements and criteria are MyST
    markdown."""

    key: str
    paper: str
    statement: str
    chapter: str
    measure: str
    criterion: str
    judge: Judge | None
    statistic: str = ""  # what is computed, with its interval's units
    null: str = ""  # the chance level or null it is compared with
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
OVER_IMAGES = "95% bootstrap interval over images"
OVER_HEADS = "95% bootstrap interval over heads, resampled within each layer"
SHAPE_STAT = ("the mean of the first layers (a sixth, at least two) minus the lowest layer (*drop*) and the last layer "
              f"minus the lowest (*rise*), layer values the mean weighted cosine over heads; {OVER_HEADS}")
SHAPE_NULL = "a random-init control sits at 0 (Fig 3's simulated null band of the plotted mean is drawn in §4)"
RULE = ("Every verdict compares a statistic's 95% interval with a stated threshold: *agrees* when the whole interval "
        "lies on the claim's side, *disagrees* when it lies wholly on the other side, *borderline* when it crosses the "
        "threshold; a claim is *not tested* when no model of the run concerns it. A claim judged on several models "
        "is *mixed* when their outcomes differ. Intervals are seeded percentile bootstraps (2000 resamples unless a "
        "chapter's `resamples` says otherwise; `qklib.core.stats`).")

CLAIMS: tuple[Claim, ...] = (
    Claim("s3-same-early", "§3, Fig 2", "In early layers a token attends most to its own object (same-object "
          "attention dominates).", "s3_attention", "attention",
          "in layer 0 same-object attention per unit area exceeds the larger of different-object and background "
          "attention per unit area (their ratio's interval lies above 1)", _same_leads_early,
          statistic=f"attention per unit area: each group's ratio pooled over images ÷ what uniform attention over the "
                    f"same key tokens gives; {OVER_IMAGES}",
          null="chance = 1 for every group (uniform attention over the key tokens)", excludes=(SIMMIM_PT,),
          paper_data=O3),
    Claim("s3-different-grows", "§3, Fig 2", "Attention to different objects grows with depth.", "s3_attention",
          "attention", "the least-squares slope of the layer means is positive (its interval lies above 0)",
          _grows("different"), statistic=f"slope per layer of the mean ratio (raw, as Fig 2 plots it); {OVER_IMAGES}",
          null="slope 0 (chance is the same in every layer)", excludes=(SIMMIM_PT,), paper_data=O3),
    Claim("s3-background-grows", "§3, Fig 2", "Attention to the background grows with depth.", "s3_attention",
          "attention", "the least-squares slope of the layer means is positive (its interval lies above 0)",
          _grows("background"), statistic=f"slope per layer of the mean ratio (raw, as Fig 2 plots it); {OVER_IMAGES}",
          null="slope 0 (chance is the same in every layer)", excludes=(SIMMIM_PT,), paper_data=O3),
    Claim("s3-simmim-exception", "§3, Fig 2", "SimMIM-pretrain is the exception to the three observations above.",
          "s3_attention", "attention", "at least one of the three observations above fails for it (all three agreeing "
          "disagrees; otherwise borderline)", _fig2_exception, statistic="the three rules above", null="as above",
          about=(SIMMIM_PT,), paper_data=O3),
    Claim("s4-biases", "§4 (formulation)", "The biases can be left out of the analysis: they do not depend on the pair "
          "of tokens.", "s4_cosine", "biases", "dropping the query-bias term moves attention by less than the bias "
          f"shift threshold ({BIAS_SHIFT_MAX}) in every layer (the largest layer's interval lies below it). The term "
          "`b_q · W_k x_j` depends on the key alone, so the paper's sentence is literally right; the question is "
          "whether the QK SVD can omit this key-salience term, which the softmax keeps",
          _biases_negligible, statistic="total variation between each query's attention with and without the term, "
          f"mean over queries and heads per photo; {OVER_IMAGES}", null="0: a term that moves nothing",
          paper_data="natural images (`image_dir`)"),
    Claim("s4-early-high-falls", "§4.2, Fig 3", "The weighted cosine between `u_n` and `v_n` is high in early layers "
          "and falls with depth.", "s4_cosine", "cosine", "the *drop* exceeds one random cosine's spread",
          _falls, statistic=SHAPE_STAT, null=SHAPE_NULL, excludes=(IJEPA_PREDICTOR_LABEL,)),
    Claim("s4-middle-zero", "§4.2, Fig 3", "It is close to zero in some middle layers.", "s4_cosine", "cosine",
          "the middle layer (outside the first and last sixth) closest to 0 lies within one random cosine's spread "
          "of 0 (its whole interval inside); the same is checked with the norm's gamma folded in, and where the "
          "two bases disagree the verdict is borderline", _middle_near_zero,
          statistic=f"that layer's weighted cosine; {OVER_HEADS}", null=SHAPE_NULL, excludes=(IJEPA_PREDICTOR_LABEL,)),
    Claim("s4-concave-simmim", "§4.2, Fig 3", "SimMIM-pretrain's curve rises again in the last layers (concave).",
          "s4_cosine", "cosine", "both the *drop* and the *rise* exceed one random cosine's spread", _concave,
          statistic=SHAPE_STAT, null=SHAPE_NULL, about=(SIMMIM_PT,)),
    Claim("s4-concave-dino", "§4.2, Fig 3", "The DINO models' curves rise again in the last layers (concave).",
          "s4_cosine", "cosine", "both the *drop* and the *rise* exceed one random cosine's spread", _concave,
          statistic=SHAPE_STAT, null=SHAPE_NULL, about=DINO),
    Claim("s4-concave-deit", "§4.2, Fig 3", "The DeiT models' curves rise again in the last layers (concave).",
          "s4_cosine", "cosine", "both the *drop* and the *rise* exceed one random cosine's spread", _concave,
          statistic=SHAPE_STAT, null=SHAPE_NULL, about=DEIT),
    Claim("s4-concave-huge", "§4.2, Fig 3", "The huge ViT's curve rises again in the last layers (concave), although "
          "it is trained for classification.", "s4_cosine", "cosine", "both the *drop* and the *rise* exceed one "
          "random cosine's spread", _concave, statistic=SHAPE_STAT, null=SHAPE_NULL, about=("ViT-H/14",)),
    Claim("s4-classification-falls", "§4.2, Fig 3", "The other classification-trained ViTs (B and L) fall without a "
          "late rise.", "s4_cosine", "cosine", "the *drop* exceeds one random cosine's spread and the *rise* stays "
          "below it", _falls_without_rise, statistic=SHAPE_STAT, null=SHAPE_NULL, about=CLASSIFICATION),
    Claim("s4-simmim-finetuned-falls", "§4.2, Fig 3", "SimMIM fine-tuned falls like the classification-trained "
          "models (no late rise).", "s4_cosine", "cosine", "the *drop* exceeds one random cosine's spread and the "
          "*rise* stays below it", _falls_without_rise, statistic=SHAPE_STAT, null=SHAPE_NULL, about=(SIMMIM_FT,)),
    Claim("s4-ijepa-encoder", "§4.2, Fig 3, S3", "The I-JEPA encoder shows no late rise.", "s4_cosine", "cosine",
          "the *rise* stays below one random cosine's spread", _no_late_rise, statistic=SHAPE_STAT, null=SHAPE_NULL,
          about=(IJEPA_ENCODER,), also=f"or the authors' checkpoint `{IJEPA_FILE}` in s4_cosine's `ijepa_checkpoint`"),
    Claim("s4-ijepa-predictor", "§4.2, Fig S3", "The I-JEPA predictor's weighted cosine is high in every layer.",
          "s4_cosine", "cosine", "the lowest layer lies above one random cosine's spread (for the predictor's width)",
          _high_everywhere, statistic=f"the lowest layer's weighted cosine; {OVER_HEADS}", null=SHAPE_NULL,
          about=(IJEPA_PREDICTOR_LABEL,), parameter="ijepa_checkpoint"),
    Claim("s4-anisotropy", "§4.2, Fig S4", "The high cosine is not just anisotropy: it remains relative to the "
          "cosine between token embeddings of different images.", "s4_cosine", "anisotropy",
          "in the first sixth of the layers the weighted cosine minus the baseline is positive (its interval lies "
          "above 0)", _above_baseline, statistic="weighted cosine minus the mean cosine between tokens of different "
          "photos; the interval is the baseline's (95% bootstrap over photos)",
          null="the anisotropy baseline itself", excludes=(IJEPA_PREDICTOR_LABEL,),
          paper_data="natural images (`image_dir`)"),
    Claim("s5-semantic", "§5, Fig 1, 4, S5–S16", "Singular modes are semantically interpretable: a mode's optimal "
          "images share the feature its query and key maps pick out.", "s5_modes", "optimal_images",
          "a reading of pictures of natural images; §5 shows the optimal images of modes chosen by a rule and how "
          "much of each mode's maps token position alone explains. Not tested without a natural-image gallery: "
          "optimal images among generated scenes say nothing about semantics", None,
          statistic="none: a reading of pictures", null="the share of a map's variance that token position explains "
          "(§5)", paper_data="ImageNet validation images (`image_dir`)"),
    Claim("s5-same-object-depth", "§5, Fig 6", "A mode's query and key features fall on the same object more often in "
          "early layers than in late ones.", "s5_modes", "same_object",
          "P(same object) in the first half of the layers minus the second half is positive (its interval lies "
          "above 0)", _same_object_falls, statistic=f"P(same object) per head, s_n-weighted as Fig 6; {OVER_HEADS}",
          null="chance (the two objects drawn independently), the random-init control and, where computed, the "
               "trained modes with mismatched query and key directions, all printed",
          paper_data="ADE20K, every object segmented (`ade20k_dir`)"),
    Claim("s5-fig5-ranking", "§5, Fig 5, S17–S19", "An image's modes ordered by their contribution to the attention "
          "score (summed over token pairs) are the modes that shape its attention.", "s5_modes", "ablation",
          "removing each head's top modes by the paper's sum changes the attention rows more than removing as many "
          "random modes (the paired difference's interval lies above 0); singular value alone and the "
          "attention-weighted ranking are printed beside it", _paper_ranking,
          statistic="mean total variation of the attention rows per image-head case; 95% bootstrap interval over "
                    "image-head cases", null="as many modes drawn at random (seeded)",
          paper_data="any image (`image_dir`, `walkthrough_image`)"),
)

CHAPTERS: tuple[str, ...] = tuple(dict.fromkeys(claim.chapter for claim in CLAIMS))

# "Beyond the paper": the paper's open questions (its "future research"), answered by the book's second part with
# the same machinery. An answer is *yes* where the claim's rule agrees, *no* where it disagrees.
QUESTIONS: tuple[Claim, ...] = (
    Claim("s6-composition", "§6 (the value side)", "Do later heads read what earlier heads write, beyond chance "
          "(Q-, K- or V-composition, Elhage et al. 2021)?", "s6_values", "composition",
          "the share of head pairs that compose beyond their null is above the share chance gives (its interval "
          "lies above 1 / (draws + 1))", _composes,
          statistic="share of pairs of heads (earlier layer, later layer) whose score beats every draw of its null; "
                    "95% bootstrap interval over pairs", null="each earlier head's written directions Haar-rotated, "
                    "its spectrum kept"),
    Claim("s6-copying", "§6 (the value side)", "Do the heads' OV circuits copy (positive eigenvalues, Elhage et al. "
          "2021) more than heads with the same spectra and random directions?", "s6_values", "copying",
          "the mean copying score over heads lies above the null's 97.5th percentile (its interval wholly above)",
          _copies, statistic="the share of each head's OV eigenvalue mass that is positive real, mean over heads; 95% "
                             "bootstrap interval over heads",
          null="every head's read and write directions Haar-random, its singular values kept"),
    Claim("s6-key-value", "§6 (the value side)", "Does a head's value read what its QK modes look for in the keys "
          "(the key feature v_n inside the head's OV read subspace) beyond chance?", "s6_values", "key_value",
          "the mean share over heads lies above the null's 97.5th percentile (its interval wholly above)", _reads_keys,
          statistic="|V_ov^T v_n|^2 per QK mode, mean over the head's modes, mean over heads; 95% bootstrap interval "
                    "over heads", null="every head's OV read directions Haar-random (spectrum kept); r / d for one "
                                       "random direction, printed"),
    Claim("s6-grouping", "§6 (the value side); §3, Fig 2", "Where early layers attend within objects (§3), does what "
          "the heads write make the tokens of one object more alike than tokens of different objects?", "s6_values",
          "grouping", "in the first layers (a sixth, at least two) one head's output raises the within- minus "
          "between-object cosine of the tokens (interval above 0) and raises it more than the same head attending "
          "uniformly (paired difference's interval above 0)", _groups,
          statistic="per image: contrast(x + head output) - contrast(x), contrast = mean cosine of token pairs within "
                    "an object minus between objects, mean over heads and the first layers; 95% bootstrap interval "
                    "over images", null="the same head with uniform attention (its OV kept); the random-init control, "
                                        "printed", paper_data="images with exact object masks: the generated scenes, "
                                                              "or ADE20K (`ade20k_dir`)"),
    Claim("s6-grouping-copying", "§6 (the value side)", "Are the grouping heads (high same-object attention, high "
          "weighted cosine) also copying heads?", "s6_values", "grouping_copying",
          "the rank correlation across heads between grouping and the copying score is positive (its interval lies "
          "above 0)", _groupers_copy,
          statistic="Spearman correlation across heads of the mean rank of same-object attention and weighted cosine "
                    "with the copying score; 95% bootstrap interval over heads",
          null="copying scores shuffled over heads (and, keeping depth trends, within layers), 95% bands printed",
          paper_data="images with exact object masks: the generated scenes, or ADE20K (`ade20k_dir`)"),
    Claim("s7-symmetric", "§7 (other modalities)", "Are the QK modes of text and speech encoders symmetric early and "
          "less so with depth (the weighted cosine high in the first layers and falling), as in ViTs (§4.2, Fig 3)?",
          "s7_modalities", "cosine", "the *drop* exceeds one random cosine's spread", _falls, statistic=SHAPE_STAT,
          null=SHAPE_NULL),
    Claim("s7-same-unit", "§7 (other modalities)", "Do text and speech encoders attend to the query's own word beyond "
          "what attention to neighbouring tokens gives, in their first half of layers (as ViTs attend within objects "
          "early, §3, Fig 2)?", "s7_modalities", "same_unit", "the mean excess over the first half of the layers "
          f"lies above {UNIT_EXCESS} (its interval wholly above)", _unit_early,
          statistic="excess = (attention per unit area to the own word over that to other words) divided by the "
                    "same ratio for shifted words; 95% bootstrap interval over inputs",
          null="shifted words: the word labels rolled along the sequence (same lengths and gaps, boundaries moved), "
               "so that a preference for neighbours scores 1; the random-init control, printed",
          paper_data="text from pydoc_data.topics; the same sentences spoken by eSpeak NG"),
    Claim("s7-same-unit-falls", "§7 (other modalities)", "Does that preference for the own word fall with depth, "
          "as same-object attention does in ViTs (§3, Fig 2)?", "s7_modalities", "same_unit",
          "the excess in the first half of the layers minus the second half is positive (its interval lies above 0)",
          _unit_falls, statistic="the excess as above, first half minus second half of the layers; 95% bootstrap "
                                 "interval over inputs", null="no change with depth (0); the random-init control",
          paper_data="text from pydoc_data.topics; the same sentences spoken by eSpeak NG"),
    Claim("s8-segmentation", "§8 (modes at work)", "Do the QK modes segment objects better than the token features "
          "they come from?", "s8_segmentation", "segmentation",
          "the modes' mIoU minus k-means' on the same layer's tokens is positive (its interval lies above 0)",
          _segments, statistic="mIoU after Hungarian matching per image, paired difference; 95% bootstrap interval "
                               "over images", null="a regular grid with as many segments (the floor), printed",
          paper_data="images with object masks: the generated scenes by default, Pascal VOC (`voc_dir`), ADE20K "
                     "(`ade20k_dir`) or O3 (`o3_dir`)"),
)
QUESTION_CHAPTERS: tuple[str, ...] = tuple(dict.fromkeys(q.chapter for q in QUESTIONS))


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
    """One model's judgement for one claim: ``outcome`` (``AGREES``, ``DISAGREES``, ``BORDERLINE``, or ``BY_EYE``
    for a claim read by eye), the numbers behind it and the decisive statistic's interval."""

    chapter: str
    model: str
    paper_model: str | None
    data: str
    number: str
    outcome: str
    interval: Interval | None = None


@dataclass(frozen=True)
class Row:
    """One claim of the ledger with its verdict (``AGREES``, ``DISAGREES``, ``BORDERLINE``, ``MIXED``,
    ``NOT_TESTED`` or ``BY_EYE``), the evidence behind it, and why a concerned model could not test it."""

    claim: Claim
    verdict: str
    evidence: tuple[Evidence, ...]
    untested: tuple[str, ...] = ()

    def count(self, outcome: str) -> int:
        return sum(e.outcome == outcome for e in self.evidence)


def verdict(evidence: Sequence[Evidence]) -> str:
    """The models' common outcome; "mixed" when they differ; "not tested" with no model."""
    outcomes = {e.outcome for e in evidence}
    if not outcomes:
        return NOT_TESTED
    return outcomes.pop() if len(outcomes) == 1 else MIXED


def assemble(records: Mapping[str, Mapping], claims: Sequence[Claim] = CLAIMS, missing_ok: bool = False) -> list[Row]:
    """One :class:`Row` per claim, judged on every model of the chapters' ``records`` that it concerns
    (``{chapter: record}``, as :func:`read_records` returns). A claim's chapter missing is a :class:`LedgerError`,
    or with ``missing_ok`` a row "not tested" that says the chapter did not run in this build."""
    missing = [c for c in dict.fromkeys(claim.chapter for claim in claims) if c not in records]
    if missing and missing_ok:
        judged = {row.claim.key: row for row in assemble(records, [c for c in claims if c.chapter in records])}
        return [judged.get(c.key) or Row(c, NOT_TESTED, (), (f"{c.chapter} was not executed in this build",))
                for c in claims]
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
        evidence, untested = [], []
        for entry in record["models"]:
            if not claim.concerns(entry):
                continue
            judged = (claim.judge or _semantic)(entry[claim.measure])
            if judged is None:
                untested.append(f"`{entry['label']}`: {record['data'].get(claim.measure, '')} hold no natural images")
                continue
            evidence.append(Evidence(claim.chapter, entry["label"], entry["paper_model"],
                                     record["data"].get(claim.measure, ""), judged.number, judged.outcome,
                                     judged.interval))
        rows.append(Row(claim, verdict(evidence), tuple(evidence), tuple(untested)))
    return rows
