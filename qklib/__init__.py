"""qklib: query-key interaction in vision transformers (Pan et al., NeurIPS 2024), exactly and fast.

The package has five floors, one subpackage each; a module imports only from its own floor and those below
(``tests/test_layout.py``):

* ``qklib.core``: load a model (``models``; checkpoint loaders in ``loaders``; the text and speech encoders in
  ``modalities``), the one reader of every model family's attention weights and hook sites (``reader``), the exact
  QK SVD (``svd``: the container and the bases; ``lowrank``: the fast thin-factor SVD; ``nulls``: the cosines' null
  statistics), the value side (``ov``), what meets W_q and W_k (``extract``), images in (``images``, ``stream``),
  datasets with object masks (``datasets``), and the intervals and decision rule of every verdict (``stats``).
* ``qklib.search``: the optimal-image search of §5.
* ``qklib.analyses``: one module per measurement: §3 ``preference``; §4 ``cosine``, ``biases``, ``grouping``; §5
  ``modes``, ``same_object``; §6 ``values``, ``object_contrast``; §7 ``units``, ``sequences``, ``crossmodal``; §8
  ``segmentation``, ``recognition``.
* ``qklib.book``: what only the book needs: the chapters' parameters (``chapter``), the claims ledger (``ledger``)
  and the paper's models (``paper_models``).
* ``qklib.present``: every chart, picture and widget, and the claims ledger's page.

``qklib.cli`` is the command line (``python -m qklib``). To read the core in an hour, follow a model from its name
to its SVD: ``core/models.py`` (``load_model``), ``core/reader.py`` (``read_attention``), ``core/svd.py``
(``qk_svd``, ``QKSVD``), ``core/lowrank.py``, then ``core/extract.py`` for what the model computes on images.
"""

from .analyses.segmentation import segment
from .core.models import DEFAULT_MODEL, ModelError, ModelInfo, info, load_model, random_control
from .core.ov import (OVWeights, composition_null, composition_scores, copying_null, copying_scores, effective_rank,
                      haar_rotated, mode_alignment, ov_svd, ov_weights)
from .core.svd import QKSVD, QKWeights, mode_scores, null_band, qk_svd, qk_weights

__all__ = [
    "DEFAULT_MODEL", "ModelError", "ModelInfo", "OVWeights", "QKSVD", "QKWeights", "composition_null",
    "composition_scores", "copying_null", "copying_scores", "effective_rank", "haar_rotated", "info", "load_model",
    "mode_alignment", "mode_scores", "null_band", "ov_svd", "ov_weights", "qk_svd", "qk_weights", "random_control",
    "segment",
]
