"""qklib.present.attention_figures: §3's charts, mask figure, query maps over the scene and the "What we found"
values."""

from __future__ import annotations

import base64
import io
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qklib.book import ledger
from qklib.core import stats
from qklib.core.images import display_crop
from qklib.core.datasets.o3 import generate_scenes
from qklib.analyses.preference import GROUPS, PAIRS, query_maps, token_masks
from qklib.present import attention_figures as attention

MODELS = ["model a", "model b"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("scenes"), 5, seed=2)


def _table(layers=4, heads=3, images=("i0", "i1", "i2"), seed=0) -> pd.DataFrame:
    """A tidy table shaped like measure()'s: random ratios whose three per query sum to 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in MODELS:
        for image in images:
            for layer in range(layers):
                for head in range(heads):
                    t, d = rng.dirichlet([1, 1, 1]), rng.dirichlet([1, 1, 1])
                    rows.append({"model": model, "image": image, "layer": layer, "head": head,
                                 "depth": layer / (layers - 1), **dict(zip(PAIRS, [*t, *d]))})
    table = pd.DataFrame(rows)
    for group, pair in GROUPS.items():
        table[group] = table[list(pair)].mean(axis=1)
    return table


def _stats(curves: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """layer_stats-shaped rows from given per-layer means: ``curves[model][group] = [mean per layer]``."""
    rows = []
    for model, groups in curves.items():
        for group, values in groups.items():
            for layer, value in enumerate(values):
                rows.append({"model": model, "layer": layer, "depth": layer / (len(values) - 1), "group": group,
                             "mean": value, "low": value, "high": value, "images": 1, "chance": 0.0})
    return pd.DataFrame(rows)


def _values(spec: dict) -> list[dict]:
    """A chart's inline rows (altair moves them to ``datasets`` when it writes the spec)."""
    data = spec["data"]
    return data["values"] if "values" in data else spec["datasets"][data["name"]]


CHANCE = pd.Series({"same": 0.1, "different": 0.1, "background": 0.8})


# ------------------------------------------------------------------------------------------- scenes
def test_example_scenes_take_one_per_feature(scenes):
    shown = attention.example_scenes(scenes)
    assert [s.info["feature"] for s in shown] == ["colour", "shape", "size", "orientation"]

    class Plain:
        def __init__(self, key):
            self.id, self.info = key, {}

    assert [s.id for s in attention.example_scenes([Plain(k) for k in "abcdef"], count=3)] == ["a", "b", "c"]
    assert attention.first_measured([Plain("a"), Plain("b")], [Plain("c"), Plain("b")], ["b", "c"]).id == "b"
    assert attention.first_measured([Plain("a")], [Plain("a"), Plain("c")], ["c"]).id == "c"


def test_mask_figure_has_a_view_and_a_mask_panel_per_scene(embedded_model, scenes):
    shown = attention.example_scenes(scenes, count=3)
    figure = attention.mask_figure(embedded_model, shown)
    axes = figure.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == [s.info["feature"] for s in shown]
    assert axes[3].get_ylabel() == "token grid 16×16"
    # Two query boxes (target, distractor) on every panel.
    assert all(len(ax.patches) == 2 for ax in axes)
    # Red: the target's token fraction (plus a quarter of the background's), as token_masks computes it.
    masks = token_masks(embedded_model, [shown[0].target], [shown[0].distractor])
    panel = np.asarray(axes[3].images[0].get_array())
    assert panel.shape == (16, 16, 3)
    expected = (masks.target[0] + 0.25 * masks.background[0]).clamp(0, 1).reshape(16, 16).numpy()
    np.testing.assert_allclose(panel[..., 0], expected, atol=1e-6)


def test_mask_picture_is_a_clickable_png(embedded_model, scenes):
    html = attention.mask_picture(embedded_model, attention.example_scenes(scenes, count=2), dpi=160).data
    payload = base64.b64decode(re.search(r"data:image/png;base64,([^\"]+)", html).group(1))
    drawn = Image.open(io.BytesIO(payload))
    shown = int(re.search(r"width:(\d+)px", html).group(1))
    assert shown == round(drawn.width / 2) and shown >= 2 * 160 and "onclick" in html


