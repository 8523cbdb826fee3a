"""The claims ledger (qklib.book.ledger): the claim list, the chapters' records, their verdicts, reading them back from
executed notebooks, and the page the book builder writes from them (tools/build_book.py)."""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest

from qklib.book import ledger
from qklib.book.paper_models import EMBEDDED, IJEPA_FILE, PAPER_MODELS, SIMMIM_PRETRAIN_FILE
from qklib.present.ledger_page import ledger_markdown

from ledger_records import (CONCAVE, CONTROL, EMBEDDED_NAME, FALLING, LAYERS, background_first, default_records,
                            grouping_then_context, s3_record, s4_record, s5_record, s6_record, s8_record,
                            tied_early)

ROOT = Path(__file__).resolve().parents[1]


def rows_by_key(records) -> dict[str, ledger.Row]:
    return {row.claim.key: row for row in ledger.assemble(records)}


# --- the claim list ---------------------------------------------------------------------------------------------

def test_every_claim_cites_the_paper_and_a_chapter_that_records_it():
    keys = [claim.key for claim in ledger.CLAIMS]
    assert len(keys) == len(set(keys))
    for claim in ledger.CLAIMS:
        assert re.fullmatch(r"§\d(\.\d)?(, Fig [0-9S].*| \(formulation\))", claim.paper), \
                f"{claim.key}: cite a section and a figure (or the section's formulation, for a claim made in its text)"
        assert claim.chapter in ledger.RECORD_NAMES, claim.key
        assert claim.statement.endswith(".") and claim.criterion, claim.key
        for label in claim.about + claim.excludes:
            assert label in ledger.BY_LABEL, f"{claim.key}: {label!r} is not one of the paper's models"
    assert set(ledger.CHAPTERS) | set(ledger.QUESTION_CHAPTERS) == set(ledger.RECORD_NAMES)
    cited = {claim.paper.split(",")[0][:2] for claim in ledger.CLAIMS}
    assert cited == {"§3", "§4", "§5"}


def test_a_claim_about_named_models_says_how_to_load_them():
    claims = {claim.key: claim for claim in ledger.CLAIMS}
    assert "`vit_small_patch16_224.dino`" in claims["s4-concave-dino"].needs
    assert "`vit_base_patch16_224.dino`" in claims["s4-concave-dino"].needs
    assert SIMMIM_PRETRAIN_FILE in claims["s3-simmim-exception"].needs and "O3" in claims["s3-simmim-exception"].needs
    assert "ijepa_checkpoint" in claims["s4-ijepa-predictor"].needs and IJEPA_FILE in claims["s4-ijepa-predictor"].needs
    assert "ADE20K" in claims["s5-same-object-depth"].needs
    assert claims["s4-middle-zero"].needs.startswith("the paper's models (any of its 16")
    encoder = claims["s4-ijepa-encoder"].needs
    assert IJEPA_FILE in encoder and "`vit_huge_patch14_gap_224.in1k_ijepa`" in encoder


def test_models_are_recognised_by_timm_name_and_checkpoint_file():
    for model in PAPER_MODELS:
        if model.timm_name:
            assert ledger.paper_model(model.timm_name) == model.label
    assert ledger.paper_model(EMBEDDED_NAME) == EMBEDDED.label
    assert ledger.paper_model(f"beit_base_patch16_224 [{SIMMIM_PRETRAIN_FILE}]") == "SimMIM ViT-B/16 pretrain"
    assert ledger.paper_model(f"vit_huge_patch14_gap_224 [{IJEPA_FILE}, encoder]") == "I-JEPA ViT-H/14 encoder"
    assert ledger.paper_model(f"ijepa_predictor [{IJEPA_FILE}, predictor]") == "I-JEPA ViT-H/14 predictor"
    assert ledger.paper_model("vit_base_patch16_224.dino [my_weights.safetensors]") == "DINO ViT-B/16"
    assert ledger.paper_model("vit_base_patch16_224.dino (random init, seed 0)") is None
    assert ledger.paper_model("vit_tiny_patch16_224") is None


# --- verdicts from records ----------------------------------------------------------------------------------------

