"""`GramLoss`: the GRAM contrastive loss with a learnable temperature (DESIGN §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastbind.nn._temperature import _TemperatureMixin
from fastbind.ops.gram import gram_loss

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class GramLoss(_TemperatureMixin):
    """GRAM loss module: ``loss = GramLoss()(anchor, *modalities)``.

    As the GRAM release, the temperature is a parameter initialised to ``temperature`` (0.07) and
    learnt directly (no log parametrisation, no clamp); with ``learnable_temperature=False`` it is
    a buffer. ``label_smoothing`` and ``direction`` as in :func:`fastbind.gram_loss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = True,
        label_smoothing: float = 0.0,
        direction: str = "both",
        reduction: str = "mean",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self._init_temperature("GramLoss", temperature, learnable_temperature)
        self.label_smoothing = label_smoothing
        self.direction = direction
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        anchor: torch.Tensor,
        *modalities: torch.Tensor,
        gather: bool = False,
        process_group: ProcessGroup | None = None,
    ) -> torch.Tensor:
        return gram_loss(
            anchor,
            *modalities,
            temperature=self.temperature,
            label_smoothing=self.label_smoothing,
            direction=self.direction,
            reduction=self.reduction,
            backend=self.backend,
            gather=gather,
            process_group=process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):.4g}, label_smoothing={self.label_smoothing}, "
            f"direction={self.direction!r}"
        )
