#!/usr/bin/env python
"""Build the book: vendor its JavaScript, execute the chapters whose inputs changed with papermill, build
strict HTML.

What `make book` runs. Works offline once the npm tarballs are in the cache (the first run fetches them
with `npm pack` from the npm registry).

    tools/build_book.py                                   # every chapter in _toc.yml (each reused if unchanged)
    tools/build_book.py --only s4_cosine                  # only this chapter; the site keeps the others
    tools/build_book.py --param s4_cosine models='["vit_base_patch16_224.dino"]'
    tools/build_book.py --param all device=cuda           # a parameter for every chapter that declares it
    tools/build_book.py --force                           # re-execute every chapter and rebuild every page
    tools/build_book.py --no-execute                      # rebuild the HTML from executed/*.ipynb

Chapters are the `executed/<name>` entries of _toc.yml; each comes from the jupytext text notebook
`notebooks/<name>.py`, converted to .ipynb in a temporary folder and executed by papermill (cwd = repo
root) into a temporary file beside `executed/<name>.ipynb`, which replaces it only when the run succeeded; a
failed run is kept as `executed/<name>.failed.ipynb`. The text notebook is never touched.

A chapter is executed again only when one of its inputs changed since its last good run: its text, qklib's
source, the parameters given, the files and folders its parameters name (by listing: names, sizes, times), the
models' weights files (likewise), the pinned environment (pyproject.toml). The inputs are recorded in the
executed notebook's metadata (key `qklib_book`); the builder prints for each chapter "reused (inputs
unchanged)" or which inputs changed. Sphinx then rewrites only the pages whose sources changed.

Every build then writes the claims ledger, `executed/ledger.md` (included by the page `book/claims.md`), from
the glued records of the executed chapters (`qklib.book.ledger`), so that it always matches the chapters in the site.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qklib.book import ledger  # noqa: E402
from qklib.book.chapter import (SPECS, declared_parameters, default_parameters, listing_digest,  # noqa: E402
                                output_folder)
from qklib.core.cluster import ClusterError  # noqa: E402  (submitit itself is imported only for --executor slurm)
from qklib.core.loaders.imgfocus import cache_dir as qklib_cache_dir  # noqa: E402
from qklib.present.ledger_page import ledger_markdown  # noqa: E402
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "executed"
VENDOR = ROOT / "book" / "vendor"
BUILD_HTML = ROOT / "_build" / "html"
DOCTREES = ROOT / "_build" / ".doctrees"  # Sphinx's environment: what lets it rebuild only changed pages
HTML_STAMP = ROOT / "_build" / "html-site.json"  # the site the last good HTML build made (see build_html)
TOC = ROOT / "_toc.yml"
CHAPTER_PREFIX = "executed/"
LEDGER_PAGE = "book/claims"  # includes LEDGER, which write_ledger makes from the chapters' glued records
LEDGER = EXECUTED / "ledger.md"

# npm packages the pages load; the versions are what the book was tested with.
REQUIREJS = ("requirejs", "2.3.7")
HTML_MANAGER = ("@jupyter-widgets/html-manager", "1.0.15")
MATHJAX = ("mathjax", "3.2.2")
MAX_PAGE_BYTES = 5 * 1024 * 1024
RECORD_KEY = "qklib_book"  # the executed notebook's metadata key holding the inputs of its run


# Appended to require.js, so it runs on widget pages only, after require.js and before embed-amd.js.
WIDGET_PAGE_SETUP = r"""
/* qklib: setup for @jupyter-widgets/html-manager's embed-amd.js */
(function () {
  // Its two AMD modules locate their font files from their module URI, which without a path is relative
  // to the page (404s on every page); both modules live in embed-amd.js.
  var dist = document.currentScript.src.replace(/requirejs\/require\.js.*$/, '') + 'html-manager/dist/';
  requirejs.config({paths: {
    '@jupyter-widgets/html-manager': dist + 'embed-amd',
    '@jupyter-widgets/html-manager/dist/libembed-amd': dist + 'libembed-amd'
  }});
  // The controls typeset widget labels with MathJax 2's MathJax.Hub.Queue whenever window.MathJax exists;
  // the book loads MathJax 3, which has no Hub (a page error per label). Give it that one call. MathJax 3
  // replaces window.MathJax when its deferred script runs, so install this once the document is parsed
  // (the widgets render later, on window load).
  document.addEventListener('DOMContentLoaded', function () {
    var mathjax = window.MathJax;
    if (!mathjax || mathjax.Hub || !mathjax.startup) return;
    mathjax.Hub = {Queue: function (job) {
      var element = job && job[2];
      if (element) mathjax.startup.promise.then(function () { return mathjax.typesetPromise([element]); });
    }};
  });
})();
"""


class BuildError(RuntimeError):
    """A step failed; the message says which and what to do."""


# ---------------------------------------------------------------------------------------------- toc
def toc_files(toc_path: Path = TOC) -> list[str]:
    """Every document of the toc, in reading order (root first), as written there (no suffix)."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(node):
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                if "file" in child:
                    files.append(child["file"])
                walk(child)

    walk(toc)
    return files


def chapter_names(files: list[str]) -> list[str]:
    return [f[len(CHAPTER_PREFIX):] for f in files if f.startswith(CHAPTER_PREFIX)]