def test_the_default_run_tests_the_general_claims_and_names_what_the_others_need():
    rows = rows_by_key(default_records())
    assert [row.claim.key for row in rows.values()] == [claim.key for claim in ledger.CLAIMS]
    for key in ("s3-same-early", "s3-different-grows", "s3-background-grows", "s4-early-high-falls", "s4-middle-zero",
                "s4-anisotropy", "s5-same-object-depth", "s5-fig5-ranking"):
        assert rows[key].verdict == ledger.AGREES, (key, rows[key].evidence)
        assert [e.model for e in rows[key].evidence] == [EMBEDDED_NAME]  # the random-init control is no evidence
        assert rows[key].evidence[0].interval is not None, key
    semantic = rows["s5-semantic"]
    assert semantic.verdict == ledger.NOT_TESTED and "hold no natural images" in semantic.untested[0]
    for key in ("s3-simmim-exception", "s4-concave-simmim", "s4-concave-dino", "s4-concave-deit", "s4-concave-huge",
                "s4-classification-falls", "s4-simmim-finetuned-falls", "s4-ijepa-encoder", "s4-ijepa-predictor"):
        assert rows[key].verdict == ledger.NOT_TESTED and not rows[key].evidence, key
    evidence = rows["s3-same-early"].evidence[0]
    assert evidence.chapter == "s3_attention" and evidence.data == "60 of 64 generated scenes (seed 0)"
    assert evidence.number.startswith("L0, attention per unit area (× chance): same 9.")
    assert evidence.interval.low > 1


def test_section_3_is_judged_per_unit_area_with_three_outcomes():
    flipped = rows_by_key(default_records(s3_attention=s3_record({EMBEDDED_NAME: background_first()})))
    for key in ("s3-same-early", "s3-different-grows", "s3-background-grows"):
        assert flipped[key].verdict == ledger.DISAGREES, key
    # raw ratios: background 0.70 leads layer 0; per unit area same (0.03 / 0.066) is below chance but background
    # (0.76 / 0.864) is too, and different (0.30 / 0.066) leads
    assert "background 0.8" in flipped["s3-same-early"].evidence[0].number
    tied = rows_by_key(default_records(s3_attention=s3_record({EMBEDDED_NAME: tied_early()})))["s3-same-early"]
    assert tied.verdict == ledger.BORDERLINE and tied.evidence[0].interval.low < 1 < tied.evidence[0].interval.high


def test_per_unit_area_on_a_hand_worked_case():
    """Two images, layer 0: same-object ratios 0.2 and 0.4 where chance is 0.05 and 0.15: pooled, 0.6 / 0.2 = 3."""
    curves = {"same": np.array([[0.2], [0.4]]), "different": np.array([[0.1], [0.1]]),
              "background": np.array([[0.7], [0.5]])}
    chances = {"same": np.array([0.05, 0.15]), "different": np.array([0.05, 0.15]), "background": np.array([0.9, 0.7])}
    area = ledger.per_area(curves, chances, 0, resamples=200)
    assert area["same"].estimate == pytest.approx(3.0)
    assert area["different"].estimate == pytest.approx(1.0)
    assert area["background"].estimate == pytest.approx(1.2 / 1.6)
    assert area["dominance"].estimate == pytest.approx(3.0)


def test_a_named_model_is_judged_and_the_exception_is_left_out_of_the_general_claim():
    simmim = f"beit_base_patch16_224 [{SIMMIM_PRETRAIN_FILE}]"
    rows = rows_by_key(default_records(s3_attention=s3_record({EMBEDDED_NAME: grouping_then_context(),
                                                               simmim: background_first()})))
    assert rows["s3-simmim-exception"].verdict == ledger.AGREES
    assert rows["s3-simmim-exception"].evidence[0].number == "of Fig 2's 3 observations 0 hold, 3 fail, 0 borderline"
    assert [e.model for e in rows["s3-same-early"].evidence] == [EMBEDDED_NAME]
    rows = rows_by_key(default_records(s3_attention=s3_record({simmim: grouping_then_context()})))
    assert rows["s3-simmim-exception"].verdict == ledger.DISAGREES
    assert rows["s3-same-early"].verdict == ledger.NOT_TESTED


