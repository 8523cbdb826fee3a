"""Slider widgets that keep working in a static page.

ipywidgets driven by Python callbacks freeze once the kernel is gone. Here every slider is ``jslink``ed
(client-side) to the ``selected_index`` of ``Stack`` widgets whose children were all rendered up front,
so the saved widget state alone makes the sliders work in the built book.

``nested_stack`` takes a nested list of widgets, one nesting level per slider (e.g. layer -> head ->
mode), and links the level-k slider to every Stack at depth k. Given ``values``, a level's slider reads the
value it selects (``L7``), not its position (``2``).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

import ipywidgets as widgets
import pandas as pd
from IPython.display import HTML


def _depth(tree) -> int:
    depth = 0
    while isinstance(tree, Sequence) and not isinstance(tree, widgets.Widget | str):
        if len(tree) == 0:
            raise ValueError("nested_stack needs at least one child at every level")
        tree = tree[0]
        depth += 1
    return depth


def nested_stack(tree, names: Sequence[str], values: Sequence[Sequence | None] | None = None) -> widgets.VBox:
    """A VBox of one slider per level above a nested ``Stack`` of ``tree``'s leaves.

    ``tree``: nested lists of widgets, ``len(names)`` levels deep (``tree[layer][head]`` for names
    ``("layer", "head")``). Every inner level must have the same length.
    ``values``: per level, what each position stands for (``[["L1", "L4", "L7"], ["H0", "H1"]]``); that
    level's slider is then a ``SelectionSlider`` whose readout is the selected value, linked by its
    ``index``. A level without values (``None``, or no ``values`` at all) gets an ``IntSlider`` of
    0-based positions.
    """
    depth = _depth(tree)
    if depth != len(names):
        raise ValueError(f"tree is {depth} levels deep but {len(names)} slider names were given")
    values = list(values) if values is not None else [None] * depth
    if len(values) != depth:
        raise ValueError(f"tree is {depth} levels deep but values were given for {len(values)} levels")
    stacks_by_level: list[list[widgets.Stack]] = [[] for _ in range(depth)]
    sizes = [0] * depth

    def build(node, level: int):
        if level == depth:
            return node
        if sizes[level] and len(node) != sizes[level]:
            raise ValueError(f"level {names[level]!r} has {len(node)} children here but {sizes[level]} elsewhere")
        sizes[level] = len(node)
        stack = widgets.Stack([build(child, level + 1) for child in node], selected_index=0)
        stacks_by_level[level].append(stack)
        return stack

    root = build(tree, 0)
    sliders = []
    for level, name in enumerate(names):
        slider, linked = _slider(name, sizes[level], values[level])
        for stack in stacks_by_level[level]:
            widgets.jslink((slider, linked), (stack, "selected_index"))
        sliders.append(slider)
    return widgets.VBox([*sliders, root])


def _slider(name: str, size: int, values: Sequence | None) -> tuple[widgets.Widget, str]:
    """A slider over ``size`` positions and the trait that holds its position."""
    if values is None:
        return widgets.IntSlider(value=0, min=0, max=size - 1, description=name, continuous_update=True), "value"
    labels = [str(v) for v in values]
    if len(labels) != size:
        raise ValueError(f"level {name!r} has {size} children but {len(labels)} values: {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"level {name!r}: values must differ from each other, got {labels}")
    slider = widgets.SelectionSlider(options=[(label, i) for i, label in enumerate(labels)], index=0,
                                     description=name, continuous_update=True)
    return slider, "index"


def picture_html(data: bytes, width: int = 160, caption: str = "", format: str = "jpeg") -> str:
    """An ``<img>`` (``data`` = encoded JPEG/PNG bytes) shown ``width`` px wide; a click toggles full size.

    Plain HTML with an inline handler, so it works in a static page, in an ``HTML`` widget inside a static
    slider ``Stack`` and in a live notebook alike.
    """
    source = f"data:image/{format};base64,{base64.b64encode(data).decode()}"
    toggle = "this.style.width = this.style.width === '100%' ? '{w}px' : '100%'".format(w=width)
    image = (f'<img src="{source}" style="width:{width}px;max-width:100%;cursor:zoom-in" '
             f'title="click to enlarge / shrink" onclick="{toggle}">')
    return f"<figure style='margin:0;padding:0'>{image}<figcaption>{caption}</figcaption></figure>" if caption else image


def download_link(frame: pd.DataFrame, filename: str, label: str | None = None) -> HTML:
    """A link that downloads ``frame`` as CSV, embedded in the page (no file beside it, no widget manager needed)."""
    payload = base64.b64encode(frame.to_csv(index=False).encode()).decode()
    text = html.escape(label or f"Download {filename} ({len(frame)} rows, CSV)")
    return HTML(f'<a download="{html.escape(filename)}" href="data:text/csv;base64,{payload}">{text}</a>')
