"""Directions and reductions of the contrastive losses, written once for every family.

A loss has per-row cross-entropies (``"a2d"``: each query/anchor row ranks the columns) and
per-column ones (``"d2a"``); ``"both"`` is their mean per row (DESIGN §1). ``reduction``: the
``"mean"`` over the (global) batch, the ``"sum"``, or ``"none"`` (per row). With ``gather=True``
the reduced loss is multiplied by the DDP scale W (:func:`fastbind.distributed.ddp_scale`).

The weights of that definition live here only: :func:`per_row` and :func:`reduce` apply them to
loss tensors, and :func:`loss_weight` hands their product to the fused ops that reduce in C++ (the
cpu GRAM loss, ``fastbind::gram_loss_fused_fwd``, which computes weight · Σ(row + col losses) and
knows nothing of directions or reductions).
"""

from __future__ import annotations

import torch

DIRECTIONS = ("both", "a2d", "d2a")
REDUCTIONS = ("mean", "sum", "none")


def directions(direction: str) -> tuple[bool, bool]:
    """(rows needed, columns needed) for `direction`."""
    return direction in ("both", "a2d"), direction in ("both", "d2a")


def _direction_weight(direction: str) -> float:
    """Weight of each direction's loss in the per-row loss: "both" is the mean of the two."""
    return 0.5 if direction == "both" else 1.0


def _reduction_weight(reduction: str, batch: int, scale: int = 1) -> float:
    """Factor on the summed losses: "mean" scale / batch (`batch`: the global batch), "sum" scale."""
    if reduction == "none":
        return 1.0
    return scale / batch if reduction == "mean" else float(scale)


def loss_weight(direction: str, reduction: str, batch: int, scale: int = 1) -> float:
    """w with reduce(per_row(row, col, direction), reduction, batch, scale) = w · Σ (row + col) over
    the enabled directions (summed when reduced, else per row): the weight of the fused ops."""
    return _direction_weight(direction) * _reduction_weight(reduction, batch, scale)


def per_row(row_loss: torch.Tensor | None, col_loss: torch.Tensor | None, direction: str) -> torch.Tensor:
    """The per-row loss of `direction` from the row and column losses (None where not computed)."""
    if direction == "a2d":
        return row_loss
    if direction == "d2a":
        return col_loss
    return (row_loss + col_loss) * _direction_weight(direction)


def reduce(losses: torch.Tensor, reduction: str, batch: int, scale: int = 1) -> torch.Tensor:
    """`losses` (any shape: the per-row losses of one or several pairs) reduced: "none" as is, "sum"
    times `scale`, "mean" summed times scale / batch (`batch`: the global batch size)."""
    if reduction == "none":
        return losses
    return losses.sum() * _reduction_weight(reduction, batch, scale)
