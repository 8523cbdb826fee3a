"""The §5 figures: mode maps (Fig 1), optimal images (Fig 4), one image through many modes (Fig 5) and the
same-object probability (Fig 6), as static widgets, HTML picture rows, tidy tables and altair charts.

Pictures are red (query map ``x_i . u_n``) and cyan (key map ``x_j . v_n``) over the photo, drawn by
:mod:`qklib.present.render`; each is shown ``PICTURE_PX`` (160) px wide and a click shows it at full width
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

from ..analyses.modes import mode_label, mode_maps, top_modes
from ..analyses.same_object import SameObject
from ..book.ledger import RANKINGS
from ..core.extract import record, token_embeddings
from ..core.images import display_crop, open_rgb, to_pixels
from ..core.models import depth, info
from ..core.stats import AGREES, BORDERLINE, DISAGREES, RESAMPLES, bootstrap, bootstrap_curve, decide
from ..core.svd import QKSVD
from ..search import SearchResult
from .attention_figures import course
from .render import jpeg_bytes, mode_pictures, render_mode, thumbnail
from .style import CHANCE, CONTROLS, TRAINED, inline
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


def featured_table(svd: QKSVD, featured: Sequence[tuple[int, int, int, int]], correlations: Sequence[float],
                   positions: Sequence[dict] | None = None) -> pd.DataFrame:
    """One row per featured mode: ``mode`` label, ``layer``, ``s``, ``cos`` (u_n . v_n), ``map_corr`` (the
    token-level correlation of its query and key maps over the gallery, :func:`qklib.analyses.modes.position_shares`)
    and, with ``positions`` (:func:`qklib.analyses.modes.position_shares`), the share of each map's variance that token
    position explains with its null's 97.5th percentile."""
    if len(correlations) != len(featured):
        raise ValueError(f"{len(correlations)} correlations for {len(featured)} featured modes")
    rows = [{"mode": mode_label(l, h, m, sg), "layer": l, "s": float(svd.S[l, h, m]), "cos": float(svd.cos[l, h, m]),
             "map_corr": float(r)} for (l, h, m, sg), r in zip(featured, correlations)]
    for row, share in zip(rows, positions or ()):
        row.update({"query_position_share": share["query"], "key_position_share": share["key"],
                    "position_null": max(share["query_null"], share["key_null"])})
    return pd.DataFrame(rows)


def featured_findings(table: pd.DataFrame, top_names: Sequence[Sequence[str]] = ()) -> dict:
    """Glue values from :func:`featured_table`: the modes with cos, map correlation and (where measured) how much
    of their maps token position explains, how often cos and map correlation agree in sign, and how many of the
    featured modes' optimal images (``top_names``, one list of gallery paths per mode) are generated scenes."""
    def describe(row) -> str:
        text = f"{row.mode} (cos {row.cos:+.2f}, map r {row.map_corr:+.2f}"
        if "query_position_share" in table:
            text += (f"; position explains {row.query_position_share:.0%} of its query map and "
                     f"{row.key_position_share:.0%} of its key map, null ≤ {row.position_null:.1%}")
        return text + ")"
    agree = int((np.sign(table["cos"]) == np.sign(table["map_corr"])).sum())
    names = [name for top in top_names for name in top]
    scenes = sum(name.startswith("scenes/") for name in names)
    return {"featured_modes": "; ".join(describe(row) for row in table.itertuples()),
            "featured_agree": f"{agree} of {len(table)}",
            "featured_scenes": f"{scenes} of the {len(names)} optimal images shown are generated scenes"}


def gallery_phrases(natural: bool) -> dict:
    """What the run's gallery is, for the prose (``natural``: the gallery is the user's ``image_dir``, else the
    default of shipped photos and generated scenes): ``gallery_text`` and ``semantic_note``, the latter saying
    whether this run can test the paper's semantic reading of optimal images at all."""
    if natural:
        return {"gallery_text": "`image_dir`",
                "semantic_note": "The gallery is `image_dir`; whether a mode's optimal images share a feature is a "
                                 "reading of the pictures above."}
    return {"gallery_text": "the photos shipped in installed packages and the generated scenes",
            "semantic_note": "The gallery holds no folder of natural images (`image_dir` is empty), so this run does "
                             "not test the paper's semantic reading of optimal images (§5, Fig 4); the claims ledger "
                             "marks it not tested."}


