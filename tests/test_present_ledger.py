"""The claims ledger's page fragment (qklib.present.ledger_page): a row per claim with its verdict, evidence and
needs."""

import dataclasses
import re

from qklib.book import ledger
from qklib.present.ledger_page import (answers_markdown, answers_text, chapter_link, ledger_markdown, model_text,
                                      summary)

from ledger_records import CONCAVE, CONTROL, EMBEDDED_NAME, FALLING, default_records, s4_record, s6_record


def rows_and_text(records):
    rows = ledger.assemble(records)
    return rows, ledger_markdown(rows, records)


def table_rows(text: str) -> list[str]:
    """The list-table's rows after the header, each as its text."""
    body = text.split(":::{list-table}", 1)[1].split("\n:::", 1)[0]
    return re.split(r"^\* - ", body, flags=re.M)[2:]


def test_one_row_per_claim_in_the_claims_order_with_citation_and_rule():
    rows, text = rows_and_text(default_records())
    found = table_rows(text)
    assert len(found) == len(ledger.CLAIMS)
    for number, (row, claim) in enumerate(zip(found, ledger.CLAIMS), 1):
        assert row.startswith(f"{number}\n  - **{claim.paper}.** {claim.statement}")
        assert len(re.findall(r"^  - ", row, flags=re.M)) == 2  # two cells after the number
        rule = "*Agrees when*" if claim.judge else "*Not computed:*"
        assert f"{rule} {claim.criterion}." in row and claim.needs in row
    assert text.splitlines().count(":::") == 1 and "$" not in text  # one table; the book parses $...$ as math


def test_a_tested_row_shows_chapter_model_data_number_and_outcome():
    rows, text = rows_and_text(default_records())
    same_early = table_rows(text)[0]
    assert "  - **agrees**\n\n" in same_early
    assert (f"\n    - {{doc}}`§3 </executed/s3_attention>` · `{EMBEDDED_NAME}` (embedded, not a paper model) · "
            "60 of 64 generated scenes (seed 0): L0, attention per unit area (× chance): same 9.") in same_early
    assert same_early.count("→ **agrees**") == 1 and "*Statistic:* attention per unit area" in same_early
    assert "*Null:* chance = 1 for every group" in same_early
    assert same_early.rstrip().endswith("(`o3_dir`).")
    dino = table_rows(text)[[c.key for c in ledger.CLAIMS].index("s4-concave-dino")]
    assert "  - **not tested in this run**\n\n    *A test as the paper's needs* `vit_small_patch16_224.dino`" in dino


def test_several_models_are_a_list_in_one_cell_and_a_mixed_verdict_counts_them():
    records = default_records(s4_cosine=s4_record({"vit_small_patch16_224.dino": CONCAVE,
                                                   "vit_base_patch16_224.dino": FALLING}))
    rows, text = rows_and_text(records)
    dino = table_rows(text)[[c.key for c in ledger.CLAIMS].index("s4-concave-dino")]
    assert "  - **mixed** across 2 models: 1 agrees, 1 disagrees\n" in dino
    assert re.search(r"^    - .*`vit_small_patch16_224.dino` \(the paper's DINO ViT-S/16\).* → \*\*agrees\*\*$", dino, re.M)
    assert re.search(r"^    - .*`vit_base_patch16_224.dino` \(the paper's DINO ViT-B/16\).* → \*\*disagrees\*\*$", dino,
                     re.M)


def test_summary_and_the_run_name_what_was_tested_and_the_controls():
    rows, text = rows_and_text(default_records())
    assert summary(rows) == ("Of the paper's 19 headline claims listed here, this run tested 8: 8 agree, 0 disagree, 0 are "
                             "borderline (the interval crosses the threshold) and 0 are mixed across models; 0 are a "
                             "reading of pictures; 11 were not tested in this run.")
    one = [rows[0], dataclasses.replace(rows[1], verdict=ledger.BORDERLINE)]
    assert summary(one) == ("Of the paper's 2 headline claims listed here, this run tested 2: 1 agrees, 0 disagree, 1 "
                            "is borderline (the interval crosses the threshold) and 0 are mixed across models; 0 are a "
                            "reading of pictures; 0 were not tested in this run.")
    for name, (value, reason) in ledger.THRESHOLDS.items():
        assert f"- **{name}** = {value}: {reason}." in text
    assert text.startswith(summary(rows))
    assert f"`{CONTROL}` (random-init control)" in text and ledger.RULE in text
    assert f"- {chapter_link('s5_modes')}: `{EMBEDDED_NAME}`. Data: same object: 24 generated scenes" in text
    assert model_text("my_vit", None) == "`my_vit` (not a paper model)"


def test_the_open_questions_get_their_own_table_with_yes_and_no():
    from ledger_records import s6_record, s7_record, s8_record

    records = default_records()
    questions = ledger.assemble({"s6_values": s6_record(beyond=0), "s7_modalities": s7_record(),
                                 "s8_segmentation": s8_record()}, ledger.QUESTIONS)
    text = ledger_markdown(ledger.assemble(records), records, questions)
    paper, beyond = text.split("## Beyond the paper")
    assert len(table_rows(paper)) == len(ledger.CLAIMS) and "→ **agrees**" in paper
    rows = re.split(r"^\* - ", beyond.split(":::{list-table}", 1)[1].split("\n:::", 1)[0], flags=re.M)[2:]
    assert len(rows) == len(ledger.QUESTIONS)
    assert "  - **no**" in rows[0] and "→ **no**" in rows[0]  # no pair composes beyond chance
    assert "  - **yes**" in rows[-1] and "*Yes when*" in rows[-1] and "*A test on the paper's models needs*" in rows[-1]


def test_the_answers_are_the_ledgers_in_words():
    text = answers_text(s6_record(), ["s6-key-value", "s6-grouping-copying"])
    assert text.startswith("Does a head's value read what its QK modes look for")
    assert f"{EMBEDDED_NAME}: yes, share of a QK mode's key feature" in text
    assert f"{CONTROL} (control, not evidence): yes" in text
    no = answers_text(s6_record(association=-1), ["s6-grouping-copying"])
    assert f"{EMBEDDED_NAME}: no, Spearman correlation over 72 heads" in no and "s6-key-value" not in no
    assert "copying score -1.00" in no


def test_the_markdown_answers_give_each_rule_and_leave_the_controls_out():
    questions = [q for q in ledger.QUESTIONS if q.key in ("s6-key-value", "s6-grouping-copying")]
    text = answers_markdown(s6_record(association=-1), questions)
    bullets = [line for line in text.splitlines() if line.startswith("- **")]
    assert [b.split("** Rule: ")[0][4:] for b in bullets] == [q.statement for q in questions]
    assert all(f"Rule: {q.criterion}." in text for q in questions)
    assert f"  - {EMBEDDED_NAME}: **yes**; share of a QK mode's key feature" in text
    assert f"  - {EMBEDDED_NAME}: **no**; Spearman correlation over 72 heads" in text
    assert CONTROL not in text
