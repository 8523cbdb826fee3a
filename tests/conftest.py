import os
import time
from pathlib import Path

import pytest
import torch

# Tests never touch the network: make any hub access fail at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Set in JupyterLab's terminals by `make lab`; chapters run by the tests draw charts as the book does.
os.environ.pop("QKLIB_VEGA_SCRIPT", None)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium driven by Playwright (never a browser Playwright downloads). Missing: the test is
    skipped with the reason printed, except under CI (``$CI`` set), where that is a failure."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: apt-get install -y chromium (the browser tests need Debian's chromium)"
        print(reason)
        if os.environ.get("CI"):
            pytest.fail(reason + " [CI is set, so this is a failure]")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def embedded_model():
    import qklib

    return qklib.load_model()


@pytest.fixture(scope="session")
def embedded_svd(embedded_model):
    import qklib

    return qklib.qk_svd(embedded_model)


@pytest.fixture(scope="session")
def cat_photo():
    from qklib.core.images import shipped_photos

    return shipped_photos()["chelsea"]


@pytest.fixture(scope="session")
def tiny_vit():
    """A 3-block random ViT at 64 px (4 x 4 tokens) and its QK SVD: fast, and exercises every code path."""
    import timm

    import qklib
    from qklib.core.provenance import relabel

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()
    relabel(model, "vit_tiny_patch16_224 (test)")
    return model, qklib.qk_svd(model)


@pytest.fixture
def run_chapter(tmp_path):
    """``run_chapter(name, **parameters) -> (executed notebook, PapermillExecutionError or None)``: the text
    notebook ``notebooks/<name>.py`` converted with jupytext and executed by papermill from the repo root."""
    import jupytext
    import nbformat
    import papermill

    def run(name: str, **parameters):
        parameters.setdefault("results_dir", str(tmp_path / "results"))  # never write into the repository
        source = tmp_path / f"{name}.ipynb"
        jupytext.write(jupytext.read(ROOT / "notebooks" / f"{name}.py"), source, fmt="ipynb")
        out = tmp_path / f"{name}.out.ipynb"
        try:
            papermill.execute_notebook(str(source), str(out), parameters=parameters, kernel_name="python3",
                                       language="python", cwd=str(ROOT), progress_bar=False)
        except papermill.PapermillExecutionError as error:
            return nbformat.read(out, 4), error
        return nbformat.read(out, 4), None

    return run


def write_o3_folder(root: Path, names=("a", "b"), layout=None, skip_mask=None):
    """A tiny O3-layout folder: 40 x 30 photos, a target and a distractor mask each (``skip_mask``: a name
    whose target mask is left out)."""
    import numpy as np
    from PIL import Image

    from qklib.core.datasets.o3 import O3Layout

    layout = layout or O3Layout()
    for folder in (layout.images, layout.targets, layout.distractors):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (40, 30), (10, 200, 30)).save(root / layout.images / f"{name}.jpg")
        target = np.zeros((30, 40), np.uint8)
        target[2:10, 2:10] = 255
        distractor = np.zeros((30, 40), np.uint8)
        distractor[15:25, 20:30] = 255
        if skip_mask != name:
            Image.fromarray(target).save(root / layout.targets / f"{name}.png")
        Image.fromarray(distractor).save(root / layout.distractors / f"{name}.jpg")  # JPEG masks are thresholded


@pytest.fixture
def write_o3():
    return write_o3_folder


SLURM_UP = ROOT / "tools" / "slurm" / "up.sh"
SLURM_DOWN = ROOT / "tools" / "slurm" / "down.sh"


def _slurm_answers(env: dict) -> bool:
    import subprocess

    try:
        return subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _no_slurm(reason: str):
    """Skip with the reason printed; under ``QKLIB_REQUIRE_SLURM=1`` (set by .ci/run) that is a failure."""
    print(reason)
    if os.environ.get("QKLIB_REQUIRE_SLURM") == "1":
        pytest.fail(reason + " [QKLIB_REQUIRE_SLURM=1, so this is a failure]")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm that submitit can use, with accounting (``sacct``): the one ``$SLURM_CONF`` names when ``sinfo``
    answers, else a single-node one brought up by ``tools/slurm/up.sh`` (as root, with Debian's slurm-wlm, slurmdbd,
    munge and mariadb-server installed) and taken down by ``tools/slurm/down.sh`` at the end of the session.
    Neither possible: skipped with the reason, a failure under ``QKLIB_REQUIRE_SLURM=1``."""
    import shutil
    import subprocess

    try:
        import submitit  # noqa: F401
    except ImportError:
        _no_slurm("submitit is not installed: pip install -e '.[test]' (the Slurm tests drive Slurm through it)")
    if os.environ.get("SLURM_CONF") and _slurm_answers(dict(os.environ)):
        yield os.environ["SLURM_CONF"]
        return
    missing = [tool for tool in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct")
               if shutil.which(tool) is None]
    if missing:
        _no_slurm(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm slurmdbd munge "
                  "mariadb-server, or tools/slurm/up.sh --install (as root)")
    if os.geteuid() != 0:
        _no_slurm("a single-node Slurm is brought up by tools/slurm/up.sh as root only; run the tests as root, or "
                  "point SLURM_CONF at a running cluster")
    import tempfile

    # Not under pytest's basetemp: its /tmp/pytest-of-USER is 0700, and munged, as the munge user, must reach it.
    folder = Path(tempfile.mkdtemp(prefix="qklib-slurm-"))
    started = time.monotonic()
    run = subprocess.run(["bash", str(SLURM_UP), str(folder)], capture_output=True, text=True, timeout=180)
    if run.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        _no_slurm(f"tools/slurm/up.sh failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
    print(f"single-node Slurm up in {time.monotonic() - started:.1f} s ({folder})")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        subprocess.run(["bash", str(SLURM_DOWN), str(folder)], timeout=120)
