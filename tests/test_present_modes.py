"""qklib.present.mode_figures (the §5 figures), value-reading sliders of qklib.present.widgets.nested_stack,
and the chapter helpers the §5 chapter adds (mode labels, fitting parameters to the model, gallery samples)."""

import base64
import io
import re
from types import SimpleNamespace

import ipywidgets as widgets
import numpy as np
import pandas as pd
import pytest
from ipywidgets.widgets.widget import _instances
from ipywidgets.widgets.widget_link import Link
from PIL import Image

from qklib.book import chapter
from qklib.analyses import modes
from qklib import search
from qklib.core.extract import record
from qklib.core.images import open_rgb, to_pixels
from qklib.present import mode_figures as figures
from qklib.present.widgets import nested_stack
from qklib.analyses.same_object import SameObject


@pytest.fixture(scope="module")
def tiny(tiny_vit):
    return tiny_vit


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(3)
    return {f"im{i}": Image.fromarray((rng.random((48, 60, 3)) * 255).astype(np.uint8)) for i in range(3)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("gallery")
    for name, image in photos.items():
        image.save(root / f"{name}.png")
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def _images(html_text: str) -> list[Image.Image]:
    """The pictures embedded in an HTML fragment, decoded."""
    found = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html_text)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]


def _labels(slider) -> tuple[str, ...]:
    return tuple(label for label, _ in slider.options)


def _chart_rows(chart) -> list[dict]:
    spec = chart.to_dict()
    data = spec["data"]
    return data["values"] if "values" in data else spec["datasets"][data["name"]]


def _links_of(slider) -> list[Link]:
    return [w for w in list(_instances.values()) if isinstance(w, Link) and w.source[0] is slider]


def _leaves(stack_box) -> list:
    """The HTML leaves under a nested_stack's VBox, depth first."""
    out, todo = [], [stack_box.children[-1]]
    while todo:
        node = todo.pop(0)
        if isinstance(node, widgets.Stack):
            todo = list(node.children) + todo
        else:
            out.append(node)
    return out


# --- sliders that read their value ----------------------------------------------------------------------

def test_nested_stack_sliders_show_values_and_link_by_index():
    tree = [[widgets.HTML(f"{l}{h}") for h in range(2)] for l in range(3)]
    box = nested_stack(tree, ("layer", "head"), values=(["L1", "L4", "L7"], None))
    layer, head = box.children[:2]
    assert isinstance(layer, widgets.SelectionSlider) and _labels(layer) == ("L1", "L4", "L7")
    assert layer.label == "L1" and layer.index == 0
    layer.index = 2
    assert layer.label == "L7"  # what the reader sees is the layer, not the position 2
    assert isinstance(head, widgets.IntSlider) and head.max == 1  # a level without values keeps positions
    layer_links, head_links = _links_of(layer), _links_of(head)
    assert {link.source[1] for link in layer_links} == {"index"} and len(layer_links) == 1
    assert {link.source[1] for link in head_links} == {"value"} and len(head_links) == 3  # one per layer's Stack
    assert all(link.target[1] == "selected_index" for link in layer_links + head_links)


def test_nested_stack_rejects_values_that_do_not_fit():
    tree = [widgets.HTML("a"), widgets.HTML("b")]
    with pytest.raises(ValueError, match="2 children but 3 values"):
        nested_stack(tree, ("mode",), values=(["M0", "M1", "M2"],))
    with pytest.raises(ValueError, match="must differ"):
        nested_stack(tree, ("mode",), values=(["M0", "M0"],))
    with pytest.raises(ValueError, match="values were given for 2 levels"):
        nested_stack(tree, ("mode",), values=(["M0", "M1"], ["x"]))
    box = nested_stack(tree, ("mode",))  # the existing call without values
    assert isinstance(box.children[0], widgets.IntSlider)


# --- pictures ------------------------------------------------------------------------------------------------