def restricted_toc(only: list[str], path: Path, leave_out: tuple[str, ...] = (),
                   sections: dict[str, list[str]] | None = None) -> Path:
    """A copy of _toc.yml keeping only the chapters in `only` and the other pages, except those in `leave_out`;
    `sections` {chapter: [files]} adds per-model pages under a chapter run once per model (--executor slurm)."""
    toc = yaml.safe_load(TOC.read_text())
    sections = sections or {}
    keep = {CHAPTER_PREFIX + name for name in only}

    def wanted(entry: dict) -> bool:
        file = entry.get("file", "")
        return file not in leave_out and (not file.startswith(CHAPTER_PREFIX) or file in keep)

    def prune(node):
        for key in ("parts", "chapters", "sections"):
            if key in node:
                node[key] = [c for c in node[key] if wanted(c)]
                for child in node[key]:
                    prune(child)
                    name = child.get("file", "")[len(CHAPTER_PREFIX):]
                    if child.get("file", "").startswith(CHAPTER_PREFIX) and name in sections:
                        child["sections"] = [{"file": file} for file in sections[name]]
        if "parts" in node:  # a part whose chapters all went is left out (Jupyter Book refuses an empty part)
            node["parts"] = [part for part in node["parts"] if part.get("chapters")]

    prune(toc)
    write_if_changed(path, "# written by tools/build_book.py --only; do not edit\n" + yaml.safe_dump(toc, sort_keys=False))
    return path


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless ``path`` holds it already (False): an unchanged file keeps its time, so Sphinx does
    not rebuild the pages that depend on it."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


# ------------------------------------------------------------------------------------------- vendor
def cache_dir() -> Path:
    """npm tarballs live next to qklib's other caches (``$QKLIB_CACHE``, default the user cache dir)."""
    return qklib_cache_dir() / "npm"


def npm_package(name: str, version: str) -> Path:
    """The extracted `package/` folder of NAME@VERSION, fetched once with `npm pack` into the cache."""
    target = cache_dir() / f"{name.replace('/', '+')}-{version}"
    if (target / "package" / "package.json").is_file():
        return target / "package"
    if shutil.which("npm") is None:
        raise BuildError(f"{name}@{version} is not in the cache {cache_dir()} and npm is missing: install npm "
                         f"(apt-get install npm) or put the extracted tarball at {target}/package")
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(target)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"npm pack {name}@{version} failed (is the npm registry reachable?):\n{result.stderr[-2000:]}")
    tarball = target / json.loads(result.stdout)[0]["filename"]
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    tarball.unlink()
    return target / "package"


def _copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, destination, dirs_exist_ok=True)
    else:
        shutil.copy2(source, destination)


def vega_versions() -> dict[str, str]:
    from altair.vegalite.v6 import display

    return {"vega_version": display.VEGA_VERSION, "vegalite_version": display.VEGALITE_VERSION,
            "vegaembed_version": display.VEGAEMBED_VERSION}


def vendor() -> None:
    """Fill book/vendor/ (served as the book's only static path) with every script the pages load."""
    import vl_convert

    # This script writes the glue scripts, so its own hash is part of the stamp.
    versions = {**vega_versions(), **dict([REQUIREJS, HTML_MANAGER, MATHJAX]),
                "build_book.py": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}
    stamp = VENDOR / "VERSIONS.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == versions:
        print(f"vendor: {VENDOR.relative_to(ROOT)} is up to date")
        return
    started = time.perf_counter()
    if VENDOR.exists():
        shutil.rmtree(VENDOR)
    (VENDOR / "vega").mkdir(parents=True)

    # vega + vega-lite + vega-embed matching the installed altair. The bundle's top-level const/let would
    # clash with Sphinx's globals (`_`): a function scope keeps them private; it sets window.vega* itself.
    vl_minor = ".".join(versions["vegalite_version"].split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=vl_minor)
    (VENDOR / "vega" / "vega-bundle.js").write_text(
        f"/* vega, vega-lite {vl_minor}, vega-embed from vl-convert's javascript_bundle() */\n"
        f"(function () {{\n{bundle}\n}})();\n")
    # altair's HTML loads vega from a CDN unless VEGA_DEBUG names the versions it wants; on pages with
    # require.js (widget pages) it asks require.js for these module names instead.
    (VENDOR / "vega" / "vega-setup.js").write_text(
        "/* Tell altair's chart HTML that vega is already here (no CDN). */\n"
        f"window.VEGA_DEBUG = Object.assign(window.VEGA_DEBUG || {{}}, {json.dumps(vega_versions())});\n"
        "if (typeof define === 'function' && define.amd) {\n"
        "  define('vega', [], function () { return window.vega; });\n"
        "  define('vega-lite', [], function () { return window.vegaLite; });\n"
        "  define('vega-embed', [], function () { return window.vegaEmbed; });\n"
        "}\n")

    # require.js (only on widget pages), followed by the widget manager's page setup.
    requirejs = npm_package(*REQUIREJS)
    (VENDOR / "requirejs").mkdir()
    (VENDOR / "requirejs" / "require.js").write_text((requirejs / "require.js").read_text() + WIDGET_PAGE_SETUP)

    manager = npm_package(*HTML_MANAGER)
    for path in (manager / "dist").iterdir():
        if path.name == "embed-amd.js" or path.suffix in {".woff", ".woff2", ".ttf", ".eot", ".svg"}:
            _copy(path, VENDOR / "html-manager" / "dist" / path.name)

    mathjax = npm_package(*MATHJAX)
    for part in ("tex-mml-chtml.js", "output/chtml/fonts", "input/tex/extensions", "a11y", "ui"):
        if (mathjax / "es5" / part).exists():
            _copy(mathjax / "es5" / part, VENDOR / "mathjax" / "es5" / part)
    _copy(mathjax / "LICENSE", VENDOR / "mathjax" / "LICENSE")

    stamp.write_text(json.dumps(versions, indent=1) + "\n")
    print(f"vendor: wrote {VENDOR.relative_to(ROOT)} in {time.perf_counter() - started:.1f} s")


