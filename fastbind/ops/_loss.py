"""Directions and reductions of the contrastive losses, written once for every family.

A loss has per-row cross-entropies (``"a2d"``: each query/anchor row ranks the columns) and
per-column ones (``"d2a"``); ``"both"`` is their mean per row (DESIGN §1). ``reduction``: the
``"mean"`` over the (global) batch, the ``"sum"``, or ``"none"`` (per row). With ``gather=True``
the reduced loss is multiplied by the DDP scale W (:func:`fastbind.distributed.ddp_scale`).
"""

from __future__ import annotations

import torch

DIRECTIONS = ("both", "a2d", "d2a")
REDUCTIONS = ("mean", "sum", "none")


def directions(direction: str) -> tuple[bool, bool]:
    """(rows needed, columns needed) for `direction`."""
    return direction in ("both", "a2d"), direction in ("both", "d2a")


def per_row(row_loss: torch.Tensor | None, col_loss: torch.Tensor | None, direction: str) -> torch.Tensor:
    """The per-row loss of `direction` from the row and column losses (None where not computed)."""
    if direction == "a2d":
        return row_loss
    if direction == "d2a":
        return col_loss
    return (row_loss + col_loss) / 2


def reduce(losses: torch.Tensor, reduction: str, batch: int, scale: int = 1) -> torch.Tensor:
    """`losses` (any shape: the per-row losses of one or several pairs) reduced: "none" as is, "sum"
    times `scale`, "mean" summed times scale / batch (`batch`: the global batch size)."""
    if reduction == "none":
        return losses
    return losses.sum() * scale if reduction == "sum" else losses.sum() * (scale / batch)
