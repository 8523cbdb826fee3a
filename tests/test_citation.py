"""How to cite: CITATION.cff, README's BibTeX and the book's bibliography agree; the years agree."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def bib_entry(text: str, key: str) -> str:
    match = re.search(r"@\w+\{" + key + r",.*?\n\}", text, flags=re.S)
    assert match, f"no BibTeX entry {key}"
    return match.group(0)


def test_citation_file_names_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    paper = cff["preferred-citation"]
    assert paper["title"] == "Dissecting Query-Key Interaction in Vision Transformers" and paper["year"] == 2024
    assert [a["family-names"] for a in paper["authors"]] == ["Pan", "Philip", "Xie", "Schwartz"]


def test_readme_bibtex_is_the_books():
    book = bib_entry((ROOT / "book" / "references.bib").read_text(), "pan2024dissecting")
    readme = (ROOT / "README.md").read_text()
    assert "## How to cite" in readme and book in readme


def test_one_year_for_the_project():
    license_year = re.search(r"Copyright \(c\) (\d{4})", (ROOT / "LICENSE").read_text()).group(1)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert config["copyright"] == license_year == str(cff["date-released"])[:4]
