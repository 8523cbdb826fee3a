"""§3's figures (paper Fig 2): the scenes' token masks, attention preference against depth, per head and per
query pair (static sliders), one scene's query maps drawn over the scene, and the values "What we found" glues.

Inputs are the tidy table of ``qklib.analyses.preference.measure`` (one row per model, image, layer and head) and
the per-layer statistics of ``qklib.analyses.preference.per_layer``. Every chart carries its data inline and works
in a static page; every picture is an ``<img>`` that toggles full size on click.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import altair as alt
import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import HTML
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from ..analyses.preference import (GROUPS, PAIRS, image_curves, per_area, per_layer, query_maps, query_tokens,
                                   token_masks)
from ..book.ledger import Judgement
from ..core.images import display_crop
from ..core.stats import RESAMPLES
from .render import jpeg_bytes
from .style import CHANCE, inline, model_colour, model_order
from .widgets import download_link, nested_stack, picture_html

GROUP_ORDER = list(GROUPS)
PAIR_NAMES = {"t_t": "T→T", "t_d": "T→D", "t_b": "T→B", "d_t": "D→T", "d_d": "D→D", "d_b": "D→B"}
TARGET_RGB, DISTRACTOR_RGB, QUERY_RGB = (255, 40, 40), (255, 255, 255), (80, 220, 255)
_MAGMA = (plt.get_cmap("magma")(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- scenes
def example_scenes(scenes: Sequence, count: int = 4) -> list:
    """Up to ``count`` scenes to show: one per feature for generated scenes (their ``info["feature"]``),
    else the first ``count``."""
    shown, features = [], set()
    for sample in scenes:
        feature = sample.info.get("feature", sample.id)
        if feature not in features:
            shown.append(sample)
            features.add(feature)
        if len(shown) == count:
            break
    return shown


def first_measured(shown: Sequence, scenes: Sequence, measured: Sequence[str]):
    """The first of ``shown`` that was measured, else the first measured scene of ``scenes``."""
    kept = set(measured)
    return next((s for s in shown if s.id in kept), None) or next(s for s in scenes if s.id in kept)


def mask_figure(model, samples: Sequence, min_cover: float = 0.5) -> Figure:
    """Top row: each scene as the model sees it; bottom row: its token-grid masks (red: target fraction,
    blue: distractor fraction, grey: background). Yellow box: the target query token, white: the distractor's."""
    masks = token_masks(model, [s.target for s in samples], [s.distractor for s in samples])
    queries, keep = query_tokens(masks, min_cover)
    grid_h, grid_w = masks.grid
    figure = Figure(figsize=(2.6 * len(samples), 5.4), dpi=80)
    axes = figure.subplots(2, len(samples), squeeze=False)
    for column, sample in enumerate(samples):
        view = display_crop(model, sample.image)
        axes[0, column].imshow(view)
        axes[0, column].set_title(sample.info.get("feature", sample.id), fontsize=10)
        coloured = torch.stack([masks.target[column], masks.distractor[column] * 0.6, masks.distractor[column]], -1)
        background = masks.background[column].reshape(grid_h, grid_w, 1).numpy()
        coloured = coloured.reshape(grid_h, grid_w, 3).numpy() + 0.25 * background
        axes[1, column].imshow(np.clip(coloured, 0, 1), interpolation="nearest")
        for query, edge in zip(queries[column].tolist(), ("yellow", "white")):
            row, col = divmod(query, grid_w)
            for ax, scale in ((axes[0, column], view.shape[0] / grid_h), (axes[1, column], 1)):
                offset = -0.5 if scale == 1 else 0
                ax.add_patch(plt.Rectangle((col * scale + offset, row * scale + offset), scale, scale,
                                           fill=False, edgecolor=edge, linewidth=1.5))
        if not keep[column]:
            axes[1, column].set_title("skipped: vanishes at token resolution", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("model's view")
    axes[1, 0].set_ylabel(f"token grid {grid_h}×{grid_w}")
    figure.tight_layout()
    return figure


def mask_picture(model, samples: Sequence, min_cover: float = 0.5, dpi: int = 120) -> HTML:
    """:func:`mask_figure` as a picture for the page: drawn at ``dpi``, shown at 80 dpi, a click enlarges it."""
    figure = mask_figure(model, samples, min_cover)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    width = round(Image.open(buffer).width * 80 / dpi)
    return HTML(picture_html(buffer.getvalue(), width=width, format="png"))


# ------------------------------------------------------------------------------------------- charts
def layer_stats(table: pd.DataFrame, chance: pd.Series) -> pd.DataFrame:
    """:func:`qklib.analyses.preference.per_layer` of ``table`` with each group's ``chance`` level as a column."""
    levels = pd.DataFrame({"group": GROUP_ORDER, "chance": [float(chance[g]) for g in GROUP_ORDER]})
    return per_layer(table).merge(levels, on="group")


def layer_chart(stats: pd.DataFrame, models: Sequence[str], scenes: int) -> alt.FacetChart:
    """Fig 2 B-D: mean same/different/background ratio per normalised layer, one line per model, a 95% band
    over images and the chance level dashed. ``stats``: :func:`layer_stats`; ``scenes``: images measured."""
    base = alt.Chart().encode(
        x=alt.X("depth:Q", title="normalised layer", scale=alt.Scale(domain=[0, 1])),
        color=model_colour(models),
    )
    band = base.mark_area(opacity=0.2).encode(y="low:Q", y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("mean:Q", title="attention ratio", scale=alt.Scale(domain=[0, 1])),
        tooltip=["model:N", "layer:O", alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f"),
                 alt.Tooltip("high:Q", format=".3f"), "images:Q"],
    )
    rule = alt.Chart().mark_rule(strokeDash=[4, 4], color=CHANCE).encode(y="mean(chance):Q")
    label = alt.Chart().mark_text(align="right", dx=-2, dy=-7, color=CHANCE).encode(
        x=alt.datum(1), y="mean(chance):Q", text=alt.value("chance"))
    # One data set for every layer, so the facet splits lines, bands and the chance rule alike.
    return (
        alt.layer(band, line, rule, label, data=inline(stats))
        .properties(width=165, height=200)
        .facet(column=alt.Column("group:N", sort=GROUP_ORDER, title=None))
        .properties(title=f"Attention preference per layer ({scenes} scenes)")
    )


def area_table(table: pd.DataFrame, chance: pd.DataFrame, models: Sequence[str], resamples: int = RESAMPLES,
               seed: int = 0, suffix: str = "_removed") -> pd.DataFrame:
    """Attention per unit area (:func:`qklib.analyses.preference.per_area`) per model, layer and group: ``ratio`` (×
    chance, 1 = uniform attention over the same key tokens) with its 95% bootstrap interval over images (``low``,
    ``high``). ``table``: one variant's rows of ``measure`` (the headline: self token removed, so ``suffix``
    picks the chance columns for that key set); ``chance``: ``Preference.chance`` of the same images."""
    by_image = chance.set_index("image")
    rows = []
    for label in models:
        rows_of = table[table["model"] == label]
        images, curves = None, {}
        for group in GROUP_ORDER:
            images, curves[group] = image_curves(rows_of, group)
        chances = {g: by_image.loc[images, g + suffix].to_numpy() for g in GROUP_ORDER}
        layers = curves["same"].shape[1]
        for layer in range(layers):
            area = per_area(curves, chances, layer, resamples, seed)
            rows += [{"model": label, "layer": layer, "depth": layer / max(layers - 1, 1), "group": g,
                      "ratio": area[g].estimate, "low": area[g].low, "high": area[g].high} for g in GROUP_ORDER]
    return pd.DataFrame(rows)


def area_chart(area: pd.DataFrame, models: Sequence[str], scenes: int) -> alt.FacetChart:
    """Fig 2 per unit area: each group's attention over its chance level against depth on a log axis, one line per
    model with its 95% interval over images as a band; the dashed line at 1 is chance (uniform attention over the
    key tokens). ``area``: :func:`area_table`."""
    color = model_colour(models)
    base = alt.Chart().encode(x=alt.X("depth:Q", title="normalised layer", scale=alt.Scale(domain=[0, 1])),
                              color=color)
    y = alt.Y("ratio:Q", title="attention ÷ chance (log scale)", scale=alt.Scale(type="log"))
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("low:Q", scale=alt.Scale(type="log")), y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=y, tooltip=["model:N", "layer:O", "group:N", alt.Tooltip("ratio:Q", format=".2f"),
                      alt.Tooltip("low:Q", format=".2f"), alt.Tooltip("high:Q", format=".2f")])
    rule = alt.Chart().mark_rule(strokeDash=[4, 4], color=CHANCE).encode(y=alt.datum(1))
    label = alt.Chart().mark_text(align="right", dx=-2, dy=-7, color=CHANCE).encode(
        x=alt.datum(1), y=alt.datum(1), text=alt.value("chance"))
    return (alt.layer(band, line, rule, label, data=inline(area)).properties(width=165, height=200)
            .facet(column=alt.Column("group:N", sort=GROUP_ORDER, title=None))
            .properties(title=f"Attention per unit area, × chance ({scenes} scenes; dashed: chance = 1)"))


