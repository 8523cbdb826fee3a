"""The book: chapter notebooks are clean text paired with their .ipynb, and the built pages work offline.

The browser test builds the book (tools/build_book.py; set QKLIB_REUSE_BOOK=1 to reuse _build/html),
serves it on 127.0.0.1 and opens every page of _toc.yml in Debian's chromium with Playwright.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
HTML = ROOT / "_build" / "html"
MAX_PAGE_BYTES = 5 * 1024 * 1024


def _build_book_module():
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "tools" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_book = _build_book_module()
TOC_FILES = build_book.toc_files()
CHAPTERS = build_book.chapter_names(TOC_FILES)
TEXT_NOTEBOOKS = sorted(NOTEBOOKS.glob("*.py"))


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


# ------------------------------------------------------------------------------ text notebooks
@pytest.mark.parametrize("path", TEXT_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_one_parameters_cell_and_is_in_toc(path):
    notebook = jupytext.read(path, fmt="py:percent")
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in _tags(cell)]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'; tag exactly one (# %% tags=[\"parameters\"])"
    assert notebook.cells[tagged[0]].cell_type == "code", f"{path.name}: the 'parameters' cell must be a code cell"
    first_code = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    assert tagged[0] == first_code, f"{path.name}: the 'parameters' cell must be the first code cell"
    assert path.stem in CHAPTERS, f"{path.name} is not in _toc.yml: add '- file: executed/{path.stem}' to its chapters"


@pytest.mark.parametrize("path", TEXT_NOTEBOOKS, ids=lambda p: p.name)
def test_paired_ipynb_in_sync(path, tmp_path):
    # The pairing jupytext.toml configures makes an .ipynb whose cells and tags equal the text notebook's...
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(path, work / path.name)
    shutil.copy(ROOT / "jupytext.toml", tmp_path / "jupytext.toml")
    subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(work / path.name)], cwd=tmp_path, check=True,
                   capture_output=True)
    made = work / path.with_suffix(".ipynb").name
    assert made.is_file(), "jupytext.toml does not pair notebooks/*.py with an .ipynb"
    text = jupytext.read(path, fmt="py:percent")
    assert _cells(jupytext.read(made)) == _cells(text)
    assert [_tags(c) for c in jupytext.read(made).cells] == [_tags(c) for c in text.cells]
    # ...and the working copy's own pair, where one was made, has not drifted from the committed text.
    pair = path.with_suffix(".ipynb")
    if pair.exists():
        assert _cells(jupytext.read(pair)) == _cells(text), (
            f"{path.name} and {pair.name} differ: run '.venv/bin/jupytext --sync {path.relative_to(ROOT)}' "
            "(the newer file wins)")


def test_committed_notebooks_have_no_outputs_or_injected_parameters():
    tracked = subprocess.run(["git", "ls-files", "*.ipynb", "notebooks/*", "executed/*"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    problems = []
    for name in tracked:
        path = ROOT / name
        if not path.is_file():
            continue
        if name.startswith("executed/"):
            problems.append(f"{name}: executed notebooks are built, never committed")
            continue
        if path.suffix == ".ipynb":
            notebook = json.loads(path.read_text())
            for index, cell in enumerate(notebook.get("cells", [])):
                if cell.get("outputs") or cell.get("execution_count"):
                    problems.append(f"{name} cell {index}: has outputs; clear them (jupyter nbconvert --clear-output)")
                if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
                    problems.append(f"{name} cell {index}: papermill's injected-parameters cell; delete it")
        elif path.suffix == ".py":
            notebook = jupytext.read(path, fmt="py:percent")
            for index, cell in enumerate(notebook.cells):
                if "injected-parameters" in _tags(cell):
                    problems.append(f"{name} cell {index}: papermill's injected-parameters cell; delete it")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------- browser
# `chromium` (Debian's, driven by Playwright) comes from conftest.py.
@pytest.fixture(scope="module")
def book(chromium):
    """The built book's folder: built now, or reused when QKLIB_REUSE_BOOK=1 and one exists."""
    if os.environ.get("QKLIB_REUSE_BOOK") == "1" and (HTML / "index.html").is_file():
        return HTML
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "tools/build_book.py"], cwd=ROOT, capture_output=True, text=True)
    print(f"tools/build_book.py took {time.perf_counter() - started:.0f} s")
    if result.returncode != 0:
        pytest.fail(f"tools/build_book.py failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return HTML


@pytest.fixture(scope="module")
def server(book):
    """http://127.0.0.1:PORT serving the built book (a free port, a thread)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(book)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _changed(take, before: bytes, timeout_s: float = 10.0) -> bool:
    """Whether `take()` (a screenshot) differs from `before` within the timeout (re-rendering is async)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if take() != before:
            return True
        time.sleep(0.1)
    return False


def _raw_tex(page) -> list[str]:
    """TeX delimiters left in the page's prose (code blocks excluded): MathJax did not typeset it."""
    return page.evaluate("""() => {
        const main = document.querySelector('main') || document.body;
        const copy = main.cloneNode(true);
        copy.querySelectorAll('pre, code, script, style, mjx-container, .highlight').forEach(e => e.remove());
        const text = copy.textContent;
        return ['\\\\(', '\\\\)', '\\\\[', '\\\\]', '$$', '\\\\begin{'].filter(d => text.includes(d));
    }""")


def _overflow(page, chart) -> float:
    """How many px a chart's drawing reaches past the right edge of the page's text column."""
    return page.evaluate("""el => {
        const column = el.closest('article, main') || document.body;
        const drawn = [...el.querySelectorAll('canvas, svg.marks')].map(g => g.getBoundingClientRect().right);
        return Math.max(...drawn) - column.getBoundingClientRect().right;
    }""", chart.element_handle())


@pytest.mark.browser
def test_overflow_check_measures_a_chart_wider_than_its_column(chromium):
    page = chromium.new_page()
    try:
        page.set_content('<main><article style="width:600px"><div id="altair-viz-1"><canvas width="900" height="10">'
                         '</canvas></div><div id="altair-viz-2"><canvas width="500" height="10"></canvas></div>'
                         '</article></main>')
        wide, narrow = (page.locator(f"#altair-viz-{i}") for i in (1, 2))
        assert _overflow(page, wide) == pytest.approx(300, abs=2)
        assert _overflow(page, narrow) < 0
    finally:
        page.close()


def _check_altair(page, problems: list[str]) -> str:
    charts = page.locator('[id^="altair-viz-"]')
    moved = 0
    for i in range(charts.count()):
        chart = charts.nth(i)
        name = f"altair chart {i}"
        try:
            page.wait_for_function(
                """el => el.classList.contains('vega-embed') && [...el.querySelectorAll('canvas, svg.marks')]
                       .some(g => g.getBoundingClientRect().width > 0 && g.getBoundingClientRect().height > 0)""",
                arg=chart.element_handle(), timeout=20_000)
        except Exception:
            problems.append(f"{name}: not rendered (no .vega-embed with a non-empty canvas/svg): "
                            f"{chart.inner_text()[:300]!r}")
            continue
        overflow = _overflow(page, chart)
        if overflow > 1:
            problems.append(f"{name}: {overflow:.0f} px wider than the page column (wrap its facets or narrow it)")
        sliders = chart.locator(".vega-bindings input[type=range]")
        for j in range(sliders.count()):
            slider = sliders.nth(j)
            low, high, value = (float(slider.get_attribute(a) or 0) for a in ("min", "max", "value"))
            new = high if value != high else low
            graphic = chart.locator("canvas, svg.marks").first
            before = graphic.screenshot()
            slider.fill(f"{new:g}")
            moved += 1
            if not _changed(graphic.screenshot, before):
                problems.append(f"{name}: moving slider {j} from {value:g} to {new:g} changed nothing")
    return f"{charts.count()} altair charts, {moved} chart sliders moved"


def _check_widgets(page, problems: list[str]) -> str:
    views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    if not views:
        return "no widgets"
    try:
        page.wait_for_function(
            """n => { const areas = [...document.querySelectorAll('.widget-subarea')];
                      return areas.length >= n && areas.every(a => a.firstElementChild &&
                          a.firstElementChild.getBoundingClientRect().height > 0); }""",
            arg=views, timeout=30_000)
    except Exception:
        rendered = page.locator(".widget-subarea").count()
        problems.append(f"widgets: {views} widget views in the page, {rendered} rendered")
        return "widgets not rendered"
    moved = 0
    areas = page.locator(".widget-subarea")
    for i in range(areas.count()):
        area = areas.nth(i)
        sliders = area.locator(".widget-slider")
        for j in range(sliders.count()):
            slider = sliders.nth(j)
            label = slider.locator(".widget-label").first.inner_text() if slider.locator(".widget-label").count() else j
            mask = [area.locator(".widget-slider")]  # the sliders' own readout moves; compare the rest

            def shot():
                return area.screenshot(mask=mask)

            before = shot()
            handle = slider.locator(".noUi-handle").first
            handle.focus()
            key = "ArrowLeft" if handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax") else "ArrowRight"
            page.keyboard.press(key)
            moved += 1
            if not _changed(shot, before):
                problems.append(f"widget area {i}: slider {label!r} ({key}) changed nothing in its output")
            # The readout names what the slider selects (L7, H3, M0, or an image's name), not a position, and the
            # picture shown carries that name.
            readout = slider.locator(".widget-readout").first.inner_text().strip()
            if re.fullmatch(r"\d+", readout):
                problems.append(f"widget area {i}: slider {label!r} reads {readout!r}, a position, not what it selects")
            elif not re.search(rf"(?<![\w-]){re.escape(readout)}(?![\w-])", area.inner_text()):
                problems.append(f"widget area {i}: slider {label!r} reads {readout!r} but no shown caption names it")
    return f"{views} widget areas, {moved} widget sliders moved"


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("doc", TOC_FILES)
def test_page_works_offline(chromium, server, book, doc):
    page_file = book / f"{doc}.html"
    assert page_file.is_file(), f"{page_file} was not built"
    size = page_file.stat().st_size
    assert size < MAX_PAGE_BYTES, f"{doc}.html is {size / 2**20:.1f} MB (limit 5 MB)"

    host = urlsplit(server).netloc
    outside, errors, problems = [], [], []
    context = chromium.new_context(viewport={"width": 1280, "height": 900})

    def route(route):
        if urlsplit(route.request.url).netloc == host:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on("console", lambda message: errors.append(f"console {message.type}: {message.text} ({message.location})")
            if message.type == "error" else None)
    try:
        page.goto(f"{server}/{doc}.html", wait_until="load")
        has_math = page.locator(".math").count() > 0
        if has_math or doc.endswith("methods"):
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                                   timeout=20_000)
            page.evaluate("() => MathJax.startup.promise.then(() => true)")
            if page.locator("mjx-container").count() == 0:
                problems.append("math: no mjx-container (MathJax did not typeset)")
        raw = _raw_tex(page)
        if raw:
            problems.append(f"math left as raw TeX: {raw}")
        checked = [_check_altair(page, problems), _check_widgets(page, problems)]
        page.wait_for_load_state("networkidle")
        math = page.locator("mjx-container").count()
        print(f"{doc}: {size / 1024:.0f} KiB, {math} typeset formulas, " + ", ".join(checked))
    finally:
        context.close()
    assert not outside, f"{doc}: requests left 127.0.0.1: {outside}"
    assert not errors, f"{doc}:\n" + "\n".join(errors)
    assert not problems, f"{doc}:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------ one look across chapters
