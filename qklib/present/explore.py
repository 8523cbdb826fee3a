"""Live-kernel explorers, one per chapter, shown when a chapter runs with ``live_explorer = True`` in a kernel
(JupyterLab, ``make lab``). They compute on demand through Python callbacks, so they freeze in a static page,
where :mod:`qklib.present.widgets` serves precomputed pictures instead.

* :func:`explore_attention` (§3): one query token's attention map over a scene or image, in any layer and
  head, the query token picked by its row and column (or put on the target or a distractor), drawn as the
  chapter's static maps are (:func:`qklib.present.attention_figures.overlay`: target outlined red, distractors white);
* :func:`explore_spectrum` (§4): one head's singular spectrum and its cos_n = u_n . v_n, and one mode's
  cosine against its head, its layer and the null band;
* :func:`explore` (§5): one mode's query (red) and key (cyan) maps, either sign, on a gallery image or an
  uploaded one, with the mode's optimal images from a saved search;
* :func:`explore_ov` (§6): one head's OV spectrum and eigenvalues, its effective rank and copying scores.

Each returns a :class:`Live` box: ``controls`` (the input widgets by name), ``pictures`` (the Image widgets it
redraws), ``message`` (what went wrong, e.g. an upload that is not an image; empty when all is well) and
``seconds`` (how long the last redraw took). What a redraw needs from the model (an image's attention, its
token embeddings at a layer) is computed once and cached, so after the first visit to an image a redraw
only slices, projects and draws.
"""

from __future__ import annotations

import html
import io
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from ..analyses.crossmodal import weights_of
from ..analyses.modes import mode_label, mode_maps
from ..analyses.preference import query_tokens, token_masks
from ..analyses.sequences import best_pair, snippet_html
from ..core.extract import record, token_embeddings
from ..core.images import ImageError, display_crop, image_from_bytes, open_rgb, to_pixels
from ..core.modalities import attention_from_weights, attention_inputs, tokenise
from ..core.models import info
from ..core.ov import copying_scores, effective_rank, ov_eigenvalues
from ..core.svd import QKSVD, null_band
from ..search import SearchResult
from .attention_figures import outline, overlay, view_mask
from .crossmodal_figures import attention_picture
from .mode_figures import mode_caption
from .render import jpeg_bytes, mosaic, normalize_map, render_mode, thumbnail


class Live(widgets.VBox):
    """A live explorer: a VBox of controls, captions and pictures redrawn by Python callbacks.

    ``controls``: input widgets by name (set their ``value`` to drive the explorer from code, as a click
    does); ``pictures``: the ``widgets.Image`` outputs by name; ``captions``: the HTML texts by name;
    ``message``: an HTML widget that shows what went wrong (empty when nothing did); ``seconds``: how long
    the last redraw took.
    """

    def __init__(self, children, controls: dict[str, widgets.Widget], pictures: dict[str, widgets.Image],
                 captions: dict[str, widgets.HTML], message: widgets.HTML, draw: Callable[[], None]):
        super().__init__(children)
        self.add_class("qk-live-explorer")
        self.controls, self.pictures, self.captions, self.message = controls, pictures, captions, message
        self.seconds = 0.0
        self._draw, self._held = draw, 0

    def redraw(self, _change=None) -> None:
        """Redraw from the controls' values; an error is shown in ``message`` (a callback's traceback would
        only reach the kernel's log, where nobody reads it)."""
        if self._held:
            return
        start = time.perf_counter()
        try:
            self._draw()
        except Exception as error:  # shown to the reader instead of vanishing into the log
            self.show_error(f"could not draw this view ({type(error).__name__}: {error})")
        else:
            self.message.value = ""
        self.seconds = time.perf_counter() - start

    def show_error(self, text: str) -> None:
        self.message.value = f'<span class="qk-live-error" style="color:#b00020">{html.escape(text)}</span>'

    @contextmanager
    def hold(self):
        """Set several controls at once with one redraw at the end."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        self.redraw()

    def watch(self, *controls: widgets.Widget) -> None:
        for control in controls:
            control.observe(self.redraw, names="value")


class _Cache(OrderedDict):
    """At most ``size`` computed values, least recently used dropped first."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, make: Callable):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