def head_means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over images per model, layer and head of the three groups and the six pairs."""
    return table.groupby(["model", "layer", "head"], sort=False)[GROUP_ORDER + list(PAIRS)].mean().reset_index()


def head_heatmap(table: pd.DataFrame, models: Sequence[str]) -> alt.FacetChart:
    """Each head's same, different and background ratio (mean over images): layer x head, one row per model."""
    long = head_means(table).melt(["model", "layer", "head"], GROUP_ORDER, var_name="group", value_name="ratio")
    return (
        alt.Chart(inline(long))
        .mark_rect()
        .encode(
            x=alt.X("head:O", title="head"),
            y=alt.Y("layer:O", title="layer"),
            color=alt.Color("ratio:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis")),
            tooltip=["model:N", "layer:O", "head:O", "group:N", alt.Tooltip("ratio:Q", format=".3f")],
        )
        .properties(width=110, height=200)
        .facet(column=alt.Column("group:N", sort=GROUP_ORDER, title=None),
               row=alt.Row("model:N", sort=model_order(models), title=None, header=alt.Header(labelLimit=300)))
    )


def pair_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model, layer, head and pair (T→T ... D→B): the pair's mean ratio over images and its group."""
    pair_group = {pair: group for group, pairs in GROUPS.items() for pair in pairs}
    long = head_means(table).melt(["model", "layer", "head"], list(PAIRS), var_name="pair", value_name="ratio")
    long["group"] = long["pair"].map(pair_group)
    long["pair"] = long["pair"].map(PAIR_NAMES)
    return long