CONTENT_PX = 112  # the position-removed rows of Fig 4 are drawn small (the page's size budget)


def optimal_images(model, svd: QKSVD, found: SearchResult, featured: Sequence[tuple[int, int, int, int]],
                   size: int = 224, correlations: Sequence[float] | None = None,
                   positions: Sequence[dict] | None = None) -> HTML:
    """Fig 4: for each featured ``(layer, head, mode, sign)``, a row of its top images with the mode drawn
    over them (``size`` px pictures shown ``PICTURE_PX`` wide), captioned with file name and score;
    ``correlations`` (one per featured mode: query/key map correlation over the gallery) go into the titles.
    With ``positions`` (:func:`qklib.analyses.modes.position_shares`), each row is followed by the same images with the
    mode's per-position mean maps taken out (the content part), drawn small."""
    if correlations is not None and len(correlations) != len(featured):
        raise ValueError(f"{len(correlations)} correlations for {len(featured)} featured modes")
    blocks = []
    for i, (layer, head, mode, sign) in enumerate(featured):
        top = found.top(layer, head, mode, sign)
        corr = "" if correlations is None else f", query/key map r = {correlations[i]:+.2f}"
        title = mode_caption(svd, layer, head, mode, sign) + f"{corr} (0-based); top {len(top)}"
        if not top:
            blocks.append(f"<p>{title}: no image scored above 0.</p>")
            continue
        images = [open_rgb(found.path(name)) for name, _ in top]
        pictures = mode_pictures(model, svd, images, layer, head, mode, sign=sign, size=size)
        captions = [f"{html.escape(name.rsplit('/', 1)[-1].rsplit('.', 1)[0])} ({score:.1f})" for name, score in top]
        blocks.append(picture_row(pictures, captions, title, quality=85))
        if positions is not None:
            share = positions[i]
            content = mode_pictures(model, svd, images, layer, head, mode, sign=sign, size=CONTENT_PX,
                                    position=(share["query_mean"], share["key_mean"]))
            blocks.append(picture_row(content, captions, f"the same, the mean map of each token position taken out "
                                      f"(position explains {share['query']:.0%} of the query map, {share['key']:.0%} "
                                      "of the key map)", width=CONTENT_PX, quality=80))
    return HTML("<div style='display:grid;gap:12px'>" + "".join(blocks) + "</div>")


def walkthrough(model, svd: QKSVD, image: Image.Image, layers: Sequence[int], heads: Sequence[int], count: int = 6,
                size: int = PICTURE_PX) -> tuple[pd.DataFrame, widgets.VBox]:
    """Fig 5: one image through the ``count`` modes that shape each head's attention most.

    Modes are ranked by their key-centred, attention-weighted contribution (:func:`qklib.analyses.modes.top_modes` with
    the head's attention); the paper's sum over token pairs ranks them too, and both are kept. Returns the tidy
    table (one row per layer, head, ranking and rank: ``ranking`` ``"attention"`` or ``"paper sum"``,
    ``label``, ``mode``, ``sign``, ``contribution``, ``share`` of the head's sum of absolute contributions, ``cos``)
    and layer/head sliders over rows of pictures of the attention ranking, modes left to right, each with the
    sign of the feature the image holds, and the paper's top modes named below them.
    """
    meta = info(model)
    crop = display_crop(model, image)
    recorded = record(model, to_pixels(model, [image]), tokens=True, attention=True, layers=list(layers))
    rows, panels = [], []
    for i, layer in enumerate(layers):
        per_head = []
        for head in heads:
            tokens = recorded.tokens[i, 0]
            ranked = top_modes(svd, tokens, layer, head, count, meta.prefix_tokens, probs=recorded.attention[i, 0, head])
            paper = top_modes(svd, tokens, layer, head, count, meta.prefix_tokens)
            pictures = []
            for r in ranked:
                query, key = mode_maps(svd, tokens, layer, head, r.mode, meta.prefix_tokens, r.sign, meta.grid)
                pictures.append(thumbnail(render_mode(crop, query, key), size))
            for name, ranking in (("attention", ranked), ("paper sum", paper)):
                rows += [{"layer": layer, "head": head, "ranking": name, "rank": rank, "label": r.label, "mode": r.mode,
                          "sign": r.sign, "contribution": r.contribution, "share": r.share, "cos": r.cos}
                         for rank, r in enumerate(ranking)]
            captions = [f"<b>{r.label}</b><br>share {r.share:.2f}, cos {r.cos:+.2f}" for r in ranked]
            shared = len({r.mode for r in ranked} & {r.mode for r in paper})
            note = (f"<div style='font-size:0.85em'>The paper's sum ranks first: "
                    f"{', '.join(f'M{r.mode}' for r in paper)} ({shared} of {count} shared)</div>")
            per_head.append(_html(picture_row(pictures, captions) + note))
        panels.append(per_head)
    sliders = nested_stack(panels, ("layer", "head"), values=([f"L{l}" for l in layers], [f"H{h}" for h in heads]))
    return pd.DataFrame(rows), sliders


