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


def test_readme_model_family_adapter_runs_end_to_end(monkeypatch):
    """The README's adapter for torch's nn.TransformerEncoder: registered, its QK and OV decompositions are the
    products of the encoder's own in_proj and out_proj rows and columns (computed here, not by the adapter), and
    the model's attention output is recomputed from the reader's stacked weights alone."""
    import torch

    from qklib.core import reader

    monkeypatch.setattr(reader, "_ADAPTERS", dict(reader._ADAPTERS))  # the registry as it was, afterwards
    snippets = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    example = next(s for s in snippets if "reader.register(" in s)
    torch.manual_seed(0)
    namespace = {}
    exec(example, namespace)
    encoder, svd = namespace["encoder"], namespace["svd"]
    assert reader.family_of(encoder) == "torch-encoder" and svd.S.shape == (2, 4, 16)
    layer = encoder.layers[1].self_attn
    w = layer.in_proj_weight.detach().double()
    wq, wk, wv = w[:64], w[64:128], w[128:]
    head = slice(2 * 16, 3 * 16)
    assert torch.allclose(svd.matrix(1, 2), wq[head].T @ wk[head], atol=1e-12)
    import qklib

    ov = qklib.ov_svd(encoder)
    assert torch.allclose(ov.matrix(1, 2), layer.out_proj.weight.detach().double()[:, head] @ wv[head], atol=1e-12)
    weights = reader.read_attention(encoder)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    q = torch.einsum("hrd,btd->bhtr", weights.wq[1], x) + weights.bq[1][None, :, None]
    k = torch.einsum("hrd,btd->bhtr", weights.wk[1], x) + weights.bk[1][None, :, None]
    v = torch.einsum("hrd,btd->bhtr", weights.wv[1], x) + weights.bv[1][None, :, None]
    out = torch.einsum("hdr,bhtr->btd", weights.wo[1], (q @ k.mT * weights.scale).softmax(-1) @ v) + weights.bo[1]
    expected = layer.double().eval()(x, x, x, need_weights=False)[0]  # eval: no dropout
    assert torch.allclose(out, expected, atol=1e-10)