def test_section_4_shapes_flip_and_several_models_can_be_mixed():
    dino_s, dino_b = "vit_small_patch16_224.dino", "vit_base_patch16_224.dino"
    rows = rows_by_key(default_records(s4_cosine=s4_record({dino_s: CONCAVE, dino_b: FALLING})))
    dino = rows["s4-concave-dino"]
    assert dino.verdict == ledger.MIXED and dino.count(ledger.AGREES) == 1 and len(dino.evidence) == 2
    assert [e.outcome for e in dino.evidence] == [ledger.AGREES, ledger.DISAGREES]
    assert dino.evidence[0].number.startswith("first 2 layers − lowest (L6) 0.425 [")
    assert rows["s4-early-high-falls"].verdict == ledger.AGREES  # concave and falling both fall from early layers
    assert rows["s4-concave-deit"].verdict == ledger.NOT_TESTED
    flat = rows_by_key(default_records(s4_cosine=s4_record({EMBEDDED_NAME: [0.3] * LAYERS})))
    assert flat["s4-early-high-falls"].verdict == ledger.DISAGREES
    assert flat["s4-middle-zero"].verdict == ledger.DISAGREES
    assert "L2 0.300 [" in flat["s4-middle-zero"].evidence[0].number


def test_the_middle_layer_claim_is_borderline_when_its_interval_crosses_the_band_or_the_bases_disagree():
    near = list(CONCAVE)
    near[4:8] = [0.14, 0.12, 0.09, 0.12]  # L6 is the middle layer closest to 0; heads spread ±0.05 around 0.09
    rows = rows_by_key(default_records(s4_cosine=s4_record({EMBEDDED_NAME: near}, spread=0.05)))
    assert rows["s4-middle-zero"].verdict == ledger.BORDERLINE
    interval = rows["s4-middle-zero"].evidence[0].interval
    assert interval.low < 0.1 < interval.high
    folded_high = [0.4] * LAYERS
    rows = rows_by_key(default_records(s4_cosine=s4_record({EMBEDDED_NAME: CONCAVE}, folded={EMBEDDED_NAME: folded_high})))
    assert rows["s4-middle-zero"].verdict == ledger.BORDERLINE
    assert "the two bases disagree" in rows["s4-middle-zero"].evidence[0].number


def test_the_anisotropy_claim_flips_with_the_baseline():
    assert rows_by_key(default_records())["s4-anisotropy"].verdict == ledger.AGREES
    high = rows_by_key(default_records(s4_cosine=s4_record({EMBEDDED_NAME: CONCAVE}, baseline=0.5)))["s4-anisotropy"]
    assert high.verdict == ledger.DISAGREES
    assert "relative -0.07 [-0.09, -0.05]" in high.evidence[0].number
    assert high.evidence[0].data == "7 photos shipped in installed packages and crops of them (8960 image tokens per layer)"


@pytest.mark.parametrize("shift, expected", [(0.01, ledger.AGREES), (0.3, ledger.DISAGREES),
                                             (0.05, ledger.BORDERLINE)])
def test_the_bias_claim_is_judged_on_how_far_attention_moves(shift, expected):
    assert rows_by_key(default_records())["s4-biases"].verdict == ledger.NOT_TESTED  # a record without the measurement
    curves = {EMBEDDED_NAME: CONCAVE, CONTROL: [0.0] * LAYERS}
    rows = rows_by_key(default_records(s4_cosine=s4_record(curves, shifts={EMBEDDED_NAME: shift, CONTROL: 0.0})))
    assert rows["s4-biases"].verdict == expected
    assert [e.model for e in rows["s4-biases"].evidence] == [EMBEDDED_NAME]
    assert f"L0 {shift:.2f}" in rows["s4-biases"].evidence[0].number
    assert rows["s4-biases"].evidence[0].data == "7 photos shipped in installed packages, every query and key token"


