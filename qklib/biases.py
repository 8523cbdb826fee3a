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

import pandas as pd
import torch
from torch import nn

from .core.extract import image_tokens, token_embeddings
from .core.models import depth, prefix_tokens
from .core.svd import QKSVD, qk_svd, qk_weights


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
    weights = qk_weights(model, with_bias=True)
    d = weights.wq.shape[-1] - 1
    wq, bq = weights.wq[..., :d], weights.wq[..., d]  # [L, H, r, d], [L, H, r]
    wk = weights.wk[..., :d]
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


def layer_table(models: dict[str, nn.Module], pixels: dict[str, torch.Tensor], batch_size: int = 8,
                svds: dict[str, QKSVD] | None = None) -> pd.DataFrame:
    """One row per (model, layer): the query-bias term's share of the key-dependent score variance
    (:func:`query_bias_table`) over the layer's heads -- median, lowest and highest -- and the layer weighted
    cosine without biases (the paper's form) and with the query bias included (``qk_svd(model,
    with_bias="query")``, the bilinear form on ``[x; 1]`` with the query bias: what the softmax keeps).
    ``pixels``: ``{label: [N, 3, S, S]}`` model input per model (each model's own preprocessing); ``svds``: the
    models' bias-free decompositions where the caller has them (else computed here)."""
    rows = []
    for label, model in models.items():
        table = query_bias_table(model, pixels[label], batch_size=batch_size)
        raw = (svds[label] if svds and label in svds else qk_svd(model)).layer_weighted_cosine().numpy()
        biased = qk_svd(model, with_bias="query").layer_weighted_cosine().numpy()
        for layer, heads in table.groupby("layer"):
            share = heads["share"].fillna(0.0)  # a head with no key-dependent variance at all: no share
            rows.append({"model": label, "layer": int(layer), "depth": depth(int(layer), len(raw)),
                         "share_median": float(share.median()), "share_low": float(share.min()),
                         "share_high": float(share.max()), "spread_ratio_median": float(heads["spread_ratio"].median()),
                         "weighted_cosine": float(raw[layer]), "weighted_cosine_query_bias": float(biased[layer])})
    return pd.DataFrame(rows)


def findings(table: pd.DataFrame) -> str:
    """Per model, in words: the query-bias share across the layers (every layer's median) and how far including
    the query bias moves the weighted cosine (the largest change and where)."""
    parts = []
    for label, frame in table.groupby("model", sort=False):
        if float(frame["share_high"].max()) == 0.0:
            parts.append(f"{label}: its query biases are zero, so the query-bias term is absent")
            continue
        medians = ", ".join(f"L{row.layer} {row.share_median:.2f}" for row in frame.itertuples())
        change = (frame["weighted_cosine_query_bias"] - frame["weighted_cosine"]).to_numpy()
        most = int(abs(change).argmax())
        lower, higher = int((change < 0).sum()), int((change > 0).sum())
        parts.append(f"{label}: the query-bias term carries a median share (over heads) of the key-dependent score "
                     f"variance of {medians}; single heads range from {frame['share_low'].min():.2f} to "
                     f"{frame['share_high'].max():.2f}. Including it lowers the layer weighted cosine in {lower} and "
                     f"raises it in {higher} of {len(change)} layers, most in L{int(frame['layer'].iloc[most])} "
                     f"({frame['weighted_cosine'].iloc[most]:.3f} without, "
                     f"{frame['weighted_cosine_query_bias'].iloc[most]:.3f} with)")
    return "; ".join(parts) + "."
