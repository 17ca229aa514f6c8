"""Thin training layer: synthetic multimodal data, per-modality encoders, a loop with the binding
losses (GRAM, CentroBind, fixed anchor, pairwise CLIP), retrieval and linear-probe metrics, and the
`fastbind train` command line (``fastbind.train.cli.main``)."""

from fastbind.train.data import Batch, SyntheticConfig, SyntheticMultimodal
from fastbind.train.loop import LOSSES, TrainConfig, Trainer, binding_loss, train
from fastbind.train.metrics import joint_volume_retrieval, linear_probe, pairwise_retrieval, retrieval
from fastbind.train.models import BindingModel, MLPEncoder

__all__ = [
    "LOSSES",
    "Batch",
    "BindingModel",
    "MLPEncoder",
    "SyntheticConfig",
    "SyntheticMultimodal",
    "TrainConfig",
    "Trainer",
    "binding_loss",
    "joint_volume_retrieval",
    "linear_probe",
    "pairwise_retrieval",
    "retrieval",
    "train",
]
