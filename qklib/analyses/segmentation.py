"""Training-free segmentation from a ViT's tokens: the QK modes against the established methods (§8, issue 26).

The paper's §5 finds that early-layer modes put a query feature and a key feature on the same object. If so,
the modes alone should group an image's tokens into objects. :func:`segment` turns them into a segmenter and
runs four methods from the literature on the same tokens:

* ``"modes"``: each head's attention restricted to its grouping modes (cos_n > 0), symmetrised and averaged
  over heads, cut spectrally (:func:`mode_affinity`); default layer: early, ``round(0.1 (L - 1))``.
* ``"kmeans"``: k-means on the layer's unit-norm token embeddings; default layer ``L - 1``.
* ``"tokencut"``: the normalised cut of the key-key cosine graph (TokenCut, Wang et al. 2022; beyond two
  segments the graph Laplacian's eigenvectors clustered, Deep Spectral Methods, Melas-Kyriazi et al. 2022),
  keys centred (below); default layer ``L - 1``.
* ``"cls_attention"``: the class token's attention averaged over heads and thresholded (DINO, Caron et al.
  2021); default layer ``L - 1``.
* ``"grid"``: a regular grid of ``n_segments`` cells, the floor; no forward pass.

Every method sees the same tokens: the whole image resized to the model's square input (no centre crop, so
every pixel gets a label; the aspect ratio is not kept), one forward pass, the image tokens of one layer on
the model's token grid (16 x 16 for the embedded ViT-S/14 at 224 px). "Layer l" means, as everywhere in qklib,
what enters block l: its normed input tokens (what W_q and W_k see), its keys and its attention. Labels on the
grid are brought to the image's own size by nearest neighbour. Every method returns at most ``n_segments``
segments (k-means can find fewer on images with fewer distinct tokens).

The defaults of the baselines follow their papers (the last layer, as TokenCut, DINO's attention maps and
Deep Spectral Methods take it). One deviation, an option: TokenCut's graph joins keys whose cosine exceeds 0.2,
set for DINO's keys; the embedded DINOv2's keys share a large common part (median cosine 0.97 at its last
layer, 0.98 at its first, biases included), so that graph is complete and its cut is noise. ``centre=True`` (default)
subtracts the image's mean key first, which the softmax would discard too (a constant key offset adds a
per-query constant to the scores), so 0.2 again means "similar"; ``centre=False`` is TokenCut as published.
The modes' default is the project's "early" depth (``qklib.analyses.modes.RULE_DEPTHS[0]``, layer 1 of 12), where §3
and §5 find attention and modes on the same object; on 24 generated scenes of seed 1 (which the chapter does
not use for its numbers) layers 0, 1 and the last did best and the middle layers worst.

:class:`Segmenter` keeps one model's SVD and runs many images and layers from one forward pass (the chapter);
:func:`segment` is the one-call form.
"""

from __future__ import annotations

import difflib
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.transforms import functional as TF

from ..core.datasets.ade20k import load_ade20k
from ..core.datasets.o3 import generate_scenes, load_o3
from ..core.datasets.voc import load_voc
from ..core.extract import record
from ..core.models import info
from ..core.stats import RESAMPLES, Interval, bootstrap
from ..core.svd import QKSVD, QKWeights, append_one, one_thread, qk_svd_from_weights, qk_weights
from .modes import RULE_DEPTHS, rule_layers


class SegmentError(ValueError):
    """A segmentation request that cannot be served; the message says what to change."""


# --- inputs -----------------------------------------------------------------------------------------------

def as_image(image) -> Image.Image:
    """A PIL image, or an ``[H, W, 3]`` (or ``[H, W]`` grey) uint8 array, as an RGB PIL image; anything else is
    refused with a TypeError or SegmentError saying what is accepted."""
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise SegmentError(f"the image is empty ({image.width} x {image.height} px)")
        return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL image or an [H, W, 3] uint8 numpy array, got {type(image).__name__}; "
                        "open files with qklib.core.images.open_rgb(path)")
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise SegmentError(f"an image array must be [H, W, 3] (or [H, W]) uint8, got {image.dtype} of shape "
                           f"{image.shape}; convert floats in [0, 1] with (array * 255).round().astype(np.uint8)")
    if min(image.shape[:2]) < 1:
        raise SegmentError(f"the image is empty (shape {image.shape})")
    return Image.fromarray(image).convert("RGB")


