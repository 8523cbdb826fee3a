"""The claims ledger as a MyST page fragment: one row per claim of ``qklib.ledger.assemble``: the paper's claim and
the rule that judges it; the verdict with the evidence of this run (chapter, model, data, number), and what a
test as the paper's needs.

The book builder writes it to ``executed/ledger.md``, which the page ``book/claims.md`` includes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..core.paper_models import EMBEDDED
from ..ledger import AGREES, BY_EYE, DISAGREES, MIXED, NOT_TESTED, SHAPES, Evidence, Row


def chapter_link(chapter: str) -> str:
    """A link to the chapter's page, labelled with its section (``s4_cosine`` -> §4)."""
    return f"{{doc}}`§{chapter.split('_')[0].lstrip('s')} </executed/{chapter}>`"


def model_text(model: str, paper_model: str | None) -> str:
    """The model's label, and what it is for the paper: one of its models, the embedded stand-in or another."""
    if paper_model == EMBEDDED.label:
        return f"`{model}` (embedded, not a paper model)"
    if paper_model:
        return f"`{model}` (the paper's {paper_model})"
    return f"`{model}` (not a paper model)"


def verdict_text(row: Row) -> str:
    if row.verdict == MIXED:
        return f"**mixed**: {row.agreeing} of {len(row.evidence)} models agree"
    return f"**{row.verdict}**"


def evidence_text(evidence: Evidence) -> str:
    outcome = "" if evidence.agrees is None else f" → {AGREES if evidence.agrees else DISAGREES}"
    return (f"{chapter_link(evidence.chapter)} · {model_text(evidence.model, evidence.paper_model)} · "
            f"{evidence.data}: {evidence.number}{outcome}")


def _cell(text: str, first: str = "  - ") -> list[str]:
    """A list-table cell: its first line after ``first``, the rest indented to the cell's content."""
    lines = text.split("\n")
    return [first + lines[0], *[("    " + line).rstrip() for line in lines[1:]]]


def summary(rows: Sequence[Row]) -> str:
    """One sentence: how many claims agree, disagree, are mixed, are read by eye and are not tested."""
    count = {v: sum(row.verdict == v for row in rows) for v in (AGREES, DISAGREES, MIXED, BY_EYE, NOT_TESTED)}
    tested = count[AGREES] + count[DISAGREES] + count[MIXED]
    return (f"Of the paper's {len(rows)} headline claims listed here, this run tested {tested}: {count[AGREES]} "
            f"agree, {count[DISAGREES]} disagree and {count[MIXED]} are mixed across models; {count[BY_EYE]} "
            f"{'is' if count[BY_EYE] == 1 else 'are'} a reading of pictures; {count[NOT_TESTED]} "
            f"{'was' if count[NOT_TESTED] == 1 else 'were'} not tested in this run.")


def run_text(records: Mapping[str, Mapping]) -> str:
    """What each chapter ran: its models (controls marked) and the data of each measurement."""
    parts = []
    for chapter, record in records.items():
        models = ", ".join(f"`{entry['label']}`" + (" (random-init control)" if entry["control"] else "")
                           for entry in record["models"])
        data = "; ".join(f"{measure.replace('_', ' ')}: {text}" for measure, text in record["data"].items())
        parts.append(f"- {chapter_link(chapter)}: {models}. Data: {data}.")
    return "\n".join(parts)


def ledger_markdown(rows: Sequence[Row], records: Mapping[str, Mapping]) -> str:
    """The page fragment: the summary, a list-table with one row per claim, how a curve's shape is judged, and
    what each chapter ran."""
    lines = [summary(rows), "", ":::{list-table}", ":header-rows: 1", ":widths: 4 44 52", "",
             "* - \\#", "  - The paper's claim, and the rule that judges it",
             "  - This run: the verdict; chapter · model · data: the number. A test as the paper's needs"]
    for number, row in enumerate(rows, 1):
        claim = row.claim
        rule = "*Agrees when*" if claim.judge else "*Not computed:*"
        evidence = "".join(f"\n- {evidence_text(e)}" for e in row.evidence) + ("\n" if row.evidence else "")
        lines += [f"* - {number}", *_cell(f"**{claim.paper}.** {claim.statement}\n\n{rule} {claim.criterion}."),
                  *_cell(f"{verdict_text(row)}\n{evidence}\n*A test as the paper's needs* {claim.needs}.")]
    lines += [":::", "", SHAPES, "", "**What the chapters ran** (the records this page is built from):", "",
              run_text(records), ""]
    return "\n".join(lines)
