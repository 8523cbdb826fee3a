"""§8's pictures, tables and charts: segmentations drawn over the images for each method side by side, the metric
table with 95 % intervals over images, the paired differences, the time per image and the recognition probe."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import altair as alt
import ipywidgets as widgets
import numpy as np
import pandas as pd
from PIL import Image

from ..analyses.recognition import ProbeResult
from ..analyses.segmentation import METHODS, Segmenter, object_map, paired_difference, summarise, upsample_labels
from ..core.images import ImageError, image_from_bytes
from ..core.stats import RESAMPLES
from .attention_figures import outline
from .explore import Live
from .render import jpeg_bytes, mosaic
from .style import PANELS_PER_ROW, inline, model_order
from .widgets import nested_stack, picture_html

# Segment colours: distinct, readable over photos (tab20's first ten, then repeated).
PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], np.float32)
METRICS = {"miou": "mean IoU (Hungarian)", "foreground_iou": "foreground IoU (best segment per object)"}


def draw_segments(photo: np.ndarray, labels: np.ndarray, opacity: float = 0.55) -> np.ndarray:
    """``[H, W, 3]`` uint8: each segment of ``labels [H, W]`` tinted with its colour over ``photo [H, W, 3]``, the
    boundaries between segments in white."""
    colours = PALETTE[np.asarray(labels) % len(PALETTE)]
    out = (1 - opacity) * np.asarray(photo, np.float32) + opacity * colours
    edges = np.zeros(labels.shape, bool)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[edges] = 255
    return out.round().astype(np.uint8)


def _truth_picture(photo: np.ndarray, truth: np.ndarray) -> np.ndarray:
    picture = draw_segments(photo, np.maximum(truth, 0))
    picture[outline(truth < 0, 1)] = 0  # void outlined in black
    return picture


def comparison_slider(segmenter: Segmenter, items: Sequence, layers: Sequence[int], n_segments: int | None = None,
                      methods: Sequence[str] = tuple(METHODS), size: int = 160, quality: int = 75):
    """Image and layer sliders over rows of pictures: the image, its ground truth, then each method's segments
    at that layer (every method on the same layer and tokens), as JPEGs that work in a static page."""
    views = segmenter.observe([item.image for item in items], layers, attention="cls_attention" in methods)
    tiles = []
    for item, view in zip(items, views):
        truth = object_map(item)
        count = n_segments or len(np.unique(truth[truth >= 0]))
        photo = np.asarray(item.image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        small = upsample_labels(truth, size, size)
        row = []
        for layer in layers:
            pictures = [photo, _truth_picture(photo, small)] + [
                draw_segments(photo, upsample_labels(segmenter.token_labels(view[layer], count, m), size, size))
                for m in methods]
            caption = (f"{getattr(item, 'id', '')}, L{layer}, {count} segments: image, ground truth, "
                       + ", ".join(methods))
            row.append(picture_html(jpeg_bytes(mosaic(pictures, len(pictures), gap=4), quality),
                                    width=len(pictures) * (size + 4), caption=caption))
        tiles.append(row)
    wrapped = [[widgets.HTML(tile) for tile in row] for row in tiles]
    labels = ([str(getattr(item, "id", i)) for i, item in enumerate(items)], [f"L{layer}" for layer in layers])
    return nested_stack(wrapped, ("image", "layer"), values=labels)


def metric_table(rows_by_model: Mapping[str, list[dict]], resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per model, method, layer and metric: the mean over images with its 95 % bootstrap interval."""
    records = []
    for model, rows in rows_by_model.items():
        for metric in METRICS:
            for (method, layer), interval in summarise(rows, metric, resamples, seed).items():
                records.append({"model": model, "method": method, "layer": layer, "metric": metric,
                                "mean": interval.estimate, "low": interval.low, "high": interval.high,
                                "images": interval.units})
    return pd.DataFrame(records)


def metric_chart(table: pd.DataFrame, metric: str = "miou") -> alt.FacetChart:
    """Mean per layer with 95 % intervals, one line per method, one panel per model; the grid (no layer) is a
    dashed rule with its band."""
    rows = table[table["metric"] == metric]
    layered, grid = rows[rows["layer"].notna()], rows[rows["layer"].isna()].drop(columns="layer")
    x = alt.X("layer:Q", title="layer (0-based)", axis=alt.Axis(tickMinStep=1))
    colour = alt.Color("method:N", sort=list(METHODS), legend=alt.Legend(orient="bottom", title=None))
    line = alt.Chart().mark_line(point=True).encode(x=x, y=alt.Y("mean:Q", title=METRICS[metric]), color=colour,
                                                   tooltip=["method:N", "layer:Q", "mean:Q", "low:Q", "high:Q", "images:Q"])
    bars = alt.Chart().mark_errorbar().encode(x=x, y=alt.Y("low:Q", title=METRICS[metric]), y2="high:Q", color=colour)
    layers = [line, bars]
    if len(grid):
        layers.append(alt.Chart(inline(grid)).mark_rule(strokeDash=[4, 3], color="grey").encode(y="mean:Q"))
    return alt.layer(*layers, data=inline(layered)).properties(width=220, height=200).facet(
        facet=alt.Facet("model:N", sort=model_order(layered["model"]), title=None), columns=PANELS_PER_ROW).properties(
        title=f"{METRICS[metric]} per layer, 95 % intervals over images (dashed: the grid)")


