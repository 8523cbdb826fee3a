"""Object recognition without training, the paper's second downstream use (§8): a nearest-centroid probe on the
class token against the same probe on the QK modes' features.

Features of an image (:func:`image_features`, one forward pass per batch):

* ``"class_token"``: the class token leaving the network (after the final norm), ``[d]``: what a linear probe of
  DINO or DINOv2 reads;
* ``"modes"``: every mode of one layer scored on the image as §5 scores it for its optimal images,
  ``max_i (x_i . u_n) * max_j (x_j . v_n)`` for each sign, clipped at zero, then square-rooted (a geometric mean
  of the two maxima, in the projections' own units): ``[H * r * 2]``.

The probe (:func:`probe`) is nearest-centroid with cross-validation: features are standardised with the
training folds' mean and spread, scaled to unit length, and an image takes the class whose mean direction
(centroid) is nearest in cosine. Every image is predicted once, by the folds it is not in, so the per-image
correctness can be bootstrapped over images (:meth:`ProbeResult.interval`). Nearest-centroid has no
hyper-parameter to tune, which keeps the comparison between feature sets honest on small data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.images import ImageError, list_images, to_pixels
from ..core.models import info
from ..core.reader import attention_sites
from ..core.stats import RESAMPLES, Interval, bootstrap
from ..core.svd import QKSVD
from ..search import Features, feature_scores


class RecognitionError(ValueError):
    """A probe or feature request that cannot be served; the message says what to change."""


@torch.no_grad()
def image_features(model: nn.Module, svd: QKSVD, images: Sequence, layers: Sequence[int],
                   batch_size: int = 16) -> dict:
    """``{"class_token": [B, d], "modes": {layer: [B, H * r * 2]}}`` float64 arrays for PIL ``images`` (the model's
    own preprocessing: resize and centre crop), from one forward pass per batch. ``layers``: whose modes
    (0-based). See the module docstring."""
    meta = info(model)
    if meta.prefix_tokens < 1:
        raise RecognitionError(f"{meta.name} has no class token; only mode features can be probed on it")
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < meta.num_layers]
    if bad or not layers:
        raise RecognitionError(f"layers {bad or layers} out of range: the model has layers 0..{meta.num_layers - 1}")
    device = next(model.parameters()).device
    features = Features.select(svd, layers, device=device)
    inputs = attention_sites(model).inputs  # per layer, the norm whose output the attention reads
    tokens, modes = [], {layer: [] for layer in layers}
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(model, list(images[start: start + batch_size])).to(device)
        seen = {}
        # One pass: hooks keep the tokens entering each chosen layer, and the pass goes on to the class token.
        hooks = [inputs[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.setdefault(layer, out)) for layer in layers]
        try:
            tokens.append(model.forward_features(pixels)[:, 0].double().cpu())
        finally:
            for hook in hooks:
                hook.remove()
        for layer in layers:
            projected = features.projected(layer, seen[layer], None, meta.prefix_tokens)  # [B, N, 2 H r]
            modes[layer].append(feature_scores(projected).flatten(1).double().sqrt().cpu())
    return {"class_token": torch.cat(tokens).numpy(),
            "modes": {layer: torch.cat(parts).numpy() for layer, parts in modes.items()}}


def common_classes(labels, minimum: int = 2) -> np.ndarray:
    """``[N]`` bool: the images whose class has at least ``minimum`` images (a probe needs two per class)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    return np.isin(labels, classes[counts >= minimum])


def nearest_centroid(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``[M]`` predicted labels of ``test [M, D]`` from ``train [N, D]`` with ``train_labels [N]``: standardise
    with the training mean and spread (a feature constant in training is dropped), unit rows, and the class
    whose unit mean direction has the largest cosine."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    mean, spread = train.mean(0), train.std(0)
    keep = spread > 1e-12 * max(float(np.abs(train).max(initial=0)), 1e-300)

    def unit(rows):
        rows = (rows[:, keep] - mean[keep]) / spread[keep]
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)

    classes = np.unique(train_labels)
    train_unit = unit(train)
    centroids = np.stack([train_unit[train_labels == c].mean(0) for c in classes])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-300)
    return classes[(unit(test) @ centroids.T).argmax(1)]


