"""§6's figures: OV spectra, effective rank and copying per layer, the composition heatmaps, what a head writes
along one QK mode (red/cyan pictures, as §5's) and grouping against copying per head, as altair charts and HTML
that keep working in a static page (sliders and menus filter precomputed rows in the browser)."""

from __future__ import annotations

import json

import html
from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from ..analyses.values import ov_images
from ..core.extract import token_embeddings
from ..core.images import display_crop, to_pixels
from ..core.models import prefix_tokens
from ..core.svd import QKSVD
from .mode_figures import picture_row
from .render import render_mode, thumbnail
from .style import PANELS_PER_ROW, inline, model_colour, model_order


def layer_interval(layers: pd.DataFrame, title: str, y_title: str,
                   null: pd.DataFrame | None = None) -> alt.LayerChart:
    """One line per model of a per-layer mean over heads (``qklib.analyses.values.layer_table`` rows) with its bootstrap
    interval over heads shaded; with ``null`` (rows with model, depth, null_low, null_high) each model's null
    band as a dashed outline."""
    colour = model_colour(layers["model"])  # the book's colour per model role, controls grey
    base = alt.Chart(inline(layers)).encode(
        x=alt.X("depth:Q", title="normalised layer depth  l / (L-1)", scale=alt.Scale(domain=[0, 1])), color=colour)
    band = base.mark_area(opacity=0.2).encode(y="low:Q", y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("mean:Q", title=y_title),
        tooltip=["model:N", "layer:O", alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f"),
                 alt.Tooltip("high:Q", format=".3f")])
    layers_ = [band, line]
    if null is not None:
        outline = alt.Chart(inline(null)).encode(x="depth:Q", color=colour.legend(None))
        layers_ += [outline.mark_line(strokeDash=[4, 3]).encode(y="null_low:Q"),
                    outline.mark_line(strokeDash=[4, 3]).encode(y="null_high:Q")]
    return alt.layer(*layers_).properties(width=460, height=260, title=title)


def _coded(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str], str]:
    """The frame with its ``model`` column replaced by an integer code ``m`` (a long label repeated on every row
    would be most of a page's bytes), the labels in code order, and a vega expression mapping ``datum.value`` (a
    code) back to its label, for axis, legend and header ``labelExpr``."""
    labels = list(dict.fromkeys(frame["model"]))
    coded = frame.assign(m=frame["model"].map({label: code for code, label in enumerate(labels)})).drop(
        columns="model")
    return coded, labels, f"{json.dumps(labels)}[datum.value]"


def _arrays(frame: pd.DataFrame, keys: list[str], position: str, values: list[str], digits: int = 3) -> alt.InlineData:
    """Inline data with one row per ``keys`` group and each of ``values`` as an array ordered by ``position``
    (charts unpack them with ``flatten`` and a row number): the keys are then written once per group rather than
    once per value, which makes the data several times smaller."""
    rows = []
    for key, group in frame.sort_values(position).groupby(keys, sort=False):
        row = dict(zip(keys, (int(k) if isinstance(k, np.integer) else k for k in key), strict=True))
        for column in values:
            row[column] = [float(f"{v:.{digits}g}") for v in group[column].to_numpy(dtype=float)]
        rows.append(row)
    return alt.InlineData(values=rows)


def _unpacked(chart: alt.Chart, values: list[str], keys: list[str], position: str) -> alt.Chart:
    """Unpack ``_arrays`` data: one datum per array element, ``position`` its 0-based index."""
    return chart.transform_flatten(values).transform_window(
        row="row_number()", groupby=keys).transform_calculate(**{position: "datum.row - 1"})