# ------------------------------------------------------------------------------------------- charts
def test_layer_chart_carries_the_per_layer_statistics():
    table = _table()
    stats = attention.layer_stats(table, CHANCE)
    assert len(stats) == 2 * 4 * 3
    row = stats[(stats.model == "model b") & (stats.layer == 2) & (stats.group == "different")].iloc[0]
    expected = table[(table.model == "model b") & (table.layer == 2)].groupby("image")["different"].mean().mean()
    assert row["mean"] == pytest.approx(expected) and row["chance"] == pytest.approx(0.1)
    assert set(stats.loc[stats.group == "background", "chance"]) == {0.8}
    spec = attention.layer_chart(stats, MODELS, scenes=3).to_dict()
    assert spec["facet"]["column"]["field"] == "group" and "3 scenes" in spec["title"]
    assert len(_values(spec)) == len(stats)


def test_head_heatmap_and_pair_chart_hold_the_head_means():
    table = _table()
    heat = attention.head_heatmap(table, MODELS).to_dict()
    values = pd.DataFrame(_values(heat))
    assert len(values) == 2 * 4 * 3 * 3
    got = values[(values.model == "model a") & (values.layer == 3) & (values["head"] == 1) & (values.group == "same")]
    expected = table[(table.model == "model a") & (table.layer == 3) & (table["head"] == 1)]["same"].mean()
    assert got["ratio"].iloc[0] == pytest.approx(expected, rel=1e-3)

    pairs = attention.pair_table(table)
    assert len(pairs) == 2 * 4 * 3 * 6 and set(pairs["pair"]) == set(attention.PAIR_NAMES.values())
    pick = (pairs.model == "model b") & (pairs.layer == 1) & (pairs["head"] == 2)
    one = pairs[pick & (pairs.pair == "D→B")].iloc[0]
    assert one["group"] == "background"
    rows = table[(table.model == "model b") & (table.layer == 1) & (table["head"] == 2)]
    assert one["ratio"] == pytest.approx(rows["d_b"].mean())
    spec = attention.pair_chart(table, MODELS).to_dict()
    bounds = {p["name"]: (p["bind"]["min"], p["bind"]["max"]) for p in spec["params"]}
    assert bounds == {"layer_pick": (0, 3), "head_pick": (0, 2)}  # slider values are the layer and head numbers


def test_table_download_is_the_rounded_table():
    table = _table()
    link = attention.table_download(table).data
    payload = re.search(r'base64,([^"]+)"', link).group(1)
    back = pd.read_csv(io.BytesIO(base64.b64decode(payload)))
    assert 'download="s3_attention_preference.csv"' in link and f"{len(table)} rows" in link
    assert list(back.columns) == list(table.columns) and len(back) == len(table)
    np.testing.assert_allclose(back["t_d"], table["t_d"], atol=5e-5 + 1e-12)
    assert not np.allclose(back["t_d"], table["t_d"], atol=1e-9)  # rounded, not the full table


# ------------------------------------------------------------------------------ query maps on the scene
def test_outline_is_a_band_inside_the_mask():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    edge = attention.outline(mask, width=2)
    assert edge.sum() == 10 * 10 - 6 * 6
    assert not (edge & ~mask).any() and edge[5, 9] and edge[6, 9] and not edge[7, 9]


