"""Modules over the fused ops: GRAM / CentroBind / InfoNCE losses and the VectorQuantizer."""

from fastbind.nn.gram import GramLoss
from fastbind.nn.infonce import CentroBindLoss, InfoNCELoss
from fastbind.nn.vq import VectorQuantizer

__all__ = ["CentroBindLoss", "GramLoss", "InfoNCELoss", "VectorQuantizer"]