def pair_chart(table: pd.DataFrame, models: Sequence[str]) -> alt.Chart:
    """The six ratios of one layer and head (picked with two sliders whose values are the layer and head
    numbers), one panel per model."""
    layers, heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    layer = alt.param(name="layer_pick", value=0, bind=alt.binding_range(min=0, max=layers - 1, step=1, name="layer "))
    head = alt.param(name="head_pick", value=0, bind=alt.binding_range(min=0, max=heads - 1, step=1, name="head "))
    return (
        alt.Chart(inline(pair_table(table)))
        .mark_bar()
        .encode(
            x=alt.X("pair:N", sort=list(PAIR_NAMES.values()), title=None),
            y=alt.Y("ratio:Q", scale=alt.Scale(domain=[0, 1]), title="attention ratio"),
            color=alt.Color("group:N", sort=GROUP_ORDER),
            column=alt.Column("model:N", sort=list(models), title=None, header=alt.Header(labelLimit=400)),
            tooltip=["model:N", "layer:O", "head:O", "pair:N", alt.Tooltip("ratio:Q", format=".3f")],
        )
        .add_params(layer, head)
        .transform_filter((alt.datum.layer == layer) & (alt.datum.head == head))
        .properties(width=220, height=180)
    )


def table_download(table: pd.DataFrame, decimals: int = 4):
    """A link in the page that downloads the tidy table as ``s3_attention_preference.csv``, ratios rounded to
    ``decimals`` (the page stays small; the chapter saves the full-precision file under its results_dir)."""
    label = (f"Download s3_attention_preference.csv ({len(table)} rows: model, image, layer, head; "
             f"ratios to {decimals} decimals)")
    return download_link(table.round(decimals), "s3_attention_preference.csv", label)