def _picture(class_name: str, width: int | None = None) -> widgets.Image:
    picture = widgets.Image(format="jpeg")
    picture.add_class(class_name)
    if width:
        picture.layout.width = f"{width}px"
    return picture


def _slider(name: str, high: int, value: int = 0) -> widgets.IntSlider:
    return widgets.IntSlider(value=min(value, high), min=0, max=high, description=name, continuous_update=False)


def _message() -> widgets.HTML:
    message = widgets.HTML("")
    message.add_class("qk-live-message")
    return message


def _models(models) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {info(models).name: models}
    if not models:
        raise ValueError("give a model or a {label: model} dict")
    return dict(models)


# ------------------------------------------------------------------------------------------------- §3
class _AttentionExplorer:
    """The state and callbacks of :func:`explore_attention`: the models, the scenes and images (``entries``:
    ``{name: (image, target mask or None, distractor mask or None)}``), two caches and the widgets."""

    def __init__(self, models: dict[str, nn.Module], entries: dict, size: int, quality: int):
        self.models, self.entries, self.size, self.quality = models, entries, size, quality
        self.attention = _Cache(6)  # (model, image) -> [L, H, T, T]; ~19 MB each for ViT-S/14
        self.views = _Cache(32)  # (model, image) -> view, outlines, masks, query tokens
        first = info(next(iter(models.values())))
        self.pick_model = widgets.Dropdown(options=list(models), description="model")
        self.pick_image = widgets.Dropdown(options=list(entries), description="image")
        self.layer, self.head = _slider("layer", first.num_layers - 1), _slider("head", first.num_heads - 1)
        self.row, self.col = _slider("query row", first.grid[0] - 1), _slider("query col", first.grid[1] - 1)
        self.to_target = widgets.Button(description="query on target")
        self.to_distractor = widgets.Button(description="query on distractor")
        self.caption, self.message, self.picture = widgets.HTML(), _message(), _picture("qk-live-picture", size)
        self.box = Live([self.pick_model, self.pick_image, self.layer, self.head, self.row, self.col,
                         widgets.HBox([self.to_target, self.to_distractor]), self.caption, self.message, self.picture],
                        {"model": self.pick_model, "image": self.pick_image, "layer": self.layer, "head": self.head,
                         "row": self.row, "col": self.col, "target": self.to_target, "distractor": self.to_distractor},
                        {"attention": self.picture}, {"caption": self.caption}, self.message, self.draw)

    def view(self, label: str, name: str):
        """The model's view at ``size`` px, the target and distractor outlines, token masks and query tokens."""
        model, (image, target, distractor), size = self.models[label], self.entries[name], self.size
        shown = np.asarray(Image.fromarray(display_crop(model, image)).resize((size, size), Image.Resampling.BILINEAR))
        if target is None:
            none = np.zeros((size, size), dtype=bool)
            return shown, (none, none), None, None
        masks = token_masks(model, [target], [distractor])
        queries, _ = query_tokens(masks, 0.0)
        edges = (outline(view_mask(model, target, size)), outline(view_mask(model, distractor, size)))
        return shown, edges, masks, queries[0].tolist()

    def draw(self) -> None:
        label, name = self.pick_model.value, self.pick_image.value
        model, meta = self.models[label], info(self.models[label])
        probs = self.attention.get((label, name), lambda: record(
            model, to_pixels(model, self.entries[name][0]), tokens=False, attention=True).attention[:, 0])
        shown, edges, masks, _ = self.views.get((label, name), lambda: self.view(label, name))
        query = self.row.value * meta.grid[1] + self.col.value
        rows = probs[self.layer.value, self.head.value, meta.prefix_tokens + query, meta.prefix_tokens:].double()
        rows = rows / rows.sum()
        self.picture.value = jpeg_bytes(overlay(shown, rows.reshape(meta.grid).numpy(), query, *edges), self.quality)
        where = f"<b>{html.escape(name)}</b>, {html.escape(label)}: layer {self.layer.value}, head {self.head.value}, " \
                f"query token row {self.row.value}, col {self.col.value}"
        if masks is not None:
            shares = (masks.stacked()[0].double() @ rows).tolist()
            where += " ({:.0%} on the target, {:.0%} on distractors, {:.0%} on background)".format(*shares)
        self.caption.value = where

    def fit_sliders(self, _change=None) -> None:
        meta = info(self.models[self.pick_model.value])
        with self.box.hold():
            self.layer.max, self.head.max = meta.num_layers - 1, meta.num_heads - 1
            self.row.max, self.col.max = meta.grid[0] - 1, meta.grid[1] - 1
            self.move_query(0)

    def move_query(self, which: int) -> None:
        """Put the query token on the scene's target (0) or first distractor (1); images without masks: nothing."""
        label, name = self.pick_model.value, self.pick_image.value
        _, _, _, queries = self.views.get((label, name), lambda: self.view(label, name))
        if queries is None:
            return
        grid_w = info(self.models[label]).grid[1]
        with self.box.hold():
            self.row.value, self.col.value = divmod(queries[which], grid_w)

    def on_image(self, _change) -> None:
        if self.entries[self.pick_image.value][1] is not None:
            self.move_query(0)
        else:
            self.box.redraw()