# ------------------------------------------------------------------------------------------ execute
def parse_value(text: str):
    """A parameter value as YAML (`3`, `true`, `[a, b]`, `'["x"]'`); anything unparsable stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def chapter_parameters(pairs: list[list[str]], chapters: list[str]) -> dict[str, dict]:
    """`--param CHAPTER NAME=VALUE` pairs -> {chapter: {name: value}}, checked against the names each chapter
    declares in its parameters cell. CHAPTER `all` sets NAME in every chapter of the build that declares it."""
    declared = {name: declared_parameters(NOTEBOOKS / f"{name}.py") for name in chapters}
    parameters: dict[str, dict] = {name: {} for name in chapters}
    for chapter, assignment in pairs:
        if "=" not in assignment:
            raise BuildError(f"--param {chapter} {assignment}: write NAME=VALUE, e.g. --param {chapter} seed=1")
        name, value = (part.strip() for part in assignment.split("=", 1))
        if chapter == "all":
            targets = [c for c in chapters if name in declared[c]]
            if not targets:
                raise BuildError(f"--param all {name}=...: no chapter of this build declares {name!r}; "
                                 + "; ".join(f"{c}: {', '.join(declared[c])}" for c in chapters))
        elif chapter not in parameters:
            raise BuildError(f"--param {chapter}: not a chapter of this build (chapters built now: "
                             f"{', '.join(chapters)}, or 'all'); check the name and --only")
        elif name not in declared[chapter]:
            raise BuildError(f"--param {chapter} {name}=...: {chapter} has no parameter {name!r}; "
                             f"its parameters: {', '.join(declared[chapter])}")
        else:
            targets = [chapter]
        for target in targets:
            parameters[target][name] = parse_value(value)
    return parameters


def prepared(name: str, notebooks: Path = NOTEBOOKS):
    """notebooks/NAME.py as the notebook papermill runs: the project's kernel, code cells collapsed."""
    import jupytext

    notebook = jupytext.read(notebooks / f"{name}.py", fmt="py:percent")
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    # The book reads as prose and figures: code cells start collapsed (a click shows them); the parameters
    # cell stays open, since it says what to change when rerunning a chapter.
    for cell in notebook.cells:
        tags = cell.metadata.setdefault("tags", [])
        if cell.cell_type == "code" and "parameters" not in tags and "hide-input" not in tags:
            tags.append("hide-input")
    return notebook


def retitle(notebook, suffix: str) -> str:
    """Append `` (suffix)`` to the notebook's first ``# `` heading; returns the new title."""
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("# "):
                lines[index] = f"{line} ({suffix})"
                cell.source = "\n".join(lines)
                return lines[index][2:]
    return suffix


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def execute(name: str, parameters: dict, workdir: Path, *, notebooks: Path = NOTEBOOKS, executed: Path = EXECUTED,
            record: Callable[[], dict] | None = None, stem: str | None = None) -> float:
    """notebooks/NAME.py -> executed/NAME.ipynb through papermill; returns seconds. Raises BuildError.

    papermill writes into a temporary file beside the result, renamed onto ``executed/NAME.ipynb`` only when
    the run succeeded (an atomic replace), so a failed or interrupted run never costs the last good chapter.
    A failed run is kept as ``executed/NAME.failed.ipynb`` for inspection (removed by the next good run).
    ``record()`` (the run's inputs, :func:`chapter_inputs`) is written into the notebook's metadata after the run.
    ``stem``: the executed file's name instead of NAME (one model's run of a chapter on a cluster)."""
    import jupytext
    import papermill

    notebook = prepared(name, notebooks)
    stem = stem or name
    unexecuted = workdir / f"{stem}.ipynb"
    jupytext.write(notebook, unexecuted, fmt="ipynb")
    executed.mkdir(parents=True, exist_ok=True)
    output, failed = executed / f"{stem}.ipynb", executed / f"{stem}.failed.ipynb"
    # papermill creates this file itself, so it gets the mode any new file gets (the umask), not mkstemp's 0600.
    running = executed / f".{stem}.{os.getpid()}.running.ipynb"
    shown_parameters = ", ".join(f"{k}={v!r}" for k, v in parameters.items()) or "defaults"
    print(f"execute: {shown(notebooks / f'{name}.py')} -> {shown(output)} ({shown_parameters})", flush=True)
    if stem != name:  # one model's run among others (--executor slurm): its title names the model
        retitle(notebook, ", ".join(str(m) for m in parameters.get("models", [])))
        jupytext.write(notebook, unexecuted, fmt="ipynb")
    started = time.perf_counter()
    try:
        papermill.execute_notebook(str(unexecuted), str(running), parameters=parameters, kernel_name="python3",
                                   language="python", cwd=str(ROOT), progress_bar=False)
        displayed = displayed_errors(running)
    except papermill.PapermillExecutionError as error:
        os.replace(running, failed)
        raise BuildError(f"chapter {name} failed in cell {error.exec_count} after {time.perf_counter() - started:.0f} s: "
                         f"{cell_error(error.ename, error.evalue, error.traceback)}\n{kept(output, failed)}") from None
    except BaseException:
        if running.is_file():  # interrupted: what ran so far is the failed notebook
            os.replace(running, failed)
        raise
    if displayed:
        os.replace(running, failed)
        raise BuildError(f"chapter {name}: a cell displayed an error instead of its output (papermill does not "
                         f"stop on these, e.g. a chart that fails to render): {displayed[0]}\n{kept(output, failed)}")
    finish(running, None if record is None else record())
    os.replace(running, output)
    failed.unlink(missing_ok=True)
    return time.perf_counter() - started


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cell_error(ename: str, evalue: str, traceback: list[str]) -> str:
    """A cell's error for a message: the error itself, and its traceback unless it is a wrong parameter (the
    chapter's own check, whose message says everything)."""
    if ename == "ParameterError":
        return f"{ename}: {evalue}"
    return f"{ename}: {evalue}\n{ANSI.sub('', chr(10).join(traceback))}\n(the cause, again: {ename}: {evalue})"