def test_picture_row_is_clickable_pictures_with_captions():
    pictures = [np.full((40, 40, 3), v, np.uint8) for v in (0, 128, 255)]
    text = figures.picture_row(pictures, ["a", "b", "c"], title="<b>T</b>", width=170)
    decoded = _images(text)
    assert [im.size for im in decoded] == [(40, 40)] * 3
    assert text.count("width:170px") == 3
    assert text.count("onclick=\"if (event.target.tagName") == 3  # each picture's box grows to the row's width with the picture
    assert [c in text for c in ("<figcaption>a</figcaption>", "<figcaption>c</figcaption>", "<b>T</b>")] == [True] * 3
    with pytest.raises(ValueError, match="3 pictures but 2 captions"):
        figures.picture_row(pictures, ["a", "b"])


def test_explorer_holds_every_layer_head_mode_for_every_image(tiny, photos):
    model, svd = tiny
    box = figures.explorer(model, svd, photos, layers=[0, 2], heads=[1, 2], n_modes=2, size=160)
    sliders = box.children[:3]
    assert [_labels(s) for s in sliders] == [("L0", "L2"), ("H1", "H2"), ("M0", "M1")]
    leaves = _leaves(box)
    assert len(leaves) == 2 * 2 * 2
    assert "L0 H1 M0" in leaves[0].value and "L2 H2 M1" in leaves[-1].value  # order: layer, head, mode
    pictures = _images(leaves[-1].value)
    assert len(pictures) == 3 and all(p.size == (160, 160) for p in pictures)
    assert all(f"<figcaption>{name}</figcaption>" in leaves[0].value for name in photos)
    # the picture is the mode's own rendering (same maps as render.mode_pictures draws)
    expected = figures.mode_pictures(model, svd, list(photos.values()), 2, 2, 1, size=160)[0]
    assert np.abs(np.asarray(pictures[0], float) - expected).mean() < 6  # JPEG noise only


# --- Fig 4 ---------------------------------------------------------------------------------------------------

def test_optimal_images_table_and_pictures_follow_the_search(tiny, folder):
    model, svd = tiny
    found = search.search(model, folder, k=2, batch_size=2, svd=svd, progress=False)
    featured = [(0, 0, 0, 1), (2, 1, 3, -1)]
    table = figures.optimal_table(svd, found, featured)
    for (layer, head, mode, sign) in featured:
        rows = table[table["mode"] == modes.mode_label(layer, head, mode, sign)]
        assert list(zip(rows["image"], rows["score"])) == found.top(layer, head, mode, sign)
        assert (rows["cos"] == float(svd.cos[layer, head, mode])).all()
    assert not any(str(folder) in name for name in table["image"])  # relative paths only
    shown = figures.optimal_images(model, svd, found, featured, size=64).data
    assert len(_images(shown)) == len(table)
    positions = modes.position_shares(model, svd, [[open_rgb(found.path(n)) for n, _ in found.top(0, 0, 0, 1)]],
                                      featured, draws=2)
    with_content = figures.optimal_images(model, svd, found, featured, size=64, positions=positions).data
    assert len(_images(with_content)) == 2 * len(table) and with_content.count("position explains") == 2
    assert "L2 H1 M3-" in shown and str(folder) not in shown
    summary = figures.search_summary(found)
    assert summary.startswith("Scored 3 of 4 images") and "broken.jpg" in summary and str(folder) not in summary


# --- Fig 5 ---------------------------------------------------------------------------------------------------