def explore_attention(models, scenes: Sequence = (), images: Mapping[str, Image.Image] | None = None, size: int = 320,
                      quality: int = 85) -> Live:
    """§3 live: any scene or image, model, layer and head; the query token by its row and column.

    ``models``: a model or ``{label: model}``; ``scenes``: O3-style samples (``id``, ``image``, ``target``,
    ``distractor`` masks), whose target is outlined red and distractors white; ``images``: more images
    ``{name: PIL image}``, without outlines. The picture is the query's attention over the image tokens
    (prefix tokens dropped, renormalised), with the share on target, distractors and background.
    """
    models = _models(models)
    entries = {sample.id: (sample.image, sample.target, sample.distractor) for sample in scenes}
    entries.update({name: (image, None, None) for name, image in (images or {}).items()})
    if not entries:
        raise ValueError("explore_attention needs at least one scene or image")
    explorer = _AttentionExplorer(models, entries, size, quality)
    box = explorer.box
    box.watch(explorer.layer, explorer.head, explorer.row, explorer.col)
    explorer.pick_model.observe(explorer.fit_sliders, names="value")
    explorer.pick_image.observe(explorer.on_image, names="value")
    explorer.to_target.on_click(lambda _button: explorer.move_query(0))
    explorer.to_distractor.on_click(lambda _button: explorer.move_query(1))
    if len(models) == 1:
        explorer.pick_model.layout.display = "none"
    explorer.fit_sliders()
    return box