@dataclass
class ProbeResult:
    """Cross-validated predictions: ``labels [N]`` the truth, ``predicted [N]`` each image's prediction by the
    folds it is not in."""

    labels: np.ndarray
    predicted: np.ndarray
    folds: int

    @property
    def correct(self) -> np.ndarray:
        """``[N]`` bool: each image's outcome, the unit the intervals resample."""
        return self.labels == self.predicted

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def per_class(self) -> dict:
        """``{class: accuracy}`` over the images of each class (recall)."""
        return {label: float(self.correct[self.labels == label].mean()) for label in np.unique(self.labels).tolist()}

    def interval(self, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
        """The accuracy with its 95 % bootstrap interval over images."""
        return bootstrap(self.correct.astype(float), resamples=resamples, seed=seed)


def probe(features: np.ndarray, labels, folds: int = 5, seed: int = 0) -> ProbeResult:
    """Nearest-centroid accuracy of ``features [N, D]`` for ``labels [N]`` by ``folds``-fold cross-validation.

    The folds are stratified: each class's images, in a seeded random order, are dealt to the folds in turn, so
    every fold holds every class with at least ``folds`` images. Each class needs two images or more."""
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise RecognitionError(f"features must be [N, D] with one label per row, got {features.shape} and "
                               f"{len(labels)} labels")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < 2 or folds < 2:
        raise RecognitionError(f"a probe needs two classes or more with two images each and folds >= 2; got "
                               f"{dict(zip(classes.tolist(), counts.tolist()))} and folds={folds}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = np.arange(len(members)) % min(folds, len(members))
    predicted = labels.copy()
    for k in np.unique(fold):
        test = fold == k
        predicted[test] = nearest_centroid(features[~test], labels[~test], features[test])
    return ProbeResult(labels, predicted, folds)


def class_folders(root: str | Path, per_class: int | None = None) -> tuple[list[Path], list[str]]:
    """``(paths, labels)`` of an ImageNet-style folder, one subfolder per class (``root/<class>/<image>``), at most
    ``per_class`` images of each (the first in sorted order)."""
    root = Path(root).expanduser()
    paths, labels, taken = [], [], {}
    for path in list_images(root):
        relative = path.relative_to(root)
        if len(relative.parts) < 2:
            raise ImageError(f"{str(path)!r} is not in a class subfolder: an ImageNet-style folder holds "
                             "root/<class>/<image> (the subfolder's name is the label)")
        label = relative.parts[0]
        if per_class is None or taken.get(label, 0) < per_class:
            paths.append(path)
            labels.append(label)
            taken[label] = taken.get(label, 0) + 1
    return paths, labels


def probe_models(models: dict[str, nn.Module], svds: dict[str, QKSVD], images: Sequence, labels: Sequence,
                 layers: Sequence[int], batch_size: int = 16, seed: int = 0) -> dict[tuple[str, str, int | None], ProbeResult]:
    """``{(model, "class token", None) or (model, "modes", layer): ProbeResult}`` for every model, on the images
    whose class has two images or more (:func:`common_classes`), one forward pass per batch per model."""
    keep = common_classes(labels)
    images = [image for image, kept in zip(images, keep) if kept]
    labels = np.asarray(labels)[keep]
    results = {}
    for label, model in models.items():
        found = image_features(model, svds[label], images, layers, batch_size)
        results[label, "class token", None] = probe(found["class_token"], labels, seed=seed)
        for layer, features in found["modes"].items():
            results[label, "modes", layer] = probe(features, labels, seed=seed)
    return results
