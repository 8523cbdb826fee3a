"""Charts in JupyterLab without a network: altair's HTML loads vega from a CDN, and JupyterLab 4.6 has no
renderer for altair 6's vega-lite 6 specs. ``make lab`` (``tools/lab.py``) serves vega, vega-lite and
vega-embed for the installed altair (from vl-convert, offline) as one script, and tells the kernels its URL
in ``$QKLIB_VEGA_SCRIPT``; :func:`use_served_vega` (called in the first cell of every chapter, in sight) then
draws every chart with that script.

The book is untouched: its pages load their own vendored copy (``tools/build_book.py``).
"""

from __future__ import annotations

import json
import os
import uuid

import altair as alt

ENV = "QKLIB_VEGA_SCRIPT"
RENDERER = "qklib-served-vega"

# One script load per page, shared by every chart; a chart that cannot be drawn says why in its place.
_TEMPLATE = """<div id="{div}"></div>
<script type="text/javascript">
(() => {{
  const ready = window.qklibVega || (window.qklibVega = new Promise((resolve, reject) => {{
    if (window.vegaEmbed) return resolve();
    const script = document.createElement("script");
    script.src = {src};
    script.onload = resolve;
    script.onerror = () => reject(new Error("could not load " + script.src));
    document.head.appendChild(script);
  }}));
  ready.then(() => vegaEmbed("#{div}", {spec}, {options}))
       .catch(error => {{ document.getElementById("{div}").textContent = "chart not drawn: " + error; }});
}})();
</script>"""


def chart_html(spec: dict, src: str, embed_options: dict | None = None) -> str:
    """HTML that draws a vega-lite ``spec`` with the vega bundle at URL ``src`` (loaded once per page)."""
    div = f"altair-viz-{uuid.uuid4().hex}"
    options = {"mode": "vega-lite", **(embed_options or {})}
    return _TEMPLATE.format(div=div, src=json.dumps(src), spec=json.dumps(spec), options=json.dumps(options))


def use_served_vega(src: str | None = None) -> bool:
    """Draw altair charts with the vega bundle at ``src`` (default ``$QKLIB_VEGA_SCRIPT``, set by
    ``make lab``). Returns whether it did: without a URL, altair's own renderer stays."""
    src = src or os.environ.get(ENV)
    if not src:
        return False
    alt.renderers.register(RENDERER, lambda spec, **metadata: {"text/html": chart_html(spec, src, metadata.get("embed_options"))})
    alt.renderers.enable(RENDERER)
    return True