def test_walkthrough_ranks_modes_by_contribution(tiny, photos):
    model, svd = tiny
    image = photos["im1"]
    table, box = figures.walkthrough(model, svd, image, layers=[1, 2], heads=[0, 2], count=4, size=160)
    assert len(table) == 2 * 2 * 4 * 2 and set(table["ranking"]) == {"attention", "paper sum"}
    recorded = record(model, to_pixels(model, image), tokens=True, attention=True, layers=[2])
    tokens = recorded.tokens[0][0]
    contrib = modes.mode_contributions(svd, tokens, 2)[2]
    paper_rows = table[(table["layer"] == 2) & (table["head"] == 2) & (table["ranking"] == "paper sum")].sort_values("rank")
    assert paper_rows["mode"].tolist() == contrib.argsort(descending=True)[:4].tolist()
    ours = modes.attention_contributions(svd, tokens, recorded.attention[0][0, 2], 2, 2)
    rows = table[(table["layer"] == 2) & (table["head"] == 2) & (table["ranking"] == "attention")].sort_values("rank")
    assert rows["mode"].tolist() == ours.argsort(descending=True)[:4].tolist()
    assert np.allclose(rows["share"], ours[rows["mode"].tolist()].numpy() / float(ours.abs().sum()))
    full, table = table, table[table["ranking"] == "attention"].drop(columns="ranking")
    assert [_labels(s) for s in box.children[:2]] == [("L1", "L2"), ("H0", "H2")]
    leaves = _leaves(box)
    assert len(leaves) == 4 and len(_images(leaves[-1].value)) == 4
    assert rows["label"].iloc[0] in leaves[-1].value
    shared = len(set(rows["mode"]) & set(paper_rows["mode"]))
    assert f"The paper's sum ranks first: M{paper_rows['mode'].iloc[0]}" in leaves[-1].value
    assert f"({shared} of 4 shared)" in leaves[-1].value

    bars = {row["layer"]: row["share"] for row in _chart_rows(figures.top_share_chart(table))}
    expected = table[table["rank"] == 0].groupby("layer")["share"].mean()
    assert bars.keys() == {1, 2} and all(abs(bars[l] - expected[l]) < 1e-3 * abs(expected[l]) for l in bars)

    found = figures.walkthrough_findings(table)
    best = table[table["rank"] == 0].sort_values("share").iloc[-1]
    assert found["top_head"] == f"L{best['layer']} H{best['head']}" and found["top_label"] == best["label"]
    assert found["top_share"] == pytest.approx(expected.mean()) and found["walk_layers"] == "L1, L2"
    both = figures.walkthrough_findings(full)
    assert both["top_label"] == found["top_label"] and both["walk_count"] == 4
    overlaps = [len(set(g[g["ranking"] == "attention"]["mode"]) & set(g[g["ranking"] == "paper sum"]["mode"]))
                for _, g in full.groupby(["layer", "head"])]
    assert both["walk_shared"] == pytest.approx(np.mean(overlaps)) and shared in overlaps


# --- Fig 6 ---------------------------------------------------------------------------------------------------

def _same(per_layer, chance=None, background=False, match="instance", spread=0.0):
    """A SameObject with two heads per layer, ``±spread`` around ``per_layer``."""
    per_layer = np.asarray(per_layer, float)
    chance = np.full_like(per_layer, 0.1) if chance is None else np.asarray(chance, float)
    n = len(per_layer)
    heads = per_layer[:, None] + spread * np.array([-1.0, 1.0])
    return SameObject(list(range(n)), 5, np.zeros((n, 2, 1, 2)), np.zeros((n, 2, 1, 2)), heads,
                      np.repeat(chance[:, None], 2, axis=1), per_layer, chance, 10, 1, 0.5, background, match)


def _variants(values, chances=None):
    """{(background, match): SameObject} from {(background, match): per-layer values}."""
    return {key: _same(v, None if chances is None else chances[key], *key) for key, v in values.items()}