def ablation_table(rows: Sequence[dict], resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """The ablation (:func:`qklib.analyses.modes.ablation`) per layer and ranking (``RANKINGS``; "all" pools the
    layers): the mean attention change (total variation) when that ranking's top modes are removed, with its 95%
    bootstrap interval over image-head cases (``low``, ``high``), and the number of cases."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("no ablation rows: pass the rows of qklib.analyses.modes.ablation for at least one image "
                         "and layer")
    out = []
    for layer, cases in [*frame.groupby("layer"), ("all", frame)]:
        for name, label in RANKINGS.items():
            interval = bootstrap(cases[name].to_numpy(), resamples=resamples, seed=seed)
            out.append({"layer": str(layer), "ranking": label, "change": interval.estimate, "low": interval.low,
                        "high": interval.high, "cases": len(cases)})
    return pd.DataFrame(out)


def ablation_findings(rows: Sequence[dict], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Numbers and a computed verdict for the ablation summary (keys become glue names with the chapter's prefix):
    each ranking's mean change with its interval, the paper's ranking against random modes (paired, interval over
    cases) and against singular value alone."""
    frame = pd.DataFrame(list(rows))
    found = {f"abl_{name}": bootstrap(frame[name].to_numpy(), resamples=resamples, seed=seed).text()
             for name in RANKINGS}
    gain = bootstrap((frame["by_paper_sum"] - frame["by_random"]).to_numpy(), resamples=resamples, seed=seed)
    versus_s = bootstrap((frame["by_paper_sum"] - frame["by_singular_value"]).to_numpy(), resamples=resamples,
                         seed=seed)
    picks = {AGREES: "picks modes that shape attention: removing them changes it more than removing random modes",
             DISAGREES: "does not beat random modes", BORDERLINE: "is borderline against random modes"}
    than_s = {AGREES: "and more than singular value alone", DISAGREES: "though less than singular value alone",
              BORDERLINE: "and about as much as singular value alone (the interval crosses 0)"}
    verdict = f"the paper's ranking {picks[decide(gain, 0.0)]}, {than_s[decide(versus_s, 0.0)]}"
    return {**found, "abl_gain": gain.text(), "abl_versus_s": versus_s.text(), "abl_verdict": verdict,
            "abl_beats_random": float((frame["by_paper_sum"] > frame["by_random"]).mean()),
            "abl_overlap": float(frame["overlap"].mean()), "abl_count": int(frame["count"].iloc[0]),
            "abl_cases": len(frame)}


def top_share_chart(table: pd.DataFrame) -> alt.Chart:
    """Bars: per layer, the mean over heads of the share carried by each head's largest mode (rank 0)."""
    top = _ours(table)
    top = top[top["rank"] == 0].groupby("layer")["share"].mean().reset_index()
    return alt.Chart(inline(top)).mark_bar().encode(
        x=alt.X("layer:O", title="layer (0-based)"),
        y=alt.Y("share:Q", title="top mode's share of sum |c_m|"),
        tooltip=["layer:O", alt.Tooltip("share:Q", format=".2f")],
    ).properties(width=320, height=200)


SAME = {"instance": "same instance", "kind": "same kind"}
STEP = 0.01  # Fig 6's courses: a smaller step between layers is level; a larger one always shows at 2 decimals
OBJECTS = {False: "background left out", True: "background an object"}


def same_object_table(model_runs: dict[tuple[bool, str], SameObject], control_runs: dict[tuple[bool, str], SameObject],
                      model_label: str, num_layers: int, resamples: int = RESAMPLES, seed: int = 0,
                      null_runs: dict[tuple[bool, str], SameObject] | None = None) -> pd.DataFrame:
    """Fig 6 as a tidy table from :func:`qklib.analyses.same_object.same_object_variants` of the model and of its
    random-init control: one row per variant, series and layer. Columns ``same`` (``"same instance"`` or ``"same
    kind"``), ``objects`` (the background left out or counted as an object), ``model`` (the model, ``"random-init
    control"``, ``"chance"``, and ``"mismatched-mode null"`` where ``null_runs``,
    :func:`qklib.analyses.same_object.mismatched`, holds the variant), ``layer``, ``P(same)``, ``low`` / ``high`` (the
    95% bootstrap interval over the layer's heads; empty for chance), ``depth``."""
    frames = []
    for (background, match), run in model_runs.items():
        control = control_runs[background, match]
        series = [(model_label, run), ("random-init control", control), ("chance", None)]
        if null_runs and (background, match) in null_runs:
            series.append(("mismatched-mode null", null_runs[background, match]))
        for name, source in series:
            values = run.chance_layer if source is None else source.per_layer
            frame = pd.DataFrame({"same": SAME[match], "objects": OBJECTS[background], "model": name,
                                  "layer": run.layers, "P(same)": values})
            if source is not None:  # the 95% interval over the layer's heads
                intervals = [bootstrap(heads, resamples=resamples, seed=seed) for heads in np.asarray(source.per_head)]
                frame["low"], frame["high"] = [i.low for i in intervals], [i.high for i in intervals]
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    table["depth"] = depth(table["layer"], num_layers)
    return table


def same_object_layers(table: pd.DataFrame, model_label: str) -> pd.DataFrame:
    """Fig 6 layer by layer, compactly (index: layer): the model's P(same) in every variant of
    :func:`same_object_table`, then chance, the random-init control and the mismatched-mode null in the claims
    ledger's variant (same instance, the background one more object)."""
    model = table[table["model"] == model_label]
    wide = model.pivot_table(index="layer", columns=["same", "objects"], values="P(same)")
    wide.columns = [f"{same}, {objects}" for same, objects in wide.columns]
    ledger_rows = table[(table["same"] == SAME["instance"]) & (table["objects"] == OBJECTS[True])
                        & (table["model"] != model_label)]
    references = ledger_rows.pivot_table(index="layer", columns="model", values="P(same)")
    references.columns = [f"{name} ({SAME['instance']}, {OBJECTS[True]})" for name in references.columns]
    return pd.concat([wide, references], axis=1).round(2)


# Fig 6's series other than the model: the control grey as everywhere in the book, chance black.
SERIES_COLOURS = {"random-init control": CONTROLS[0], "chance": CHANCE, "mismatched-mode null": "#b0306b"}


def same_object_chart(table: pd.DataFrame) -> alt.FacetChart:
    """Fig 6: P(same) against normalised depth, one line per series (model, control, chance dashed), each with its
    95% interval over heads as a band, one panel per variant of :func:`same_object_table`: same instance or same
    kind (rows), background left out or an object (columns)."""
    series = list(dict.fromkeys(table["model"]))
    colours = {name: SERIES_COLOURS.get(name, TRAINED[0]) for name in series}
    base = alt.Chart().encode(
        x=alt.X("depth:Q", title="normalised depth, layer / (L - 1)"),
        color=alt.Color("model:N", title=None, sort=series,
                        scale=alt.Scale(domain=series, range=[colours[name] for name in series]),
                        legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=400)))
    band = base.mark_area(opacity=0.18).encode(y="low:Q", y2="high:Q")
    line = base.mark_line(point=True).encode(
        y=alt.Y("P(same):Q", scale=alt.Scale(domain=[0, 1])),
        strokeDash=alt.StrokeDash("model:N", legend=None),
        tooltip=["same:N", "objects:N", "model:N", "layer:O", alt.Tooltip("P(same):Q", format=".3f"),
                 alt.Tooltip("low:Q", format=".3f"), alt.Tooltip("high:Q", format=".3f")])
    return alt.layer(band, line, data=inline(table)).properties(width=260, height=180).facet(
        row=alt.Row("same:N", title=None, sort=list(SAME.values())),
        column=alt.Column("objects:N", title=None, sort=list(OBJECTS.values())))