def chart_specs(notebook_path: Path) -> list[dict]:
    """Every altair chart's vega-lite spec in an executed notebook's HTML outputs."""
    import nbformat

    decoder, specs = json.JSONDecoder(), []
    for cell in nbformat.read(notebook_path, as_version=4).cells:
        for output in cell.get("outputs", []):
            html = output.get("data", {}).get("text/html", "")
            start = html.rfind("})(")
            if "vega" in html and start != -1:
                specs.append(decoder.raw_decode(html, start + 3)[0])
    return specs


def model_colour_scales(node) -> list[dict]:
    """Every colour encoding of the ``model`` field with an explicit scale, anywhere in a spec."""
    found = []
    if isinstance(node, dict):
        colour = node.get("color")
        if isinstance(colour, dict) and colour.get("field") == "model" and "scale" in colour:
            found.append(colour["scale"])
        for value in node.values():
            found += model_colour_scales(value)
    elif isinstance(node, list):
        for value in node:
            found += model_colour_scales(value)
    return found


def colour_problems(specs_by_chapter: dict[str, list[dict]]) -> list[str]:
    """A model with two colours anywhere in the book, a control before a trained model, small text."""
    from qklib.book.ledger import is_control

    seen, problems = {}, []
    for chapter, specs in specs_by_chapter.items():
        for index, spec in enumerate(specs):
            if spec.get("config", {}).get("axis", {}).get("labelFontSize", 0) < 12:
                problems.append(f"{chapter} chart {index}: axis labels under 12 px (the book's theme is off)")
            for scale in model_colour_scales(spec):
                domain, colours = scale.get("domain", []), scale.get("range", [])
                controls = [is_control(m) for m in domain]
                if controls != sorted(controls):
                    problems.append(f"{chapter} chart {index}: a control comes before a trained model: {domain}")
                for model, colour in zip(domain, colours):
                    first = seen.setdefault(model, (colour, chapter))
                    if first[0] != colour:
                        problems.append(f"{model}: {first[0]} in {first[1]}, {colour} in {chapter} chart {index}")
    return problems