# ------------------------------------------------------------------------------------------------- §4
def spectrum_figure(svd: QKSVD, layer: int, head: int, mode: int, band: float | None = None, dpi: int = 80,
                    cos: np.ndarray | None = None) -> Figure:
    """One head's singular spectrum (weights s_n / sum s), its cos_n = u_n . v_n with the null band, and the
    cosines of every mode of the layer (histogram), mode ``mode`` marked in red in each panel. Few artists
    (steps and lines, no bar per mode), so it draws in a fraction of a second. ``cos``: ``svd.cos`` as an
    ``[L, H, r]`` array when the caller keeps it (it is recomputed otherwise)."""
    band = null_band(svd.dim) if band is None else band
    weights = (svd.S[layer, head] / svd.S[layer, head].sum()).numpy()
    all_cos = svd.cos.numpy() if cos is None else cos
    cos, layer_cos = all_cos[layer, head], all_cos[layer].flatten()
    mean = float((weights * cos).sum())
    n = np.arange(len(cos))
    figure = Figure(figsize=(10.5, 2.8), dpi=dpi)
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.17, top=0.89, wspace=0.28)
    spectrum, cosine, context = figure.subplots(1, 3)
    spectrum.stairs(weights, np.arange(len(weights) + 1) - 0.5, fill=True, color="#9aa7b8")
    spectrum.stairs([weights[mode]], [mode - 0.5, mode + 0.5], fill=True, color="#d62728")
    spectrum.set(title=f"L{layer} H{head}: spectrum", xlabel="mode n", ylabel="s_n / sum s")
    cosine.axhspan(-band, band, color="0.85", label=f"null band ±{band:.3f}")
    cosine.plot(n, cos, ".", color="#4c72b0", markersize=4)
    cosine.plot([mode], [cos[mode]], "o", color="#d62728", markersize=7, label=f"M{mode}: {cos[mode]:+.3f}")
    cosine.axhline(mean, color="#4c72b0", linestyle="--", linewidth=1, label=f"weighted mean {mean:+.3f}")
    cosine.set(title="cos_n = u_n · v_n", xlabel="mode n", ylim=(-1, 1))
    cosine.legend(fontsize=7, loc="lower right")
    counts, edges = np.histogram(layer_cos, bins=40, range=(-1, 1))
    context.axvspan(-band, band, color="0.85")
    context.stairs(counts, edges, fill=True, color="#9aa7b8")
    context.axvline(cos[mode], color="#d62728", linewidth=2)
    context.set(title=f"every mode of layer {layer}", xlabel="cos_n", ylabel="modes")
    return figure


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def explore_spectrum(svds, band: float | None = None) -> Live:
    """§4 live: any model, layer, head and mode of ``svds`` (a :class:`~qklib.QKSVD` or ``{label: QKSVD}``): the head's
    spectrum and cos_n (:func:`spectrum_figure`) and the mode's cosine in words."""
    svds = {svds.model or "model": svds} if isinstance(svds, QKSVD) else dict(svds)
    cosines = {label: svd.cos.numpy() for label, svd in svds.items()}  # [L, H, r] each, computed once
    first = next(iter(svds.values()))
    pick_model = widgets.Dropdown(options=list(svds), description="model")
    layer, head, mode = (_slider("layer", first.num_layers - 1), _slider("head", first.num_heads - 1),
                         _slider("mode", first.rank - 1))
    caption, message, picture = widgets.HTML(), _message(), _picture("qk-live-picture")
    picture.format = "png"

    def draw():
        svd, all_cos, (l, h, n) = svds[pick_model.value], cosines[pick_model.value], (layer.value, head.value, mode.value)
        width = null_band(svd.dim) if band is None else band
        picture.value = figure_png(spectrum_figure(svd, l, h, n, width, cos=all_cos))
        weights = (svd.S[l, h] / svd.S[l, h].sum()).numpy()
        cos = float(all_cos[l, h, n])
        rank = int((all_cos[l, h] > cos).sum()) + 1
        share = float((all_cos[l] < cos).mean())
        verdict = ("inside the null band: no preference" if abs(cos) <= width else
                   "above the band: the mode groups tokens like each other" if cos > 0 else
                   "below the band: the mode links tokens with opposite features")
        caption.value = (f"<b>{html.escape(pick_model.value)}</b>, {mode_label(l, h, n)}: s = {float(svd.S[l, h, n]):.3g} "
                         f"({float(svd.S[l, h, n] / svd.S[l, h].sum()):.1%} of the head's sum), u<sub>n</sub> · v<sub>n</sub> = "
                         f"{cos:+.3f}, {verdict} (±{width:.3f}); rank {rank} of {svd.rank} in its head, above {share:.0%} "
                         f"of the layer's modes; head's weighted cosine {float((weights * all_cos[l, h]).sum()):+.3f}")

    def fit_sliders(_change=None):
        svd = svds[pick_model.value]
        with box.hold():
            layer.max, head.max, mode.max = svd.num_layers - 1, svd.num_heads - 1, svd.rank - 1

    box = Live([pick_model, layer, head, mode, caption, message, picture],
               {"model": pick_model, "layer": layer, "head": head, "mode": mode}, {"spectrum": picture},
               {"caption": caption}, message, draw)
    box.watch(layer, head, mode)
    pick_model.observe(fit_sliders, names="value")
    if len(svds) == 1:
        pick_model.layout.display = "none"
    box.redraw()
    return box


