"""README's Python example for the search and a mode picture runs as written (on a small folder)."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_readme_search_example_runs(tmp_path, embedded_model, embedded_svd, cat_photo):
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    example = next(s for s in snippets if "search.search(" in s)
    folder = tmp_path / "val" / "n01"
    folder.mkdir(parents=True)
    for index, size in enumerate((224, 160, 300)):
        cat_photo.resize((size, size)).rotate(30 * index).save(folder / f"img{index}.png")
    namespace = {"model": embedded_model, "svd": embedded_svd}
    exec(example.replace("/data/imagenet/val", str(tmp_path / "val")), namespace)
    best, pictures = namespace["best"], namespace["pictures"]
    assert 1 <= len(best) <= 3 and all(name.startswith("n01/img") for name, _ in best)
    assert [score for _, score in best] == sorted((score for _, score in best), reverse=True)
    assert len(pictures) == len(best) and all(p.shape == (224, 224, 3) and p.dtype == np.uint8 for p in pictures)