def pair_table(rows_by_model: Mapping[str, list[dict]], pairs: Sequence[tuple[tuple, tuple]],
               resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """For each model, pair ``(first, second)`` of ``(method, layer)`` keys and metric: the mean over images of
    first minus second on the same images, with its paired 95 % bootstrap interval over images."""
    records = []
    for model, rows in rows_by_model.items():
        for first, second in pairs:
            for metric in METRICS:
                interval = paired_difference(rows, first, second, metric, resamples, seed)
                records.append({"model": model, "metric": metric, "method": first[0], "layer": first[1],
                                "against": second[0], "against_layer": second[1], "difference": interval.estimate,
                                "low": interval.low, "high": interval.high, "images": interval.units})
    return pd.DataFrame(records)


def difference_table(rows_by_model: Mapping[str, list[dict]], defaults: Mapping[str, int | None], layers: Sequence[int],
                     resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """The modes against each baseline on the same images (:func:`pair_table`): at each layer against k-means on
    that layer's tokens (the features the modes come from), and at the methods' default layers against every
    baseline. ``defaults``: :meth:`qklib.analyses.segmentation.Segmenter.default_layers`."""
    pairs = [(("modes", layer), ("kmeans", layer)) for layer in layers]
    pairs += [(("modes", defaults["modes"]), (method, defaults[method])) for method in METHODS if method != "modes"]
    return pair_table(rows_by_model, pairs, resamples, seed)


def timing_table(segmenters: Mapping[str, Segmenter], images: Sequence, n_segments: int = 6,
                 methods: Sequence[str] = tuple(METHODS)) -> pd.DataFrame:
    """Wall seconds per image of each method's full call (forward pass included; one warm-up call first), median
    and largest over ``images``, per model."""
    records = []
    for model, segmenter in segmenters.items():
        for method in methods:
            segmenter(images[0], n_segments, method)
            seconds = []
            for image in images:
                start = time.perf_counter()
                segmenter(image, n_segments, method)
                seconds.append(time.perf_counter() - start)
            records.append({"model": model, "method": method, "layer": segmenter.default_layers()[method],
                            "median_s": float(np.median(seconds)), "max_s": float(np.max(seconds)),
                            "images": len(seconds)})
    table = pd.DataFrame(records)
    table["layer"] = table["layer"].astype("Int64")
    return table


def probe_table(results: Mapping[tuple[str, str, int | None], ProbeResult], resamples: int = RESAMPLES,
                seed: int = 0) -> pd.DataFrame:
    """``results[(model, features, layer)]`` -> one row each: accuracy with its 95 % interval over images, chance
    (the largest class's share) and each class's accuracy."""
    records = []
    for (model, features, layer), result in results.items():
        interval = result.interval(resamples, seed)
        _, counts = np.unique(result.labels, return_counts=True)
        records.append({"model": model, "features": features, "layer": layer, "accuracy": interval.estimate,
                        "low": interval.low, "high": interval.high, "chance": counts.max() / counts.sum(),
                        "images": interval.units, **{f"class {k}": v for k, v in result.per_class().items()}})
    table = pd.DataFrame(records)
    table["layer"] = table["layer"].astype("Int64")  # the class token has no layer: <NA>, not 1.000 beside NaN
    return table


# --- the live explorer --------------------------------------------------------------------------------------

def explore_segments(segmenters: Mapping[str, Segmenter], images: Mapping[str, Image.Image], size: int = 320,
                     quality: int = 85) -> Live:
    """Live: any model, method, layer and number of segments on any of ``images`` ({name: PIL image}) or on an
    image the reader uploads (a file that is not an image shows its reason and changes nothing)."""
    if not images or not segmenters:
        raise ValueError("explore_segments needs at least one segmenter and one image")
    images = dict(images)
    first = next(iter(segmenters.values()))
    pick_model = widgets.Dropdown(options=list(segmenters), description="model")
    pick_image = widgets.Dropdown(options=list(images), description="image")
    method = widgets.Dropdown(options=list(METHODS), description="method")
    layer = widgets.IntSlider(value=first.default_layer("modes"), min=0, max=first.info.num_layers - 1,
                              description="layer", continuous_update=False)
    count = widgets.IntSlider(value=4, min=1, max=16, description="segments", continuous_update=False)
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="upload")
    picture, message = widgets.Image(format="jpeg"), widgets.HTML("")
    picture.add_class("qk-live-picture")
    message.add_class("qk-live-message")

    def draw():
        image = images[pick_image.value]
        labels = segmenters[pick_model.value](image, count.value, method.value, layer.value)
        photo = np.asarray(image.convert("RGB"))
        scale = size / max(photo.shape[:2])
        shape = (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale)))
        small = np.asarray(Image.fromarray(photo).resize(shape, Image.Resampling.BILINEAR))
        picture.value = jpeg_bytes(draw_segments(small, upsample_labels(labels, *small.shape[:2])), quality)

    controls = {"model": pick_model, "image": pick_image, "method": method, "layer": layer, "segments": count,
                "upload": upload}
    live = Live([widgets.HBox([pick_model, pick_image, upload]), widgets.HBox([method, layer, count]), message,
                 picture], controls, {"segments": picture}, {}, message, draw)

    def uploaded(change):
        for name, data in [(str(f.get("name", "upload")), bytes(f.get("content", b""))) for f in change["new"] or ()]:
            try:
                images[name] = image_from_bytes(data, name)
            except ImageError as error:
                live.show_error(str(error))
                return
            pick_image.options = list(images)
            pick_image.value = name

    for control in (pick_model, pick_image, method, layer, count):
        control.observe(live.redraw, names="value")
    upload.observe(uploaded, names="value")
    live.redraw()
    return live


