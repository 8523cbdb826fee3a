"""The §7 chapter end to end on other models than the book's (slow: papermill), and its parameter checks."""

import pytest

from qklib.book import ledger


@pytest.mark.slow
def test_s7_runs_on_other_models_and_records_its_answers(run_chapter, tmp_path):
    nb, error = run_chapter("s7_modalities", vision_models=["random:vit_tiny_patch16_224"],
                            text_models=["random:hf:sentence-transformers/all-MiniLM-L6-v2"],
                            speech_models=["random:hf:openai/whisper-tiny.en"], n_texts=6, n_utterances=4, shifts=2,
                            top_inputs=2, resamples=200, seed=3)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell displayed an error"
    text = "\n".join(str(o.get("data", {})) for o in outputs)
    assert "hf:openai/whisper-tiny.en (random init, seed 3)" in text and "vit_tiny_patch16_224 (random init" in text
    # Fig 3 and Fig 2 across modalities, copying and effective rank
    assert sum("vegaEmbed" in o.get("data", {}).get("text/html", "") for o in outputs) == 4
    assert text.count("data:text/csv;base64") == 2 and text.count("<img") >= 2
    record = ledger.record_from_notebook(tmp_path / "s7_modalities.out.ipynb", "s7_modalities")
    assert [e["control"] for e in record["models"]] == [True, True]
    rows = ledger.assemble({"s7_modalities": record}, ledger.QUESTIONS, missing_ok=True)
    # only controls ran: no question has evidence
    assert {r.verdict for r in rows if r.claim.chapter == "s7_modalities"} == {ledger.NOT_TESTED}