def test_same_object_table_and_chart():
    model = _variants({(False, "instance"): [0.5, 0.6, 0.3, 0.2], (False, "kind"): [0.6, 0.9, 0.5, 0.2],
                       (True, "instance"): [0.7] * 4, (True, "kind"): [0.8] * 4},
                      {(False, "instance"): [0.1] * 4, (False, "kind"): [0.6] * 4, (True, "instance"): [0.3] * 4,
                       (True, "kind"): [0.5] * 4})
    control = _variants({key: [0.1, 0.12, 0.09, 0.11] for key in model})
    table = figures.same_object_table(model, control, "my model", num_layers=4)
    assert len(table) == 4 * 3 * 4  # variants x series x layers
    assert set(table["model"]) == {"my model", "random-init control", "chance"}
    mine = table[(table["model"] == "my model") & (table["same"] == "same kind") & (table["objects"] == "background left out")]
    assert mine["P(same)"].tolist() == [0.6, 0.9, 0.5, 0.2] and mine["depth"].tolist() == [0, 1 / 3, 2 / 3, 1]
    chance = table[(table["model"] == "chance") & (table["objects"] == "background an object")]
    assert sorted(set(chance["P(same)"])) == [0.3, 0.5]  # the kind's chance is its own, not 1/K
    only = figures.same_object_table({(False, "instance"): model[False, "instance"]},
                                     {(False, "instance"): control[False, "instance"]}, "my model", 4)
    assert len(only) == 3 * 4 and set(only["same"]) == {"same instance"}
    chart = figures.same_object_chart(table).to_dict()
    band, line = chart["spec"]["layer"]
    assert band["mark"]["type"] == "area" and band["encoding"]["y2"]["field"] == "high"
    assert line["encoding"]["x"]["field"] == "depth"  # the encoding the two layers share
    layers = figures.same_object_layers(table, "my model")
    assert layers.shape == (4, 4 + 2)  # four readings of the model, then chance and control in the ledger's reading
    assert layers["same kind, background left out"].tolist() == [0.6, 0.9, 0.5, 0.2]
    assert layers["chance (same instance, background an object)"].tolist() == [0.3] * 4
    assert "chance (same instance, background an object)" in layers
    mine_rows = table[table["model"] == "my model"]
    assert (mine_rows["low"] <= mine_rows["P(same)"] + 1e-12).all() and table["low"].notna().sum() == 32
    assert chart["facet"]["row"]["field"] == "same" and chart["facet"]["column"]["field"] == "objects"
    data = chart["data"]
    assert len(data["values"] if "values" in data else chart["datasets"][data["name"]]) == 48


def test_variant_findings_state_every_layer_and_the_gaps():
    model = _variants({(False, "instance"): [0.5, 0.6, 0.3, 0.4], (False, "kind"): [0.5, 0.8, 0.6, 0.4],
                       (True, "instance"): [0.5, 0.5, 0.4, 0.4], (True, "kind"): [0.6, 0.6, 0.4, 0.4]},
                      {key: [0.45] * 4 for key in [(False, "instance"), (False, "kind"), (True, "instance"), (True, "kind")]})
    control = _variants({key: [0.1] * 4 for key in model})
    found = figures.same_object_variant_findings(model, control)
    # a rise, a fall and a rise again: the course names each step, no average hides the reversal
    assert found["course_nobg_instance"] == "rises L0→L1 (0.50→0.60), falls L1→L2 (0.60→0.30), rises L2→L3 (0.30→0.40)"
    assert found["range_nobg_instance"].startswith("from 0.30 (L2) to 0.60 (L1)")
    assert found["range_nobg_instance"].endswith("in 2 of the 4 layers above chance, in every one of the 4 layers "
                                                 "above the control")
    # kind - instance = 0, 0.2, 0.3, 0: two distractors picked in layers 1 and 2 only
    assert found["kind_gap_nobg"] == "rises L0→L2 (0.00→0.30), falls L2→L3 (0.30→0.00); largest in L2 (0.30)"
    assert found["background_gap"] == "falls L0→L1 (0.00→-0.10), rises L1→L2 (-0.10→0.10), falls L2→L3 (0.10→0.00)"
    instance_only = {key: run for key, run in model.items() if key[1] == "instance"}
    partial = figures.same_object_variant_findings(instance_only, control)
    assert partial["course_nobg_kind"].startswith("not computed") and partial["kind_gap_bg"].startswith("not computed")
    assert set(partial) == set(found)  # the chapter's prose can name every key whatever was computed
    assert "distinguishable instance" in figures.kinds_phrase(("instance", "kind"), ade20k=False)
    assert "class" in figures.kinds_phrase(("instance", "kind"), ade20k=True)
    assert figures.kinds_phrase(("instance",), ade20k=True).startswith("none")