# --------------------------------------------------------------------------------- query maps on the scene
def view_mask(model, mask: np.ndarray, size: int) -> np.ndarray:
    """A pixel mask (``[H, W]`` bool) taken into the model's view (resize + centre crop), ``[size, size]`` bool."""
    view = display_crop(model, Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).convert("RGB"))[..., 0]
    return np.asarray(Image.fromarray(view).resize((size, size), Image.Resampling.NEAREST)) > 127


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The pixels of ``mask`` (``[H, W]`` bool) within ``width`` px of its edge (4-neighbour erosion)."""
    inner = np.asarray(mask, dtype=bool).copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        inner = shrunk
    return mask & ~inner


def overlay(view: np.ndarray, query_map: torch.Tensor | np.ndarray, query: int, target_edges: np.ndarray,
            distractor_edges: np.ndarray, dim: float = 0.6, opacity: float = 0.9) -> np.ndarray:
    """One query's attention map drawn over the scene, ``[S, S, 3]`` uint8.

    ``view``: ``[S, S, 3]`` uint8, the model's view of the scene. ``query_map``: ``[gh, gw]`` attention over the
    image tokens, scaled to its own maximum and drawn as token blocks in magma colours over the scene dimmed
    to ``dim``; a block's opacity is ``opacity * sqrt(level)``, so weak but widespread attention still shows.
    The target's edge is drawn red, the distractors' white (``*_edges``: ``[S, S]`` bool), and the query token
    (row-major index) boxed in light blue.
    """
    size = view.shape[0]
    level = np.asarray(query_map, dtype=np.float64)
    level = level / level.max()
    grid_h, grid_w = level.shape
    codes = (level * 255).round().astype(np.uint8)
    codes = np.asarray(Image.fromarray(codes).resize((size, size), Image.Resampling.NEAREST))  # token blocks
    alpha = np.sqrt(codes[..., None] / 255.0) * opacity
    out = view.astype(np.float64) * dim * (1 - alpha) + _MAGMA[codes].astype(np.float64) * alpha
    out = out.round().clip(0, 255).astype(np.uint8)
    out[distractor_edges] = DISTRACTOR_RGB
    out[target_edges] = TARGET_RGB
    canvas = Image.fromarray(out)
    row, col = divmod(int(query), grid_w)
    cell_w, cell_h = size / grid_w, size / grid_h
    ImageDraw.Draw(canvas).rectangle([round(col * cell_w), round(row * cell_h), round((col + 1) * cell_w) - 1,
                                      round((row + 1) * cell_h) - 1], outline=QUERY_RGB, width=2)
    return np.asarray(canvas)


def query_map_pictures(model, sample, min_cover: float = 0.5, size: int = 224, gap: int = 6) -> list[list[np.ndarray]]:
    """``pictures[layer][head]``: ``[size, 2 * size + gap, 3]`` uint8, the target query's map over the scene
    (left) and the distractor query's (right), from :func:`qklib.analyses.preference.query_maps`."""
    maps, queries, _ = query_maps(model, sample, min_cover)  # [L, H, 2, gh, gw], [2]
    view = Image.fromarray(display_crop(model, sample.image))
    view = np.asarray(view.resize((size, size), Image.Resampling.BILINEAR))
    edges_t = outline(view_mask(model, sample.target, size))
    edges_d = outline(view_mask(model, sample.distractor, size))
    space = np.full((size, gap, 3), 255, dtype=np.uint8)
    return [[np.concatenate([overlay(view, maps[layer, head, 0], queries[0].item(), edges_t, edges_d), space,
                             overlay(view, maps[layer, head, 1], queries[1].item(), edges_t, edges_d)], 1)
             for head in range(maps.shape[1])] for layer in range(maps.shape[0])]