def test_ijepa_from_the_checkpoint_is_judged_with_the_band_of_its_own_width(tiny_vit):
    _, svd = tiny_vit
    predictor = dataclasses.replace(svd, model=f"ijepa_predictor [{IJEPA_FILE}, predictor]")
    encoder = dataclasses.replace(svd, model=f"vit_huge_patch14_gap_224 [{IJEPA_FILE}, encoder]")
    record = s4_record({EMBEDDED_NAME: CONCAVE}, extra={"I-JEPA encoder": encoder, "I-JEPA predictor": predictor})
    rows = rows_by_key(default_records(s4_cosine=record))
    judged = rows["s4-ijepa-predictor"].evidence[0]
    band = ledger.null_band(svd.dim)
    expected = ledger.AGREES if judged.interval.low > band else ledger.DISAGREES if judged.interval.high < band \
        else ledger.BORDERLINE
    assert rows["s4-ijepa-predictor"].verdict == expected
    assert judged.interval.estimate == pytest.approx(svd.layer_weighted_cosine().numpy().min())
    assert f"above {band:.3f}" in judged.number
    assert [e.model for e in rows["s4-ijepa-encoder"].evidence] == [encoder.model]
    assert all(e.model != predictor.model for e in rows["s4-early-high-falls"].evidence)  # the predictor is excluded
    assert "s4-anisotropy" in rows and len(rows["s4-anisotropy"].evidence) == 1  # no images for the I-JEPA pair
    renamed = dataclasses.replace(svd, model="ijepa_predictor [ijepa.pth.tar, predictor]")
    record = s4_record({EMBEDDED_NAME: CONCAVE}, extra={"I-JEPA predictor": renamed})
    assert rows_by_key(default_records(s4_cosine=record))["s4-ijepa-predictor"].evidence[0].model == renamed.model


def test_section_5_verdicts_flip_with_the_measurement():
    rows = rows_by_key(default_records(s5_modes=s5_record(np.linspace(0.3, 0.6, LAYERS), by_paper_sum=0.05)))
    assert rows["s5-same-object-depth"].verdict == ledger.DISAGREES
    assert rows["s5-fig5-ranking"].verdict == ledger.DISAGREES  # worse than random modes
    tied = rows_by_key(default_records(s5_modes=s5_record(np.full(LAYERS, 0.4), by_paper_sum=0.10)))
    assert tied["s5-same-object-depth"].verdict == ledger.BORDERLINE
    assert tied["s5-fig5-ranking"].verdict == ledger.BORDERLINE
    same = rows_by_key(default_records())["s5-same-object-depth"].evidence[0]
    assert same.number.startswith("L0–L5 minus L6–L11: 0.16")
    assert "chance 0.08, random-init control 0.10, mismatched-mode null (each query direction with another mode's " \
           "key direction) 0.07–0.16" in same.number
    assert same.data == "24 generated scenes (24 with two or more objects)"
    ranking = rows_by_key(default_records())["s5-fig5-ranking"].evidence[0].number
    for name in ("random modes 0.1", "the paper's sum 0.19", "singular value 0.2", "attention-weighted 0.3"):
        assert name in ranking
    natural = rows_by_key(default_records(s5_modes=s5_record(natural=True)))["s5-semantic"]
    assert natural.verdict == ledger.BY_EYE and "31 images" in natural.evidence[0].number


def test_records_are_json_without_nan_and_show_as_the_ledger_mime():
    values = np.linspace(0.6, 0.3, LAYERS)
    values[3] = np.nan
    record = s5_record(values)
    assert record["models"][0]["same_object"]["heads"][3] == [None] * 6
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    bundle = record._repr_mimebundle_()
    assert bundle[ledger.MIME] == dict(record) and bundle["text/plain"] == f"ledger record of s5_modes: {EMBEDDED_NAME}"


# --- reading records back from executed notebooks -------------------------------------------------------------

def glued_output(name: str, value) -> nbformat.NotebookNode:
    """What ``myst_nb.glue(name, value, display=False)`` leaves in a notebook."""
    prefix = "application/papermill.record/"
    bundle = value._repr_mimebundle_() if hasattr(value, "_repr_mimebundle_") else {"text/plain": repr(value)}
    return nbformat.v4.new_output("display_data", data={prefix + k: v for k, v in bundle.items()},
                                  metadata={"scrapbook": {"name": name, "mime_prefix": prefix}})