def test_overlay_draws_the_map_over_the_scene():
    view = np.full((64, 64, 3), 200, np.uint8)
    query_map = np.zeros((4, 4))
    query_map[1, 2] = 2.0  # the most attended token (16 x 16 px block at rows 16-31, columns 32-47)
    query_map[0, 0] = 0.5  # a quarter of the maximum: opacity 0.9 * sqrt(1/4) (block at rows and columns 0-15)
    target = np.zeros((64, 64), bool)
    target[50:60, 2:12] = True
    edges = attention.outline(target)
    out = attention.overlay(view, query_map, query=15, target_edges=edges, distractor_edges=np.zeros_like(edges))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    top = np.round(np.asarray(plt.get_cmap("magma")(1.0)[:3]) * 255)
    np.testing.assert_allclose(out[24, 40], (200 * 0.6 * 0.1 + top * 0.9).round(), atol=1)  # the attended token
    quarter = np.round(np.asarray(plt.get_cmap("magma")(64 / 255)[:3]) * 255)  # level 1/4 -> colour code 64
    np.testing.assert_allclose(out[8, 8], 200 * 0.6 * 0.55 + quarter * 0.45, atol=1.5)
    assert (out[40, 8] == round(200 * 0.6)).all()  # no attention: the dimmed scene
    assert tuple(out[50, 6]) == attention.TARGET_RGB and tuple(out[55, 6]) != attention.TARGET_RGB
    # Query 15 is the last token: its box runs along rows and columns 48-63.
    assert tuple(out[48, 60]) == attention.QUERY_RGB and tuple(out[63, 63]) == attention.QUERY_RGB


def test_query_map_pictures_and_slider(embedded_model, scenes):
    sample = scenes[0]
    pictures = attention.query_map_pictures(embedded_model, sample, size=160)
    assert len(pictures) == 12 and all(len(row) == 6 for row in pictures)
    assert pictures[3][2].shape == (160, 2 * 160 + 6, 3)
    maps, queries, _ = query_maps(embedded_model, sample)
    # The left half is the target query's map: its most attended token is the brightest block there.
    layer, head = 5, 1
    token = int(maps[layer, head, 0].flatten().argmax())
    row, col = divmod(token, 16)
    block = pictures[layer][head][row * 10 + 3 : row * 10 + 7, col * 10 + 3 : col * 10 + 7].astype(float)
    view = display_crop(embedded_model, sample.image)
    assert block.mean() > 0.6 * view.astype(float).mean() + 100  # far brighter than the dimmed scene
    assert not np.array_equal(pictures[layer][head][:, :160], pictures[layer][head][:, 166:])

    slider = attention.query_map_slider(embedded_model, sample, size=160)
    layer_slider, head_slider, stack = slider.children
    assert (layer_slider.description, layer_slider.options[-1][0]) == ("layer", "L11")  # readouts are labels
    assert (head_slider.description, head_slider.options[-1][0]) == ("head", "H5")
    html = stack.children[4].children[3].value
    assert "<img" in html and "L4 H3" in html and sample.id in html and "onclick" in html
    assert re.search(r"width:(\d+)px", html).group(1) == str(2 * 160 + 6)


# ------------------------------------------------------------------------------------ what we found
def test_findings_state_the_ledgers_verdicts_with_their_numbers_and_a_per_layer_table():
    rising = {"same": [0.6, 0.5, 0.4, 0.3, 0.3, 0.2], "different": [0.1, 0.1, 0.2, 0.2, 0.3, 0.3],
              "background": [0.3, 0.4, 0.4, 0.5, 0.4, 0.5]}
    flat = {g: [CHANCE[g] + 0.01 * (i % 2) for i in range(6)] for g in GROUPS}
    area = pd.DataFrame([{"model": m, "layer": layer, "group": g, "ratio": values[g][layer] / CHANCE[g]}
                         for m, values in (("model a", rising), ("model b", flat)) for g in GROUPS
                         for layer in range(6)])
    judged = {key: ledger.Judgement(outcome, "unused", stats.Interval(1.5, 1.2, 1.8, 30)) for key, outcome in
              (("s3-same-early", ledger.AGREES), ("s3-different-grows", ledger.BORDERLINE),
               ("s3-background-grows", ledger.DISAGREES))}
    found = attention.findings(_stats({"model a": rising, "model b": flat}), CHANCE, MODELS, judged, area)
    ratio = {g: rising[g][0] / CHANCE[g] for g in GROUPS}
    assert found["found_same"] == (
        f"**Same-object attention dominates layer 0: agrees.** Per unit area, layer 0 gives same {ratio['same']:.2f}× "
        f"chance, different {ratio['different']:.2f}×, background {ratio['background']:.2f}×; same ÷ the larger other "
        "1.50 [1.20, 1.80].")
    assert found["found_different"].startswith("**Different-object attention grows with depth: borderline.** Slope "
                                                  "1.5000 [1.2000, 1.8000] per layer (raw ratio L0 0.10, L5 0.30")
    assert found["found_background"].startswith("**Background attention grows with depth: disagrees.**")
    assert found["controls"] == "model b stays within 0.010 of chance in every layer (raw ratios)"
    table = found["layer_table"]
    assert table.shape == (6, 9) and table[("model a (× chance)", "same")].iloc[0] == pytest.approx(ratio["same"],
                                                                                                   abs=1e-3)
    assert table[("model a (raw ratio)", "background")].tolist() == pytest.approx(rising["background"])
    one = attention.findings(_stats({"model a": rising}), CHANCE, ["model a"], judged, area)
    assert one["controls"] == "no second model was run"
    assert not [k for k, v in found.items() if isinstance(v, np.generic)]  # glue needs plain Python numbers


