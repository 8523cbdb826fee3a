"""§6 The value side: tables of every head's OV circuit and of the composition between heads, with their nulls.

The numbers come from ``qklib.core.ov`` (the exact OV SVD, composition and copying scores, their Haar nulls);
this module arranges them per model, layer and head for the chapter, and attaches intervals
(``qklib.core.stats.bootstrap`` over heads) and null thresholds. Within one head it sets each QK mode's key feature
``v_n`` against the head's own OV: how much of it the value reads, and what the head writes from it (``OV v_n``).
What the heads' outputs do to the tokens of images is ``qklib.analyses.object_contrast``'s.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from ..core.models import depth
from ..core.ov import COMPOSITION_KINDS, copying_null, copying_scores, effective_rank, haar_frames, mode_alignment
from ..core.stats import RESAMPLES, bootstrap
from ..core.svd import QKSVD


def head_table(ovs: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per model, layer and head of the OV circuits ``ovs`` (``{label: ov_svd(model)}``): the effective
    rank of the spectrum (``effective_rank``, between 1 and r), the share of the largest mode ``s_1 / sum s``, and
    both copying scores (``copying_scores``: the positive-real share of the eigenvalue mass, and the real-part
    ratio ``trace / sum |lambda|``)."""
    frames = []
    for label, ov in ovs.items():
        layers, heads = ov.S.shape[:2]
        columns = {"effective_rank": effective_rank(ov.S), "top_share": ov.S[..., 0] / ov.S.sum(-1),
                   "copying": copying_scores(ov), "copying_real_part": copying_scores(ov, kind="real_part")}
        layer, head = np.meshgrid(np.arange(layers), np.arange(heads), indexing="ij")
        frame = pd.DataFrame({"model": label, "layer": layer.ravel(), "head": head.ravel(),
                              "depth": depth(layer.ravel(), layers), "rank": ov.rank})
        for name, values in columns.items():
            frame[name] = values.cpu().numpy().ravel()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def layer_table(heads: pd.DataFrame, column: str, resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Per model and layer: the mean of ``column`` over the layer's heads (``head_table`` rows) with its 95%
    percentile-bootstrap interval over heads (``low``, ``high``)."""
    rows = []
    for (label, layer), group in heads.groupby(["model", "layer"], sort=False):
        interval = bootstrap(group[column].to_numpy(), resamples=resamples, seed=seed)
        rows.append({"model": label, "layer": layer, "depth": group["depth"].iloc[0], "quantity": column,
                     "mean": interval.estimate, "low": interval.low, "high": interval.high})
    return pd.DataFrame(rows)


def copying_nulls(ovs: dict[str, QKSVD], draws: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{label: [draws, L, H]}``: every head's copying score under ``draws`` Haar draws (``copying_null``)."""
    return {label: copying_null(ov, count=draws, seed=seed) for label, ov in ovs.items()}


def copying_null_table(ovs: dict[str, QKSVD], nulls: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Per model and layer: the central 95% of the layer's mean copying score over heads when every head's read
    and write directions are Haar-random and its spectrum kept (``nulls``: :func:`copying_nulls`):
    ``null_low``, ``null_high``, and the null's mean. Any per-head null ``[draws, L, H]`` works the same way
    (:func:`key_value_nulls`)."""
    rows = []
    for label, ov in ovs.items():
        layer_means = nulls[label].mean(-1).cpu().numpy()  # [draws, L]
        low, high = np.percentile(layer_means, [2.5, 97.5], axis=0)
        for layer in range(ov.num_layers):
            rows.append({"model": label, "layer": layer, "depth": depth(layer, ov.num_layers),
                         "null_mean": float(layer_means[:, layer].mean()), "null_low": float(low[layer]),
                         "null_high": float(high[layer])})
    return pd.DataFrame(rows)


def spectrum_table(ovs: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per model, layer, head and mode: ``s_n / s_1``, the spectrum's shape whatever its scale (the
    ``layer_scale`` option and LayerNorm gains move the scale, not the shape of a head's spectrum much)."""
    frames = []
    for label, ov in ovs.items():
        layers, heads, rank = ov.S.shape
        index = np.indices((layers, heads, rank)).reshape(3, -1)
        relative = (ov.S / ov.S[..., :1]).cpu().numpy().ravel()
        frames.append(pd.DataFrame({"model": label, "layer": index[0], "head": index[1], "mode": index[2],
                                    "relative_singular_value": relative}))
    return pd.concat(frames, ignore_index=True)


def composition_table(scores: dict[str, dict[str, torch.Tensor]],
                      nulls: dict[str, dict[str, torch.Tensor]]) -> pd.DataFrame:
    """One row per model, kind (q, k, v) and pair of heads in different layers (earlier ``layer1, head1`` writing,
    later ``layer2, head2`` reading): the composition score, the largest of the pair's null draws (``null_max``,
    from ``composition_null``) and ``beyond``: the score exceeds every null draw, which happens by chance with
    probability ``1 / (draws + 1)``. ``scores``/``nulls``: ``{label: composition_scores(...)}`` and
    ``{label: composition_null(...)}``."""
    frames = []
    for label, by_kind in scores.items():
        layers, heads = by_kind["q"].shape[:2]
        l1, h1, l2, h2 = np.indices((layers, heads, layers, heads)).reshape(4, -1)
        later = l2 > l1
        for kind in COMPOSITION_KINDS:
            score = by_kind[kind].cpu().numpy().ravel()[later]
            null = nulls[label][kind].flatten(1).cpu().numpy()[:, later]  # [draws, pairs]
            frames.append(pd.DataFrame({
                "model": label, "kind": kind, "layer1": l1[later], "head1": h1[later], "layer2": l2[later],
                "head2": h2[later], "score": score, "null_mean": null.mean(0), "null_max": null.max(0),
                "beyond": score > null.max(0), "draws": len(null)}))
    return pd.concat(frames, ignore_index=True)


def composition_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and kind: how many pairs of heads compose beyond chance (``composition_table``'s ``beyond``)
    against the ``1 / (draws + 1)`` share expected by chance, and the mean score against the null's mean."""
    grouped = table.groupby(["model", "kind"], sort=False)
    summary = grouped.agg(pairs=("score", "size"), beyond=("beyond", "sum"), share_beyond=("beyond", "mean"),
                          mean_score=("score", "mean"), null_mean=("null_mean", "mean"), draws=("draws", "first"))
    summary["chance_share"] = 1 / (summary["draws"] + 1)
    return summary.reset_index()


def alignment_table(qks: dict[str, QKSVD], ovs: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per model, later head (``layer``, ``head``), QK mode and earlier layer: how much of the mode's key
    feature v_n lies in the written subspace of the earlier layer's best-aligned head (``alignment``, the largest
    ``mode_alignment`` over its heads, and that head, ``earlier_head``), and ``chance`` = r / d, its mean for one
    random direction and one head."""
    frames = []
    for label, ov in ovs.items():
        aligned = mode_alignment(qks[label], ov)  # [L, H, r, L, H]
        best, which = aligned.max(-1)  # [L, H, r, L]: over the earlier layer's heads
        layer, head, mode, earlier = np.indices(best.shape).reshape(4, -1)
        keep = earlier < layer
        frames.append(pd.DataFrame({
            "model": label, "layer": layer[keep], "head": head[keep], "mode": mode[keep],
            "earlier_layer": earlier[keep], "alignment": best.cpu().numpy().ravel()[keep],
            "earlier_head": which.cpu().numpy().ravel()[keep], "chance": ov.rank / ov.dim}))
    return pd.concat(frames, ignore_index=True)


def findings(heads: pd.DataFrame, summary: pd.DataFrame, resamples: int = RESAMPLES, seed: int = 0) -> str:
    """One sentence per model with this run's numbers: the OV effective rank in the first and last layer (mean
    over heads, of r), the copying score over all heads with its bootstrap interval over heads, and the share of
    pairs of heads that compose beyond chance per kind against the share expected by chance."""
    sentences = []
    for label, group in heads.groupby("model", sort=False):
        first, last = (group[group.layer == layer].effective_rank.mean() for layer in (0, group.layer.max()))
        copying = bootstrap(group.copying.to_numpy(), resamples=resamples, seed=seed)
        kinds = summary[summary.model == label].set_index("kind")
        shares = ", ".join(f"{kind.upper()} {kinds.loc[kind, 'share_beyond']:.1%}" for kind in COMPOSITION_KINDS)
        sentences.append(
            f"{label}: OV effective rank {first:.1f} in the first layer and {last:.1f} in the last (of "
            f"{int(group['rank'].iloc[0])}); copying score {copying.text()} over {copying.units} heads; pairs of "
            f"heads composing beyond chance: {shares} (chance alone: {kinds['chance_share'].iloc[0]:.1%}).")
    return " ".join(sentences)


def ledger_measures(heads: pd.DataFrame, summary: pd.DataFrame, nulls: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The claims ledger's "Beyond the paper" measures per model (``qklib.book.ledger.question_record``): the pairs of
    heads composing beyond chance per kind (:func:`composition_summary`) and every head's copying score with the
    null's draws of their mean (``nulls``: :func:`copying_nulls`)."""
    measures = {}
    for label, group in heads.groupby("model", sort=False):
        kinds = summary[summary.model == label].set_index("kind")
        measures[label] = {
            "composition": {"kinds": {kind: {"beyond": int(kinds.loc[kind, "beyond"]), "pairs": int(kinds.loc[kind, "pairs"])}
                                      for kind in COMPOSITION_KINDS},
                            "chance": float(kinds["chance_share"].iloc[0])},
            "copying": {"heads": [float(v) for v in group["copying"]],
                        "null": [float(v) for v in nulls[label].mean((1, 2)).cpu()]}}
    return measures


# --- QK meets OV in one head -----------------------------------------------------------------------------------

def key_value_alignment(qk: QKSVD, ov: QKSVD) -> torch.Tensor:
    """``[L, H, r]``: for every QK mode n of a head, the share of its unit key feature ``v_n`` that lies in the same
    head's OV read subspace, ``|V_ov^T v_n|^2`` in [0, 1]. 1: the head's value reads exactly what the mode looks
    for in the keys; a random direction has ``r / d`` on average. Averaged over the r modes it is the mean squared
    cosine of the principal angles between the head's key and value row spaces."""
    return (ov.V.mT @ qk.V).square().sum(-2)


def ov_images(qk: QKSVD, ov: QKSVD) -> torch.Tensor:
    """``[L, H, d, r]``: ``OV v_n`` for every QK mode n of a head, what the head writes (per unit of attention)
    from a key token that holds exactly the mode's key feature: ``U_ov S_ov V_ov^T v_n``."""
    return ov.U @ (ov.S.unsqueeze(-1) * (ov.V.mT @ qk.V))


def key_value_table(qks: dict[str, QKSVD], ovs: dict[str, QKSVD]) -> pd.DataFrame:
    """One row per model, layer, head and QK mode: ``alignment`` (:func:`key_value_alignment`) against ``chance``
    = r / d; ``gain`` = ``|OV v_n| / s_1(OV)``, how strongly the head writes from that feature relative to its
    strongest direction; ``self_cosine`` = ``cos(OV v_n, v_n)``, whether it writes the feature back (copies it)."""
    frames = []
    for label, ov in ovs.items():
        qk = qks[label]
        images = ov_images(qk, ov)
        gain = images.norm(dim=-2) / ov.S[..., :1]
        self_cosine = (images * qk.V).sum(-2) / images.norm(dim=-2).clamp_min(1e-300)
        layer, head, mode = np.indices(ov.S.shape).reshape(3, -1)
        frames.append(pd.DataFrame({
            "model": label, "layer": layer, "head": head, "mode": mode, "depth": depth(layer, ov.num_layers),
            "alignment": key_value_alignment(qk, ov).cpu().numpy().ravel(), "chance": ov.rank / ov.dim,
            "gain": gain.cpu().numpy().ravel(), "self_cosine": self_cosine.cpu().numpy().ravel()}))
    return pd.concat(frames, ignore_index=True)


def key_value_heads(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, layer and head (``key_value_table`` rows): ``key_value``, the mean alignment over its modes."""
    return table.groupby(["model", "layer", "head"], sort=False).agg(
        depth=("depth", "first"), key_value=("alignment", "mean"), chance=("chance", "first")).reset_index()


def key_value_nulls(qks: dict[str, QKSVD], ovs: dict[str, QKSVD], draws: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{label: [draws, L, H]}``: every head's mean alignment over modes when its OV read frame is Haar-random
    (``haar_frames``, independently per head and draw: the spectrum kept, the read directions random; seeded)."""
    nulls = {}
    for label, ov in ovs.items():
        generator, (layers, heads, d, r) = torch.Generator().manual_seed(seed), ov.V.shape
        frames = (haar_frames(layers * heads, d, r, generator).view(ov.V.shape).to(ov.V.device) for _ in range(draws))
        nulls[label] = torch.stack([key_value_alignment(qks[label], replace(ov, V=frame)).mean(-1) for frame in frames])
    return nulls


def featured_heads(heads: pd.DataFrame, label: str, layers: list[int]) -> list[tuple[int, int]]:
    """``[(layer, head)]``: in each of ``layers``, the head of model ``label`` whose value reads most of its key
    features (the largest ``key_value``, :func:`key_value_heads`), for the pictures."""
    rows = heads[heads.model == label]
    return [(int(layer), int(rows[rows.layer == layer].nlargest(1, "key_value")["head"].iloc[0])) for layer in layers]


def key_value_measures(heads: pd.DataFrame, nulls: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The claims ledger's ``key_value`` measure per model: every head's mean alignment (:func:`key_value_heads`)
    and the Haar null's draws of their mean over heads (:func:`key_value_nulls`), with the chance r / d."""
    return {label: {"key_value": {"heads": [float(v) for v in rows["key_value"]],
                                  "null": [float(v) for v in nulls[label].mean((1, 2)).cpu()],
                                  "chance": float(rows["chance"].iloc[0])}}
            for label, rows in heads.groupby("model", sort=False)}


def merged(*measures: dict[str, dict]) -> dict[str, dict]:
    """One ``{label: {measure: ...}}`` from several (the first's models, in its order)."""
    return {label: {key: value for part in measures for key, value in part.get(label, {}).items()}
            for label in measures[0]}
