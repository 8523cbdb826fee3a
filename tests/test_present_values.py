"""§6's presentation helpers (qklib.present.values_figures) on hand-made tables and ledger records."""

import json

import pandas as pd

from qklib.present import values_figures as figures

from ledger_records import CONTROL, EMBEDDED_NAME


def key_value_rows() -> pd.DataFrame:
    rows = [{"model": model, "layer": layer, "head": head, "mode": mode, "depth": layer, "chance": 0.25,
             "alignment": 0.1 * mode + layer, "gain": 0.5, "self_cosine": -0.2 if model == "b" else 0.3}
            for model in ("a", "b") for layer in range(2) for head in range(2) for mode in range(3)]
    return pd.DataFrame(rows)


def test_the_modes_download_has_one_row_per_mode_and_a_column_per_model():
    wide = figures.modes_download(key_value_rows())
    assert len(wide) == 2 * 2 * 3
    row = wide[(wide.layer == 1) & (wide["head"] == 0) & (wide["mode"] == 2)].iloc[0]
    assert row["alignment [a]"] == 1.2 and row["self_cosine [b]"] == -0.2 and row["self_cosine [a]"] == 0.3


def test_the_mode_chart_carries_every_head_and_the_chance_rule():
    spec = json.loads(figures.key_value_modes(key_value_rows()).to_json())
    datasets = list(spec["datasets"].values())
    arrays = next(d for d in datasets if "alignment" in d[0])
    assert len(arrays) == 2 * 2 * 2  # models x layers x heads, each with its modes as one array
    assert arrays[-1]["alignment"] == [1.0, 1.1, 1.2] and arrays[-1]["m"] == 1
    assert next(d for d in datasets if "chance" in d[0]) == [{"chance": 0.25}]
    assert {param["name"] for param in spec["params"]} == {"model", "layer", "head"}


def test_as_null_renames_the_interval():
    frame = figures.as_null(pd.DataFrame({"model": ["a"], "depth": [0.0], "low": [1.0], "high": [2.0]}))
    assert list(frame.columns) == ["model", "depth", "null_low", "null_high"]