# ------------------------------------------------------------------------------------------------- §5
def ov_figure(svd: QKSVD, eigenvalues: np.ndarray, layer: int, head: int, dpi: int = 80) -> Figure:
    """One head's OV circuit: its singular spectrum ``s_n / s_1`` (log scale) and its r eigenvalues that can be
    nonzero in the complex plane, scaled by the largest modulus, positive real ones in red (what the copying
    score counts). ``eigenvalues``: ``qklib.core.ov.ov_eigenvalues`` as an ``[L, H, r]`` complex array."""
    s = (svd.S[layer, head] / svd.S[layer, head, 0]).numpy()
    lam = eigenvalues[layer, head] / np.abs(eigenvalues[layer, head]).max()
    copying = (lam.imag == 0) & (lam.real > 0)
    figure = Figure(figsize=(8.5, 3.0), dpi=dpi)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.17, top=0.88, wspace=0.3)
    spectrum, plane = figure.subplots(1, 2)
    spectrum.semilogy(np.arange(len(s)), s, color="#4c72b0")
    spectrum.set(title=f"L{layer} H{head}: OV spectrum", xlabel="mode n", ylabel="s_n / s_1")
    circle = np.linspace(0, 2 * np.pi, 200)
    plane.plot(np.cos(circle), np.sin(circle), color="0.8", linewidth=1)
    plane.axhline(0, color="0.8", linewidth=1)
    plane.axvline(0, color="0.8", linewidth=1)
    plane.plot(lam.real[~copying], lam.imag[~copying], ".", color="#4c72b0", markersize=5)
    plane.plot(lam.real[copying], lam.imag[copying], "o", color="#d62728", markersize=5, label="positive real")
    plane.set(title="eigenvalues / largest |lambda|", xlabel="real", ylabel="imaginary", aspect="equal",
              xlim=(-1.1, 1.1), ylim=(-1.1, 1.1))
    plane.legend(fontsize=7, loc="lower left")
    return figure


def explore_ov(ovs) -> Live:
    """§6 live: any model, layer and head of ``ovs`` (an ``ov_svd`` result or ``{label: QKSVD}``): the head's OV
    spectrum and eigenvalues (:func:`ov_figure`), with its effective rank and copying scores in words."""
    ovs = {ovs.model or "model": ovs} if isinstance(ovs, QKSVD) else dict(ovs)
    eigenvalues = {label: ov_eigenvalues(ov).numpy() for label, ov in ovs.items()}  # computed once
    copying = {label: (copying_scores(ov), copying_scores(ov, kind="real_part")) for label, ov in ovs.items()}
    first = next(iter(ovs.values()))
    pick_model = widgets.Dropdown(options=list(ovs), description="model")
    layer, head = _slider("layer", first.num_layers - 1), _slider("head", first.num_heads - 1)
    caption, message, picture = widgets.HTML(), _message(), _picture("qk-live-picture")
    picture.format = "png"

    def draw():
        ov, lam, (l, h) = ovs[pick_model.value], eigenvalues[pick_model.value], (layer.value, head.value)
        picture.value = figure_png(ov_figure(ov, lam, l, h))
        positive, real_part = (float(scores[l, h]) for scores in copying[pick_model.value])
        caption.value = (f"<b>{html.escape(pick_model.value)}</b>, L{l} H{h}: effective rank "
                         f"{float(effective_rank(ov.S[l, h])):.1f} of {ov.rank}; copying score {positive:.3f} "
                         f"(positive-real share of the eigenvalue mass), real-part ratio {real_part:+.3f}")

    def fit_sliders(_change=None):
        ov = ovs[pick_model.value]
        with box.hold():
            layer.max, head.max = ov.num_layers - 1, ov.num_heads - 1

    box = Live([pick_model, layer, head, caption, message, picture], {"model": pick_model, "layer": layer,
               "head": head}, {"ov": picture}, {"caption": caption}, message, draw)
    box.watch(layer, head)
    pick_model.observe(fit_sliders, names="value")
    if len(ovs) == 1:
        pick_model.layout.display = "none"
    box.redraw()
    return box


def _upload_files(value) -> list[tuple[str, bytes]]:
    """``[(name, bytes)]`` from a FileUpload value (ipywidgets 8: a tuple of dicts with ``name``, ``content``)."""
    return [(str(item.get("name", "upload")), bytes(item.get("content", b""))) for item in value or ()]