def test_the_colour_check_catches_a_model_in_two_colours():
    spec = {"config": {"axis": {"labelFontSize": 12}},
            "encoding": {"color": {"field": "model", "scale": {"domain": ["a", "b"], "range": ["#1", "#2"]}}}}
    other = json.loads(json.dumps(spec).replace('"#1"', '"#9"'))
    control_first = {"config": {"axis": {"labelFontSize": 10}}, "layer": [{"encoding": {"color": {
        "field": "model", "scale": {"domain": ["x (random init, seed 0)", "a"], "range": ["#7", "#1"]}}}}]}
    found = colour_problems({"s3": [spec], "s4": [other, control_first]})
    assert any(p.startswith("a: #1 in s3, #9 in s4") for p in found)
    assert any("control comes before" in p for p in found) and any("under 12 px" in p for p in found)
    assert colour_problems({"s3": [spec], "s4": [spec]}) == []


@pytest.mark.slow
@pytest.mark.browser
def test_one_colour_per_model_across_the_chapters(book):
    executed = ROOT / "executed"
    specs = {chapter: chart_specs(executed / f"{chapter}.ipynb") for chapter in CHAPTERS}
    assert all(specs.values()), {chapter: len(found) for chapter, found in specs.items()}
    assert sum(len(model_colour_scales(s)) for found in specs.values() for s in found) >= 5
    assert colour_problems(specs) == []
