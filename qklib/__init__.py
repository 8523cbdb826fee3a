"""qklib: query-key interaction in vision transformers (Pan et al., NeurIPS 2024), exactly and fast."""

from .models import DEFAULT_MODEL, ModelError, ModelInfo, info, load_model, random_control
from .svd import QKSVD, QKWeights, mode_scores, null_band, qk_svd, qk_weights

__all__ = [
    "DEFAULT_MODEL", "ModelError", "ModelInfo", "QKSVD", "QKWeights", "info", "load_model", "mode_scores",
    "null_band", "qk_svd", "qk_weights", "random_control",
]
