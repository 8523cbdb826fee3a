"""qklib.present.widgets: static-page sliders over nested Stacks, clickable pictures, CSV downloads."""

import base64
import re

import ipywidgets as widgets
from ipywidgets.widgets.widget import _instances as live_widgets  # ipywidgets' registry of open widgets
from ipywidgets.widgets.widget_link import Link
import pandas as pd
import pytest

from qklib.present.widgets import download_link, nested_stack, picture_html


def leaf(text: str) -> widgets.HTML:
    return widgets.HTML(text)


def test_nested_stack_links_each_slider_to_every_stack_of_its_level():
    tree = [[leaf(f"L{l} H{h}") for h in range(3)] for l in range(2)]
    box = nested_stack(tree, ("layer", "head"))
    layer, head, root = box.children
    assert (layer.max, head.max) == (1, 2)
    inner = root.children
    links = [w for w in live_widgets.values() if isinstance(w, Link)]
    targets = {(id(link.source[0]), id(link.target[0])) for link in links}
    assert (id(layer), id(root)) in targets
    assert all((id(head), id(stack)) in targets for stack in inner)
    assert inner[1].children[2].value == "L1 H2"


def test_nested_stack_rejects_ragged_or_mislabelled_trees():
    with pytest.raises(ValueError, match="2 levels deep but 1 slider names"):
        nested_stack([[leaf("a")]], ("layer",))
    with pytest.raises(ValueError, match="has 1 children here but 2 elsewhere"):
        nested_stack([[leaf("a"), leaf("b")], [leaf("c")]], ("layer", "head"))


def test_picture_html_embeds_the_bytes_and_toggles_full_size():
    markup = picture_html(b"\xff\xd8jpeg", width=160, caption="L1 H2 M3")
    source = re.search(r'src="data:image/jpeg;base64,([^"]+)"', markup).group(1)
    assert base64.b64decode(source) == b"\xff\xd8jpeg"
    assert "width:160px" in markup and "onclick=" in markup and "100%" in markup
    assert "<figcaption>L1 H2 M3</figcaption>" in markup


def test_download_link_carries_the_csv():
    frame = pd.DataFrame({"layer": [0, 1], "same": [0.25, 0.5]})
    markup = download_link(frame, "s3.csv").data
    payload = re.search(r'href="data:text/csv;base64,([^"]+)"', markup).group(1)
    assert base64.b64decode(payload).decode() == "layer,same\n0,0.25\n1,0.5\n"
    assert 'download="s3.csv"' in markup and "2 rows" in markup