# --- what we found ------------------------------------------------------------------------------------------

QUESTION = "Do the QK modes segment objects better than the token features they come from?"


def _verdict(interval) -> str:
    """How a paired difference's 95 % interval reads: wholly above zero, wholly below, or across it."""
    if interval.low > 0:
        return "better"
    if interval.high < 0:
        return "worse"
    return "not distinguishable"


def findings(rows_by_model: Mapping[str, list[dict]], defaults: Mapping[str, int | None], layers: Sequence[int],
             resamples: int = RESAMPLES, seed: int = 0, metric: str = "miou") -> dict:
    """``{"text": one paragraph, "record": the numbers behind it}``: per model, the modes at their default layer
    against k-means on the same tokens, against the best of the other training-free methods at its default
    layer and against the grid (paired differences, 95 % intervals over images), and the layer where the modes
    did best. ``defaults``: :meth:`qklib.analyses.segmentation.Segmenter.default_layers`."""
    sentences, record = [], {"question": QUESTION, "metric": metric, "models": {}}
    for model, rows in rows_by_model.items():
        summary = summarise(rows, metric, resamples, seed)
        own, grid = ("modes", defaults["modes"]), ("grid", defaults["grid"])
        compared = {"kmeans": ("kmeans", own[1]), "grid": grid}
        compared["best"] = max([(m, defaults[m]) for m in METHODS if m not in ("modes", "grid")],
                               key=lambda key: summary[key].estimate)
        differences = {name: paired_difference(rows, own, key, metric, resamples, seed) for name, key in compared.items()}
        best_layer = max((layer for layer in layers if ("modes", layer) in summary),
                         key=lambda layer: summary["modes", layer].estimate)
        best = compared["best"]
        sentences.append(
            f"{model}: the modes at L{own[1]} reach {METRICS[metric]} {summary[own]}; k-means on the same tokens "
            f"{summary[compared['kmeans']]}, so the modes are {_verdict(differences['kmeans'])} (difference "
            f"{differences['kmeans']}). The best other method at its own layer, {best[0]} L{best[1]}, reaches "
            f"{summary[best]}: the modes are {_verdict(differences['best'])} (difference {differences['best']}); "
            f"against the grid ({summary[grid]}) they are {_verdict(differences['grid'])}. The modes did best at "
            f"L{best_layer} ({summary['modes', best_layer]}).")
        record["models"][model] = {
            "modes_layer": own[1], "modes": summary[own].as_dict(), "best_modes_layer": best_layer,
            "best_baseline": best[0], "best_baseline_layer": best[1], "images": summary[own].units,
            **{f"{name}_score": summary[key].as_dict() for name, key in compared.items()},
            **{f"against_{name}": differences[name].as_dict() for name in compared},
            **{f"against_{name}_verdict": _verdict(differences[name]) for name in compared}}
    return {"text": " ".join(sentences), "record": record}
