"""tools/build_book.py on tiny stand-in chapters: a failed run never costs the last good chapter (issue 28
item 1), and a chapter is re-executed only when one of its inputs changed (issue 27 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from test_book import build_book  # tools/build_book.py, loaded as a module

# A stand-in chapter: a parameters cell, then a cell that checks the parameter as qklib.book.chapter.check does.
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
    qklib.book.chapter.SPECS is where the chapter writes, so what appears there never reruns it."""
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


# ------------------------------------------------------------------------------- on a cluster (issue 27 item 3)
PER_MODEL = '''# %% [markdown]
# # A chapter over models

# %% tags=["parameters"]
models = ["a", "b"]  # the models

# %%
bad = [m for m in models if m.startswith("bad")]
if bad:
    raise ValueError(f"unknown model {bad[0]!r}")
print("ran on", models)
'''


def test_model_runs_split_a_chapter_per_model(tmp_path):
    (tmp_path / "over.py").write_text(PER_MODEL)
    assert build_book.model_runs("over", {}, tmp_path) == [("over__00-a", {"models": ["a"]}),
                                                         ("over__01-b", {"models": ["b"]})]
    assert build_book.model_runs("over", {"models": ["x/y z"]}, tmp_path) == [("over", {"models": ["x/y z"]})]
    assert build_book.part_stem(3, {"name": "vit", "weights": "/w/f.safetensors"}).startswith("03-name-vit-weights-")
    (tmp_path / "plain.py").write_text(TINY)
    assert build_book.model_runs("plain", {"count": 3}, tmp_path) == [("plain", {"count": 3})]


@pytest.mark.slow
def test_cluster_runs_name_the_failing_model_and_build_an_index(tmp_path):
    """Through submitit's LocalExecutor: each model's run is a task; a failing one stops the build naming the chapter,
    the model and the error; when all succeed, the chapter's page is an index of one page per model, which the site's
    toc lists under it."""
    pytest.importorskip("submitit")
    from qklib.core.cluster import SlurmOptions

    notebooks, executed = tmp_path / "notebooks", tmp_path / "executed"
    notebooks.mkdir()
    (notebooks / "over.py").write_text(PER_MODEL)
    options = SlurmOptions(time_min=5)
    with pytest.raises(build_book.BuildError) as failure:
        build_book.cluster_execute(["over"], {"over": {"models": ["a", "bad-one"]}}, "submitit-local", options,
                                   executed=executed, notebooks=notebooks, poll_s=0.5, jobs_folder=tmp_path / "jobs")
    message = str(failure.value)
    assert message.startswith("1 of 2 runs failed") and "over (over__01-bad-one, job" in message
    assert "unknown model 'bad-one'" in message and not (executed / "over.ipynb").exists()
    stems = build_book.cluster_execute(["over"], {"over": {}}, "submitit-local", options, executed=executed,
                                       notebooks=notebooks, poll_s=0.5, jobs_folder=tmp_path / "jobs")
    assert stems == {"over": ["over__00-a", "over__01-b"]}
    for stem, model in (("over__00-a", "a"), ("over__01-b", "b")):
        page = nbformat.read(executed / f"{stem}.ipynb", 4)
        assert page.cells[0].source.startswith(f"# A chapter over models ({model})")
        assert f"ran on ['{model}']" in page.cells[-1].outputs[0]["text"]
        assert page.metadata[build_book.RECORD_KEY]["parameters"] == {"models": [model]}
    index = nbformat.read(executed / "over.ipynb", 4)
    assert index.metadata[build_book.PARTS_KEY] == ["over__00-a", "over__01-b"]
    assert "{doc}`over__00-a`" in index.cells[0].source and "{doc}`over__01-b`" in index.cells[0].source
    sections = build_book.chapter_sections(["over"], executed)
    assert sections == {"over": ["executed/over__00-a", "executed/over__01-b"]}


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_runs_a_chapter_once_per_model_and_joins_their_ledger_records(slurm_cluster, tmp_path):
    """§4 on two random-init models as a two-task Slurm job array: a page per model, each with its own ledger
    record, and an index page whose glued record joins them (what the claims ledger reads)."""
    from qklib.book import ledger
    from qklib.core.cluster import SlurmOptions

    models = ["random:vit_tiny_patch16_224", "random:deit_tiny_patch16_224"]
    parameters = {"s4_cosine": {"models": models, "max_images": 2, "resamples": 200,
                                "results_dir": str(tmp_path / "results")}}
    stems = build_book.cluster_execute(["s4_cosine"], parameters, "slurm", SlurmOptions(time_min=10), executed=tmp_path,
                                       poll_s=2, jobs_folder=tmp_path / "jobs")
    assert stems == {"s4_cosine": ["s4_cosine__00-random-vit_tiny_patch16_224",
                                   "s4_cosine__01-random-deit_tiny_patch16_224"]}
    parts = [ledger.record_from_notebook(tmp_path / f"{stem}.ipynb", "s4_cosine")
             for stem in stems["s4_cosine"]]
    assert [[entry["label"] for entry in part["models"]] for part in parts] == [
        ["vit_tiny_patch16_224 (random init, seed 0)"], ["deit_tiny_patch16_224 (random init, seed 0)"]]
    joined = ledger.record_from_notebook(tmp_path / "s4_cosine.ipynb", "s4_cosine")
    assert joined["models"] == parts[0]["models"] + parts[1]["models"] and joined["data"] == parts[0]["data"]
    toc = build_book.restricted_toc(["s4_cosine"], tmp_path / "toc.yml", (), build_book.chapter_sections(["s4_cosine"], tmp_path))
    assert "file: executed/s4_cosine__01-random-deit_tiny_patch16_224" in toc.read_text()
