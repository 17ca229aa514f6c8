"""`CentroBindLoss` and `InfoNCELoss`: modules over :func:`fastbind.centroid_loss` / :func:`fastbind.infonce`."""

from __future__ import annotations

import torch

from fastbind.nn._temperature import _TemperatureMixin
from fastbind.ops.infonce import centroid_loss, infonce


class CentroBindLoss(_TemperatureMixin):
    """CentroBind loss: ``loss = CentroBindLoss()(z1, z2, z3, ...)`` with M >= 2 tensors [B, D].

    Keyword flags are those of :func:`fastbind.centroid_loss` (``label_smoothing``, ``weights``,
    ``normalize_anchor``, ``detach_anchor``, ``leave_one_out``, ``backend``). The temperature is a
    buffer, or a parameter with ``learnable_temperature=True``.
    """

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = False, **centroid_loss_flags) -> None:
        super().__init__()
        self._init_temperature("CentroBindLoss", temperature, learnable_temperature)
        allowed = {"label_smoothing", "weights", "normalize_anchor", "detach_anchor", "leave_one_out", "backend"}
        unknown = set(centroid_loss_flags) - allowed
        if unknown:
            raise TypeError(f"CentroBindLoss: unknown flags {sorted(unknown)}; expected some of {sorted(allowed)}")
        self.flags = centroid_loss_flags

    def forward(self, *modalities: torch.Tensor, gather: bool = False, process_group=None) -> torch.Tensor:
        return centroid_loss(
            *modalities, temperature=self.temperature, gather=gather, process_group=process_group, **self.flags
        )

    def extra_repr(self) -> str:
        flags = ", ".join(f"{k}={v!r}" for k, v in self.flags.items())
        return f"temperature={float(self.temperature):.4g}" + (f", {flags}" if flags else "")


class InfoNCELoss(_TemperatureMixin):
    """CLIP's symmetric InfoNCE: ``loss = InfoNCELoss()(x, y)`` with x, y [B, D].

    ``label_smoothing``, ``direction``, ``reduction`` and ``backend`` as in :func:`fastbind.infonce`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        label_smoothing: float = 0.0,
        direction: str = "both",
        reduction: str = "mean",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self._init_temperature("InfoNCELoss", temperature, learnable_temperature)
        self.label_smoothing = label_smoothing
        self.direction = direction
        self.reduction = reduction
        self.backend = backend

    def forward(self, x: torch.Tensor, y: torch.Tensor, gather: bool = False, process_group=None) -> torch.Tensor:
        return infonce(
            x,
            y,
            temperature=self.temperature,
            label_smoothing=self.label_smoothing,
            direction=self.direction,
            reduction=self.reduction,
            backend=self.backend,
            gather=gather,
            process_group=process_group,
        )

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.4g}, direction={self.direction!r}, reduction={self.reduction!r}"