def test_per_area_table_and_chart_on_a_hand_worked_scene():
    """One image, one head: the target query gives 0.4 of its attention to the target, whose area among the other
    keys is 0.1; the distractor query gives 0.2 to the distractor (area 0.1): same = (0.4 + 0.2) / (0.1 + 0.1) = 3."""
    rows = [{"model": "m", "image": "a", "layer": 0, "head": 0, "same": 0.3, "different": 0.1, "background": 0.6},
            {"model": "m", "image": "a", "layer": 1, "head": 0, "same": 0.1, "different": 0.1, "background": 0.8}]
    chance = pd.DataFrame({"image": ["a"], "same_removed": [0.1], "different_removed": [0.1],
                           "background_removed": [0.8]})
    area = attention.area_table(pd.DataFrame(rows), chance, ["m"], resamples=50)
    first = area[(area["layer"] == 0)].set_index("group")["ratio"]
    assert first.to_dict() == pytest.approx({"same": 3.0, "different": 1.0, "background": 0.75})
    assert (area["low"] == area["ratio"]).all()  # one image: the bootstrap has nothing to vary
    spec = attention.area_chart(area, ["m"], 1).to_dict()
    assert spec["spec"]["layer"][1]["encoding"]["y"]["scale"]["type"] == "log"


def test_course_shows_a_reversal_that_an_average_would_hide():
    assert attention.course([0.3, 0.25, 0.2, 0.3, 0.4]) == "falls L0→L2 (0.30→0.20), rises L2→L4 (0.20→0.40)"
    assert attention.course([0.5, 0.502, 0.5]) == "stays level L0→L2 (0.50→0.50)"


def test_variant_means_chart_and_self_token_findings():
    rows = []
    for queries, self_token, offset in (("peak", "kept", 0.3), ("peak", "removed", 0.0), ("all", "removed", 0.1)):
        for image, extra in (("a", 0.0), ("b", 0.1)):
            for layer, same in enumerate([0.2, 0.3, 0.4]):
                value = same + offset + extra
                rows.append({"model": "m", "image": image, "layer": layer, "head": 0, "depth": layer / 2,
                             "queries": queries, "self_token": self_token, "same": value, "different": 0.1,
                             "background": 0.9 - value})
    means = attention.variant_means(pd.DataFrame(rows), "m")
    assert means.shape == (3, 9)
    assert means.loc[1, ("same", "peak token, self kept")] == pytest.approx(0.65)
    assert means.loc[1, ("same", "peak token, self removed")] == pytest.approx(0.35)
    found = attention.self_token_findings(means)
    assert found["self_part_l0"] == pytest.approx(0.3) and found["same_removed_l0"] == pytest.approx(0.25)
    assert found["same_kept_l0"] == pytest.approx(0.55) and found["variants"].shape == (3, 9)
    spec = attention.variant_chart(means, "m").to_dict()
    values = next(iter(spec["datasets"].values())) if "datasets" in spec else spec["data"]["values"]
    assert len(values) == 27 and {v["variant"] for v in values} == {"peak token, self kept", "peak token, self removed",
                                                                   "all covered tokens, self removed"}
