"""One look across the book's charts: a colour per model and per control, and text legible at page size.

Colours follow a model's role, not its name, so the same run shows the same colours in every chapter: the
first trained model of a chapter's ``models`` is always blue, the second orange, ...; random-init controls are
greys, listed after the trained models they control; chance is drawn in black, dashed, and named in the chart.
Charts carry their data inline (:func:`inline`), rounded to keep pages small. The theme (``THEME``, registered with
altair under that name) sets the charts' text sizes; a chapter turns it on in its first cell with
``alt.theme.enable(style.THEME)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import altair as alt
import numpy as np
import pandas as pd

from ..book.ledger import is_control

TRAINED = ("#1f5fa8", "#d9730d", "#2a9d5c", "#b0306b", "#7b5ea7", "#8c6d31", "#17a2b8", "#c9a227")
CONTROLS = ("#7f7f7f", "#a9a9a9", "#505050", "#c7c7c7")
CHANCE = "black"
THEME = "qklib"


# Facetted charts wrap after this many panels, so that they fit the book's text column.
PANELS_PER_ROW = 2


def inline(frame: pd.DataFrame, digits: int = 4) -> alt.InlineData:
    """The frame as inline chart data, floats rounded to ``digits`` significant digits to keep pages small
    (significant, not decimal, digits: small values such as spectrum weights on a log axis must not become 0).

    Inline values bypass altair's 5000-row guard on purpose: the chapters precompute every row that a
    slider can show, and the page-size budget (5 MB) is checked by the book's browser test instead.
    """
    rounded = frame.copy()
    for column in rounded.select_dtypes("float").columns:
        values = rounded[column].to_numpy(dtype=float)
        magnitude = np.floor(np.log10(np.abs(np.where(values == 0, 1.0, values))))
        scale = 10.0 ** (digits - 1 - magnitude)
        rounded[column] = np.round(values * scale) / scale
    return alt.InlineData(values=rounded.to_dict(orient="records"))


def model_order(models: Iterable[str]) -> list[str]:
    """The models, trained ones first (in the order given), then the random-init controls."""
    models = list(dict.fromkeys(models))
    return [m for m in models if not is_control(m)] + [m for m in models if is_control(m)]


def model_colours(models: Iterable[str]) -> dict[str, str]:
    """``{model: colour}``: trained models in ``TRAINED`` order, controls in ``CONTROLS`` order."""
    ordered = model_order(models)
    trained = [m for m in ordered if not is_control(m)]
    controls = [m for m in ordered if is_control(m)]
    colours = {m: TRAINED[i % len(TRAINED)] for i, m in enumerate(trained)}
    return colours | {m: CONTROLS[i % len(CONTROLS)] for i, m in enumerate(controls)}


def model_colour(models: Iterable[str], field: str = "model", **legend) -> alt.Color:
    """An altair colour encoding of ``field`` with the book's colour for each model and its legend at the bottom,
    one entry a line, trained models before their controls."""
    colours = model_colours(models)
    options = {"orient": "bottom", "direction": "vertical", "title": None, "labelLimit": 400} | legend
    return alt.Color(f"{field}:N", sort=list(colours), scale=alt.Scale(domain=list(colours), range=list(colours.values())),
                     legend=alt.Legend(**options))


@alt.theme.register(THEME, enable=False)
def _theme() -> alt.theme.ThemeConfig:
    """Text sizes that read at the book's page width without enlarging (altair's defaults are about 10 px)."""
    return alt.theme.ThemeConfig({"config": {
        "axis": {"labelFontSize": 12, "titleFontSize": 13},
        "legend": {"labelFontSize": 12, "titleFontSize": 13},
        "header": {"labelFontSize": 13, "titleFontSize": 13},
        "title": {"fontSize": 14},
        "text": {"fontSize": 12},
    }})
