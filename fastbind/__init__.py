"""fastbind: fused kernels for multimodal binding (GRAM, CentroBind/InfoNCE, shared VQ codebooks).

Public API: see DESIGN §1 and the README. Every function takes ``backend=None`` (automatic) or one
of :func:`backends`.
"""

from fastbind import nn
from fastbind._backend import backends, get_backend, set_backend
from fastbind.ops.codebook import codebook_lookup, quantize, toc_scores, toc_select
from fastbind.ops.gram import gram_loss, gram_volume, gram_volume_paired
from fastbind.ops.infonce import anchor_loss, centroid_loss, centroid_similarity, infonce

__version__ = "0.1.0"

__all__ = [
    "nn",
    "anchor_loss",
    "backends",
    "centroid_loss",
    "centroid_similarity",
    "codebook_lookup",
    "get_backend",
    "gram_loss",
    "gram_volume",
    "gram_volume_paired",
    "infonce",
    "quantize",
    "set_backend",
    "toc_scores",
    "toc_select",
]
