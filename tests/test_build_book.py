"""tools/build_book.py on tiny stand-in chapters: a failed run never costs the last good chapter (issue 28
item 1), and a chapter is re-executed only when one of its inputs changed (issue 27 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from test_book import build_book  # tools/build_book.py, loaded as a module

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


# ------------------------------------------------------------------------------ the incremental book
def inputs(folders, parameters=None, name="tiny", shared=None):
    notebooks, _ = folders
    return build_book.chapter_inputs(name, parameters or {}, shared or {"qklib": "q", "environment": "e"},
                                     notebooks=notebooks)


def test_unchanged_inputs_reuse_the_chapter(folders):
    assert build_book.changed_inputs(inputs(folders), inputs(folders)) == []


def test_a_chapter_without_a_record_is_executed(folders):
    assert build_book.changed_inputs(None, inputs(folders)) == ["no earlier run recorded its inputs"]


def test_an_edited_sentence_reruns_the_chapter(folders):
    notebooks, _ = folders
    before = inputs(folders)
    (notebooks / "tiny.py").write_text(TINY.replace("# # A tiny chapter", "# # A tiny chapter, edited"))
    assert build_book.changed_inputs(before, inputs(folders)) == ["the chapter's text changed"]


def test_a_changed_parameter_reruns_the_chapter_and_says_which(folders):
    before = inputs(folders, {"count": 3})
    assert build_book.changed_inputs(before, inputs(folders, {"count": 3})) == []
    assert build_book.changed_inputs(before, inputs(folders, {"count": 4})) == ["parameters changed: count 3 -> 4"]
    assert build_book.changed_inputs(before, inputs(folders)) == ["parameters changed: count 3 -> default"]


def test_qklib_and_the_environment_are_inputs(folders):
    before = inputs(folders, shared={"qklib": "q1", "environment": "e"})
    assert build_book.changed_inputs(before, inputs(folders, shared={"qklib": "q2", "environment": "e"})) == [
        "qklib's source changed"]
    assert build_book.changed_inputs(before, inputs(folders, shared={"qklib": "q1", "environment": "e2"})) == [
        "the environment changed (pyproject.toml)"]


def test_the_source_digest_follows_the_code_and_ignores_caches(tmp_path):
    package = tmp_path / "qklib"
    (package / "__pycache__").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    first = build_book.tree_digest(package)
    (package / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\0")
    assert build_book.tree_digest(package) == first
    (package / "a.py").write_text("x = 2\n")
    assert build_book.tree_digest(package) != first


def test_a_data_folder_is_an_input_and_the_output_folder_is_not(folders, tmp_path):
    """Folder parameters are digested by their listing (names, sizes, times); `results_dir` of a chapter in
    qklib.chapter.SPECS is where the chapter writes, so what appears there never reruns it."""
    notebooks, _ = folders
    images, results = tmp_path / "images", tmp_path / "results"
    images.mkdir(), results.mkdir()
    (images / "a.png").write_bytes(b"a")
    (notebooks / "s4_cosine.py").write_text(
        TINY.replace("count = 2  # how many lines to print",
                     f"count = 2  # how many\nimage_dir = {str(images)!r}  # photos\nresults_dir = {str(results)!r}  # out"))
    before = inputs(folders, name="s4_cosine")
    (results / "written.csv").write_text("by the chapter")
    assert build_book.changed_inputs(before, inputs(folders, name="s4_cosine")) == []
    (images / "b.png").write_bytes(b"b")
    assert build_book.changed_inputs(before, inputs(folders, name="s4_cosine")) == [
        "data changed: image_dir's listing"]


def test_model_weights_are_inputs(tmp_path, folders):
    """A weights file named in `models` is digested by its size and time (cheap), a random-init control by
    its name alone."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"0" * 10)
    models = [{"name": "vit_tiny_patch16_224", "weights": str(weights)}, "random:vit_tiny_patch16_224"]
    before = inputs(folders, {"models": models})
    weights.write_bytes(b"1" * 11)
    assert build_book.changed_inputs(before, inputs(folders, {"models": models})) == [
        f"model weights changed: {weights}"]


def test_the_build_reruns_only_what_changed(folders, tmp_path, capsys):
    notebooks, executed = folders
    shared = {"qklib": "q", "environment": "e"}

    def build(force=False, parameters=None):
        timings = build_book.execute_chapters(["tiny"], {"tiny": parameters or {}}, force=force, shared=shared,
                                              notebooks=notebooks, executed=executed)
        return list(timings), capsys.readouterr().out

    ran, out = build()
    assert ran == ["tiny"] and "tiny: executing: no earlier run recorded its inputs" in out
    assert build_book.read_record(executed / "tiny.ipynb") == inputs(folders)
    ran, out = build()
    assert ran == [] and "tiny: reused (inputs unchanged)" in out
    ran, out = build(parameters={"count": 1})
    assert ran == ["tiny"] and "tiny: executing: parameters changed: count default -> 1" in out
    ran, out = build(force=True, parameters={"count": 1})
    assert ran == ["tiny"] and "tiny: executing: --force" in out


def test_a_collapsed_cell_that_shows_nothing_leaves_no_empty_toggle(tmp_path):
    quiet = nbformat.v4.new_code_cell("glue('x', 1, display=False)", metadata={"tags": ["hide-input"]})
    quiet.outputs = [nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain": "1"},
                                            metadata={"scrapbook": {"name": "x"}})]
    empty = nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["hide-input"]})
    shows = nbformat.v4.new_code_cell("print(1)", metadata={"tags": ["hide-input"]})
    shows.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    parameters = nbformat.v4.new_code_cell("count = 2", metadata={"tags": ["parameters"]})
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[parameters, quiet, empty, shows]), path)
    build_book.finish(path, {"inputs": "recorded"})
    notebook = nbformat.read(path, as_version=4)
    assert [c.metadata.get("tags") for c in notebook.cells] == [["parameters"], ["remove-input"], ["remove-input"],
                                                                ["hide-input"]]
    assert notebook.cells[1].outputs  # the glued value stays: the page reads it
    assert notebook.metadata[build_book.RECORD_KEY] == {"inputs": "recorded"}