def whole_image_pixels(model: nn.Module, images: Sequence[Image.Image]) -> torch.Tensor:
    """``[B, 3, S, S]``: each whole image resized (bicubic) to the model's square input and normalised with the
    model's mean and std. Unlike the model's eval transform there is no centre crop, so the token grid covers
    every pixel and labels can be drawn back over the full image."""
    config = timm.data.resolve_data_config({}, model=model)
    size = info(model).img_size
    tensors = [TF.to_tensor(image.resize((size, size), Image.Resampling.BICUBIC)) for image in images]
    return TF.normalize(torch.stack(tensors), config["mean"], config["std"])


def upsample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[rows, cols]`` token labels -> ``[height, width]`` by nearest neighbour: pixel ``(y, x)`` takes the label
    of the token whose cell holds its centre, ``floor((y + 1/2) rows / height)``."""
    rows, cols = labels.shape
    ys = np.minimum(((np.arange(height) + 0.5) * rows / height).astype(np.int64), rows - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * cols / width).astype(np.int64), cols - 1)
    return labels[ys[:, None], xs[None, :]]


# --- clustering -------------------------------------------------------------------------------------------

def kmeans(points, k: int, seed: int = 0, restarts: int = 4, iterations: int = 100) -> np.ndarray:
    """``[N]`` cluster of each of ``points [N, D]`` by Lloyd's k-means from k-means++ seeds, the best of
    ``restarts`` runs by inertia (sum of squared distances to the centres). Fewer than ``k`` clusters when the
    points have fewer distinct values. Runs on one torch thread: the matrices are small, and BLAS threads on a
    busy machine cost more than they save."""
    x = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    rng = np.random.default_rng(seed)
    norms = (x**2).sum(1)
    best, best_inertia = torch.zeros(len(x), dtype=torch.long), math.inf
    with one_thread():
        for _ in range(restarts):
            labels, inertia = _lloyd(x, norms, _plus_plus(x, norms, k, rng), iterations)
            if inertia < best_inertia - 1e-12:
                best, best_inertia = labels, inertia
    return best.numpy()


def _squared_distances(x: torch.Tensor, norms: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return (norms[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None]).clamp_min(0)


def _lloyd(x: torch.Tensor, norms: torch.Tensor, centres: torch.Tensor, iterations: int) -> tuple[torch.Tensor, float]:
    labels = None
    for _ in range(iterations):
        distances = _squared_distances(x, norms, centres)
        new = distances.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=len(centres))
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        keep = counts > 0  # a centre that lost all its points is dropped
        centres = sums[keep] / counts[keep, None]
        labels = torch.cumsum(keep, 0)[labels] - 1
    return labels, float(distances.gather(1, distances.argmin(1, keepdim=True)).sum())


def _plus_plus(x: torch.Tensor, norms: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k-means++ seeds (Arthur & Vassilvitskii 2007); stops early when every point coincides with a seed."""
    centres = x[[int(rng.integers(len(x)))]]
    nearest = _squared_distances(x, norms, centres)[:, 0]
    while len(centres) < k and float(nearest.sum()) > 1e-12 * max(float(norms.max()), 1e-300):
        weights = nearest.numpy() / float(nearest.sum())
        chosen = x[[int(rng.choice(len(x), p=weights))]]
        centres = torch.cat([centres, chosen])
        nearest = torch.minimum(nearest, _squared_distances(x, norms, chosen)[:, 0])
    return centres


def spectral_labels(affinity: np.ndarray, n_segments: int, seed: int = 0) -> np.ndarray:
    """``[N]`` segments of a symmetric non-negative ``affinity [N, N]`` by its normalised graph Laplacian.

    Two segments: the normalised cut of Shi & Malik as TokenCut takes it, the second eigenvector ``y`` of
    ``(D - A) y = lambda D y`` split at its mean; the side holding the largest ``|y|`` (TokenCut's seed) is 1.
    More: the ``n_segments`` leading eigenvectors of ``D^-1/2 A D^-1/2`` with unit rows, clustered by k-means
    (Ng, Jordan & Weiss 2001; Deep Spectral Methods). The eigenvectors of ``D^-1/2 A D^-1/2`` with the largest
    eigenvalues are those of the normalised Laplacian with the smallest, and ``y = D^-1/2 z``.
    """
    a = torch.as_tensor(np.asarray(affinity), dtype=torch.float64)
    if n_segments == 1:
        return np.zeros(len(a), np.int64)
    inv_sqrt = a.sum(1).clamp_min(1e-300).rsqrt()
    with one_thread():
        _, vectors = torch.linalg.eigh(inv_sqrt[:, None] * a * inv_sqrt[None])  # ascending eigenvalues
    leading = vectors.flip(1)[:, :n_segments]
    if n_segments == 2:
        fiedler = (inv_sqrt * leading[:, 1]).numpy()
        side = fiedler > fiedler.mean()
        return (side == side[np.abs(fiedler).argmax()]).astype(np.int64)
    return kmeans(leading / leading.norm(dim=1, keepdim=True).clamp_min(1e-300), n_segments, seed)