# --- "What we found": numbers and phrases computed from the run --------------------------------------------

def _count_phrase(hits: int, total: int, what: str) -> str:
    if hits == total:
        return f"in every one of the {total} layers {what}"
    if hits == 0:
        return f"in none of the {total} layers {what}"
    return f"in {hits} of the {total} layers {what}"


def same_object_findings(same: SameObject, control: SameObject, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Numbers and computed phrases for the Fig 6 summary (keys become glue names with the chapter's prefix)."""
    per_layer, layers = np.asarray(same.per_layer, float), list(same.layers)
    half = len(layers) // 2
    early, late = float(np.nanmean(per_layer[:half])), float(np.nanmean(per_layer[half:]))
    drop = bootstrap_curve(np.asarray(same.per_head, float),
                           lambda c: np.nanmean(c[:, :half], axis=1) - np.nanmean(c[:, half:], axis=1),
                           resamples=resamples, seed=seed)
    trend = {AGREES: "higher in the first half of the layers than in the second, the direction the paper reports",
             DISAGREES: "lower in the first half of the layers than in the second, against the paper's trend",
             BORDERLINE: "borderline: the interval of the difference between the halves includes 0"}[decide(drop, 0.0)]
    trend += f" (first half minus second {drop.text()}, 95% interval over heads)"
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


def same_object_variant_findings(model_runs: dict[tuple[bool, str], SameObject],
                                 control_runs: dict[tuple[bool, str], SameObject]) -> dict:
    """Layer-by-layer phrases for every Fig 6 variant (keys become glue names with the chapter's prefix):
    ``course_<objects>_<match>`` (:func:`qklib.present.attention_figures.course` of P(same) over all layers, steps under
    ``STEP`` level) and
    ``range_...`` (its lowest and highest layer, with chance and the control); where both matches were computed,
    ``kind_gap_<objects>`` (the course of P(same kind) - P(same instance): the share of top images whose query and
    key features fall on two different objects of one kind) with its largest layer; and ``background_gap``
    (the course of P(same instance) with the background as an object minus without it)."""
    missing = "not computed: the images carry no kind labels"
    found = {f"{name}_{objects}_kind": missing for name in ("course", "range") for objects in ("nobg", "bg")}
    found |= {f"kind_gap_{objects}": missing for objects in ("nobg", "bg")}
    found["background_gap"] = "not computed: one background setting only"
    for (background, match), run in model_runs.items():
        key = f"{'bg' if background else 'nobg'}_{match}"
        values, chance = np.asarray(run.per_layer, float), np.asarray(run.chance_layer, float)
        control = np.asarray(control_runs[background, match].per_layer, float)
        low, high = int(np.nanargmin(values)), int(np.nanargmax(values))
        found[f"course_{key}"] = course(values, STEP)
        found[f"range_{key}"] = (f"from {values[low]:.2f} (L{run.layers[low]}) to {values[high]:.2f} (L{run.layers[high]}); "
                                 f"chance {np.nanmin(chance):.2f}-{np.nanmax(chance):.2f}, random-init control "
                                 f"{np.nanmin(control):.2f}-{np.nanmax(control):.2f}; "
                                 + _count_phrase(int(np.sum(values > chance)), len(values), "above chance") + ", "
                                 + _count_phrase(int(np.sum(values > control)), len(values), "above the control"))
    for background in (False, True):
        if (background, "instance") in model_runs and (background, "kind") in model_runs:
            instance, kind = (np.asarray(model_runs[background, m].per_layer, float) for m in ("instance", "kind"))
            gap, layers = kind - instance, model_runs[background, "instance"].layers
            top = int(np.nanargmax(gap))
            found[f"kind_gap_{'bg' if background else 'nobg'}"] = (
                f"{course(gap, STEP)}; largest in L{layers[top]} ({gap[top]:.2f})")
    if (False, "instance") in model_runs and (True, "instance") in model_runs:
        found["background_gap"] = course(np.asarray(model_runs[True, "instance"].per_layer, float)
                                         - np.asarray(model_runs[False, "instance"].per_layer, float), STEP)
    return found


def kinds_phrase(matches: Sequence[str], ade20k: bool) -> str:
    """What a kind is in this run's Fig 6 (``matches``: the matches computed; ``ade20k``: ADE20K images, else the
    generated scenes), for the chapter's prose."""
    if "kind" not in matches:
        return ("none: these masks name no classes (ADE20K's semantic maps, or a plain label folder), so only "
                "P(same instance) is computed")
    if ade20k:
        return "ADE20K's object classes, as its annotation files name them, and the unlabelled background one more"
    return ("the target is one kind, every distractor (each a distinguishable instance: its own shade, size and "
            "rotation) a second, the background a third")


def walkthrough_findings(table: pd.DataFrame) -> dict:
    """Numbers for the Fig 5 summary (attention ranking): the mean share of each head's largest mode, the most
    concentrated head, and how many of the top modes the paper's sum also ranks on top."""
    ours = _ours(table)
    top = ours[ours["rank"] == 0]
    paper = table[table["ranking"] == "paper sum"] if "ranking" in table else ours.iloc[:0]
    sets = {key: set(g["mode"]) for key, g in paper.groupby(["layer", "head"])}
    shared = [len(set(g["mode"]) & sets.get(key, set())) for key, g in ours.groupby(["layer", "head"])]
    strongest = top.loc[top["share"].idxmax()]
    return {"top_share": float(top["share"].mean()), "top_head": f"L{int(strongest['layer'])} H{int(strongest['head'])}",
            "top_label": str(strongest["label"]), "top_head_share": float(strongest["share"]),
            "walk_layers": ", ".join(f"L{l}" for l in sorted(top["layer"].unique())),
            "walk_shared": float(np.mean(shared)), "walk_count": int(ours["rank"].max()) + 1}


def _ours(table: pd.DataFrame) -> pd.DataFrame:
    """The attention ranking's rows of a :func:`walkthrough` table (all rows of a table without ``ranking``)."""
    return table[table["ranking"] == "attention"] if "ranking" in table else table


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


def ablation_chart(table: pd.DataFrame) -> alt.Chart:
    """Bars per layer (and all layers pooled): mean attention change when each ranking's top modes are removed,
    with its 95% interval over image-head cases (:func:`ablation_table`); random modes are the null."""
    order = list(RANKINGS.values())
    base = alt.Chart().encode(x=alt.X("ranking:N", title=None, axis=None, sort=order))
    bars = base.mark_bar().encode(
        y=alt.Y("change:Q", title="mean TV change of attention rows"),
        color=alt.Color("ranking:N", title="top modes removed by", sort=order,
                        legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=400)),
        tooltip=["layer:N", "ranking:N", alt.Tooltip("change:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f"),
                 alt.Tooltip("high:Q", format=".3f"), "cases:Q"])
    errors = base.mark_rule(color="black").encode(y="low:Q", y2="high:Q")
    layers = list(dict.fromkeys(table["layer"]))
    return alt.layer(bars, errors, data=inline(table)).properties(width=70, height=180).facet(
        column=alt.Column("layer:N", title="layer (0-based; all = every case)", sort=layers))
