"""The claims ledger as a MyST page fragment: one row per claim of ``qklib.book.ledger.assemble``: the paper's claim and
the rule that judges it; the verdict with the evidence of this run (chapter, model, data, number), and what a
test as the paper's needs.

The book builder writes it to ``executed/ledger.md``, which the page ``book/claims.md`` includes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..book.ledger import (AGREES, BORDERLINE, BY_EYE, DISAGREES, MIXED, NOT_TESTED, QUESTIONS, RULE, THRESHOLDS, Claim,
                           Evidence, Row, judge_questions)
from ..book.paper_models import EMBEDDED


ANSWERS = {AGREES: "yes", DISAGREES: "no"}  # a question's outcome in words; borderline and the rest unchanged
NEEDS = {False: "*A test as the paper's needs*", True: "*A test on the paper's models needs*"}


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


def verdict_text(row: Row, answers: bool = False) -> str:
    words = ANSWERS if answers else {}
    if row.verdict == MIXED:
        counts = ", ".join(f"{row.count(o)} {words.get(o, o)}" for o in (AGREES, DISAGREES, BORDERLINE) if row.count(o))
        return f"**mixed** across {len(row.evidence)} models: {counts}"
    return f"**{words.get(row.verdict, row.verdict)}**"


def evidence_text(evidence: Evidence, answers: bool = False) -> str:
    words = ANSWERS if answers else {}
    outcome = "" if evidence.outcome == BY_EYE else f" → **{words.get(evidence.outcome, evidence.outcome)}**"
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
    def verb(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    return (f"Of the paper's {len(rows)} headline claims listed here, this run tested {tested}: "
            f"{verb(count[AGREES], 'agrees', 'agree')}, {verb(count[DISAGREES], 'disagrees', 'disagree')}, "
            f"{verb(count[BORDERLINE], 'is', 'are')} borderline (the interval crosses the threshold) and "
            f"{verb(count[MIXED], 'is', 'are')} mixed across models; {verb(count[BY_EYE], 'is', 'are')} a reading "
            f"of pictures; {verb(count[NOT_TESTED], 'was', 'were')} not tested in this run.")


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


def _table(rows: Sequence[Row], head: str, answers: bool = False) -> list[str]:
    """A list-table with one row per claim (or question): the claim, its rule, statistic and null; the verdict with
    each model's statistic and interval; what a test needs."""
    lines = [":::{list-table}", ":header-rows: 1", ":widths: 4 44 52", "",
             "* - \\#", f"  - {head}; the rule that judges it, the statistic and its null",
             "  - This run: the verdict; chapter · model · data: the statistic with its 95% interval → the outcome. "
             "A test as the paper's needs"]
    for number, row in enumerate(rows, 1):
        claim = row.claim
        rule = ("*Yes when*" if answers else "*Agrees when*") if claim.judge else "*Not computed:*"
        details = (f"\n\n*Statistic:* {claim.statistic}. *Null:* {claim.null}." if claim.statistic else "")
        evidence = "".join(f"\n- {evidence_text(e, answers)}" for e in row.evidence) + ("\n" if row.evidence else "")
        untested = "".join(f"\n- not tested: {text}" for text in row.untested) + ("\n" if row.untested else "")
        lines += [f"* - {number}",
                  *_cell(f"**{claim.paper}.** {claim.statement}\n\n{rule} {claim.criterion}.{details}"),
                  *_cell(f"{verdict_text(row, answers)}\n{evidence}{untested}\n"
                         f"{NEEDS[answers]} {claim.needs}.")]
    return lines + [":::"]


def ledger_markdown(rows: Sequence[Row], records: Mapping[str, Mapping], questions: Sequence[Row] = ()) -> str:
    """The page fragment: the summary, the table of the paper's claims, how verdicts are decided with the
    thresholds, the table "Beyond the paper" (the book's answers to the paper's open questions, by the same
    machinery) where ``questions`` are given, and what each chapter ran."""
    lines = [summary(rows), "", *_table(rows, "The paper's claim"), "", "**How a verdict is decided.** " + RULE, "",
             "**The thresholds**, each with its reason:", "", thresholds_text(), ""]
    if questions:
        lines += ["## Beyond the paper", "", "The paper's own future research (its closing section) names open "
                  "questions; the book's second part answers some of them, each with the same statistics as the "
                  "claims above. An answer is *yes* when the rule agrees, *no* when it disagrees, *borderline* when "
                  "the interval cannot decide.", "", *_table(questions, "The question", answers=True), ""]
    lines += ["**What the chapters ran** (the records this page is built from):", "", run_text(records), ""]
    return "\n".join(lines)


def answers_text(record: dict, keys: Sequence[str]) -> str:
    """Plain text (for ``glue:text``): for each question ``keys`` (``qklib.book.ledger.QUESTIONS``), the question and,
    per model of the chapter's ``record``, the ledger's answer (yes, no or borderline) with the numbers behind it;
    random-init controls are marked, and the ledger leaves them out."""
    questions = {question.key: question for question in QUESTIONS}
    judged_by_model = {entry["label"]: judge_questions(record, entry["label"], keys) for entry in record["models"]}
    parts = []
    for key in keys:
        said = []
        for entry in record["models"]:
            judged = judged_by_model[entry["label"]].get(key)
            if judged is not None:
                note = " (control, not evidence)" if entry["control"] else ""
                said.append(f"{entry['label']}{note}: {ANSWERS.get(judged.outcome, judged.outcome)}, {judged.number}")
        parts.append(f"{questions[key].statement} " + "; ".join(said) + ".")
    return " ".join(parts)


def answers_markdown(record: dict, questions: Sequence[Claim]) -> str:
    """Markdown (for ``glue:md``): per question, its statement and rule, then each trained model's answer (yes, no
    or borderline, by the ledger's rule) with the numbers behind it. Random-init controls are left out: the
    chapter draws them in its figures as the yardstick."""
    judged = {entry["label"]: judge_questions(record, entry["label"])
              for entry in record["models"] if not entry["control"]}
    lines = []
    for question in questions:
        lines.append(f"- **{question.statement}** Rule: {question.criterion}.")
        for label, verdicts in judged.items():
            verdict = verdicts.get(question.key)
            if verdict is not None:
                lines.append(f"  - {label}: **{ANSWERS.get(verdict.outcome, verdict.outcome)}**; {verdict.number}.")
    return "\n".join(lines)