def write_executed(folder: Path, records: dict, without=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for chapter, record in records.items():
        cell = nbformat.v4.new_code_cell("glue(...)")
        cell.outputs = [glued_output(f"{chapter[:2]}_other", 3)]
        if chapter not in without:
            cell.outputs.append(glued_output(ledger.RECORD_NAMES[chapter], record))
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A chapter"), cell])
        nbformat.validate(notebook)
        nbformat.write(notebook, folder / f"{chapter}.ipynb")
    return folder


def test_records_are_read_back_from_the_executed_notebooks(tmp_path):
    records = default_records()
    executed = write_executed(tmp_path / "executed", records)
    read = ledger.read_records(executed)
    assert read == json.loads(json.dumps(records))
    assert [row.verdict for row in ledger.assemble(read)] == [row.verdict for row in ledger.assemble(records)]


def test_a_missing_chapter_or_record_is_a_clear_error(tmp_path):
    records = default_records()
    executed = write_executed(tmp_path / "executed", records, without=("s4_cosine",))
    with pytest.raises(ledger.LedgerError, match=r"s4_cosine.ipynb holds no glued 's4_ledger' record: .*"
                                                 r"tools/build_book.py --only s4_cosine"):
        ledger.read_records(executed)
    (executed / "s5_modes.ipynb").unlink()
    with pytest.raises(ledger.LedgerError, match=r"s5_modes.ipynb is missing: .*execute s5_modes first"):
        ledger.record_from_notebook(executed / "s5_modes.ipynb", "s5_modes")
    del records["s4_cosine"]
    with pytest.raises(ledger.LedgerError, match="no record of s4_cosine: the claims ledger needs every chapter"):
        ledger.assemble(records)
    stale = dict(default_records()["s3_attention"], format=0)
    with pytest.raises(ledger.LedgerError, match="format 0"):
        ledger.assemble(default_records(s3_attention=stale))


# --- the page the book builder writes ---------------------------------------------------------------------------

def build_book_module():
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "tools" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_builder_writes_a_row_per_claim_and_leaves_the_page_out_without_every_chapter(tmp_path, capsys):
    build_book = build_book_module()
    executed = write_executed(tmp_path / "executed", default_records())
    target = executed / "ledger.md"
    assert build_book.write_ledger(list(ledger.CHAPTERS), executed, target)
    text = target.read_text()
    # the paper's claims, then the open questions, not tested: their chapters did not run here
    assert len(re.findall(r"^\* - \d+$", text, flags=re.M)) == len(ledger.CLAIMS) + len(ledger.QUESTIONS)
    records = ledger.read_records(executed)
    assert text == ("<!-- written by tools/build_book.py from the chapters' glued records; do not edit -->\n"
                    + ledger_markdown(ledger.assemble(records), records, ledger.assemble({}, ledger.QUESTIONS, True)))
    assert "## Beyond the paper" in text and "s6_values was not executed in this build" in text
    assert not build_book.write_ledger(["s3_attention", "s5_modes"], executed, target)
    assert not target.exists()  # no stale ledger from an earlier build
    assert "not executed yet: s4_cosine" in capsys.readouterr().out
    write_executed(executed, {"s4_cosine": default_records()["s4_cosine"]}, without=("s4_cosine",))
    with pytest.raises(build_book.BuildError, match="claims ledger: .*holds no glued 's4_ledger' record"):
        build_book.write_ledger(list(ledger.CHAPTERS), executed, target)


def test_the_ledger_page_is_in_the_toc_and_left_out_with_its_chapters(tmp_path):
    build_book = build_book_module()
    files = build_book.toc_files()
    assert build_book.LEDGER_PAGE in files and (ROOT / f"{build_book.LEDGER_PAGE}.md").is_file()
    assert files.index(build_book.LEDGER_PAGE) > max(files.index(f"executed/{c}") for c in ledger.CHAPTERS)
    assert "../executed/ledger.md" in (ROOT / f"{build_book.LEDGER_PAGE}.md").read_text()
    toc = build_book.restricted_toc(["s4_cosine"], tmp_path / "toc.yml", (build_book.LEDGER_PAGE,)).read_text()
    assert "book/claims" not in toc and "executed/s4_cosine" in toc and "book/api" in toc


# --- beyond the paper ----------------------------------------------------------------------------------------------

def questions(**records) -> dict[str, ledger.Row]:
    """The rows of the questions whose chapters are among ``records`` (the others are not tested)."""
    rows = ledger.assemble(records, ledger.QUESTIONS, missing_ok=True)
    return {row.claim.key: row for row in rows if row.claim.chapter in records or row.verdict != ledger.NOT_TESTED}


def test_the_open_questions_are_answered_by_the_same_rules():
    rows = questions(s6_values=s6_record(), s8_segmentation=s8_record())
    assert {key: row.verdict for key, row in rows.items()} == {
        "s6-composition": ledger.AGREES, "s6-copying": ledger.AGREES, "s6-key-value": ledger.AGREES,
        "s6-grouping": ledger.AGREES, "s6-grouping-copying": ledger.AGREES, "s8-segmentation": ledger.AGREES}
    assert [e.model for e in rows["s6-copying"].evidence] == [EMBEDDED_NAME]  # the control is no evidence
    assert "Q 20.0% of 300" in rows["s6-composition"].evidence[0].number
    assert "tokencut L11" in rows["s8-segmentation"].evidence[0].number
    assert "0.280 [0.279, 0.281]; a random direction 0.167" in rows["s6-key-value"].evidence[0].number
    assert "interval over 30 images) 0.0020 [" in rows["s6-grouping"].evidence[0].number
    assert "random-init control +0.0000" in rows["s6-grouping"].evidence[0].number
    assert "copying score 1.00 [1.00, 1.00]" in rows["s6-grouping-copying"].evidence[0].number
    no = questions(s6_values=s6_record(beyond=0, copying=0.03, key_value=0.15, grouping=-0.002, association=-1),
                   s8_segmentation=s8_record((-0.06, -0.08, -0.05)))
    assert {row.verdict for row in no.values()} == {ledger.DISAGREES}
    close = questions(s6_values=s6_record(beyond=16, copying=0.042, key_value=0.1672, grouping=0.0005,
                                          beyond_uniform=0.0, association=0),
                      s8_segmentation=s8_record((0.01, -0.01, 0.03)))
    # 16 of 300 per kind = 5.3% against chance 4.8%; copying 0.042 ± 0.01 against the null's 0.0419 at 97.5%;
    # key-value 0.1672 ± 0.01 against the null's 0.1672 at 97.5%; a grouping change no larger than with uniform
    # attention; copying ranked without regard to grouping
    assert {row.verdict for row in close.values()} == {ledger.BORDERLINE}
    assert "copying score 0.05 [" in close["s6-grouping-copying"].evidence[0].number


def test_the_grouping_question_needs_a_change_beyond_uniform_attention():
    """A positive change that uniform attention gives as well is not grouping by attention: borderline."""
    rows = questions(s6_values=s6_record(grouping=0.002, beyond_uniform=0.0))
    assert rows["s6-grouping"].verdict == ledger.BORDERLINE
    rows = questions(s6_values=s6_record(grouping=0.002, beyond_uniform=-0.003))
    assert rows["s6-grouping"].verdict == ledger.DISAGREES
    judged = ledger.judge_questions(s6_record(), EMBEDDED_NAME, ["s6-grouping"])
    assert list(judged) == ["s6-grouping"] and judged["s6-grouping"].outcome == ledger.AGREES


def test_a_question_whose_chapter_did_not_run_is_not_tested():
    rows = {row.claim.key: row for row in ledger.assemble({"s8_segmentation": s8_record()}, ledger.QUESTIONS,
                                                          missing_ok=True)}
    assert rows["s6-copying"].verdict == ledger.NOT_TESTED
    assert rows["s6-copying"].untested == ("s6_values was not executed in this build",)
    assert rows["s8-segmentation"].verdict == ledger.AGREES
    with pytest.raises(ledger.LedgerError, match="no record of s6_values"):
        ledger.assemble({"s8_segmentation": s8_record()}, ledger.QUESTIONS)


def test_the_modalities_questions_follow_the_rules_on_generated_attention():
    from ledger_records import TEXT_NAME, s7_record

    rows = questions(s7_modalities=s7_record())
    assert {key: row.verdict for key, row in rows.items()} == {
        "s7-symmetric": ledger.AGREES, "s7-same-unit": ledger.AGREES, "s7-same-unit-falls": ledger.AGREES}
    assert [e.model for e in rows["s7-same-unit"].evidence] == [TEXT_NAME]  # the control is no evidence
    assert "(counts beyond 1.05)" in rows["s7-same-unit"].evidence[0].number
    # attention to the own word that grows with depth: grouping early, but it does not fall
    rising = questions(s7_modalities=s7_record(strengths=(0.5, 1.0, 2.0, 3.0), symmetric=0))
    assert rising["s7-same-unit-falls"].verdict == ledger.DISAGREES
    assert rising["s7-symmetric"].verdict != ledger.AGREES
    # no preference for the own word at all: attention follows position only
    flat = questions(s7_modalities=s7_record(strengths=(0.0,) * 4))
    assert flat["s7-same-unit"].verdict == ledger.DISAGREES
