"""The claims ledger as a MyST page fragment: one row per claim of ``qklib.ledger.assemble``: the paper's claim and
the rule that judges it; the verdict with the evidence of this run (chapter, model, data, number), and what a
test as the paper's needs.

The book builder writes it to ``executed/ledger.md``, which the page ``book/claims.md`` includes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..core.paper_models import EMBEDDED
from ..ledger import AGREES, BORDERLINE, BY_EYE, DISAGREES, MIXED, NOT_TESTED, RULE, THRESHOLDS, Evidence, Row


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
        counts = ", ".join(f"{row.count(o)} {o}" for o in (AGREES, DISAGREES, BORDERLINE) if row.count(o))
        return f"**mixed** across {len(row.evidence)} models: {counts}"
    return f"**{row.verdict}**"


def evidence_text(evidence: Evidence) -> str:
    outcome = "" if evidence.outcome == BY_EYE else f" → **{evidence.outcome}**"
    return (f"{chapter_link(evidence.chapter)} · {model_text(evidence.model, evidence.paper_model)} · "
            f"{evidence.data}: {evidence.number}{outcome}")


def _cell(text: str, first: str = "  - ") -> list[str]:
    """A list-table cell: its first line after ``first``, the rest indented to the cell's content."""
    lines = text.split("\n")
    return [first + lines[0], *[("    " + line).rstrip() for line in lines[1:]]]


def summary(rows: Sequence[Row]) -> str:
    """One sentence: how many claims agree, disagree, are borderline or mixed, are read by eye, are not tested."""
    count = {v: sum(row.verdict == v for row in rows) for v in (AGREES, DISAGREES, BORDERLINE, MIXED, BY_EYE,
                                                                 NOT_TESTED)}
    tested = count[AGREES] + count[DISAGREES] + count[BORDERLINE] + count[MIXED]
    return (f"Of the paper's {len(rows)} headline claims listed here, this run tested {tested}: {count[AGREES]} "
            f"agree, {count[DISAGREES]} disagree, {count[BORDERLINE]} are borderline (the interval crosses the "
            f"threshold) and {count[MIXED]} are mixed across models; {count[BY_EYE]} "
            f"{'is' if count[BY_EYE] == 1 else 'are'} a reading of pictures; {count[NOT_TESTED]} "
            f"{'was' if count[NOT_TESTED] == 1 else 'were'} not tested in this run.")


def thresholds_text() -> str:
    """The named thresholds the verdicts use, each with its reason."""
    return "\n".join(f"- **{name}** = {value}: {reason}." for name, (value, reason) in THRESHOLDS.items())


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
    """The page fragment: the summary, a list-table with one row per claim (the claim, its rule, statistic and null;
    the verdict with each model's statistic and interval), how verdicts are decided with the thresholds, and what
    each chapter ran."""
    lines = [summary(rows), "", ":::{list-table}", ":header-rows: 1", ":widths: 4 44 52", "",
             "* - \\#", "  - The paper's claim; the rule that judges it, the statistic and its null",
             "  - This run: the verdict; chapter · model · data: the statistic with its 95% interval → the outcome. "
             "A test as the paper's needs"]
    for number, row in enumerate(rows, 1):
        claim = row.claim
        rule = "*Agrees when*" if claim.judge else "*Not computed:*"
        details = (f"\n\n*Statistic:* {claim.statistic}. *Null:* {claim.null}." if claim.statistic else "")
        evidence = "".join(f"\n- {evidence_text(e)}" for e in row.evidence) + ("\n" if row.evidence else "")
        untested = "".join(f"\n- not tested: {text}" for text in row.untested) + ("\n" if row.untested else "")
        lines += [f"* - {number}",
                  *_cell(f"**{claim.paper}.** {claim.statement}\n\n{rule} {claim.criterion}.{details}"),
                  *_cell(f"{verdict_text(row)}\n{evidence}{untested}\n*A test as the paper's needs* {claim.needs}.")]
    lines += [":::", "", "**How a verdict is decided.** " + RULE, "", "**The thresholds**, each with its reason:", "",
              thresholds_text(), "", "**What the chapters ran** (the records this page is built from):", "",
              run_text(records), ""]
    return "\n".join(lines)