def first_seen_order(labels: np.ndarray) -> np.ndarray:
    """Relabel ``0, 1, ...`` in raster order of first appearance, so equal partitions get equal labels."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(labels.shape)]


# --- the methods, on one layer's tokens ------------------------------------------------------------------

@dataclass
class LayerTokens:
    """What block ``layer`` sees of one image.

    ``tokens``: ``[T, d]`` normed tokens entering the block (prefix tokens first); ``attention``: ``[H, T, T]``
    its attention probabilities (rows: queries), or None when not recorded; ``grid``: ``(rows, cols)`` of the
    ``N = rows * cols`` image tokens.
    """

    layer: int
    tokens: torch.Tensor
    attention: torch.Tensor | None
    prefix: int
    grid: tuple[int, int]

    @property
    def image_tokens(self) -> torch.Tensor:
        """``[N, d]`` float64, the prefix tokens dropped."""
        return self.tokens[self.prefix:].to(torch.float64)


def grid_labels(rows: int, cols: int, n_segments: int) -> np.ndarray:
    """``[rows, cols]``: exactly ``n_segments`` near-square cells. The grid is cut into ``b`` bands of rows, with
    ``b`` near ``sqrt(n rows / cols)``, and the bands into ``n // b`` or ``n // b + 1`` cells of columns."""
    bands = min(max(round(math.sqrt(n_segments * rows / cols)), math.ceil(n_segments / cols), 1), n_segments, rows)
    cells = [n_segments // bands + (band < n_segments % bands) for band in range(bands)]
    labels = np.empty((rows, cols), np.int64)
    first = 0
    for band, count in enumerate(cells):
        top, bottom = rows * band // bands, rows * (band + 1) // bands
        labels[top:bottom] = first + np.arange(cols) * count // cols
        first += count
    return labels


def mode_affinity(svd: QKSVD, tokens: torch.Tensor, layer: int, cos_min: float | None = 0.0,
                  scale: float | None = None, modes: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """``[N, N]`` affinity between image tokens from the grouping modes of every head of ``layer``.

    ``tokens``: ``[N, d]`` image tokens entering block ``layer``. For head h with modes ``(u_n, s_n, v_n)``, keep
    the set G_h of modes with ``cos_n = u_n . v_n > cos_min`` (``modes``: a bool ``[H, r]`` mask instead, e.g.
    the modes §5's same-object statistics pick; ``cos_min=None``: every mode, the head's whole bias-free score),
    and form the head's attention from those modes alone,

        P^h_ij = softmax_j( scale * sum_{n in G_h} (x_i . u_n) s_n (v_n . x_j) ),

    with the model's own ``scale = 1 / sqrt(d_k)``. The affinity is ``W = mean_h (P^h + P^h^T) / 2`` over the
    heads with at least one kept mode.

    Why this form: a mode with cos_n > 0 raises the score between tokens whose query and key projections agree
    in sign, i.e. it groups tokens that share its feature (§4.2); §5 finds such modes fall on one object. Their
    terms, weighted by s_n exactly as they enter the score, are what the head would attend to with grouping
    alone; the softmax turns scores into comparable per-query distributions (a mode's large s_n on a few tokens
    does not swamp the rest), and symmetrising makes a graph a normalised cut can split. Modes with cos_n <= 0
    pull a query towards tokens unlike itself (§4.2's contextualising modes), so they are left out by default.
    Whether that matters is measured, not assumed: on 24 generated scenes of seed 1 the embedded model scored
    within 0.01 mean IoU with and without them (layer 1: 0.137 kept, 0.142 all; layer 11: 0.165, 0.171), so
    there the grouping selection is not what makes the segmenter work; the chapter shows the comparison.
    """
    x = tokens.to(torch.float64)
    s = svd.S[layer].to(torch.float64)  # [H, r]
    keep = _mode_mask(svd, layer, cos_min, modes)
    used = keep.any(1)
    if not bool(used.any()):
        raise SegmentError(f"no mode of layer {layer} passes the selection (largest cos_n there is "
                           f"{float(svd.cos[layer].max()):.3f}); lower cos_min or pass cos_min=None for every mode")
    query = torch.einsum("nd,hdr->hnr", x, svd.U[layer].to(torch.float64)) * (s * keep)[:, None]
    key = torch.einsum("nd,hdr->hnr", x, svd.V[layer].to(torch.float64))
    factor = svd.rank**-0.5 if scale is None else float(scale)
    attention = torch.softmax(factor * (query[used] @ key[used].mT), dim=-1)  # [H', N, N]
    return ((attention + attention.mT) / 2).mean(0).numpy()


def _mode_mask(svd: QKSVD, layer: int, cos_min: float | None, modes) -> torch.Tensor:
    shape = tuple(svd.S[layer].shape)
    if modes is not None:
        mask = torch.as_tensor(np.asarray(modes), dtype=torch.bool)
        if tuple(mask.shape) != shape:
            raise SegmentError(f"modes must be a bool mask of shape [heads, modes] = {list(shape)}, got {list(mask.shape)}")
        return mask
    if cos_min is None:
        return torch.ones(shape, dtype=torch.bool)
    return svd.cos[layer] > float(cos_min)


def attention_levels(weights: np.ndarray, n_segments: int, mass: float = 0.6) -> np.ndarray:
    """``[N]`` levels of a token weighting (the class token's attention). Two segments: DINO's rule, the fewest
    tokens holding ``mass`` of the total weight are foreground (1), the rest background (0). More: equal-count
    quantile bins, 0 the least attended."""
    weights = np.asarray(weights, np.float64)
    count = len(weights)
    if n_segments == 1:
        return np.zeros(count, np.int64)
    order = np.argsort(-weights, kind="stable")
    if n_segments == 2:
        cumulative = np.cumsum(weights[order]) / weights.sum()
        foreground = min(int(np.searchsorted(cumulative, mass)) + 1, count)
        labels = np.zeros(count, np.int64)
        labels[order[:foreground]] = 1
        return labels
    ranks = np.empty(count, np.int64)
    ranks[order[::-1]] = np.arange(count)
    return ranks * n_segments // count


def _modes(segmenter, view: LayerTokens, n_segments: int, cos_min: float | None = 0.0, scale: float | None = None,
           modes=None, seed: int = 0) -> np.ndarray:
    svd, index = segmenter.layer_modes(view.layer)
    affinity = mode_affinity(svd, view.image_tokens, index, cos_min, scale, modes)
    return spectral_labels(affinity, n_segments, seed)


def _kmeans(segmenter, view: LayerTokens, n_segments: int, seed: int = 0, restarts: int = 4) -> np.ndarray:
    # Unit-norm tokens: k-means then groups by direction (cosine), as the feature-clustering baselines do.
    x = view.image_tokens.numpy()
    return kmeans(x / np.linalg.norm(x, axis=1, keepdims=True), n_segments, seed, restarts)


def _tokencut(segmenter, view: LayerTokens, n_segments: int, tau: float = 0.2, eps: float = 1e-5,
              centre: bool = True, seed: int = 0) -> np.ndarray:
    # TokenCut's graph: keys of all heads (biases included, as the model computes them), edge 1 where their cosine
    # exceeds tau, else eps (Wang et al. 2022, tau = 0.2). centre: subtract the image's mean key first (module
    # docstring).
    wk = segmenter.weights.wk[view.layer]  # [H, d_k, d + 1]
    keys = append_one(view.image_tokens) @ wk.reshape(-1, wk.shape[-1]).T
    if centre:
        keys = keys - keys.mean(0)
    keys = keys / keys.norm(dim=1, keepdim=True)
    cosine = (keys @ keys.T).numpy()
    return spectral_labels(np.where(cosine > tau, 1.0, eps), n_segments, seed)


def _cls_attention(segmenter, view: LayerTokens, n_segments: int, mass: float = 0.6) -> np.ndarray:
    if view.prefix < 1:
        raise SegmentError(f"{segmenter.info.name} has no class token, so method='cls_attention' does not apply; "
                           "use another method")
    rows = view.attention[:, 0, view.prefix:].to(torch.float64)  # [H, N]: the class token's query row
    return attention_levels((rows / rows.sum(1, keepdim=True)).mean(0).numpy(), n_segments, mass)


def _grid(segmenter, view: LayerTokens, n_segments: int) -> np.ndarray:
    return grid_labels(*view.grid, n_segments).ravel()


@dataclass(frozen=True)
class Method:
    """One segmenter: ``run(segmenter, view, n_segments, **options) -> [N]`` labels; its default layer as a
    function of the model's layer count; whether it needs the attention probabilities or a forward pass; whether
    its labels carry meaning (``ordered``: kept as they are) or are arbitrary cluster ids (renumbered in raster
    order of first appearance)."""

    run: Callable
    default_layer: Callable[[int], int]
    attention: bool = False
    forward: bool = True
    ordered: bool = False


METHODS: dict[str, Method] = {
    "modes": Method(_modes, lambda layers: rule_layers(layers, RULE_DEPTHS[:1])[0]),
    "kmeans": Method(_kmeans, lambda layers: layers - 1),
    "tokencut": Method(_tokencut, lambda layers: layers - 1),
    "cls_attention": Method(_cls_attention, lambda layers: layers - 1, attention=True, ordered=True),
    "grid": Method(_grid, lambda layers: 0, forward=False, ordered=True),
}


# --- the segmenter ---------------------------------------------------------------------------------------

def _method(method: str) -> Method:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SegmentError(f"unknown segmentation method {method!r}; {hint}choose one of {', '.join(METHODS)}")
    return METHODS[method]


def _check_options(method: str, options: dict) -> None:
    parameters = list(inspect.signature(METHODS[method].run).parameters)[3:]
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise SegmentError(f"method {method!r} takes no option(s) {', '.join(unknown)}; its options are "
                           f"{', '.join(parameters) or 'none'}")


class Segmenter:
    """One model's segmenters, its modes and key weights computed once (``svd``: a precomputed
    :func:`qklib.qk_svd` of the model in the raw basis, to skip that).

    ``segmenter(image, n_segments, method, layer)`` is :func:`segment`; for many images and layers,
    :meth:`observe` runs one forward pass per batch and :meth:`token_labels` segments each view.
    """

    def __init__(self, model: nn.Module, svd: QKSVD | None = None):
        self.model, self.info = model, info(model)
        if svd is not None and (svd.fold_gamma or svd.with_bias or svd.num_layers != self.info.num_layers
                                or svd.dim != self.info.dim):
            raise SegmentError("svd must be qklib.qk_svd(model) of this model in the raw basis (no fold_gamma, "
                               "no with_bias): the modes act on the tokens entering each block")
        self._svd, self._weights, self._layer_svds = svd, None, {}

    def layer_modes(self, layer: int) -> tuple[QKSVD, int]:
        """``(svd, index)``: the modes of ``layer`` are ``svd``'s layer ``index``. Without a full SVD given, only that
        layer's heads are decomposed (once; a twelfth of :func:`qklib.qk_svd`'s work on a 12-layer model)."""
        if self._svd is not None:
            return self._svd, layer
        if layer not in self._layer_svds:
            w = self.weights  # [W | b] per head: the last column is the bias, left out of the modes as in the paper
            raw = QKWeights(wq=w.wq[layer: layer + 1, ..., :-1], wk=w.wk[layer: layer + 1, ..., :-1])
            self._layer_svds[layer] = qk_svd_from_weights(raw, self.info.name)
        return self._layer_svds[layer], 0

    @property
    def weights(self) -> QKWeights:
        """Per-head ``[W | b]`` of queries and keys (``qk_weights(with_bias=True)``), for the keys TokenCut uses."""
        if self._weights is None:
            self._weights = qk_weights(self.model, with_bias=True)
        return self._weights

    def default_layer(self, method: str) -> int:
        """The layer ``method`` uses when none is given (see the module docstring)."""
        return _method(method).default_layer(self.info.num_layers)

    def default_layers(self) -> dict[str, int | None]:
        """``{method: its default layer}``, None for the grid (no layer): the keys of :func:`evaluate`'s rows."""
        return {method: self.default_layer(method) if chosen.forward else None for method, chosen in METHODS.items()}

    def observe(self, images: Sequence, layers: Sequence[int], attention: bool = True) -> list[dict[int, LayerTokens]]:
        """One forward pass over ``images`` (PIL or uint8 arrays; whole images, see :func:`whole_image_pixels`):
        for each image, ``{layer: LayerTokens}``. ``attention=False`` skips the attention probabilities
        (every method but ``cls_attention`` runs without them)."""
        layers = [int(layer) for layer in layers]
        recorded = record(self.model, whole_image_pixels(self.model, [as_image(i) for i in images]),
                          tokens=True, attention=attention, layers=layers)
        return [{layer: LayerTokens(layer, recorded.tokens[i, b], recorded.attention[i, b] if attention else None,
                                    recorded.prefix_tokens, self.info.grid) for i, layer in enumerate(layers)}
                for b in range(recorded.tokens.shape[1])]

    def token_labels(self, view: LayerTokens | None, n_segments: int, method: str = "modes", **options) -> np.ndarray:
        """``[rows, cols]`` int64 labels on the token grid for one :class:`LayerTokens` (None for ``"grid"``)."""
        chosen = _method(method)
        _check_options(method, options)
        self.check_segments(n_segments)
        if view is None:
            if chosen.forward:
                raise SegmentError(f"method {method!r} needs a view of the tokens; get one from Segmenter.observe")
            view = LayerTokens(0, torch.empty(0), None, self.info.prefix_tokens, self.info.grid)
        if chosen.attention and view.attention is None:
            raise SegmentError(f"method {method!r} needs the attention probabilities: observe with attention=True")
        with one_thread():  # [N, N] matrices of a few hundred tokens: threads cost more than they save
            labels = chosen.run(self, view, n_segments, **options).reshape(view.grid)
        return labels if chosen.ordered else first_seen_order(labels)

    def check_segments(self, n_segments) -> None:
        rows, cols = self.info.grid
        if isinstance(n_segments, bool) or not isinstance(n_segments, int | np.integer) or not 1 <= n_segments <= rows * cols:
            raise SegmentError(f"n_segments must be an integer from 1 to {rows * cols} (the model's {rows} x {cols} "
                               f"image tokens), got {n_segments!r}")

    def __call__(self, image, n_segments: int, method: str = "modes", layer: int | None = None, **options) -> np.ndarray:
        chosen = _method(method)
        _check_options(method, options)
        self.check_segments(n_segments)
        picture = as_image(image)
        layer = chosen.default_layer(self.info.num_layers) if layer is None else layer
        view = self.observe([picture], [layer], chosen.attention)[0][layer] if chosen.forward else None
        return upsample_labels(self.token_labels(view, n_segments, method, **options), picture.height, picture.width)


def segment(model: nn.Module, image, n_segments: int, method: str = "modes", layer: int | None = None,
            svd: QKSVD | None = None, **options) -> np.ndarray:
    """``[H, W]`` int64 segment labels (0, 1, ...) of ``image`` at its own size, from one layer's tokens.

    ``image``: a PIL image or an ``[H, W, 3]`` uint8 array. ``n_segments``: at most this many segments, from 1
    to the number of image tokens. ``method``: ``"modes"`` (the QK modes, :func:`mode_affinity`), ``"kmeans"``,
    ``"tokencut"``, ``"cls_attention"`` or ``"grid"`` (see the module docstring). ``layer``: the block whose
    input tokens are used (0-based; default per method, :meth:`Segmenter.default_layer`). ``svd``: the model's
    :func:`qklib.qk_svd`, if already computed. ``options`` go to the method: ``modes``: ``cos_min`` (0.0; None
    keeps every mode), ``scale`` (1/sqrt(d_k)), ``modes`` (a bool [H, r] mask), ``seed``; ``kmeans``: ``seed``,
    ``restarts``; ``tokencut``: ``tau`` (0.2), ``eps`` (1e-5), ``seed``; ``cls_attention``: ``mass`` (0.6).

    Labels of ``"cls_attention"`` are ordered (1 = foreground for two segments; quantile levels beyond, 0 the
    least attended); the others are numbered in raster order of first appearance.
    """
    return Segmenter(model, svd)(image, n_segments, method, layer, **options)


# --- metrics ---------------------------------------------------------------------------------------------

def _regions(masks, shape: tuple[int, int], background: bool, ignore) -> tuple[np.ndarray, np.ndarray]:
    """``(regions [K, P] bool, valid [P] bool)`` over the ``P = H * W`` pixels from an integer label map
    (``background``: label 0 is a region too; negative labels are void) or a stack of bool masks ``[K, H, W]``."""
    array = np.asarray(masks)
    if array.dtype != bool and array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
        if array.shape != shape:
            raise SegmentError(f"the label map is {array.shape} but the segmentation is {shape}; give both at one size")
        flat = array.ravel()
        ids = np.unique(flat[flat >= (0 if background else 1)])
        regions, valid = flat[None] == ids[:, None], flat >= 0
    elif array.dtype == bool and array.ndim == 3:
        if array.shape[1:] != shape:
            raise SegmentError(f"the masks are {array.shape[1:]} but the segmentation is {shape}; give both at one size")
        regions, valid = array.reshape(len(array), -1), np.ones(array[0].size, bool)
    else:
        raise SegmentError(f"ground truth must be an integer label map [H, W] (negative = void) or bool masks "
                           f"[K, H, W], got {array.dtype} of shape {array.shape}")
    if ignore is not None:
        valid = valid & ~np.asarray(ignore, bool).ravel()
    return regions & valid, valid


def iou_matrix(labels: np.ndarray, masks, background: bool = True, ignore=None) -> np.ndarray:
    """``[S, K]`` IoU of each segment of ``labels [H, W]`` (its distinct values, in sorted order) with each
    ground-truth region, over the valid pixels (void and ``ignore`` pixels count for neither)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise SegmentError(f"labels must be an integer [H, W] map, got {labels.dtype} of shape {labels.shape}")
    regions, valid = _regions(masks, labels.shape, background, ignore)
    _, segment = np.unique(labels.ravel(), return_inverse=True)
    count = int(segment.max()) + 1
    # Counting pixels per (segment, region) with bincount: linear in the pixels, no [S, P] one-hot products.
    inter = np.stack([np.bincount(segment[region], minlength=count) for region in regions], 1).astype(np.float64) \
        if len(regions) else np.zeros((count, 0))
    sizes = np.bincount(segment[valid], minlength=count).astype(np.float64)
    present = sizes > 0  # segments that lie wholly on void pixels do not count
    inter, sizes = inter[present], sizes[present]
    union = sizes[:, None] + regions.sum(1)[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def miou(labels: np.ndarray, masks, ignore=None) -> float:
    """Mean IoU of one image after Hungarian matching: each ground-truth region is paired with at most one
    segment and vice versa so that the summed IoU is largest (``scipy.optimize.linear_sum_assignment``); the
    mean runs over the K regions, an unmatched region (more regions than segments) counting 0.

    ``masks``: an integer label map ``[H, W]`` whose every value >= 0 is a region (background included;
    negative = void, e.g. VOC's border) or bool masks ``[K, H, W]``; ``ignore``: an extra ``[H, W]`` bool void
    mask. NaN when the image has no region."""
    iou = iou_matrix(labels, masks, background=True, ignore=ignore)
    if iou.shape[1] == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / iou.shape[1])


def foreground_iou(labels: np.ndarray, object_masks, ignore=None) -> np.ndarray:
    """``[K]``: for each object, the IoU of its best segment (segments may serve several objects). An image's
    value is the mean over its objects.

    ``object_masks``: an instance label map ``[H, W]`` (0 = background, left out; negative = void) or bool
    masks ``[K, H, W]``."""
    iou = iou_matrix(labels, object_masks, background=False, ignore=ignore)
    return iou.max(0) if iou.shape[0] else np.zeros(iou.shape[1])


# --- measurement over a data set -------------------------------------------------------------------------

def object_map(item) -> np.ndarray:
    """``[H, W]`` int64 instance labels of a data item (0 background, 1.. objects, negative void): its
    ``objects`` map (generated scenes, ADE20K, VOC), else, for O3 photos, 1 = target and 2 = the distractors
    (O3 marks all distractors in one mask, so they count as one region)."""
    objects = getattr(item, "objects", None)
    if objects is not None:
        return np.asarray(objects).astype(np.int64)
    target, distractor = getattr(item, "target", None), getattr(item, "distractor", None)
    if target is None or distractor is None:
        raise SegmentError(f"item {getattr(item, 'id', '?')!r} has neither an object label map nor target and "
                           "distractor masks; segmentation is scored against one of them")
    return np.where(target, 1, np.where(distractor, 2, 0)).astype(np.int64)


@dataclass(frozen=True)
class Variant:
    """A method run with its own options and scored under its own name (``Variant("modes, every mode", "modes",
    {"cos_min": None})``), beside the methods' defaults in one :func:`evaluate` pass."""

    name: str
    method: str
    options: dict


def _layer_plan(segmenter: Segmenter, methods: Sequence, layers, options: dict) -> list[tuple[Variant, int | None]]:
    """``(variant, layer)`` pairs: each method (a name, or a :class:`Variant`) at its default layer, or at each of
    ``layers`` (the grid once). A plain name takes those of ``options`` that its method accepts."""
    plan = []
    for entry in methods:
        if not isinstance(entry, Variant):
            accepted = list(inspect.signature(_method(entry).run).parameters)[3:]
            entry = Variant(entry, entry, {k: v for k, v in options.items() if k in accepted})
        _check_options(entry.method, entry.options)
        if not _method(entry.method).forward:
            plan.append((entry, None))
        else:
            chosen = [segmenter.default_layer(entry.method)] if layers is None else layers
            plan += [(entry, int(layer)) for layer in chosen]
    return plan


def evaluate(segmenter: Segmenter, items, methods: Sequence = tuple(METHODS), layers: Sequence[int] | None = None,
             n_segments: int | None = None, batch_size: int = 8, **options) -> list[dict]:
    """Score every method on every item: one row per image, method and layer with ``image`` (id), ``method``,
    ``layer`` (None for the grid), ``n_segments``, ``miou`` (:func:`miou`), ``foreground_iou`` (mean over the
    image's objects of :func:`foreground_iou`; NaN without objects) and ``seconds`` (the method's own time on
    the tokens, the shared forward pass left out; time :func:`segment` for the whole).

    ``items``: anything with ``.image`` and an object map (:func:`object_map`): generated scenes, O3, ADE20K, VOC.
    ``methods``: names, or :class:`Variant` (a method with its own options, rows under the variant's name).
    ``layers``: None, each method at its default layer; else every method at each of these layers.
    ``n_segments``: None, as many as the image has ground-truth regions (objects + background, at most the
    token count: the oracle count unsupervised segmentation is usually scored with); else this many. One
    forward pass per ``batch_size`` images serves every method and layer. ``options`` go to every named method
    that takes them (e.g. ``seed``)."""
    plan = _layer_plan(segmenter, methods, layers, options)
    needed = sorted({layer for _, layer in plan if layer is not None})
    attention = any(_method(variant.method).attention for variant, _ in plan)
    rows, batch = [], []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            rows += _score_batch(segmenter, batch, plan, needed, attention, n_segments)
            batch = []
    if batch:
        rows += _score_batch(segmenter, batch, plan, needed, attention, n_segments)
    return rows


def _score_batch(segmenter: Segmenter, batch: list, plan, layers: list[int], attention: bool, n_segments) -> list[dict]:
    views = segmenter.observe([item.image for item in batch], layers, attention) if layers else [{}] * len(batch)
    limit = math.prod(segmenter.info.grid)
    rows = []
    for item, view in zip(batch, views):
        truth = object_map(item)
        count = n_segments or min(max(len(np.unique(truth[truth >= 0])), 1), limit)
        for variant, layer in plan:
            start = time.perf_counter()
            labels = segmenter.token_labels(view.get(layer), count, variant.method, **variant.options)
            seconds = time.perf_counter() - start
            labels = upsample_labels(labels, *truth.shape)
            objects = foreground_iou(labels, truth)
            rows.append({"image": getattr(item, "id", ""), "method": variant.name, "layer": layer,
                         "n_segments": count, "miou": miou(labels, truth), "seconds": seconds,
                         "foreground_iou": float(objects.mean()) if objects.size else float("nan")})
    return rows


def summarise(rows: list[dict], metric: str = "miou", resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``{(method, layer): Interval}``: the mean of ``metric`` (``"miou"`` or ``"foreground_iou"``) over images
    for each method and layer of :func:`evaluate`'s rows, with its 95 % bootstrap interval over images
    (:func:`qklib.core.stats.bootstrap`; an image's NaN, no object, is left out)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["layer"]), []).append(row[metric])
    return {key: bootstrap(np.array(values), resamples=resamples, seed=seed) for key, values in groups.items()}


def paired_difference(rows: list[dict], first: tuple[str, int | None], second: tuple[str, int | None],
                      metric: str = "miou", resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean over images of ``metric(first) - metric(second)``, two ``(method, layer)`` of :func:`evaluate`'s
    rows scored on the same images, with its bootstrap interval over those images (paired: each resample draws
    images, and both methods are scored on each drawn image, so the images' difficulty cancels)."""
    by_key: dict[tuple, dict[str, float]] = {}
    for row in rows:
        by_key.setdefault((row["method"], row["layer"]), {})[row["image"]] = row[metric]
    missing = [key for key in (first, second) if key not in by_key]
    if missing:
        raise SegmentError(f"no rows for {missing}; the rows hold {sorted(by_key, key=str)}")
    images = [image for image in by_key[first] if image in by_key[second]]
    differences = np.array([by_key[first][image] - by_key[second][image] for image in images])
    return bootstrap(differences, resamples=resamples, seed=seed)


def datasets(results_dir: str | Path, n_scenes: int, seed: int = 0, o3_dir=None, o3_layout=None, ade20k_dir=None,
             voc_dir=None, max_images: int = 100) -> dict[str, Sequence]:
    """§8's data, ``{description: items}``: ``n_scenes`` generated scenes with exact masks (always, written once
    under ``results_dir``), then each folder given: O3 (a seeded choice of ``max_images``), ADE20K and Pascal
    VOC (the first ``max_images``)."""
    found = {f"{n_scenes} generated scenes (seed {seed})":
             generate_scenes(Path(results_dir) / f"scenes-224px-seed{seed}", n_scenes, seed=seed)}
    if o3_dir:
        found[f"O3 ({max_images} at most)"] = load_o3(o3_dir, o3_layout, limit=max_images, seed=seed)
    if ade20k_dir:
        found[f"ADE20K ({max_images} at most)"] = load_ade20k(ade20k_dir, limit=max_images)
    if voc_dir:
        found[f"Pascal VOC ({max_images} at most)"] = load_voc(voc_dir, limit=max_images)
    return found