def test_same_object_findings_compute_their_phrases():
    control = _same([0.1, 0.1, 0.1, 0.1])
    falling = figures.same_object_findings(_same([0.5, 0.6, 0.3, 0.2]), control)
    assert falling["early"] == pytest.approx(0.55) and falling["late"] == pytest.approx(0.25)
    assert falling["trend"].startswith("higher in the first half") and falling["peak_layer"] == 1
    assert falling["early_layers"] == "0-1" and falling["late_layers"] == "2-3"
    assert falling["above_chance"] == "in every one of the 4 layers above chance"
    rising = figures.same_object_findings(_same([0.05, 0.2, 0.3, 0.4]), control)
    assert "against the paper's trend" in rising["trend"]
    assert rising["above_chance"] == "in 3 of the 4 layers above chance"
    flat = figures.same_object_findings(_same([0.3, 0.31, 0.3, 0.305], spread=0.1), _same([0.4] * 4))
    assert flat["trend"].startswith("borderline") and "first half minus second 0.003 [" in flat["trend"]
    assert flat["above_control"] == "in none of the 4 layers above the random-init control"


# --- the ablation and the rule-chosen modes ------------------------------------------------------------------

def test_ablation_table_findings_and_chart():
    cases = [(0, 1, 0, 0.4, 0.1, 0.30, 0.02, 0), (0, 1, 1, 0.2, 0.3, 0.35, 0.05, 1), (1, 5, 0, 0.5, 0.2, 0.25, 0.03, 2)]
    rows = [{"image": i, "layer": l, "head": h, "count": 2, "by_attention": a, "by_paper_sum": b,
             "by_singular_value": s, "by_random": r, "overlap": o} for i, l, h, a, b, s, r, o in cases]
    table = figures.ablation_table(rows, resamples=200)
    one = table[(table["layer"] == "1") & (table["ranking"] == "attention-weighted")].iloc[0]
    assert one["change"] == pytest.approx(0.3) and one["cases"] == 2 and one["low"] <= 0.3 <= one["high"]
    pooled = table[(table["layer"] == "all") & (table["ranking"] == "random modes")].iloc[0]
    assert pooled["change"] == pytest.approx(0.1 / 3) and pooled["cases"] == 3
    found = figures.ablation_findings(rows, resamples=200)
    assert found["abl_by_paper_sum"].startswith("0.200 [") and found["abl_by_random"].startswith("0.033 [")
    # the paper's ranking beats random in every case (interval above 0) but falls short of singular value
    assert found["abl_verdict"] == ("the paper's ranking picks modes that shape attention: removing them changes it "
                                    "more than removing random modes, though less than singular value alone")
    assert found["abl_beats_random"] == 1.0 and found["abl_count"] == 2 and found["abl_cases"] == 3
    worse = figures.ablation_findings([{**r, "by_paper_sum": 0.0} for r in rows], resamples=200)
    assert "does not beat random modes" in worse["abl_verdict"]
    bars = _chart_rows(figures.ablation_chart(table))
    assert len(bars) == 12 and {b["layer"] for b in bars} == {"1", "5", "all"}
    with pytest.raises(ValueError, match="no ablation rows"):
        figures.ablation_table([])


def test_featured_table_and_rule(tiny):
    _, svd = tiny
    chosen = modes.rule_modes(svd)
    table = figures.featured_table(svd, chosen, [0.5, -0.1, 0.2])
    assert table["mode"].tolist() == [modes.mode_label(*c) for c in chosen]
    assert table["cos"].tolist() == [float(svd.cos[l, h, m]) for l, h, m, _ in chosen]
    assert table["map_corr"].tolist() == [0.5, -0.1, 0.2]
    found = figures.featured_findings(table)
    first = table.iloc[0]
    assert found["featured_modes"].startswith(f"{first['mode']} (cos {first['cos']:+.2f}, map r +0.50); ")
    signs = sum(np.sign(c) == np.sign(r) for c, r in zip(table["cos"], [0.5, -0.1, 0.2]))
    assert found["featured_agree"] == f"{signs} of 3"
    assert "does not test" in figures.gallery_phrases(False)["semantic_note"]
    assert figures.gallery_phrases(True)["gallery_text"] == "`image_dir`"
    with pytest.raises(ValueError, match="2 correlations for 3"):
        figures.featured_table(svd, chosen, [0.1, 0.2])
    assert chapter.mode_labels("featured", "rule") == "rule"
    fitted = chapter.fit_to_model(SimpleNamespace(featured="rule"), svd)
    assert fitted.featured == chosen


