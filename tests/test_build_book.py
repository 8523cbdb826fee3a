"""tools/build_book.py on tiny stand-in chapters: a failed run never costs the last good chapter (issue 28
item 1), and a chapter is re-executed only when one of its inputs changed (issue 27 item 1)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_book_module():
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "tools" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_book = _build_book_module()

# A stand-in chapter: a parameters cell, then a cell that checks the parameter as qklib.chapter.check does.
TINY = '''# %% [markdown]
# # A tiny chapter

# %% tags=["parameters"]
count = 2  # how many lines to print

# %%
if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f"parameter 'count' must be an integer >= 1, got {count!r}")
print("line\\n" * count)
'''


@pytest.fixture
def folders(tmp_path):
    """``(notebooks, executed)`` folders holding the stand-in chapter ``tiny``."""
    notebooks, executed = tmp_path / "notebooks", tmp_path / "executed"
    notebooks.mkdir()
    (notebooks / "tiny.py").write_text(TINY)
    return notebooks, executed


def run(name, parameters, folders, workdir):
    notebooks, executed = folders
    return build_book.execute(name, parameters, workdir, notebooks=notebooks, executed=executed)


def printed_lines(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_a_failed_run_keeps_the_last_good_chapter_and_names_the_cause(folders, tmp_path):
    notebooks, executed = folders
    run("tiny", {"count": 3}, folders, tmp_path)
    good = executed / "tiny.ipynb"
    before = good.read_bytes()
    assert printed_lines(good).count("line") == 3

    with pytest.raises(build_book.BuildError) as failure:
        run("tiny", {"count": "eight"}, folders, tmp_path)
    message = str(failure.value)
    assert good.read_bytes() == before, "the failed run replaced the last good notebook"
    failed = executed / "tiny.failed.ipynb"
    assert failed.is_file() and "'eight'" in json.dumps(nbformat.read(failed, as_version=4).cells[-1].outputs)
    assert "parameter 'count' must be an integer >= 1, got 'eight'" in message
    assert "executed/tiny.failed.ipynb" in message and "executed/tiny.ipynb is unchanged" in message
    assert not list(executed.glob(".*")), "a temporary file was left behind"

    # the next good run replaces the good notebook and removes the failed one
    run("tiny", {"count": 1}, folders, tmp_path)
    assert printed_lines(good).count("line") == 1 and not failed.exists()


def test_a_failed_notebook_in_place_of_a_chapter_is_reported_with_its_cause(folders, tmp_path):
    """An executed notebook left by an older builder after a failed run stops the build with the failing
    cell's error and the command that fixes it, not with a complaint about missing records."""
    notebooks, executed = folders
    with pytest.raises(build_book.BuildError):
        run("tiny", {"count": 0}, folders, tmp_path)
    executed.joinpath("tiny.failed.ipynb").rename(executed / "tiny.ipynb")  # what older builders left
    with pytest.raises(build_book.BuildError) as failure:
        build_book.check_not_failed(["tiny"], executed)
    message = str(failure.value)
    assert "executed/tiny.ipynb is a failed run" in message
    assert "parameter 'count' must be an integer >= 1, got 0" in message and "--only tiny" in message
