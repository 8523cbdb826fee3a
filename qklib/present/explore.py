"""Live-kernel explorers: widgets that compute on demand through Python callbacks (they freeze in a static
page, where :mod:`qklib.present.widgets` serves precomputed pictures instead)."""

from __future__ import annotations

import ipywidgets as widgets
import torch
from IPython.display import display

from ..core.extract import token_embeddings
from ..core.images import to_pixels
from ..core.svd import QKSVD
from ..modes import mode_label
from .render import mode_pictures
from .widgets import png_widget


def explore(model, svd: QKSVD, images: dict, size: int = 224):
    """A live-kernel explorer: any layer, head, mode and sign for any of ``images`` ({name: PIL image}).

    Uses Python callbacks, so it only works with a running kernel (the static book uses
    ``qklib.present.widgets.nested_stack`` over precomputed pictures instead).
    """
    names = list(images)
    cache: dict[tuple[str, int], torch.Tensor] = {}
    pick = widgets.Dropdown(options=names, description="image")
    layer = widgets.IntSlider(0, 0, svd.num_layers - 1, description="layer")
    head = widgets.IntSlider(0, 0, svd.num_heads - 1, description="head")
    mode = widgets.IntSlider(0, 0, svd.rank - 1, description="mode")
    sign = widgets.ToggleButtons(options=[("+", 1), ("-", -1)], description="sign")
    out = widgets.Output()

    def draw(_change=None):
        key = (pick.value, layer.value)
        if key not in cache:
            cache[key] = token_embeddings(model, to_pixels(model, images[pick.value]), layers=[layer.value])[0]
        picture = mode_pictures(model, svd, [images[pick.value]], layer.value, head.value, mode.value, sign.value,
                                size=size, tokens=cache[key])[0]
        n = mode.value
        caption = (f"{mode_label(layer.value, head.value, n, sign.value)} (0-based): "
                   f"s = {float(svd.S[layer.value, head.value, n]):.3g}, cos = {float(svd.cos[layer.value, head.value, n]):+.3f}")
        out.clear_output(wait=True)
        with out:
            display(widgets.VBox([widgets.HTML(caption), png_widget(picture)]))

    for control in (pick, layer, head, mode, sign):
        control.observe(draw, names="value")
    draw()
    return widgets.VBox([pick, layer, head, mode, sign, out])