def kept(output: Path, failed: Path) -> str:
    last = (f"{shown(output)} is unchanged (the last good run)" if output.is_file()
            else f"there is no good {shown(output)} yet")
    return f"the failed notebook is kept for inspection: {shown(failed)}; {last}"


def check_not_failed(names: list[str], executed: Path = EXECUTED) -> None:
    """Stop with the failing cell's error when an executed chapter is a failed run (an older builder wrote
    failed runs in place of the chapter), rather than letting the ledger complain about missing records."""
    for name in names:
        path = executed / f"{name}.ipynb"
        for cell in json.loads(path.read_text()).get("cells", []):
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if cell.get("cell_type") == "code" and errors:
                error = errors[0]
                raise BuildError(f"{shown(path)} is a failed run, left by an earlier build: cell "
                                 f"{cell.get('execution_count')} stopped with {error.get('ename')}: "
                                 f"{error.get('evalue')}; fix the cause and rerun it: tools/build_book.py --only {name}")


def displayed_errors(path: Path) -> list[str]:
    """Errors a notebook shows without failing: error outputs of display hooks (altair catches its own)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    return [f"{output.get('ename')}: {output.get('evalue')}" for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if output.get("output_type") == "error"]


# -------------------------------------------------------------------------------------- incremental
# A chapter is re-executed only when one of these inputs differs from the record kept in its executed notebook's
# metadata (RECORD_KEY); the messages say which.
INPUT_CHANGES = {
    "text": "the chapter's text changed",
    "qklib": "qklib's source changed",
    "environment": "the environment changed (pyproject.toml)",
    "format": "the record's format changed",
}
RECORD_FORMAT = 1  # bump when what the builder puts into an executed notebook changes (e.g. its cell tags)


def tree_digest(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``root`` (bytecode caches left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix != ".pyc"):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def shared_inputs() -> dict:
    """The inputs every chapter shares: qklib's source and the pinned environment (and the Python running it)."""
    environment = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()
    return {"qklib": tree_digest(ROOT / "qklib"), "environment": environment}


def path_listing(path: Path) -> str:
    """What a data file or folder looks like without reading it: names, sizes and modification times."""
    if path.is_file():
        return listing_digest(path.parent, [path.name])
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return listing_digest(path, names)


def model_weights(spec) -> tuple[str, str]:
    """``(what, digest)`` of one ``models`` entry's weights where that is cheap: a weights file's or folder's
    listing, timm's or the embedded model's cached file; a random-init control has none."""
    from qklib.book.chapter import ParameterError, model_spec
    from qklib.core.loaders import imgfocus
    from qklib.core.models import DEFAULT_MODEL, cached_pretrained_file

    try:
        parsed = model_spec(spec)
    except ParameterError:
        return str(spec), "unreadable entry"  # the run itself stops with the chapter's message
    if parsed.random_init:
        return f"random:{parsed.name}", "random init"
    if parsed.weights:
        path = Path(parsed.weights).expanduser()
        return parsed.weights, path_listing(path) if path.exists() else "missing"
    if parsed.name == DEFAULT_MODEL:
        found = imgfocus.cache_dir() / f"{imgfocus.NAME}.safetensors"
    elif parsed.name.startswith("hf:"):
        return parsed.name, "hf cache"  # resolved by the hub's cache; its revisions pin the weights
    else:
        found = cached_pretrained_file(parsed.name)
    return parsed.name, path_listing(found) if found is not None and found.is_file() else "not cached"