class _ModeExplorer:
    """The state and callbacks of :func:`explore`: the model and its SVD, the images (``{name: PIL image or file}``,
    uploads added), the saved search, three caches and the widgets."""

    def __init__(self, model, svd: QKSVD, images: dict, found: SearchResult | None, top: int, size: int, thumb: int,
                 quality: int):
        self.model, self.svd, self.images, self.found = model, svd, images, found
        self.top, self.size, self.thumb, self.quality = top, size, thumb, quality
        self.meta = info(model)
        self.opened = _Cache(64)  # name or search path -> PIL image
        self.tokens = _Cache(512)  # (image key, layer) -> [T, d]; ~0.4 MB each for ViT-S/14
        self.crops = _Cache(64)  # image key -> the model's view, [S, S, 3] uint8
        self.cosines = svd.cos  # [L, H, r], computed once
        searched = found.layers if found is not None else []
        self.pick = widgets.Dropdown(options=list(images), description="image")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="your image",
                                         tooltip="draw the mode on an image of yours (PNG, JPEG, ...)")
        self.upload.layout.width = "auto"
        self.layer = _slider("layer", svd.num_layers - 1, searched[0] if searched else 0)
        self.head, self.mode = _slider("head", svd.num_heads - 1), _slider("mode", svd.rank - 1)
        self.sign = widgets.ToggleButtons(options=[("+", 1), ("-", -1)], description="sign")
        self.caption, self.optimal_caption, self.message = widgets.HTML(), widgets.HTML(), _message()
        self.picture, self.optimal = _picture("qk-live-picture", size), _picture("qk-live-optimal")
        self.box = Live([widgets.HBox([self.pick, self.upload]), self.layer, self.head, self.mode, self.sign,
                         self.caption, self.message, self.picture, self.optimal_caption, self.optimal],
                        {"image": self.pick, "upload": self.upload, "layer": self.layer, "head": self.head,
                         "mode": self.mode, "sign": self.sign},
                        {"image": self.picture, "optimal": self.optimal},
                        {"caption": self.caption, "optimal": self.optimal_caption}, self.message, self.draw)

    def image(self, key: str) -> Image.Image:
        value = self.images[key] if key in self.images else key
        return value if isinstance(value, Image.Image) else self.opened.get(key, lambda: open_rgb(value))

    def layer_tokens(self, keys: list[str], l: int) -> torch.Tensor:
        """``[B, T, d]`` for images ``keys`` (names of ``images`` or search paths) at layer ``l``, the missing ones
        computed in one batch."""
        missing = [key for key in keys if (key, l) not in self.tokens]
        if missing:
            pixels = to_pixels(self.model, [self.image(key) for key in missing])
            computed = token_embeddings(self.model, pixels, layers=[l])[0]
            for key, x in zip(missing, computed):
                self.tokens.get((key, l), lambda x=x: x)
        return torch.stack([self.tokens.get((key, l), None) for key in keys])

    def pictures(self, keys: list[str], l: int, h: int, n: int, s: int) -> list[np.ndarray]:
        query, key = mode_maps(self.svd, self.layer_tokens(keys, l), l, h, n, self.meta.prefix_tokens, s,
                               self.meta.grid)
        views = [self.crops.get(k, lambda k=k: display_crop(self.model, self.image(k))) for k in keys]
        return [render_mode(view, q, kk) for view, q, kk in zip(views, query, key)]

    def draw(self) -> None:
        l, h, n, s = self.layer.value, self.head.value, self.mode.value, self.sign.value
        main = self.pictures([self.pick.value], l, h, n, s)[0]
        resized = Image.fromarray(main).resize((self.size, self.size), Image.Resampling.LANCZOS)
        self.picture.value = jpeg_bytes(np.asarray(resized), self.quality)
        self.caption.value = (f"<b>{html.escape(self.pick.value)}</b>, {mode_label(l, h, n, s)}: query map red, key "
                              f"map cyan; s = {float(self.svd.S[l, h, n]):.3g}, cos = {float(self.cosines[l, h, n]):+.3f}")
        self.draw_optimal(l, h, n, s)

    def draw_optimal(self, l: int, h: int, n: int, s: int) -> None:
        """The mode's ``top`` optimal images from the saved search, or why there are none."""
        found, label = self.found, mode_label(l, h, n, s)
        if found is None:
            best, why = [], "no saved search given"
        elif l in found.layers and h in found.heads and n in found.modes:
            best, why = found.top(l, h, n, s)[: self.top], "no gallery image scored above 0"
        else:
            best, why = [], (f"{label} was not searched (searched layers {found.layers}, heads {found.heads}, "
                             f"modes {found.modes[0]}..{found.modes[-1]})")
        if not best:
            self.optimal.layout.display = "none"
            self.optimal_caption.value = f"Optimal images: {html.escape(why)}."
            return
        keys = [str(found.path(name)) for name, _ in best]
        thumbs = [thumbnail(p, self.thumb) for p in self.pictures(keys, l, h, n, s)]
        self.optimal.value = jpeg_bytes(mosaic(thumbs, columns=len(thumbs)), self.quality)
        self.optimal.layout.display = ""
        self.optimal_caption.value = (
            f"Optimal images of {label} in the saved search ({found.n_images} images), best first: "
            + ", ".join(f"{html.escape(Path(name).stem)} ({score:.3g})" for name, score in best))

    def on_upload(self, change) -> None:
        files = _upload_files(change["new"])
        if not files:
            return
        name, data = files[-1]
        try:
            uploaded = image_from_bytes(data, name)
        except ImageError as error:
            self.box.show_error(f"Upload {error}")
        else:
            key = f"upload: {name}"
            self.images[key] = uploaded
            for stale in [k for k in self.tokens if k[0] == key]:
                del self.tokens[stale]
            self.crops.pop(key, None)
            with self.box.hold():
                self.pick.options = list(self.images)
                self.pick.value = key
        self.upload.value = ()  # the same file can be uploaded again


