"""§4's figures (Fig 3, S1, S2, S4) as altair charts.

Every chart carries its data inline and keeps working in a static page: sliders are altair parameters
bound to range inputs, filtering precomputed rows in the browser.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
from IPython.display import Markdown

from ..analyses.cosine import layer_table, null_band_table
from ..core.svd import QKSVD
from .style import PANELS_PER_ROW, inline, model_colour, model_order

def _layer_slider(max_layer: int, name: str = "layer") -> alt.Parameter:
    return alt.param(name=name, value=0, bind=alt.binding_range(min=0, max=max_layer, step=1, name=f"{name} "))


def heads_heatmap(heads: pd.DataFrame) -> alt.Chart:
    """Weighted cosine of every head: layer x head, one panel per model."""
    return alt.Chart(inline(heads)).mark_rect().encode(
        x=alt.X("head:O"), y=alt.Y("layer:O"),
        color=alt.Color("weighted_cosine:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True)),
        tooltip=["model:N", "layer:O", "head:O", alt.Tooltip("weighted_cosine:Q", format="+.3f")],
    ).properties(width=160, height=220).facet(facet=alt.Facet("model:N", title=None, sort=model_order(heads["model"])),
                                              columns=PANELS_PER_ROW)


def s1_histograms(histograms: pd.DataFrame) -> alt.Chart:
    """S1: histogram of cos_n over all modes and heads of one layer, with a layer slider."""
    layer = _layer_slider(int(histograms["layer"].max()))
    return alt.Chart(inline(histograms)).mark_bar(opacity=0.6, binSpacing=0).encode(
        x=alt.X("bin_start:Q", title="cos_n = u_n . v_n", scale=alt.Scale(domain=[-1, 1])), x2="bin_end:Q",
        y=alt.Y("fraction:Q", title="fraction of modes", stack=None), y2=alt.datum(0),
        color=model_colour(histograms["model"]),
        tooltip=["model:N", "layer:O", alt.Tooltip("bin_start:Q", format="+.2f"), alt.Tooltip("fraction:Q", format=".3f")],
    ).add_params(layer).transform_filter(alt.datum.layer == layer).properties(
        width=460, height=240, title="cos_n of every mode of every head in the chosen layer")


def s2_spectrum(modes: pd.DataFrame, num_layers: int, num_heads: int) -> alt.HConcatChart:
    """S2: singular spectrum (as weights s_n / sum s) and cos_n of one head, with layer and head sliders."""
    layer = _layer_slider(num_layers - 1)
    head = alt.param(name="head", value=0, bind=alt.binding_range(min=0, max=num_heads - 1, step=1, name="head "))
    modes = modes[["model", "layer", "head", "mode", "singular_value", "weight", "cos"]]
    base = alt.Chart(inline(modes)).add_params(layer, head).transform_filter(
        (alt.datum.layer == layer) & (alt.datum.head == head))
    color = model_colour(modes["model"])
    spectrum = base.mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        x=alt.X("mode:Q", title="mode n (0-based)"),
        y=alt.Y("weight:Q", title="s_n / sum_m s_m", scale=alt.Scale(type="log")),
        color=color, tooltip=["model:N", "layer:O", "head:O", "mode:Q", alt.Tooltip("singular_value:Q", format=".3g")],
    ).properties(width=260, height=220, title="singular spectrum")
    cosines = base.mark_point(filled=True, size=25).encode(
        x=alt.X("mode:Q", title="mode n (0-based)"),
        y=alt.Y("cos:Q", title="cos_n", scale=alt.Scale(domain=[-1, 1])),
        color=color, tooltip=["model:N", "layer:O", "head:O", "mode:Q", alt.Tooltip("cos:Q", format="+.3f")],
    ).properties(width=260, height=220, title="cosine of each mode")
    return alt.hconcat(spectrum, cosines)


# S4 puts a cosine between weight vectors and cosines between token embeddings on one axis, as the paper does;
# each label says which space its quantity lives in.
S4_QUANTITIES = {"weighted_cosine": "weights: weighted cosine of u_n and v_n",
                 "anisotropy_baseline": "tokens: baseline, tokens of different photos",
                 "centre_token_baseline": "tokens: baseline, centre tokens (the paper's)",
                 "relative_cosine": "weights minus tokens: relative cosine"}


def s4_relative(frame: pd.DataFrame) -> alt.FacetChart:
    """S4: weighted cosine, the many-token anisotropy baseline with its bootstrap interval (shaded), the paper's
    centre-token baseline and the relative cosine per layer (:func:`qklib.analyses.cosine.relative_table` rows)."""
    long = frame.melt(id_vars=["model", "layer", "depth", "baseline_low", "baseline_high"],
                      value_vars=list(S4_QUANTITIES), var_name="quantity", value_name="value")
    long["quantity"] = long["quantity"].map(S4_QUANTITIES)
    base = alt.Chart().encode(x=alt.X("depth:Q", title="normalised layer depth  l / (L-1)"))
    band = base.mark_area(opacity=0.25, color="gray").encode(y="baseline_low:Q", y2="baseline_high:Q")
    lines = base.mark_line(point=True).encode(
        y=alt.Y("value:Q", title="cosine (weight or token space: see the legend)"),
        color=alt.Color("quantity:N", sort=list(S4_QUANTITIES.values()),
                        legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=400)),
        tooltip=["model:N", "layer:O", "quantity:N", alt.Tooltip("value:Q", format="+.3f"),
                 alt.Tooltip("baseline_low:Q", format="+.3f"), alt.Tooltip("baseline_high:Q", format="+.3f")],
    )
    return alt.layer(band, lines, data=inline(long)).properties(width=260, height=240).facet(
        facet=alt.Facet("model:N", title=None, sort=model_order(frame["model"])), columns=PANELS_PER_ROW).properties(
        title="relative cosine = weighted cosine - anisotropy baseline (grey: the baseline's 95% interval)")


def model_summary(svds: dict[str, QKSVD]) -> Markdown:
    """A table of each model's geometry, followed by the notes of models whose score is not exactly bilinear."""
    rows = "\n".join(f"| `{label}` | {svd.num_layers} | {svd.num_heads} | {svd.dim} | {svd.rank} |"
                     for label, svd in svds.items())
    notes = "".join(f"\n\n**Note on `{label}`:** {note}." for label, svd in svds.items() for note in svd.notes)
    return Markdown("| model | layers | heads | d | modes per head |\n|---|---|---|---|---|\n" + rows + notes)


