"""`CentroBindLoss` and `InfoNCELoss`: modules over :func:`fastbind.centroid_loss` / :func:`fastbind.infonce`.

Both take the temperature as ``temperature=`` or as open_clip's ``logit_scale=`` (= 1/τ; exactly
one) at construction, and a ``logit_scale=`` at call time as open_clip's ``ClipLoss`` does (e.g.
``loss_fn(x, y, logit_scale=model.logit_scale.exp())``), which then replaces the module's own
fixed temperature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fastbind.nn._temperature import _TemperatureMixin
from fastbind.ops.infonce import DEFAULT_TEMPERATURE, centroid_loss, infonce

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _initial_temperature(name: str, temperature: float | None, logit_scale: float | None) -> float:
    """The constructor's temperature from exactly one of temperature= and logit_scale= (= 1/τ)."""
    if logit_scale is None:
        return DEFAULT_TEMPERATURE if temperature is None else temperature
    if temperature is not None:
        raise ValueError(f"{name}: got both temperature={temperature!r} and logit_scale={logit_scale!r}; pass one")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not logit_scale > 0:
        raise ValueError(f"{name}: logit_scale must be a float > 0 (it is 1/temperature), got {logit_scale!r}")
    return 1.0 / logit_scale


class _CallScaleMixin(_TemperatureMixin):
    def _call_temperature(self, name: str, logit_scale) -> dict:
        """temperature= / logit_scale= keywords of one call: a call-time logit_scale replaces the
        module's temperature, unless that is a learnable parameter (it would silently stop learning)."""
        if logit_scale is None:
            return {"temperature": self.temperature}
        if isinstance(self.temperature, torch.nn.Parameter):
            raise ValueError(
                f"{name}: got logit_scale= at call time but the module learns its own temperature "
                "(learnable_temperature=True); use one or the other"
            )
        return {"logit_scale": logit_scale}


class CentroBindLoss(_CallScaleMixin):
    """CentroBind loss: ``loss = CentroBindLoss()(z1, z2, z3, ...)`` with M >= 2 tensors [B, D].

    Keyword flags are those of :func:`fastbind.centroid_loss` (``label_smoothing``, ``weights``,
    ``normalize_anchor``, ``detach_anchor``, ``leave_one_out``, ``backend``). The temperature
    (``temperature=`` or ``logit_scale=``, default 0.07) is a buffer, or a parameter with
    ``learnable_temperature=True``.
    """

    def __init__(
        self,
        temperature: float | None = None,
        learnable_temperature: bool = False,
        *,
        logit_scale: float | None = None,
        **centroid_loss_flags: Any,
    ) -> None:
        super().__init__()
        temperature = _initial_temperature("CentroBindLoss", temperature, logit_scale)
        self._init_temperature("CentroBindLoss", temperature, learnable_temperature)
        allowed = {"label_smoothing", "weights", "normalize_anchor", "detach_anchor", "leave_one_out", "backend"}
        unknown = set(centroid_loss_flags) - allowed
        if unknown:
            raise TypeError(f"CentroBindLoss: unknown flags {sorted(unknown)}; expected some of {sorted(allowed)}")
        self.flags = centroid_loss_flags

    def forward(
        self,
        *modalities: torch.Tensor,
        logit_scale: float | torch.Tensor | None = None,
        gather: bool = False,
        process_group: ProcessGroup | None = None,
    ) -> torch.Tensor:
        return centroid_loss(
            *modalities,
            **self._call_temperature("CentroBindLoss", logit_scale),
            gather=gather,
            process_group=process_group,
            **self.flags,
        )

    def extra_repr(self) -> str:
        flags = ", ".join(f"{k}={v!r}" for k, v in self.flags.items())
        return f"temperature={float(self.temperature):.4g}" + (f", {flags}" if flags else "")


class InfoNCELoss(_CallScaleMixin):
    """CLIP's symmetric InfoNCE: ``loss = InfoNCELoss()(x, y)`` with x, y [B, D].

    ``label_smoothing``, ``direction``, ``reduction`` and ``backend`` as in :func:`fastbind.infonce`;
    ``temperature=`` or ``logit_scale=`` (default 0.07); ``forward(x, y, logit_scale=...)`` as
    open_clip's ``ClipLoss``.
    """

    def __init__(
        self,
        temperature: float | None = None,
        learnable_temperature: bool = False,
        label_smoothing: float = 0.0,
        direction: str = "both",
        reduction: str = "mean",
        backend: str | None = None,
        *,
        logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        temperature = _initial_temperature("InfoNCELoss", temperature, logit_scale)
        self._init_temperature("InfoNCELoss", temperature, learnable_temperature)
        self.label_smoothing = label_smoothing
        self.direction = direction
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        logit_scale: float | torch.Tensor | None = None,
        gather: bool = False,
        process_group: ProcessGroup | None = None,
    ) -> torch.Tensor:
        return infonce(
            x,
            y,
            **self._call_temperature("InfoNCELoss", logit_scale),
            label_smoothing=self.label_smoothing,
            direction=self.direction,
            reduction=self.reduction,
            backend=self.backend,
            gather=gather,
            process_group=process_group,
        )

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.4g}, direction={self.direction!r}, reduction={self.reduction!r}"