def explore(model, svd: QKSVD, images: Mapping[str, Image.Image | str | Path], found: SearchResult | None = None,
            top: int = 4, size: int = 320, thumb: int = 160, quality: int = 85) -> Live:
    """§5 live: any layer, head, mode and sign on any of ``images`` ({name: PIL image or image file, opened when
    first shown}) or on an image the reader uploads; with ``found`` (a saved search of the same model), the
    mode's ``top`` optimal images drawn the same way.

    An upload that is not an image shows its reason in ``message``; the explorer keeps its last picture.
    """
    images = dict(images)
    if not images:
        raise ValueError("explore needs at least one image")
    explorer = _ModeExplorer(model, svd, images, found, top, size, thumb, quality)
    box = explorer.box
    box.watch(explorer.pick, explorer.layer, explorer.head, explorer.mode, explorer.sign)
    explorer.upload.observe(explorer.on_upload, names="value")
    box.redraw()
    return box


def explore_text(models: dict, svds: dict[str, QKSVD], text: str = "The quick brown fox jumps over the lazy "
                 "dog. It was not amused.") -> widgets.VBox:
    """§7 live: type any English text; for a text model, layer, head and mode, the head's attention map on it and
    the mode's best token pair (query on red, key on cyan) in the text."""

    first = next(iter(svds.values()))
    pick_model = widgets.Dropdown(options=list(models), description="model")
    box_text = widgets.Textarea(value=text, description="text", layout=widgets.Layout(width="100%"))
    layer, head = _slider("layer", first.num_layers - 1), _slider("head", first.num_heads - 1)
    mode = _slider("mode", first.rank - 1)
    caption, message, picture = widgets.HTML(), _message(), _picture("qk-live-picture")
    weights = {label: weights_of(model) for label, model in models.items()}

    def draw():
        model, svd = models[pick_model.value], svds[pick_model.value]
        tokens = tokenise(model, box_text.value)
        x = attention_inputs(model, tokens)
        l, h, n = layer.value, head.value, mode.value
        maps = attention_from_weights(weights[pick_model.value], x)[l, h]
        u, v = svd.U[l, h, :, n], svd.V[l, h, :, n]
        xq = x[l].to(u)
        picture.value = jpeg_bytes(attention_picture(maps, normalize_map(xq @ u), normalize_map(xq @ v)))
        pair = best_pair(x[l], u, float(svd.S[l, h, n]), v)
        caption.value = (f"{mode_caption(svd, l, h, n, pair.sign)}: best pair "
                         + snippet_html(list(tokens.tokens), pair.query, pair.key, context=30))

    box = Live([pick_model, box_text, layer, head, mode, caption, message, picture],
               {"model": pick_model, "text": box_text, "layer": layer, "head": head, "mode": mode},
               {"attention": picture}, {"caption": caption}, message, draw)
    box.watch(pick_model, box_text, layer, head, mode)
    if len(models) == 1:
        pick_model.layout.display = "none"
    box.redraw()
    return box