def chapter_inputs(name: str, parameters: dict, shared: dict, *, notebooks: Path = NOTEBOOKS) -> dict:
    """Everything a chapter's run depends on: its text (as executed, cell tags included), the parameters given,
    the listings of the files and folders its parameters name (output folders left out), the models' weights,
    and ``shared`` (:func:`shared_inputs`). JSON-able; stored in the executed notebook's metadata."""
    notebook = prepared(name, notebooks)
    # Cells' sources and metadata, not their ids: jupytext draws new random cell ids on every conversion.
    cells = [[cell.cell_type, cell.source, cell.metadata] for cell in notebook.cells]
    text = hashlib.sha256(json.dumps([cells, notebook.metadata], sort_keys=True).encode()).hexdigest()
    values = default_parameters(notebooks / f"{name}.py") | parameters
    outputs = {key for key, checker in SPECS.get(name, {}).items() if checker is output_folder}
    data = {key: path_listing(Path(value).expanduser()) for key, value in sorted(values.items())
            if key not in outputs and key != "models" and isinstance(value, str) and value
            and Path(value).expanduser().exists()}
    models = values.get("models", [])
    models = [models] if isinstance(models, str | dict) else models if isinstance(models, list) else []
    return {"format": RECORD_FORMAT, "text": text, "parameters": json.loads(json.dumps(parameters, sort_keys=True)),
            "data": data, "models": dict(model_weights(spec) for spec in models), **shared}


