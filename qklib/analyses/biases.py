"""§4 formulation: what the query and key biases add to the attention score, measured on real tokens.

With biases, ``q_i = W_q x_i + b_q`` and ``k_j = W_k x_j + b_k``, so the score of query i on key j is

    q_i . k_j = x_i^T W_q^T W_k x_j      (g_ij, the bias-free bilinear form the paper decomposes)
              + b_q . W_k x_j            (c_j, the query-bias term: depends on the key, not on the query)
              + x_i^T W_q^T b_k + b_q . b_k   (constant over keys: cancels in the softmax over j)

The paper leaves all biases out ("they do not depend on the input pair"). That is right for the last two terms
and wrong for c_j: it shifts every query's scores by the same key-dependent amount, which the softmax keeps.
:func:`query_bias_table` measures, per head, how large c_j is next to g_ij as the keys vary. The exact
decomposition with biases is ``qk_svd(model, with_bias=True)`` (the bilinear form on ``[x; 1]``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.extract import image_tokens, token_embeddings
from ..core.models import depth, prefix_tokens
from ..core.reader import read_attention


@torch.no_grad()
def score_variance_parts(model: nn.Module, pixels: torch.Tensor, batch_size: int = 8,
                         image_tokens_only: bool = False) -> dict[str, torch.Tensor]:
    """Per head, the spread over keys of the parts of the score, averaged over queries and images.

    ``pixels``: ``[N, 3, S, S]`` model input. Queries i and keys j run over all T tokens of each image (prefix
    tokens included: the softmax normalises over them), or over the image tokens only with
    ``image_tokens_only``. With ``Var_j`` the population variance over the keys of one image, returns
    ``[L, H]`` float64 tensors:

    * ``"bias_free"``: mean over images and queries of ``Var_j g_ij`` (g_ij = x_i^T W_q^T W_k x_j);
    * ``"query_bias"``: mean over images of ``Var_j c_j`` (c_j = b_q . W_k x_j, the same for every query);
    * ``"score"``: mean over images and queries of ``Var_j (q_i . k_j)`` = ``Var_j (g_ij + c_j)``: the whole
      key-dependent score (the other terms are constant over j), so ``score = bias_free + query_bias + 2 cov``.

    Computed exactly through each image's key covariance ``Sigma = Cov_j(W_k x_j)`` (``[d_k, d_k]``):
    ``Var_j g_ij = (W_q x_i)^T Sigma (W_q x_i)``, ``Var_j c_j = b_q^T Sigma b_q``. The 1/sqrt(d_k) scale is
    left out (it scales all three alike).
    """
    attention = read_attention(model)
    wq, bq, wk = attention.wq, attention.bq, attention.wk  # [L, H, r, d], [L, H, r], [L, H, r, d]
    prefix = prefix_tokens(model)
    sums = {"bias_free": 0.0, "query_bias": 0.0, "score": 0.0}
    queries = images = 0
    for start in range(0, len(pixels), batch_size):
        x = token_embeddings(model, pixels[start : start + batch_size]).double()  # [L, B, T, d]
        if image_tokens_only:
            x = image_tokens(x, prefix)
        qx = torch.einsum("lbtd,lhrd->lbhtr", x, wq)  # [L, B, H, T, r]
        kx = torch.einsum("lbtd,lhrd->lbhtr", x, wk)
        centred = kx - kx.mean(-2, keepdim=True)
        sigma = centred.transpose(-1, -2) @ centred / kx.shape[-2]  # [L, B, H, r, r]
        q_biased = qx + bq[:, None, :, None, :]
        sums["bias_free"] = sums["bias_free"] + torch.einsum("lbhir,lbhrs,lbhis->lh", qx, sigma, qx)
        sums["score"] = sums["score"] + torch.einsum("lbhir,lbhrs,lbhis->lh", q_biased, sigma, q_biased)
        sums["query_bias"] = sums["query_bias"] + torch.einsum("lhr,lbhrs,lhs->lh", bq, sigma, bq)
        images += x.shape[1]
        queries += x.shape[1] * x.shape[2]
    if images == 0:
        raise ValueError("no images: pixels must be [N, 3, S, S] with N >= 1")
    return {"bias_free": sums["bias_free"] / queries, "query_bias": sums["query_bias"] / images,
            "score": sums["score"] / queries}


def query_bias_table(model: nn.Module, pixels: torch.Tensor, batch_size: int = 8,
                     image_tokens_only: bool = False) -> pd.DataFrame:
    """One row per (layer, head): the parts of :func:`score_variance_parts` and three ratios.

    * ``share`` = ``query_bias / (bias_free + query_bias)``: the query-bias term's share of the key-dependent
      score variance, the covariance between the two terms left out (so it lies in [0, 1]);
    * ``spread_ratio`` = ``sqrt(query_bias / bias_free)``: the query-bias term's spread over keys (sd) as a
      multiple of the bias-free score's;
    * ``cross`` = ``(score - bias_free - query_bias) / score``: the covariance term's part of the whole
      key-dependent variance (0 when the two terms are uncorrelated over keys).
    """
    parts = score_variance_parts(model, pixels, batch_size=batch_size, image_tokens_only=image_tokens_only)
    layers, heads = parts["score"].shape
    frame = pd.DataFrame({
        "layer": [layer for layer in range(layers) for _ in range(heads)],
        "head": [head for _ in range(layers) for head in range(heads)],
        "var_bias_free": parts["bias_free"].flatten().numpy(),
        "var_query_bias": parts["query_bias"].flatten().numpy(),
        "var_score": parts["score"].flatten().numpy(),
    })
    frame["share"] = frame["var_query_bias"] / (frame["var_bias_free"] + frame["var_query_bias"])
    frame["spread_ratio"] = (frame["var_query_bias"] / frame["var_bias_free"]) ** 0.5
    frame["cross"] = (frame["var_score"] - frame["var_bias_free"] - frame["var_query_bias"]) / frame["var_score"]
    return frame


@torch.no_grad()
def attention_shift(model: nn.Module, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``[L, H, N]`` float64: per layer, head and image, how far the query-bias term moves attention: the mean over
    query tokens of the total-variation distance ``0.5 sum_j |p_ij - p'_ij|`` between the head's attention with
    the term (``p = softmax_j((g_ij + c_j) / sqrt(d_k))``, what the model computes: the other bias terms are
    constant over keys and cancel) and without it (``p'``, the softmax of the bias-free form the QK SVD
    decomposes). 0: the term changes nothing; 1: disjoint attention. Unlike a cosine on ``[x; c]`` it depends on
    no choice of basis or of a constant coordinate. ``pixels``: ``[N, 3, S, S]``; every token is a query and a
    key (prefix tokens included: the softmax normalises over them)."""
    attention = read_attention(model)
    wq, bq, wk = attention.wq, attention.bq, attention.wk  # [L, H, r, d], [L, H, r], [L, H, r, d]
    scale = attention.scale
    shifts = []
    for start in range(0, len(pixels), batch_size):
        x = token_embeddings(model, pixels[start : start + batch_size]).double()  # [L, B, T, d]
        per_layer = []
        for layer in range(x.shape[0]):
            qx = torch.einsum("btd,hrd->bhtr", x[layer], wq[layer])
            kx = torch.einsum("btd,hrd->bhtr", x[layer], wk[layer])
            free = qx @ kx.transpose(-1, -2) * scale  # [B, H, T, T]
            salience = torch.einsum("bhtr,hr->bht", kx, bq[layer]) * scale  # c_j / sqrt(d_k)
            moved = (free.softmax(-1) - (free + salience[:, :, None, :]).softmax(-1)).abs().sum(-1) / 2
            per_layer.append(moved.mean(-1).transpose(0, 1))  # [H, B]
        shifts.append(torch.stack(per_layer))
    if not shifts:
        raise ValueError("no images: pixels must be [N, 3, S, S] with N >= 1")
    return torch.cat(shifts, dim=-1)