def fig3_cosine_simulated_band(layers: pd.DataFrame, bands: pd.DataFrame,
                               title: str | list[str] = "Weighted cosine between u_n and v_n", effect: float | None = None,
                               baseline: pd.DataFrame | None = None) -> alt.LayerChart:
    """Fig 3 with each model's own per-layer null band (:func:`qklib.analyses.cosine.null_band_table`): a shaded
    ``[-null_band, +null_band]`` strip per model, in the model's colour, instead of one flat single-cosine band.

    ``layers``: :func:`qklib.analyses.cosine.layer_table` rows (model, layer, depth, weighted_cosine, ...); with
    ``heads_low`` and ``heads_high`` columns (the 95% interval over heads) each curve gets its interval as error bars.
    ``bands``: rows with model, layer, depth and null_band. ``effect``: the claims ledger's verdict band (one random
    cosine's 95% spread), drawn as two dashed grey lines at ``±effect``. ``baseline``: rows with model, depth and
    ``anisotropy_baseline`` (:func:`qklib.analyses.cosine.relative_table`), drawn dotted in the model's colour.
    """
    strip = bands[["model", "layer", "depth", "null_band"]].copy()
    strip["low"], strip["high"] = -strip["null_band"], strip["null_band"]
    color = model_colour(layers["model"])
    x = alt.X("depth:Q", title="normalised layer depth  l / (L-1)", scale=alt.Scale(domain=[0, 1]))
    shade = alt.Chart(inline(strip)).mark_area(opacity=0.2).encode(
        x=x, y=alt.Y("low:Q"), y2="high:Q", color=color,
        tooltip=["model:N", "layer:O", alt.Tooltip("null_band:Q", title="95% null half-width", format=".4f")])
    columns = ["model", "layer", "depth", "weighted_cosine"] + [c for c in ("heads_low", "heads_high") if c in layers]
    curve = alt.Chart(inline(layers[columns])).encode(x=x, color=color)
    chart = shade + curve.mark_line(point=True).encode(
        y=alt.Y("weighted_cosine:Q", title="weighted cosine (mean over heads)"),
        tooltip=["model:N", "layer:O", *[alt.Tooltip(f"{c}:Q", format="+.3f") for c in columns[3:]]])
    if "heads_low" in layers:
        chart += curve.mark_rule().encode(y="heads_low:Q", y2="heads_high:Q")
    if baseline is not None:
        chart += alt.Chart(inline(baseline[["model", "depth", "anisotropy_baseline"]])).mark_line(
            strokeDash=[2, 2]).encode(x=x, y="anisotropy_baseline:Q", color=color,
                                      tooltip=["model:N", alt.Tooltip("anisotropy_baseline:Q", format="+.3f")])
    if effect is not None:
        rules = pd.DataFrame({"y": [effect, -effect], "what": [f"verdict band ±{effect:.3f}"] * 2})
        chart += alt.Chart(inline(rules)).mark_rule(strokeDash=[6, 3], color="gray").encode(y="y:Q", tooltip=["what:N"])
        chart += alt.Chart(inline(rules.iloc[:1])).mark_text(align="left", dx=4, dy=-6, color="gray", fontSize=11).encode(
            x=alt.value(0), y="y:Q", text="what:N")
    return chart.properties(width=460, height=280, title=title)