def spectra(spectrum: pd.DataFrame) -> alt.FacetChart:
    """Every head's OV spectrum ``s_n / s_1`` against the mode index in the layer a slider picks, one panel per
    model (``qklib.analyses.values.spectrum_table`` rows)."""
    coded, _labels, label_expr = _coded(spectrum.rename(columns={"relative_singular_value": "s"}))
    keys = ["m", "layer", "head"]
    layer = alt.param(name="layer", value=0, bind=alt.binding_range(
        min=0, max=int(spectrum["layer"].max()), step=1, name="layer "))
    chart = alt.Chart(_arrays(coded, keys, "mode", ["s"])).add_params(layer).transform_filter(
        alt.datum.layer == layer)
    return _unpacked(chart, ["s"], keys, "mode").mark_line().encode(
        x=alt.X("mode:Q", title="mode n (0-based)"),
        y=alt.Y("s:Q", title="s_n / s_1", scale=alt.Scale(type="log")),
        color=alt.Color("head:N", legend=alt.Legend(orient="right")),
        tooltip=["layer:O", "head:N", "mode:Q", alt.Tooltip("s:Q", format=".3f", title="s_n / s_1")],
    ).properties(width=220, height=200).facet(
        facet=alt.Facet("m:N", title=None, header=alt.Header(labelExpr=label_expr)), columns=PANELS_PER_ROW
    ).properties(title="OV singular spectrum of every head in the chosen layer")


def composition_heatmap(table: pd.DataFrame, heads: int) -> alt.LayerChart:
    """Composition score of every pair of heads (``qklib.analyses.values.composition_table`` rows): the earlier head
    (writing) down, the later head (reading) across, ordered by layer then head; menus pick the model and the
    kind (q, k, v). Pairs beyond chance (above every null draw) are ringed."""
    frame = pd.DataFrame({"model": table["model"], "kind": table["kind"],
                          "writer": table["layer1"] * heads + table["head1"],
                          "reader": table["layer2"] * heads + table["head2"],
                          "score": table["score"], "beyond": table["beyond"].astype(float)})
    coded, labels, _expr = _coded(frame)
    keys = ["m", "kind", "writer"]
    model = alt.param(name="model", value=0, bind=alt.binding_select(
        options=list(range(len(labels))), labels=labels, name="model "))
    kind = alt.param(name="kind", value="k", bind=alt.binding_select(options=["q", "k", "v"], name="composition "))
    data = _arrays(coded, keys, "reader", ["score", "beyond", "reader"])
    base = alt.Chart(data).add_params(model, kind).transform_filter(
        (alt.datum.m == model) & (alt.datum.kind == kind)).transform_flatten(["score", "beyond", "reader"]).encode(
        x=alt.X("reader:O", title=f"later head (reading): layer x {heads} + head", axis=alt.Axis(labels=False)),
        y=alt.Y("writer:O", title=f"earlier head (writing): layer x {heads} + head", axis=alt.Axis(labels=False)))
    cells = base.mark_rect().encode(
        color=alt.Color("score:Q", scale=alt.Scale(scheme="viridis"), title="score"),
        tooltip=["kind:N", "writer:O", "reader:O", alt.Tooltip("score:Q", format=".3f"), "beyond:Q"])
    rings = base.transform_filter(alt.datum.beyond == 1).mark_point(color="red", size=12, filled=False)
    return (cells + rings).properties(width=440, height=440,
                                      title="composition between heads (red: beyond every null draw)")