def layer_table(models: dict[str, nn.Module], pixels: dict[str, torch.Tensor], batch_size: int = 8,
                shifts: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per (model, layer): the query-bias term's share of the key-dependent score variance
    (:func:`query_bias_table`) over the layer's heads -- median, lowest and highest -- and how far dropping the
    term moves attention (:func:`attention_shift`, mean over photos per head): median, lowest and highest head.
    ``pixels``: ``{label: [N, 3, S, S]}`` model input per model (each model's own preprocessing); ``shifts``: the
    models' :func:`attention_shift` where the caller has it (else computed here)."""
    rows = []
    for label, model in models.items():
        table = query_bias_table(model, pixels[label], batch_size=batch_size)
        shift = (shifts[label] if shifts and label in shifts else attention_shift(model, pixels[label], batch_size))
        per_head = shift.mean(-1).numpy()  # [L, H]
        for layer, heads in table.groupby("layer"):
            share = heads["share"].fillna(0.0)  # a head with no key-dependent variance at all: no share
            moved = per_head[int(layer)]
            rows.append({"model": label, "layer": int(layer), "depth": depth(int(layer), len(per_head)),
                         "share_median": float(share.median()), "share_low": float(share.min()),
                         "share_high": float(share.max()), "spread_ratio_median": float(heads["spread_ratio"].median()),
                         "shift_median": float(np.median(moved)), "shift_low": float(moved.min()),
                         "shift_high": float(moved.max())})
    return pd.DataFrame(rows)


def findings(table: pd.DataFrame) -> str:
    """Per model, in words: how far dropping the query-bias term moves attention in every layer (median head,
    and the largest head), and the term's share of the key-dependent score variance."""
    parts = []
    for label, frame in table.groupby("model", sort=False):
        if float(frame["share_high"].max()) == 0.0:
            parts.append(f"{label}: its query biases are zero, so the query-bias term is absent")
            continue
        moved = ", ".join(f"L{row.layer} {row.shift_median:.2f}" for row in frame.itertuples())
        worst = frame.loc[frame["shift_high"].idxmax()]
        parts.append(f"{label}: dropping the term moves each query's attention by a total variation of (median over "
                     f"heads, mean over photos and queries) {moved}; the most affected head moves by "
                     f"{worst['shift_high']:.2f} (L{int(worst['layer'])}). Its share of the key-dependent score "
                     f"variance ranges from {frame['share_median'].min():.2f} to {frame['share_median'].max():.2f} "
                     "over the layers (median heads)")
    return "; ".join(parts) + "."