def basis_comparison(table: pd.DataFrame, title: str = "Weighted cosine in two bases") -> alt.FacetChart:
    """Raw weights (the paper's basis) and LayerNorm gamma folded in, side by side on a shared y axis: one
    panel per basis, one line per model. ``table``: :func:`qklib.analyses.cosine.basis_table` rows."""
    frame = table[["model", "basis", "basis_label", "layer", "depth", "weighted_cosine"]]
    order = [label for label in ("raw", "gamma-folded") if label in set(frame["basis"])]
    return alt.Chart(inline(frame)).mark_line(point=True).encode(
        x=alt.X("depth:Q", title="normalised layer depth  l / (L-1)", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("weighted_cosine:Q", title="weighted cosine (mean over heads)"),
        color=model_colour(frame["model"]),
        tooltip=["model:N", "basis_label:N", "layer:O", alt.Tooltip("weighted_cosine:Q", format="+.3f")],
    ).properties(width=220, height=240).facet(
        column=alt.Column("basis:N", sort=order, title=None)).resolve_scale(y="shared").properties(title=title)


def fig_s3_encoder_predictor(svds: dict[str, QKSVD]) -> alt.HConcatChart:
    """Fig S3: weighted cosine across depth for I-JEPA's encoder and predictor side by side, one panel each,
    each with the simulated 95% null band of its own plotted statistic (the predictor is narrower: d = 384
    against the encoder's 1280).

    ``svds``: ``{label: QKSVD}``, e.g. from ``qklib.book.paper_models.ijepa_encoder_predictor(checkpoint)``.
    """
    panels = []
    for label, svd in svds.items():
        title = alt.TitleParams([label, f"{svd.num_layers} layers x {svd.num_heads} heads, d = {svd.dim}"], fontSize=12)
        chart = fig3_cosine_simulated_band(layer_table({label: svd}), null_band_table({label: svd}))
        panels.append(chart.properties(width=220, height=240, title=title))
    return alt.hconcat(*panels).resolve_scale(y="shared")


def bias_shift(table: pd.DataFrame, threshold: float,
               title: str = "How far dropping the query-bias term moves attention") -> alt.LayerChart:
    """Per model, against depth, the total variation by which attention moves when the query-bias term is dropped
    (:func:`qklib.analyses.biases.attention_shift`): the median over the layer's heads (line), the range of its heads
    (band), and the ledger's threshold for "negligible" (dashed, ``threshold``). ``table``:
    :func:`qklib.analyses.biases.layer_table`."""
    frame = inline(table[["model", "layer", "depth", "shift_median", "shift_low", "shift_high"]])
    base = alt.Chart(frame).encode(
        x=alt.X("depth:Q", title="normalised layer depth  l / (L-1)", scale=alt.Scale(domain=[0, 1])),
        color=model_colour(table["model"]))
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("shift_low:Q", title="attention moved (total variation)",
                                                      scale=alt.Scale(domain=[0, 1])), y2="shift_high:Q")
    line = base.mark_line(point=True).encode(
        y="shift_median:Q",
        tooltip=["model:N", "layer:O", alt.Tooltip("shift_median:Q", format=".3f"),
                 alt.Tooltip("shift_low:Q", format=".3f"), alt.Tooltip("shift_high:Q", format=".3f")])
    rule = alt.Chart(inline(pd.DataFrame({"y": [threshold], "what": [f"negligible below {threshold}"]})))
    rule = rule.mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q", tooltip=["what:N"])
    return (band + line + rule).properties(width=420, height=240, title=title)


def grouping_chart(table: pd.DataFrame, title: str = "Grouping index against the weighted cosine, per head") -> alt.Chart:
    """One point per head (:func:`qklib.analyses.grouping.head_table`): its weighted cosine (x, from the weights) and
    its grouping index on real tokens (y, with its 95% interval over images as a whisker), one colour per model; the
    grey band is the widest key-permutation null band of the heads (chance grouping), the dashed line 0."""
    frame = inline(table[["model", "layer", "head", "weighted_cosine", "grouping", "low", "high", "null_low",
                          "null_high"]])
    color = model_colour(table["model"])
    base = alt.Chart(frame).encode(x=alt.X("weighted_cosine:Q", title="weighted cosine of the head (weights)"),
                                   color=color)
    points = base.mark_point(filled=True, size=30).encode(
        y=alt.Y("grouping:Q", title="grouping index G (tokens)"),
        tooltip=["model:N", "layer:O", "head:O", alt.Tooltip("weighted_cosine:Q", format="+.3f"),
                 alt.Tooltip("grouping:Q", format="+.3f"), alt.Tooltip("low:Q", format="+.3f"),
                 alt.Tooltip("high:Q", format="+.3f")])
    whiskers = base.mark_rule(opacity=0.5).encode(y="low:Q", y2="high:Q")
    null = pd.DataFrame({"low": [float(table["null_low"].min())], "high": [float(table["null_high"].max())],
                         "what": ["key-permutation null (widest head)"]})
    band = alt.Chart(inline(null)).mark_rect(color="gray", opacity=0.2).encode(y="low:Q", y2="high:Q",
                                                                                 tooltip=["what:N"])
    zero = alt.Chart(inline(pd.DataFrame({"y": [0.0]}))).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y:Q")
    return (band + zero + whiskers + points).properties(width=420, height=280, title=title)
