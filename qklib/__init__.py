"""qklib: query-key interaction in vision transformers (Pan et al., NeurIPS 2024), exactly and fast.

The package has three floors; each imports only from the floors below it (``tests/test_layout.py``):

* ``qklib.core``: load a ViT (``models``; converters ``weights``, ``hf``, ``official``, ``imgfocus``; the paper's
  table ``paper_models``), the one reader of every model family's attention weights and hook sites (``reader``),
  images in (``images``, ``stream``), what meets W_q and W_k (``extract``), the exact QK SVD (``svd``: the
  container and the bases; ``lowrank``: the fast thin-factor SVD; ``nulls``: the cosines' null statistics), the
  value side (``ov``: the exact OV SVD, composition and copying scores, their Haar nulls) and atomic writes
  (``files``).
* analyses, one per paper section: §3 ``o3`` (data) and ``preference``; §4 ``cosine``, ``biases`` and ``grouping``;
  §5 ``modes``, ``search`` (optimal images), ``ade20k`` (data) and ``same_object``; across them ``stats`` (the
  intervals, nulls and decision rule of every verdict) and ``ledger``, the paper's headline claims judged from the
  chapters' records; beyond the paper, §6 ``values`` (the value side),
  §8 ``segmentation`` (the modes as a training-free segmenter against the established methods), ``recognition``
  and ``voc`` (data).
* ``qklib.present``: every chart, picture and widget (``attention``, ``cosine``, ``values``, ``mode_figures``,
  ``segmentation``, ``render``, ``widgets``, ``explore``, ``lab``), and the claims ledger's table (``ledger``).

``qklib.book.chapter`` serves the book's chapters (parameter checks, the gallery, cached results), and
``qklib.cli`` is the command line (``python -m qklib``).
"""

from .core.models import DEFAULT_MODEL, ModelError, ModelInfo, info, load_model, random_control
from .core.ov import (OVWeights, composition_null, composition_scores, copying_null, copying_scores, effective_rank,
                      haar_rotated, mode_alignment, ov_svd, ov_weights)
from .core.svd import QKSVD, QKWeights, mode_scores, null_band, qk_svd, qk_weights
from .analyses.segmentation import segment

__all__ = [
    "DEFAULT_MODEL", "ModelError", "ModelInfo", "OVWeights", "QKSVD", "QKWeights", "composition_null",
    "composition_scores", "copying_null", "copying_scores", "effective_rank", "haar_rotated", "info", "load_model",
    "mode_alignment", "mode_scores", "null_band", "ov_svd", "ov_weights", "qk_svd", "qk_weights", "random_control",
    "segment",
]