def alignment(table: pd.DataFrame) -> alt.LayerChart:
    """For one later head (layer and head sliders, model menu), each QK mode's key feature against the written
    subspaces of the earlier layers (``qklib.analyses.values.alignment_table`` rows): one line per earlier layer, its
    best-aligned head's share of the feature; the dashed rule is r / d, the mean share for a random direction."""
    coded, labels, _expr = _coded(table[["model", "layer", "head", "mode", "earlier_layer", "alignment"]])
    keys = ["m", "layer", "head", "earlier_layer"]
    model = alt.param(name="model", value=0, bind=alt.binding_select(
        options=list(range(len(labels))), labels=labels, name="model "))
    later = alt.param(name="later", value=int(table["layer"].max()), bind=alt.binding_range(
        min=1, max=int(table["layer"].max()), step=1, name="later layer "))
    head = alt.param(name="head", value=0, bind=alt.binding_range(
        min=0, max=int(table["head"].max()), step=1, name="head "))
    chart = alt.Chart(_arrays(coded, keys, "mode", ["alignment"])).add_params(model, later, head).transform_filter(
        (alt.datum.m == model) & (alt.datum.layer == later) & (alt.datum.head == head))
    lines = _unpacked(chart, ["alignment"], keys, "mode").mark_line().encode(
        x=alt.X("mode:Q", title="QK mode n of the later head (0-based)"),
        y=alt.Y("alignment:Q", title="share of v_n in the written subspace", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("earlier_layer:O", scale=alt.Scale(scheme="viridis"), title="earlier layer"),
        tooltip=["earlier_layer:O", "mode:Q", alt.Tooltip("alignment:Q", format=".3f")])
    chance = alt.Chart(pd.DataFrame({"chance": [float(table["chance"].iloc[0])]})).mark_rule(
        strokeDash=[4, 3], color="gray").encode(y="chance:Q")
    return (lines + chance).properties(width=460, height=260,
                                       title="key features of one head against earlier heads' written directions")


def key_value_modes(table: pd.DataFrame) -> alt.LayerChart:
    """For one head (layer and head sliders, model menu), every QK mode's share of its key feature read by the
    head's own value (``qklib.analyses.values.key_value_table`` rows), against the mode index; the dashed rule is r / d,
    the mean share for a random direction."""
    coded, labels, _expr = _coded(table[["model", "layer", "head", "mode", "alignment"]])
    keys = ["m", "layer", "head"]
    model = alt.param(name="model", value=0, bind=alt.binding_select(
        options=list(range(len(labels))), labels=labels, name="model "))
    layer = alt.param(name="layer", value=0, bind=alt.binding_range(
        min=0, max=int(table["layer"].max()), step=1, name="layer "))
    head = alt.param(name="head", value=0, bind=alt.binding_range(
        min=0, max=int(table["head"].max()), step=1, name="head "))
    chart = alt.Chart(_arrays(coded, keys, "mode", ["alignment"])).add_params(model, layer, head).transform_filter(
        (alt.datum.m == model) & (alt.datum.layer == layer) & (alt.datum.head == head))
    line = _unpacked(chart, ["alignment"], keys, "mode").mark_line(point=True).encode(
        x=alt.X("mode:Q", title="QK mode n (0-based, by singular value)"),
        y=alt.Y("alignment:Q", title="share of v_n read by the value", scale=alt.Scale(domain=[0, 1])),
        tooltip=["mode:Q", alt.Tooltip("alignment:Q", format=".3f")])
    chance = alt.Chart(pd.DataFrame({"chance": [float(table["chance"].iloc[0])]})).mark_rule(
        strokeDash=[4, 3], color="black").encode(y="chance:Q")
    return (line + chance).properties(width=460, height=240, title="each QK mode's key feature against the value")


def composition_layers(table: pd.DataFrame) -> alt.FacetChart:
    """Per pair of layers and kind, the share of head pairs beyond chance, one panel per model and kind."""
    shares = table.groupby(["model", "kind", "layer1", "layer2"], sort=False)["beyond"].mean().rename(
        "share_beyond").reset_index()
    return alt.Chart(inline(shares, digits=3)).mark_rect().encode(
        x=alt.X("layer2:O", title="later layer"), y=alt.Y("layer1:O", title="earlier layer"),
        color=alt.Color("share_beyond:Q", scale=alt.Scale(scheme="greys", domain=[0, 1]), title="share beyond"),
        tooltip=["model:N", "kind:N", "layer1:O", "layer2:O", alt.Tooltip("share_beyond:Q", format=".2f")],
    ).properties(width=150, height=150).facet(row=alt.Row("model:N", title=None, sort=model_order(shares["model"])),
                                               column=alt.Column("kind:N", title="composition", sort=["q", "k", "v"]))


def pairs_download(table: pd.DataFrame) -> pd.DataFrame:
    """``qklib.analyses.values.composition_table`` rows as one row per pair of heads, a column per kind, quantity and
    model (``k_score [model]``, ``k_null_max [model]``, ``k_beyond [model]``): the model label once per column instead
    of once per row, for the chapter's CSV download."""
    wide = table.pivot_table(index=["layer1", "head1", "layer2", "head2"], columns=["kind", "model"],
                             values=["score", "null_max", "beyond"], sort=False)
    wide.columns = [f"{kind}_{quantity} [{model}]" for quantity, kind, model in wide.columns]
    return wide.round(4).reset_index()


def modes_download(table: pd.DataFrame) -> pd.DataFrame:
    """``qklib.analyses.values.key_value_table`` rows as one row per layer, head and QK mode, a column per quantity and
    model (``alignment [model]``, ``gain [model]``, ``self_cosine [model]``), rounded to 4 decimals: the model
    label once per column, for the chapter's CSV download."""
    wide = table.pivot_table(index=["layer", "head", "mode"], columns="model",
                             values=["alignment", "gain", "self_cosine"], sort=False)
    wide.columns = [f"{quantity} [{model}]" for quantity, model in wide.columns]
    return wide.round(4).reset_index()


def as_null(rows: pd.DataFrame) -> pd.DataFrame:
    """``layer_table``-style rows (``low``, ``high``) as the null outline :func:`layer_interval` draws."""
    return rows.rename(columns={"low": "null_low", "high": "null_high"})


def _caption(table: pd.DataFrame, layer: int, head: int, mode: int) -> str:
    row = table[(table.layer == layer) & (table["head"] == head) & (table["mode"] == mode)].iloc[0]
    return (f"<b>L{layer} H{head} M{mode}</b>: {row.alignment:.2f} of v_n read by the value (random: "
            f"{row.chance:.2f}); |OV v_n| / s_1 = {row.gain:.2f}; cos(OV v_n, v_n) = {row.self_cosine:+.2f}")


def ov_image_pictures(model, qk: QKSVD, ov: QKSVD, images: dict[str, Image.Image], picks: Sequence[tuple[int, int]],
                      table: pd.DataFrame, modes: int = 2, size: int = 160) -> str:
    """HTML: for each ``(layer, head)`` of ``picks`` and its first ``modes`` QK modes, the ``images`` ({name: PIL})
    in §5's red/cyan: red the key map ``z . v_n`` (the tokens the mode attends to), cyan ``z . w`` with ``w`` the
    unit OV image of v_n (the tokens that already hold what the head writes when it attends along the mode); white
    where both are high, as for a head that copies. ``z``: the normed tokens entering the block; ``table``: this
    model's ``qklib.analyses.values.key_value_table`` rows, for the captions."""
    layers = sorted({layer for layer, _head in picks})
    tokens = token_embeddings(model, to_pixels(model, list(images.values())), layers=layers)  # [L', B, T, d]
    prefix, written = prefix_tokens(model), ov_images(qk, ov)
    photos = [display_crop(model, image) for image in images.values()]
    rows = []
    for layer, head in picks:
        z = tokens[layers.index(layer), :, prefix:].double()  # [B, N, d]
        side = int(round(z.shape[1] ** 0.5))
        for mode in range(min(modes, qk.rank)):
            image = written[layer, head, :, mode]
            key = (z @ qk.V[layer, head, :, mode]).reshape(-1, side, side)
            out = (z @ (image / image.norm().clamp_min(1e-300))).reshape(-1, side, side)
            pictures = [thumbnail(render_mode(photo, k, o), size) for photo, k, o in zip(photos, key, out)]
            rows.append(picture_row(pictures, [html.escape(name) for name in images], _caption(table, layer, head, mode)))
    return "".join(rows)


def grouping_copying(table: pd.DataFrame) -> alt.FacetChart:
    """Every head's same-object attention against its copying score, coloured by layer, one panel per model
    (``qklib.analyses.object_contrast.head_table`` rows); the tooltip adds the weighted cosine and the change in
    contrast."""
    frame = table[["model", "layer", "head", "same_object_attention", "copying", "weighted_cosine", "delta"]]
    return alt.Chart(inline(frame, digits=3)).mark_circle(size=40).encode(
        x=alt.X("same_object_attention:Q", title="same-object attention above uniform"),
        y=alt.Y("copying:Q", title="copying score"),
        color=alt.Color("layer:Q", scale=alt.Scale(scheme="viridis"), title="layer"),
        tooltip=["layer:O", "head:O", alt.Tooltip("same_object_attention:Q", format=".3f"),
                 alt.Tooltip("weighted_cosine:Q", format=".3f"), alt.Tooltip("copying:Q", format=".3f"),
                 alt.Tooltip("delta:Q", format=".4f", title="change in contrast")],
    ).properties(width=220, height=200).facet(
        facet=alt.Facet("model:N", title=None, sort=model_order(frame["model"])), columns=PANELS_PER_ROW
    ).properties(title="grouping against copying, one point per head")
