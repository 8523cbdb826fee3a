"""Each chapter run by plain papermill (issue 28 item 2): its parameters cell parses cleanly for papermill
(`papermill --help-notebook` lists every parameter with a type and a help text), and a parameter name the
chapter does not declare stops the run in the chapter's checking cell instead of running the defaults."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import papermill
import pytest

from qklib.book import chapter

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(chapter.SPECS)


def converted(name: str, folder: Path) -> Path:
    """notebooks/NAME.py as an .ipynb in ``folder``, as a user would make it with jupytext."""
    target = folder / f"{name}.ipynb"
    jupytext.write(jupytext.read(ROOT / "notebooks" / f"{name}.py", fmt="py:percent"), target, fmt="ipynb")
    return target


@pytest.mark.parametrize("name", CHAPTERS)
def test_papermill_reads_every_parameter_with_its_type_and_help(name, tmp_path, caplog):
    path = converted(name, tmp_path)
    with caplog.at_level(logging.WARNING, logger="papermill"):
        found = papermill.inspect_notebook(str(path))
    assert not caplog.records, f"papermill warns: {[r.getMessage() for r in caplog.records]}"
    assert sorted(found) == sorted(chapter.SPECS[name])
    for parameter, described in found.items():
        assert described["inferred_type_name"] not in ("None", ""), f"{name}: {parameter} has no type annotation"
        assert len(described["help"]) > 10, f"{name}: {parameter} has no help comment"


def test_help_notebook_lists_the_types(tmp_path):
    """What a user sees: `papermill --help-notebook` prints each parameter's type, default and help."""
    path = converted("s4_cosine", tmp_path)
    shown = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(path)], capture_output=True,
                           text=True, check=True)
    assert "Unable to parse" not in shown.stdout + shown.stderr
    assert re.search(r"max_images: int \(default 32\)", shown.stdout), shown.stdout
    assert "Unknown type" not in shown.stdout


def injected(source: str) -> dict:
    """A notebook namespace after papermill injected ``source`` as its parameters cell (IPython's input
    history ``In`` holds every executed cell's source)."""
    return {"In": ["", "models = ['x']", "# Parameters\n" + source]}


@pytest.mark.parametrize("name", CHAPTERS)
def test_check_refuses_a_name_papermill_injected_that_the_chapter_does_not_declare(name, tmp_path):
    defaults = chapter.default_parameters(ROOT / "notebooks" / f"{name}.py")
    namespace = defaults | {"results_dir": str(tmp_path)} | injected("n_scene = 8\nseed = 1\n")
    with pytest.raises(chapter.ParameterError, match=r"papermill passed parameter 'n_scene', which .* does not declare"):
        chapter.check(name, namespace)
    # declared names injected by papermill pass
    assert chapter.check(name, defaults | {"results_dir": str(tmp_path)} | injected("seed = 1\n")).seed == 0


def test_the_refusal_suggests_the_close_name(tmp_path):
    defaults = chapter.default_parameters(ROOT / "notebooks" / "s3_attention.py")
    with pytest.raises(chapter.ParameterError, match=r"did you mean 'n_scenes'\?"):
        chapter.check("s3_attention", defaults | {"results_dir": str(tmp_path)} | injected("n_scene = 8\n"))


def test_plain_papermill_with_a_misspelt_parameter_stops_in_the_checking_cell(tmp_path):
    """The real kernel: §3's parameters cell and checking cell run by papermill with `-p n_scene 8`."""
    path = converted("s3_attention", tmp_path)
    notebook = jupytext.read(path)
    codes = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    notebook.cells = notebook.cells[: codes[1] + 1]  # the parameters cell and the cell that checks them
    jupytext.write(notebook, path, fmt="ipynb")
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(ROOT),
                                   parameters={"n_scene": 8, "results_dir": str(tmp_path)}, progress_bar=False)
    assert failure.value.ename == "ParameterError"
    assert "'n_scene'" in failure.value.evalue and "did you mean 'n_scenes'?" in failure.value.evalue
