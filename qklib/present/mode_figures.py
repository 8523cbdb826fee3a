"""The §5 figures: mode maps (Fig 1), optimal images (Fig 4), one image through many modes (Fig 5) and the
same-object probability (Fig 6), as static widgets, HTML picture rows, tidy tables and altair charts.

Pictures are red (query map ``x_i . u_n``) and cyan (key map ``x_j . v_n``) over the photo, drawn by
:mod:`qklib.present.render`; each is shown :data:`PICTURE_PX` px wide and a click shows it at full width
(:func:`qklib.present.widgets.picture_html`). Sliders read the layer, head and mode they select.
Labels ``L{layer} H{head} M{mode}`` are 0-based; a trailing ``-`` marks the sign-flipped feature.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import altair as alt
import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from IPython.display import HTML
from PIL import Image

from ..core.extract import token_embeddings
from ..core.images import display_crop, open_rgb, to_pixels
from ..core.models import DEFAULT_MODEL, depth, info
from ..core.svd import QKSVD
from ..modes import mode_label, mode_maps, parse_label, top_modes
from ..same_object import SameObject
from ..search import SearchResult
from .cosine import inline
from .render import jpeg_bytes, mode_pictures, render_mode, thumbnail
from .widgets import nested_stack, picture_html

PICTURE_PX = 160  # shown width of every picture (a click enlarges it)
QUALITY = 72  # JPEG quality of the many small pictures in the sliders (page size < 5 MB)


def mode_caption(svd: QKSVD, layer: int, head: int, mode: int, sign: int = 1) -> str:
    """``"<b>L10 H3 M0</b> s = 0.276, cos = -0.501"`` (HTML)."""
    return (f"<b>{mode_label(layer, head, mode, sign)}</b> s = {float(svd.S[layer, head, mode]):.3g}, "
            f"cos = {float(svd.cos[layer, head, mode]):+.3f}")


def picture_row(pictures: Sequence[np.ndarray], captions: Sequence[str], title: str = "", width: int = PICTURE_PX,
                quality: int = QUALITY) -> str:
    """HTML: ``[H, W, 3]`` uint8 pictures side by side (wrapping), each ``width`` px wide with its caption
    (HTML) below, clickable to full width; ``title`` (HTML) above the row."""
    if len(pictures) != len(captions):
        raise ValueError(f"{len(pictures)} pictures but {len(captions)} captions")
    cells = "".join(f'<div style="flex:0 1 auto" onclick="{_GROW}">{picture_html(jpeg_bytes(p, quality), width, c)}</div>'
                    for p, c in zip(pictures, captions))
    head = f"<div style='margin:2px 0'>{title}</div>" if title else ""
    return (f"<div style='line-height:1.3;font-size:0.85em'>{head}"
            f"<div style='display:flex;flex-wrap:wrap;gap:4px'>{cells}</div></div>")


# A picture's click toggles its width between `width` px and 100% of its box; in a wrapping row that box must
# take the whole row at the same time, or 100% of a shrink-wrapped box is the picture's own width.
_GROW = "if (event.target.tagName === 'IMG') this.style.flexBasis = this.style.flexBasis === '100%' ? 'auto' : '100%'"


def _html(value: str) -> widgets.HTML:
    """An HTML widget as wide as the page column (the default is a narrow inline box)."""
    return widgets.HTML(value, layout=widgets.Layout(width="100%"))


def _layer_tokens(model, images: Sequence[Image.Image], layers: Sequence[int]) -> torch.Tensor:
    """``[L', B, T, d]`` normed tokens entering each of ``layers`` for a few images."""
    device = next(model.parameters()).device
    return token_embeddings(model, to_pixels(model, list(images)).to(device), layers=list(layers))


def explorer(model, svd: QKSVD, images: dict[str, Image.Image], layers: Sequence[int], heads: Sequence[int],
             n_modes: int, size: int = PICTURE_PX) -> widgets.VBox:
    """Fig 1 for a static page: layer, head and mode sliders (reading e.g. ``L7``, ``H1``, ``M2``) over
    precomputed pictures of every ``images`` entry ({name: PIL image}) for modes ``M0..M{n_modes-1}`` of
    every head in ``heads`` of every layer in ``layers``."""
    names = list(images)
    tokens = _layer_tokens(model, images.values(), layers)
    tree = [[[_html(picture_row(
        mode_pictures(model, svd, list(images.values()), layer, head, mode, size=size, tokens=tokens[i]),
        [html.escape(n) for n in names], mode_caption(svd, layer, head, mode) + " (0-based)"))
        for mode in range(n_modes)] for head in heads] for i, layer in enumerate(layers)]
    return nested_stack(tree, ("layer", "head", "mode"),
                        values=([f"L{l}" for l in layers], [f"H{h}" for h in heads], [f"M{m}" for m in range(n_modes)]))


def optimal_table(svd: QKSVD, found: SearchResult, featured: Sequence[tuple[int, int, int, int]]) -> pd.DataFrame:
    """One row per (featured mode, rank): the mode's top images by the optimal-image score (Fig 4).

    Columns: ``mode`` label, ``rank`` (0 = best), ``image`` (path relative to the searched folder), ``score``,
    the mode's singular value ``s`` and ``cos``."""
    rows = []
    for layer, head, mode, sign in featured:
        for rank, (name, score) in enumerate(found.top(layer, head, mode, sign)):
            rows.append({"mode": mode_label(layer, head, mode, sign), "rank": rank, "image": name, "score": score,
                         "s": float(svd.S[layer, head, mode]), "cos": float(svd.cos[layer, head, mode])})
    return pd.DataFrame(rows, columns=["mode", "rank", "image", "score", "s", "cos"])


def optimal_images(model, svd: QKSVD, found: SearchResult, featured: Sequence[tuple[int, int, int, int]],
                   size: int = 224) -> HTML:
    """Fig 4: for each featured ``(layer, head, mode, sign)``, a row of its top images with the mode drawn
    over them (``size`` px pictures shown :data:`PICTURE_PX` wide), captioned with file name and score."""
    blocks = []
    for layer, head, mode, sign in featured:
        top = found.top(layer, head, mode, sign)
        title = mode_caption(svd, layer, head, mode, sign) + f" (0-based); top {len(top)}"
        if not top:
            blocks.append(f"<p>{title}: no image scored above 0.</p>")
            continue
        images = [open_rgb(found.path(name)) for name, _ in top]
        pictures = mode_pictures(model, svd, images, layer, head, mode, sign=sign, size=size)
        captions = [f"{html.escape(name.rsplit('/', 1)[-1].rsplit('.', 1)[0])} ({score:.1f})" for name, score in top]
        blocks.append(picture_row(pictures, captions, title, quality=85))
    return HTML("<div style='display:grid;gap:12px'>" + "".join(blocks) + "</div>")


def walkthrough(model, svd: QKSVD, image: Image.Image, layers: Sequence[int], heads: Sequence[int], count: int = 6,
                size: int = PICTURE_PX) -> tuple[pd.DataFrame, widgets.VBox]:
    """Fig 5: one image through the ``count`` modes that raise its attention scores most, per head.

    Returns the tidy table (one row per layer, head and rank: ``label``, ``mode``, ``sign``,
    ``contribution``, ``share`` of the head's sum of |contributions|, ``cos``) and layer/head sliders over
    rows of pictures, modes left to right by contribution, each with the sign of the feature the image holds.
    """
    meta = info(model)
    crop = display_crop(model, image)
    tokens = _layer_tokens(model, [image], layers)[:, 0]  # [L', T, d]
    rows, panels = [], []
    for i, layer in enumerate(layers):
        per_head = []
        for head in heads:
            ranked = top_modes(svd, tokens[i], layer, head, count=count, prefix_tokens=meta.prefix_tokens)
            pictures = []
            for rank, r in enumerate(ranked):
                query, key = mode_maps(svd, tokens[i], layer, head, r.mode, meta.prefix_tokens, r.sign, meta.grid)
                pictures.append(thumbnail(render_mode(crop, query, key), size))
                rows.append({"layer": layer, "head": head, "rank": rank, "label": r.label, "mode": r.mode,
                             "sign": r.sign, "contribution": r.contribution, "share": r.share, "cos": r.cos})
            captions = [f"<b>{r.label}</b><br>share {r.share:.2f}, cos {r.cos:+.2f}" for r in ranked]
            per_head.append(_html(picture_row(pictures, captions)))
        panels.append(per_head)
    sliders = nested_stack(panels, ("layer", "head"), values=([f"L{l}" for l in layers], [f"H{h}" for h in heads]))
    return pd.DataFrame(rows), sliders


def top_share_chart(table: pd.DataFrame) -> alt.Chart:
    """Bars: per layer, the mean over heads of the share carried by each head's largest mode (rank 0)."""
    top = table[table["rank"] == 0].groupby("layer")["share"].mean().reset_index()
    return alt.Chart(inline(top)).mark_bar().encode(
        x=alt.X("layer:O", title="layer (0-based)"),
        y=alt.Y("share:Q", title="top mode's share of sum |c_m|"),
        tooltip=["layer:O", alt.Tooltip("share:Q", format=".2f")],
    ).properties(width=320, height=200)


def same_object_table(same: SameObject, control: SameObject, model_label: str, num_layers: int) -> pd.DataFrame:
    """Fig 6 as a tidy table: one row per layer and series (the model, its random-init control, chance 1/K)."""
    series = [(model_label, same.layers, same.per_layer), ("random-init control", control.layers, control.per_layer),
              ("chance (1/K)", same.layers, same.chance_layer)]
    frames = [pd.DataFrame({"model": name, "layer": layers, "P(same object)": values}) for name, layers, values in series]
    table = pd.concat(frames, ignore_index=True)
    table["depth"] = depth(table["layer"], num_layers)
    return table


def same_object_chart(table: pd.DataFrame) -> alt.Chart:
    """Fig 6: P(same object) against normalised depth, one line per series of :func:`same_object_table`."""
    return alt.Chart(inline(table)).mark_line(point=True).encode(
        x=alt.X("depth:Q", title="normalised depth, layer / (L - 1)"),
        y=alt.Y("P(same object):Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=400)),
        strokeDash=alt.StrokeDash("model:N", legend=None),
        tooltip=["model:N", "layer:O", alt.Tooltip("P(same object):Q", format=".3f")],
    ).properties(width=420, height=240)


# --- "What we found": numbers and phrases computed from the run --------------------------------------------

def _count_phrase(hits: int, total: int, what: str) -> str:
    if hits == total:
        return f"in every one of the {total} layers {what}"
    if hits == 0:
        return f"in none of the {total} layers {what}"
    return f"in {hits} of the {total} layers {what}"


def same_object_findings(same: SameObject, control: SameObject) -> dict:
    """Numbers and computed phrases for the Fig 6 summary (keys become glue names with the chapter's prefix)."""
    per_layer, layers = np.asarray(same.per_layer, float), list(same.layers)
    half = len(layers) // 2
    early, late = float(np.nanmean(per_layer[:half])), float(np.nanmean(per_layer[half:]))
    if abs(early - late) < 0.02:
        trend = "about the same in the first and the second half of the layers"
    else:
        trend = ("higher in the first half of the layers than in the second, the direction the paper reports"
                 if early > late else "lower in the first half of the layers than in the second, against the paper's trend")
    peak = int(np.nanargmax(per_layer))
    above_chance = int(np.sum(per_layer > np.asarray(same.chance_layer)))
    above_control = int(np.sum(per_layer > np.asarray(control.per_layer)))
    return {
        "early": early, "late": late, "early_layers": f"{layers[0]}-{layers[half - 1]}",
        "late_layers": f"{layers[half]}-{layers[-1]}", "trend": trend, "peak": float(per_layer[peak]),
        "peak_layer": layers[peak], "chance": float(np.nanmean(same.chance_layer)),
        "control": float(np.nanmean(control.per_layer)),
        "above_chance": _count_phrase(above_chance, len(layers), "above chance"),
        "above_control": _count_phrase(above_control, len(layers), "above the random-init control"),
    }


def walkthrough_findings(table: pd.DataFrame) -> dict:
    """Numbers for the Fig 5 summary: the mean share of each head's largest mode and the most concentrated head."""
    top = table[table["rank"] == 0]
    strongest = top.loc[top["share"].idxmax()]
    return {"top_share": float(top["share"].mean()), "top_head": f"L{int(strongest['layer'])} H{int(strongest['head'])}",
            "top_label": str(strongest["label"]), "top_head_share": float(strongest["share"]),
            "walk_layers": ", ".join(f"L{l}" for l in sorted(top["layer"].unique()))}


# --- modes read by eye ------------------------------------------------------------------------------------

# What the optimal images of the default gallery show for three modes of the embedded model, written by a
# person looking at the pictures of the default build (not computed): valid only for that run.
READ_BY_EYE = {
    "L10 H3 M0": "query on the background and surroundings, key on the main object (face, body, cat's head): "
                 "context tokens look for the object -- contextualising, as its negative cosine says",
    "L10 H2 M2": "query and key together (white) on the one salient object -- the pagoda, the flower, the "
                 "scenes' shapes -- with the query stronger at its rim: a grouping mode, foreground tokens attend to "
                 "their own object",
    "L7 H1 M2": "query on the left part of the image, key on the right: a positional mode that looks sideways, "
                "whatever the content",
}
READ_BY_EYE_RUN = {"models": [(DEFAULT_MODEL, None, False)], "image_dir": None, "n_scenes": 24, "seed": 0}


def readings(svd: QKSVD, p) -> str:
    """Markdown with the modes read by eye when ``p`` (the chapter's checked parameters) is the run they were
    read from (embedded model, default gallery, the three modes featured); otherwise a sentence saying so."""
    default = all(getattr(p, name) == value for name, value in READ_BY_EYE_RUN.items())
    featured = [mode_label(l, h, m, s) for l, h, m, s in p.featured]
    if not (default and featured == list(READ_BY_EYE)):
        return ("*Readings by eye exist only for the default run (embedded model, default gallery and featured "
                "modes); this run differs, so read the pictures above yourself.*")
    items = "\n".join(f"- **{label}** (cos {float(svd.cos[parse_label(label)[:3]]):+.2f}): {text}."
                      for label, text in READ_BY_EYE.items())
    return ("**Read by eye** (a person looked at the optimal images of the default build; nothing below is computed; "
            "red = query, cyan = key, 0-based labels):\n\n" + items)


# --- one-line reports under the steps --------------------------------------------------------------------

def model_summary(model, svd: QKSVD) -> str:
    """Markdown: the model's label and geometry, and any note of the QK SVD."""
    meta = info(model)
    return (f"`{meta.name}`: {meta.num_layers} layers, {meta.num_heads} heads, d = {meta.dim}, {svd.rank} modes per "
            f"head, {meta.grid[0]} x {meta.grid[1]} image tokens, {meta.prefix_tokens} prefix token(s)."
            + "".join(f"\n\n**Note:** {note}." for note in svd.notes))


def search_summary(found: SearchResult) -> str:
    """Markdown: how many images the search scored, how long it took, and the first files it skipped (paths
    relative to the searched folder: no machine path reaches the page)."""
    root = str(found.root).rstrip("/") + "/"
    return (f"Scored {found.n_images} of {found.n_files} images in {found.seconds:.1f} s; skipped {len(found.skipped)}"
            + "".join(f"\n- `{name}`: {why.replace(root, '')}" for name, why in found.skipped[:5]))