def _differences(before: dict, after: dict, shown) -> list[str]:
    return [shown(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def changed_inputs(recorded: dict | None, current: dict) -> list[str]:
    """Why a chapter must run again: one line per input that differs from the recorded run; [] to reuse it."""
    if not recorded:
        return ["no earlier run recorded its inputs"]
    reasons = [message for key, message in INPUT_CHANGES.items() if recorded.get(key) != current.get(key)]
    parameters = _differences(recorded.get("parameters", {}), current["parameters"], lambda key, old, new:
                              f"{key} {'default' if old is None else json.dumps(old)} -> "
                              f"{'default' if new is None else json.dumps(new)}")
    if parameters:
        reasons.append("parameters changed: " + ", ".join(parameters))
    data = _differences(recorded.get("data", {}), current["data"], lambda key, old, new: f"{key}'s listing")
    if data:
        reasons.append("data changed: " + ", ".join(data))
    models = _differences(recorded.get("models", {}), current["models"], lambda key, old, new: key)
    if models:
        reasons.append("model weights changed: " + ", ".join(models))
    return reasons


def read_record(path: Path) -> dict | None:
    """The inputs recorded in an executed notebook (None: no notebook, or one written without a record)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("metadata", {}).get(RECORD_KEY)
    except ValueError:
        return None


def _shows_nothing(cell: dict) -> bool:
    """A code cell whose outputs the page would not show: none at all, or only values glued with
    ``display=False`` (their data is papermill's record alone)."""
    return all(output.get("output_type") == "display_data"
               and all(key.startswith("application/papermill.record/") for key in output.get("data", {}))
               for output in cell.get("outputs", []))


def finish(path: Path, record: dict | None = None) -> None:
    """Finish the executed notebook at ``path`` (in place: a temporary file) for the page: a collapsed code cell
    that shows nothing loses its input too, so the page has no empty "Show code cell source" toggle (the code is
    in the notebook download); ``record``, if given, goes into the notebook's metadata."""
    notebook = json.loads(path.read_text())
    for cell in notebook.get("cells", []):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.get("cell_type") == "code" and "hide-input" in tags and _shows_nothing(cell):
            tags[tags.index("hide-input")] = "remove-input"
    if record is not None:
        notebook.setdefault("metadata", {})[RECORD_KEY] = record
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")


def execute_chapters(selected: list[str], parameters: dict[str, dict], *, force: bool = False,
                     shared: dict | None = None, notebooks: Path = NOTEBOOKS, executed: Path = EXECUTED) -> dict:
    """Execute each chapter of ``selected`` whose inputs changed since its last good run (every one with
    ``force``), printing for each why it runs or that it is reused. Returns ``{chapter: seconds}`` of those run."""
    shared = shared_inputs() if shared is None else shared
    timings = {}
    with tempfile.TemporaryDirectory(prefix="qklib-book-") as workdir:
        for name in selected:
            current = chapter_inputs(name, parameters[name], shared, notebooks=notebooks)
            reasons = ["--force"] if force else changed_inputs(read_record(executed / f"{name}.ipynb"), current)
            if not reasons:
                print(f"{name}: reused (inputs unchanged)", flush=True)
                continue
            print(f"{name}: executing: {'; '.join(reasons)}", flush=True)
            # Recorded after the run: a run may itself fill an input, such as the embedded model's weights cache.
            timings[name] = execute(name, parameters[name], Path(workdir), notebooks=notebooks, executed=executed,
                                    record=lambda name=name: chapter_inputs(name, parameters[name], shared,
                                                                            notebooks=notebooks))
            print(f"execute: {name} took {timings[name]:.1f} s", flush=True)
    return timings


# ------------------------------------------------------------------------------------------ cluster
# `--executor slurm`: every (chapter, model) run is one task of a Slurm job array (qklib.core.cluster, submitit).
# A chapter run on several models becomes one page per model, executed/<name>__<NN>-<model>.ipynb (beside the
# chapters, so that the text's relative links hold), under an index
# page executed/<name>.ipynb that lists them and glues the models' ledger records joined into one, so that the
# claims ledger judges every claim with every model's measurements.
PARTS_KEY = "qklib_book_parts"  # the index notebook's metadata key: the stems of its per-model pages, in order


def part_stem(index: int, model) -> str:
    """A per-model page's file name: its position and the model spelled with safe characters."""
    text = model if isinstance(model, str) else json.dumps(model, sort_keys=True)
    return f"{index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '-', text).strip('-')[:80]}"


def model_runs(name: str, parameters: dict, notebooks: Path = NOTEBOOKS) -> list[tuple[str, dict]]:
    """``[(stem, parameters)]``: one run per model when the chapter runs on several models, else one run (stem
    ``name``)."""
    values = default_parameters(notebooks / f"{name}.py") | parameters
    models = values.get("models")
    if "models" not in declared_parameters(notebooks / f"{name}.py") or not isinstance(models, list) or len(models) < 2:
        return [(name, parameters)]
    return [(f"{name}__{part_stem(i, model)}", parameters | {"models": [model]}) for i, model in enumerate(models)]


def run_one(name: str, stem: str, parameters: dict, executed: Path, notebooks: Path = NOTEBOOKS) -> float:
    """One cluster task: execute chapter ``name`` with ``parameters`` into ``executed/<stem>.ipynb``, its inputs
    recorded as a local run records them."""
    shared = shared_inputs()
    with tempfile.TemporaryDirectory(prefix="qklib-book-") as workdir:
        return execute(name, parameters, Path(workdir), notebooks=notebooks, executed=executed, stem=stem,
                       record=lambda: chapter_inputs(name, parameters, shared, notebooks=notebooks))


def glued_record_output(path: Path, chapter: str) -> dict:
    """The output cell in which ``path`` glued ``chapter``'s ledger record (a copy), or {} when it glued none."""
    import nbformat

    if chapter not in ledger.RECORD_NAMES:
        return {}
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            if output.get("metadata", {}).get("scrapbook", {}).get("name") == ledger.RECORD_NAMES.get(chapter):
                return json.loads(json.dumps(output))
    return {}


def assemble(name: str, stems: list[str], executed: Path = EXECUTED, notebooks: Path = NOTEBOOKS) -> Path:
    """Write the index page ``executed/<name>.ipynb`` of a chapter run once per model: its title, the list of the
    models' pages, and (for a chapter of the claims ledger) the models' records joined into one glued record."""
    import jupytext
    import nbformat

    parts = [executed / f"{stem}.ipynb" for stem in stems]
    title = retitle(jupytext.read(notebooks / f"{name}.py", fmt="py:percent"), f"{len(stems)} models, one page each")
    lines = [f"# {title}", "", f"This chapter ran once per model, each run a task of a Slurm job array "
             "(`tools/build_book.py --executor slurm`); every model has its own page:", ""]
    lines += [f"- {{doc}}`{stem}`" for stem in stems]
    notebook = nbformat.v4.new_notebook(metadata={PARTS_KEY: stems, "kernelspec": prepared(name, notebooks).metadata["kernelspec"]})
    notebook.cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
    output = glued_record_output(parts[0], name)
    if output:
        records = [ledger.record_from_notebook(path, name) for path in parts]
        joined = dict(records[0], models=[entry for record in records for entry in record["models"]])
        key = output["metadata"]["scrapbook"].get("mime_prefix", "") + ledger.MIME
        output["data"] = {key: joined}
        cell = nbformat.v4.new_code_cell("# the models' ledger records, joined", metadata={"tags": ["remove-input"]})
        cell.outputs = [nbformat.from_dict(output)]
        notebook.cells.append(cell)
    path = executed / f"{name}.ipynb"
    running = path.with_name(f".{name}.{os.getpid()}.assembling.ipynb")
    nbformat.write(notebook, running)
    os.replace(running, path)
    return path


def chapter_sections(present: list[str], executed: Path = EXECUTED) -> dict[str, list[str]]:
    """``{chapter: [its per-model pages]}`` for the chapters whose executed notebook is an index page."""
    sections = {}
    for name in present:
        try:
            stems = json.loads((executed / f"{name}.ipynb").read_text()).get("metadata", {}).get(PARTS_KEY)
        except (OSError, ValueError):
            stems = None
        if stems:
            sections[name] = [f"{CHAPTER_PREFIX}{stem}" for stem in stems]
    return sections


def cluster_execute(selected: list[str], parameters: dict[str, dict], kind: str, options, *,
                    executed: Path = EXECUTED, notebooks: Path = NOTEBOOKS, poll_s: float = 10.0,
                    jobs_folder: Path = ROOT / "_build" / "submitit") -> dict:
    """Every (chapter, model) run of ``selected`` as one task of a job array (``kind``: ``slurm`` or
    ``submitit-local``), followed until all end; then each chapter run on several models gets its index page.
    Returns ``{chapter: [stems]}``. A failed task stops the build with each failure (chapter, model, error).
    submitit's job files and logs go to a new folder under ``jobs_folder`` (one per launch)."""
    from qklib.core.cluster import Command, array_id, failure, launch_folder, make_executor, run_command, wait

    runs = [(name, stem, values) for name in selected for stem, values in model_runs(name, parameters[name], notebooks)]
    commands = [Command([sys.executable, str(Path(__file__).resolve()), "--execute-one", name, stem,
                         json.dumps(values), "--executed", str(executed), "--notebooks", str(notebooks)],
                        cwd=str(ROOT), label=f"{name} ({stem})") for name, stem, values in runs]
    folder = launch_folder(jobs_folder)
    jobs = make_executor(kind, folder, options).map_array(run_command, commands)
    print(f"execute: {len(jobs)} runs as job array {array_id(jobs)} ({kind}); logs in {shown(folder)}", flush=True)
    last = []

    def report(states):
        line = ", ".join(f"{list(states.values()).count(s)} {s.lower()}" for s in sorted(set(states.values())))
        if line != (last[-1] if last else None):
            print(f"execute: {line}", flush=True)
            last.append(line)

    states = wait(jobs, poll_s=poll_s, report=report)
    failed = [f"{name} ({stem}, job {job.job_id}, {states[i]}): {failure(job, states[i])}"
              for i, ((name, stem, _), job) in enumerate(zip(runs, jobs)) if states[i] != "COMPLETED"]
    if failed:
        raise BuildError(f"{len(failed)} of {len(jobs)} runs failed:\n  " + "\n  ".join(failed)
                         + f"\nthe logs: {shown(folder)}")
    stems = {name: [stem for n, stem, _ in runs if n == name] for name in selected}
    for name, names in stems.items():
        if names != [name]:
            print(f"build: {shown(assemble(name, names, executed, notebooks))}: index of {len(names)} model pages")
    return stems


# -------------------------------------------------------------------------------------------- build
def build_html(toc: Path, clean: bool = False) -> None:
    """Build ``_build/html`` with jupyter-book (warnings are errors). Sphinx re-reads and rewrites only the pages
    whose sources changed since the last good build (its environment lives in ``_build/.doctrees``); a page's
    source is its executed notebook, which a reused chapter leaves untouched. Every page is rebuilt into a
    fresh folder when ``clean``, after a failed or interrupted build, and when the site's pages (the toc) or
    its vendored scripts changed since, so that no page or script is left from an earlier build."""
    site = {"toc": toc.read_text(), "vendor": (VENDOR / "VERSIONS.json").read_text(),
            "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    fresh = clean or not HTML_STAMP.is_file() or json.loads(HTML_STAMP.read_text()) != site
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--builder", "html",
               "-W", "-n", "--keep-going", "--toc", str(toc)] + (["--all"] if fresh else [])
    HTML_STAMP.unlink(missing_ok=True)  # written back only after a good build
    if fresh:
        shutil.rmtree(BUILD_HTML, ignore_errors=True)
        shutil.rmtree(DOCTREES, ignore_errors=True)
    print(f"build ({'every page' if fresh else 'pages whose sources changed'}):", " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise BuildError("jupyter-book build failed (warnings are errors); see the messages above")
    HTML_STAMP.write_text(json.dumps(site))


def report(files: list[str]) -> None:
    print("\npages:")
    too_big = []
    for doc in files:
        page = BUILD_HTML / f"{doc}.html"
        size = page.stat().st_size
        print(f"  {page.relative_to(ROOT)}  {size / 1024:8.1f} KiB")
        if size >= MAX_PAGE_BYTES:
            too_big.append(doc)
    static = sum(p.stat().st_size for p in (BUILD_HTML / "_static").rglob("*") if p.is_file())
    print(f"  _static/ (shared scripts, fonts, styles) {static / 2**20:.1f} MiB")
    print(f"\nopen it: {Path(sys.executable).relative_to(ROOT) if Path(sys.executable).is_relative_to(ROOT) else 'python'}"
          " -m http.server -d _build/html 8000   then http://127.0.0.1:8000/")
    if too_big:
        raise BuildError(f"pages over 5 MB: {', '.join(too_big)}; show fewer images/modes or lower their resolution")


def site_chapters(chapters: list[str], executed: Path = EXECUTED) -> tuple[list[str], list[str]]:
    """``(in the site, left out)``: the site holds every chapter executed so far (``executed/<name>.ipynb``),
    so ``--only`` updates its chapters and keeps the others."""
    present = [name for name in chapters if (executed / f"{name}.ipynb").is_file()]
    return present, [name for name in chapters if name not in present]


def write_ledger(present: list[str], executed: Path = EXECUTED, target: Path = LEDGER) -> bool:
    """Write the claims ledger (``qklib.book.ledger``) from the glued records of the executed chapters to ``target``,
    which the page ``book/claims.md`` includes; True when written. It is rebuilt on every build, so it always
    matches the chapters of the site. A chapter of the paper's claims not executed yet leaves the ledger out of the
    site (False, with a message); a "Beyond the paper" chapter not executed leaves its questions "not tested"; a
    chapter executed without its record stops the build (BuildError)."""
    absent = [name for name in ledger.CHAPTERS if name not in present]
    if absent:
        target.unlink(missing_ok=True)
        print(f"build: the claims ledger needs every chapter; not executed yet: {', '.join(absent)}; "
              f"{LEDGER_PAGE} is left out of the site (run tools/build_book.py, or --only {absent[0]})")
        return False
    try:
        records = ledger.read_records(executed)
        beyond = ledger.read_records(executed, [name for name in ledger.QUESTION_CHAPTERS if name in present])
        text = ledger_markdown(ledger.assemble(records), records | beyond,
                               ledger.assemble(beyond, ledger.QUESTIONS, missing_ok=True))
    except ledger.LedgerError as error:
        target.unlink(missing_ok=True)
        raise BuildError(f"claims ledger: {error}") from None
    written = write_if_changed(target, "<!-- written by tools/build_book.py from the chapters' glued records; do not "
                                       "edit -->\n" + text)
    print(f"build: {'wrote' if written else 'unchanged:'} the claims ledger {shown(target)}")
    return True


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "on a cluster", "--executor slurm runs every (chapter, model) execution of the chapters built now as one "
        "task of a Slurm job array (submitit: pip install 'qklib[slurm]'), every chapter anew, then builds the site "
        "here; a chapter run on several models gets one page per model under an index page")
    group.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local"],
                       help="local: papermill here, chapter after chapter (default)")
    group.add_argument("--partition", help="Slurm partition")
    group.add_argument("--gpus-per-task", type=int, default=0, metavar="G", help="GPUs per run (then --param all "
                       "device=cuda)")
    group.add_argument("--cpus-per-task", type=int, default=2, metavar="C", help="CPU cores per run (default 2)")
    group.add_argument("--time", type=int, default=60, metavar="MINUTES", help="time limit per run (default 60)")
    group.add_argument("--array-parallelism", type=int, metavar="K", help="at most K runs at once")
    group.add_argument("--slurm-setup", action="append", default=[], metavar="LINE", help="shell line run before each run")
    group.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE", help="an sbatch option, e.g. mem=32G")
    group.add_argument("--poll-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    group.add_argument("--execute-one", nargs=3, metavar=("NAME", "STEM", "PARAMETERS"), help=argparse.SUPPRESS)
    group.add_argument("--executed", default=str(EXECUTED), help=argparse.SUPPRESS)
    group.add_argument("--notebooks", default=str(NOTEBOOKS), help=argparse.SUPPRESS)


def cluster_options(args):
    from qklib.core.cluster import SlurmOptions, parse_slurm_args

    return SlurmOptions(partition=args.partition, gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                        time_min=args.time, array_parallelism=args.array_parallelism, setup=list(args.slurm_setup),
                        extra=parse_slurm_args(args.slurm_arg), job_name="qklib-book")


def execute_one(args) -> int:
    """The task a cluster runs for one (chapter, model): ``--execute-one NAME STEM PARAMETERS_JSON``."""
    name, stem, values = args.execute_one
    os.chdir(ROOT)
    try:
        seconds = run_one(name, stem, json.loads(values), Path(args.executed), Path(args.notebooks))
    except BuildError as error:
        print(f"\nbuild_book: {error}", file=sys.stderr)
        print(f"build_book: {str(error).splitlines()[0]}", file=sys.stderr)  # the last line: what a failure reports
        return 1
    print(f"execute: {name} ({stem}) took {seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="re-execute only this chapter (repeatable); the site keeps every chapter executed before")
    parser.add_argument("--param", "-p", nargs=2, action="append", default=[], metavar=("CHAPTER", "NAME=VALUE"),
                        help="papermill parameter for a chapter (CHAPTER 'all': every chapter that declares NAME); "
                             "VALUE is YAML; a name the chapter does not declare is an error")
    parser.add_argument("--no-execute", action="store_true", help="reuse executed/*.ipynb, only rebuild the HTML")
    parser.add_argument("--force", action="store_true", help="re-execute every chapter built now even when its "
                        "inputs are unchanged, and rebuild every page")
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    if args.execute_one:
        return execute_one(args)
    os.environ.pop("QKLIB_VEGA_SCRIPT", None)  # set in JupyterLab's terminals by `make lab`; pages load their own vega
    os.chdir(ROOT)
    try:
        files = toc_files()
        chapters = chapter_names(files)
        unknown = [name for name in args.only if name not in chapters]
        if unknown:
            raise BuildError(f"--only {', '.join(unknown)}: not a chapter of _toc.yml; chapters: {', '.join(chapters)}")
        selected = [name for name in chapters if not args.only or name in args.only]
        for name in selected:
            if not (NOTEBOOKS / f"{name}.py").is_file():
                raise BuildError(f"notebooks/{name}.py missing: _toc.yml lists executed/{name}; write the chapter "
                                 f"or build the others with --only")
        parameters = chapter_parameters(args.param, selected)
        vendor()
        timings = {}
        if args.no_execute:
            missing = [n for n in selected if not (EXECUTED / f"{n}.ipynb").is_file()]
            if missing:
                raise BuildError(f"--no-execute: executed/{missing[0]}.ipynb missing; run without --no-execute first")
        elif args.executor != "local":
            cluster_execute(selected, parameters, args.executor, cluster_options(args), poll_s=args.poll_seconds)
        else:
            timings = execute_chapters(selected, parameters, force=args.force)
        present, absent = site_chapters(chapters)
        if absent:
            print(f"build: not executed yet, left out of the site: {', '.join(absent)} "
                  f"(run tools/build_book.py --only {absent[0]} to add it)")
        check_not_failed(present)
        leave_out = () if LEDGER_PAGE not in files or write_ledger(present) else (LEDGER_PAGE,)
        started = time.perf_counter()
        sections = chapter_sections(present)
        toc = (restricted_toc(present, ROOT / "_build" / "toc-only.yml", leave_out, sections)
               if absent or leave_out or sections else TOC)
        build_html(toc, clean=args.force)
        print(f"build: jupyter-book took {time.perf_counter() - started:.1f} s")
        built = [f for f in files if f not in leave_out and (not f.startswith(CHAPTER_PREFIX)
                                                              or f[len(CHAPTER_PREFIX):] in present)]
        built += [file for files_of in sections.values() for file in files_of]
        for name, seconds in timings.items():
            print(f"chapter {name}: executed in {seconds:.1f} s")
        report(built)
    except (BuildError, ClusterError) as error:
        print(f"\nbuild_book: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