def query_map_slider(model, sample, min_cover: float = 0.5, size: int = 224, quality: int = 80) -> widgets.VBox:
    """Layer and head sliders over one scene's two query maps (:func:`query_map_pictures`), each picture a
    JPEG at its full size that a click enlarges to the page width; works in a static page."""
    pictures = query_map_pictures(model, sample, min_cover, size)
    width = pictures[0][0].shape[1]
    tiles = [[widgets.HTML(picture_html(jpeg_bytes(picture, quality), width=width,
                                        caption=f"{sample.id}, L{layer} H{head}: target query (left), "
                                                "distractor query (right)"))
              for head, picture in enumerate(row)] for layer, row in enumerate(pictures)]
    labels = ([f"L{layer}" for layer in range(len(pictures))], [f"H{head}" for head in range(len(pictures[0]))])
    return nested_stack(tiles, ("layer", "head"), values=labels)


# ------------------------------------------------------------------------------------ what we found
def layer_means(stats: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Mean ratio per layer (over images and heads): index layer, columns (model, group)."""
    wide = stats.pivot_table(index="layer", columns=["model", "group"], values="mean")
    return wide[[(label, group) for label in models for group in GROUP_ORDER]]


def course(values: Sequence[float], tolerance: float = 0.005) -> str:
    """Layer by layer, how a per-layer curve moves: runs of rising, falling or level steps (a step within
    ``tolerance`` counts as level), each with its first and last layer and values, e.g.
    "rises L0→L3 (0.22→0.30), falls L3→L11 (0.30→0.24)". No reversal is hidden by an average."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return f"one layer only ({values[0]:.2f})" if values else "no layers"
    signs = ["rises" if b - a > tolerance else "falls" if a - b > tolerance else "stays level"
             for a, b in zip(values, values[1:])]
    runs, start = [], 0
    for step in range(1, len(signs) + 1):
        if step == len(signs) or signs[step] != signs[start]:
            runs.append(f"{signs[start]} L{start}→L{step} ({values[start]:.2f}→{values[step]:.2f})")
            start = step
    return ", ".join(runs)


FINDINGS = {"same": ("s3-same-early", "Same-object attention dominates layer 0"),
            "different": ("s3-different-grows", "Different-object attention grows with depth"),
            "background": ("s3-background-grows", "Background attention grows with depth")}


def findings(stats: pd.DataFrame, chance: pd.Series, models: Sequence[str], judged: Mapping[str, Judgement],
             area: pd.DataFrame) -> dict[str, object]:
    """The numbers and sentences of "What we found", keyed by name (the chapter glues each as ``s3_<name>``).

    ``stats``: :func:`layer_stats` of one variant (the chapter's headline); ``judged``: the claims ledger's
    judgements of the first model (``qklib.book.ledger.judge_model`` of the chapter's record), so the chapter states
    the same verdicts, by the same rules and intervals, as the ledger; ``area``: :func:`area_table`. Returns one
    sentence per Fig 2 observation (``found_<group>``: the outcome and its deciding statistic),
    ``controls`` (each further model's largest distance from chance) and ``layer_table`` (every layer:
    attention per unit area of every model, and the first model's raw ratios).
    """
    wide = layer_means(stats, models)
    distance = {(m, g): float((wide[(m, g)] - float(chance[g])).abs().max()) for m in models for g in GROUP_ORDER}
    first = models[0]
    per_area = area.pivot_table(index="layer", columns=["model", "group"], values="ratio")
    at_zero = {g: float(per_area[(first, g)].iloc[0]) for g in GROUP_ORDER}
    sentences = {}
    for group, (key, name) in FINDINGS.items():
        verdict = judged[key]
        if group == "same":
            detail = (f"per unit area, layer 0 gives same {at_zero['same']:.2f}× chance, different "
                      f"{at_zero['different']:.2f}×, background {at_zero['background']:.2f}×; same ÷ the larger "
                      f"other {verdict.interval.text(2)}")
        else:
            curve = wide[(first, group)]
            detail = (f"slope {verdict.interval.text(4)} per layer (raw ratio L0 {curve.iloc[0]:.2f}, "
                      f"L{len(curve) - 1} {curve.iloc[-1]:.2f}; every layer in the table below)")
        sentences[f"found_{group}"] = f"**{name}: {verdict.outcome}.** {detail[0].upper()}{detail[1:]}."
    table = pd.concat({f"{m} (× chance)": per_area[m][GROUP_ORDER] for m in models}
                      | {f"{first} (raw ratio)": wide[first][GROUP_ORDER]}, axis=1)
    return {
        "model": first, "layers": len(wide), **sentences,
        "chance_same": float(chance["same"]), "chance_background": float(chance["background"]),
        "controls": "; ".join(f"{m} stays within {max(distance[(m, g)] for g in GROUP_ORDER):.3f} of chance "
                                 "in every layer (raw ratios)" for m in models[1:]) or "no second model was run",
        "layer_table": table.round(3),
    }


VARIANT_NAMES = {("peak", "removed"): "peak token, self removed", ("peak", "kept"): "peak token, self kept",
                 ("all", "removed"): "all covered tokens, self removed", ("all", "kept"): "all covered tokens, self kept"}


def variant_means(table: pd.DataFrame, model: str) -> pd.DataFrame:
    """One model's mean ratio per layer (over images and heads) in every variant of a ``measure`` table with
    ``queries`` and ``self_token`` columns: index layer, columns (group, variant name)."""
    stats = per_layer(table[table["model"] == model])
    stats["variant"] = [VARIANT_NAMES[(q, v)] for q, v in zip(stats["queries"], stats["self_token"])]
    wide = stats.pivot_table(index="layer", columns=["group", "variant"], values="mean")
    order = [name for name in VARIANT_NAMES.values() if name in set(stats["variant"])]
    return wide[[(g, name) for g in GROUP_ORDER for name in order]]


def variant_chart(means: pd.DataFrame, model: str) -> alt.FacetChart:
    """Same, different and background attention per layer for each variant (:func:`variant_means`)."""
    long = means.stack(["group", "variant"], future_stack=True).rename("mean").reset_index()
    return alt.Chart(inline(long)).mark_line(point=True).encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("mean:Q", title="attention ratio", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("variant:N", sort=list(VARIANT_NAMES.values()),
                        legend=alt.Legend(orient="bottom", direction="vertical", title=None, labelLimit=400)),
        strokeDash=alt.StrokeDash("variant:N", sort=list(VARIANT_NAMES.values()), legend=None),
        tooltip=["variant:N", "layer:O", alt.Tooltip("mean:Q", format=".3f")],
    ).properties(width=165, height=200).facet(column=alt.Column("group:N", sort=GROUP_ORDER, title=None)).properties(
        title=f"{model}: the query's own token and the choice of query token")


def self_token_findings(means: pd.DataFrame) -> dict[str, object]:
    """Glue values on the query's own token from :func:`variant_means` (needs both peak-token variants):
    same-object attention in layer 0 with and without it and their difference (the self term), and the variants'
    table (``variants``)."""
    removed = means[("same", VARIANT_NAMES[("peak", "removed")])]
    kept = means[("same", VARIANT_NAMES[("peak", "kept")])]
    return {"same_kept_l0": float(kept.iloc[0]), "same_removed_l0": float(removed.iloc[0]),
            "self_part_l0": float(kept.iloc[0] - removed.iloc[0]), "variants": means.round(3)}
