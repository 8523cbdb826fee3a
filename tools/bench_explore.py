"""How fast the live explorers answer (qklib.present.explore) for the embedded model, on this machine.

Each explorer is built as its chapter builds it, then its controls are set one after another as a reader's
clicks would; the redraw time of each change is the explorer's own ``seconds`` (wall clock) and the
process CPU time around it. "first" is a change that needs the model (an image not seen before: its
attention or token embeddings are computed and cached), "cached" every later change.

    .venv/bin/python tools/bench_explore.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import qklib  # noqa: E402
from qklib.book import chapter
from qklib import search  # noqa: E402
from qklib.core.images import shipped_photos  # noqa: E402
from qklib.present.explore import explore, explore_attention, explore_spectrum  # noqa: E402


def timed(box, changes) -> list[tuple[str, float, float]]:
    """``[(change, wall s, cpu s)]`` for each ``(control, value)`` set on ``box``."""
    out = []
    for control, value in changes:
        cpu = time.process_time()
        box.controls[control].value = value
        assert box.message.value == "", box.message.value
        out.append((f"{control}={value}", box.seconds, time.process_time() - cpu))
    return out


def report(name: str, first: list, cached: list) -> None:
    def line(kind, rows):
        if not rows:
            return
        walls, cpus = [r[1] for r in rows], [r[2] for r in rows]
        print(f"  {kind:7s} {len(rows):2d} changes: wall median {statistics.median(walls):.3f} s, max {max(walls):.3f} s; "
              f"cpu median {statistics.median(cpus):.3f} s")
    print(name)
    line("first", first)
    line("cached", cached)


def main() -> None:
    torch.set_num_threads(2)
    model = qklib.load_model()
    svd = qklib.qk_svd(model)
    photos = shipped_photos()
    with TemporaryDirectory() as folder:
        scenes = chapter.scenes(Path(folder), 4, seed=0)
        box = explore_attention({qklib.info(model).name: model}, scenes, {"chelsea": photos["chelsea"]})
        first = timed(box, [("image", scenes[1].id), ("image", "chelsea")])
        cached = timed(box, [("layer", 3), ("head", 2), ("row", 4), ("col", 9), ("layer", 10), ("head", 5),
                             ("image", scenes[1].id), ("row", 12), ("layer", 0)])
        report("§3 explore_attention (query token's attention map)", first, cached)

    box = explore_spectrum({"embedded": svd, "random": qklib.qk_svd(qklib.random_control(qklib.DEFAULT_MODEL))})
    cached = timed(box, [("layer", 3), ("head", 2), ("mode", 10), ("layer", 11), ("mode", 0), ("model", "random"),
                         ("layer", 5), ("head", 1)])
    report("§4 explore_spectrum (spectrum, cos_n, mode in context; no image)", [], cached)

    found = search.search_images(model, photos, layers=[4, 10], k=4, svd=svd)
    box = explore(model, svd, photos, found, top=4)
    first = timed(box, [("image", "coffee"), ("layer", 10)])
    for name in photos:  # every image's tokens at both searched layers, so the rest is all cached
        timed(box, [("image", name), ("layer", 4), ("layer", 10)])
    cached = timed(box, [("image", "chelsea"), ("head", 2), ("sign", -1), ("layer", 4), ("head", 1), ("mode", 0),
                         ("sign", 1), ("layer", 10), ("head", 1)])
    report(f"§5 explore (one mode on an image + its {found.k} optimal images)", first, cached)


if __name__ == "__main__":
    main()
