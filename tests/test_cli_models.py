"""`python -m qklib models` (issue 28 item 9): fits 100 columns by default, `--wide` gives every column on one
line per model, `--json` the registry as data; and CITATION.cff's software entry has author and repository
placeholders that README explains."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import yaml

from qklib.cli import main
from qklib.book import paper_models

ROOT = Path(__file__).resolve().parents[1]


def printed(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["models", *args]) == 0
    return out.getvalue()


def test_the_default_table_fits_100_columns_and_keeps_every_model_and_how_it_loads():
    text = printed()
    lines = text.splitlines()
    too_wide = [line for line in lines if len(line) > 100]
    assert not too_wide, f"{len(too_wide)} lines over 100 columns, e.g. {too_wide[0]!r}"
    header = lines[0]
    column = header.index("loads as")
    starts = [i for i, line in enumerate(lines) for m in paper_models.all_models() if line.startswith(m.label + "  ")]
    assert len(starts) == len(paper_models.all_models())
    for model in paper_models.all_models():
        first = next(i for i, line in enumerate(lines) if line.startswith(model.label + "  "))
        block = [lines[first]] + [line for line in lines[first + 1:] if line[:column].strip() == ""][:1]
        shown = "".join(line[column:].strip() for line in block if not line.strip().startswith("note:"))
        assert model.loads.replace(" ", "") in shown.replace(" ", ""), (model.label, shown)
        assert f"{model.layers} x {model.heads} x {model.head_dim}" in lines[first]
        if model.note:
            assert " ".join(model.note.split()[:3]) in text


def test_wide_puts_each_model_on_one_line():
    text = printed("--wide")
    for model in paper_models.all_models():
        line = next(line for line in text.splitlines() if line.startswith(model.label + " "))
        assert model.loads in line and model.family in line and (not model.note or model.note in line)


def test_json_lists_every_model_with_its_geometry():
    entries = json.loads(printed("--json"))
    assert [e["label"] for e in entries] == [m.label for m in paper_models.all_models()]
    simmim = next(e for e in entries if e["label"] == "SimMIM ViT-B/16 pretrain")
    assert simmim["bilinear"] is False and simmim["loads"].startswith("weights=simmim_pretrain")
    vit_h = next(e for e in entries if e["label"] == "ViT-H/14")
    assert (vit_h["layers"], vit_h["heads"], vit_h["head_dim"]) == (32, 16, 80)
    assert all(e["offline_now"] in ("yes", "no", "file") for e in entries)


def test_citation_software_entry_has_placeholders_that_readme_explains():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    author = cff["authors"][0]
    assert re.fullmatch(r"<.+>", author["family-names"]) and re.fullmatch(r"<.+>", author["given-names"])
    assert re.fullmatch(r"https://github\.com/<.+>/<.+>", cff["repository-code"])
    readme = (ROOT / "README.md").read_text()
    assert "CITATION.cff" in readme and "repository-code" in readme and "family-names" in readme