# --- chapter helpers used by §5 -------------------------------------------------------------------------------

def test_gallery_batches_skip_unreadable_files(tmp_path, photos):
    for name, image in photos.items():
        image.save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    names = ["im0.png", "broken.png", "im1.png", "im2.png"]
    batches = list(chapter.gallery_batches(tmp_path, names, 2))
    assert [len(b) for b in batches] == [2, 1] and batches[0][1].size == photos["im1"].size
    assert [len(b) for b in chapter.gallery_batches(tmp_path, names, 2, limit=2)] == [1]
    with pytest.raises(chapter.ParameterError, match="batch_size"):
        list(chapter.gallery_batches(tmp_path, names, 0))


def test_featured_labels_are_parsed_and_fitted_to_the_model(tiny):
    _, svd = tiny  # 3 layers, 3 heads, 64 modes
    assert chapter.mode_labels("featured", ["L2 H1 M0-", "L0 H0 M5"]) == [(2, 1, 0, -1), (0, 0, 5, 1)]
    with pytest.raises(chapter.ParameterError, match="parameter 'featured'.*'layer 3'"):
        chapter.mode_labels("featured", ["layer 3"])
    p = SimpleNamespace(layers=[2, 0], heads="all", explorer_modes=4, featured=[(2, 1, 0, -1)])
    fitted = chapter.fit_to_model(p, svd)
    assert fitted.layers == [0, 2] and fitted.heads == [0, 1, 2] and p.heads == "all"
    with pytest.raises(chapter.ParameterError, match="parameter 'layers'.*out of range"):
        chapter.fit_to_model(SimpleNamespace(**{**vars(p), "layers": [3]}), svd)
    with pytest.raises(chapter.ParameterError, match="'L1 H3 M0-' is outside the model"):
        chapter.fit_to_model(SimpleNamespace(**{**vars(p), "featured": [(1, 3, 0, -1)]}), svd)
    with pytest.raises(chapter.ParameterError, match="'explorer_modes' is 65"):
        chapter.fit_to_model(SimpleNamespace(**{**vars(p), "explorer_modes": 65}), svd)


def test_gallery_sample_prefers_named_images_and_passes_over_broken_ones(folder):
    names = search.image_files(folder)  # broken.jpg, im0.png, im1.png, im2.png
    picked = chapter.gallery_sample(folder, names, 2, prefer=("im2", "absent"))
    assert list(picked) == ["im2", "im0"] and all(isinstance(i, Image.Image) for i in picked.values())
    assert list(chapter.gallery_sample(folder, names, 10)) == ["im0", "im1", "im2"]
    with pytest.raises(chapter.ParameterError, match="could be read"):
        chapter.gallery_sample(folder, ["broken.jpg"], 1)


def test_gallery_image_names_refer_to_the_folder(folder):
    names = search.image_files(folder)
    name, image = chapter.gallery_image("im1", folder, names)
    assert name == "im1" and image.size == (60, 48)
    with pytest.raises(chapter.ParameterError, match="'chelsea' is neither.*im0, im1, im2"):
        chapter.gallery_image("chelsea", folder, names)


def test_pictures_frame_columns_are_stable(tiny):
    _, svd = tiny
    empty = figures.optimal_table(svd, search.SearchResult(
        scores=np.full((1, 1, 1, 2, 1), -np.inf, np.float32), index=np.full((1, 1, 1, 2, 1), -1), files=[],
        layers=[0], heads=[0], modes=[0], k=1, model="m", root="", n_files=0, n_images=0, skipped=[]), [(0, 0, 0, 1)])
    assert isinstance(empty, pd.DataFrame) and empty.empty
    assert list(empty.columns) == ["mode", "rank", "image", "score", "s", "cos"]
