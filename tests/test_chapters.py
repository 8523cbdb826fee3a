"""Every chapter: declared parameters, how much of it is code, and wrong parameters stopping it early."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qklib.book import chapter

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(chapter.SPECS)


def cells(name: str) -> list[tuple[str, list[str]]]:
    """``(kind, non-blank lines)`` per cell of ``notebooks/<name>.py`` (the jupytext header excluded)."""
    text = (ROOT / "notebooks" / f"{name}.py").read_text()
    out = []
    for cell in re.split(r"^# %%", text, flags=re.M)[1:]:
        header, _, body = cell.partition("\n")
        out.append(("markdown" if "[markdown]" in header else "code", [l for l in body.splitlines() if l.strip()]))
    return out


def test_every_toc_chapter_has_a_declared_spec():
    toc = (ROOT / "_toc.yml").read_text()
    assert sorted(re.findall(r"executed/(\w+)", toc)) == CHAPTERS


@pytest.mark.parametrize("name", CHAPTERS)
def test_parameters_cell_matches_the_declared_spec(name):
    assert sorted(chapter.declared_parameters(ROOT / "notebooks" / f"{name}.py")) == sorted(chapter.SPECS[name])


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapters_read_as_prose_with_short_code_cells(name):
    kinds = cells(name)
    code = sum(len(lines) for kind, lines in kinds if kind == "code")
    total = sum(len(lines) for _, lines in kinds)
    longest = max(len(lines) for kind, lines in kinds if kind == "code")
    assert code / total <= 0.5, f"{name}: {code} of {total} non-blank lines are code"
    assert longest <= 25, f"{name}: a code cell has {longest} lines"


def defaults(name: str) -> dict:
    """The chapter's default parameter values, from its parameters cell."""
    namespace: dict = {}
    body = next("\n".join(lines) for kind, lines in cells(name) if kind == "code")
    exec(body, namespace)  # the parameters cell holds only literal assignments
    return {key: value for key, value in namespace.items() if key in chapter.SPECS[name]}


WRONG = [  # (parameter, value, what the message must say); each applies to the chapters that declare it
    ("models", ["vit_bse_patch16_224"], "unknown model 'vit_bse_patch16_224'"),
    ("models", [{"name": "vit_tiny_patch16_224", "weights": "/no/such.safetensors"}], "does not exist"),
    ("models", [{"nme": "vit_tiny_patch16_224"}], "use {'name'"),
    ("image_dir", "/no/such/folder", "folder '/no/such/folder' does not exist"),
    ("o3_dir", "/no/such/folder", "folder '/no/such/folder' does not exist"),
    ("ade20k_dir", "/no/such/folder", "does not exist"),
    ("max_images", -1, "'max_images' must be an integer >="),
    ("n_scenes", "many", "'n_scenes' must be an integer"),
    ("seed", 1.5, "'seed' must be an integer >= 0"),
    ("device", "cuda:7", "no CUDA device is available"),
    ("device", 3, "'device' must be a string"),
    ("batch_size", 0, "'batch_size' must be an integer >= 1"),
    ("min_cover", 1.5, "'min_cover' must be a number in (0, 1]"),
    ("o3_layout", {"masks": "x"}, "'o3_layout'"),
    ("live_explorer", "yes", "must be True or False"),
    ("featured", [], "non-empty list"),
    ("layers", "some", "'layers' must be 'all'"),
]
CASES = [(name, parameter, value, message) for name in CHAPTERS for parameter, value, message in WRONG
         if parameter in chapter.SPECS[name]]


@pytest.mark.parametrize("name, parameter, value, message", CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_a_wrong_parameter_is_named_with_what_to_pass(tmp_path, name, parameter, value, message):
    namespace = defaults(name) | {"results_dir": str(tmp_path), parameter: value}
    with pytest.raises(chapter.ParameterError, match=re.escape(message)):
        chapter.check(name, namespace)


@pytest.mark.parametrize("name", CHAPTERS)
def test_the_defaults_pass(tmp_path, name):
    checked = chapter.check(name, defaults(name) | {"results_dir": str(tmp_path)})
    assert checked.results_dir == tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAPTERS)
def test_a_wrong_parameter_stops_the_notebook_in_its_checking_cell(run_chapter, name):
    nb, error = run_chapter(name, seed=-1)
    assert error is not None and "'seed' must be an integer >= 0" in str(error)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    failing = next(i for i, c in enumerate(code_cells) if any(o.output_type == "error" for o in c.outputs))
    assert failing <= 2  # parameters, injected parameters, then the checking cell


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/build_book.py", *args], capture_output=True, text=True, cwd=ROOT)


def test_the_book_builder_refuses_a_parameter_the_chapter_does_not_declare():
    wrong = build("--only", "s4_cosine", "--param", "s4_cosine", "model=[x]")
    assert wrong.returncode == 1
    assert "s4_cosine has no parameter 'model'; its parameters: models, image_dir" in wrong.stderr
    nobody = build("--only", "s4_cosine", "--param", "all", "walkthrough_image=x")
    assert nobody.returncode == 1 and "no chapter of this build declares 'walkthrough_image'" in nobody.stderr


def test_every_parameter_the_docs_show_is_declared():
    """`--param CHAPTER NAME=...` and papermill `-y 'NAME: ...'` lines in README.md and the book's pages name
    parameters the chapter declares (`all` applies to chapters that declare the name)."""
    shown = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]:
        text = doc.read_text()
        shown += [(doc.name, c, n) for c, n in re.findall(r"--param\s+(\w+)\s+(\w+)=", text)]
        shown += [(doc.name, "s4_cosine", n) for n in re.findall(r"-y\s+'(\w+):", text)]  # intro's papermill example
    assert shown, "the docs show no --param example"
    for doc, target, name in shown:
        if target == "all":
            assert any(name in chapter.SPECS[c] for c in CHAPTERS), f"{doc}: --param all {name}"
        else:
            assert name in chapter.SPECS[target], f"{doc}: --param {target} {name}: not a parameter of {target}"


def test_only_keeps_every_chapter_executed_before_in_the_site(tmp_path):
    """`--only NAME` re-executes NAME; the site is built from every executed chapter present (issue 15 item 2)."""
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "tools" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    for name in ("s3_attention", "s5_modes"):
        (tmp_path / f"{name}.ipynb").write_text("{}")
    present, absent = build_book.site_chapters(CHAPTERS, tmp_path)
    assert present == ["s3_attention", "s5_modes"]
    assert absent == [name for name in CHAPTERS if name not in present] and "s4_cosine" in absent
    toc = build_book.restricted_toc(present, tmp_path / "toc.yml").read_text()
    assert "executed/s3_attention" in toc and "executed/s5_modes" in toc and "executed/s4_cosine" not in toc
    assert "book/intro" in toc and "book/api" in toc  # the pages that are not chapters always stay
