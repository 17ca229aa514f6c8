"""Gathers with gradient for multi-process losses (``torch.distributed``; gloo on CPU, NCCL on GPU).

The contract used by every loss with ``gather=True`` (``gram_loss``, ``infonce``, ``anchor_loss``,
``centroid_loss``):

* :func:`gather_with_grad` concatenates every rank's local ``[b_r, ...]`` tensor in rank order into
  ``x_global [B, ...]`` (``B = sum_r b_r``; unequal ``b_r`` are allowed) and returns the row
  ``offset`` of this rank's block. Its backward *sums* the gradient of ``x_global`` over all ranks
  and returns this rank's slice, so that gradients flowing through any rank's copy reach the rank
  that owns the rows.
* Each rank computes its local rows against the global columns (``a2d``) and its local columns
  against the global rows (``d2a``) and returns the **DDP-convention loss** (open_clip's): with
  ``W`` processes, ``W`` times its share of the global loss, where the shares (the sums of its rows'
  and columns' terms divided by the global B for ``reduction="mean"``) sum to the single-process
  loss on the concatenated batch. So for equal per-rank batches a rank returns the mean loss of its
  own rows and columns, and for any batches (unequal ones included) **the mean over ranks equals
  the single-process loss** exactly. Since the backward of the gather sums over ranks, each rank's
  input gradients are ``W`` times the single-process gradients of its rows, and DDP's averaging of
  parameter gradients (the temperature included) gives exactly the single-process gradients: no
  scaling by the world size anywhere. ``reduction="sum"`` follows the same rule (``W`` times the
  local sum); ``"none"`` returns the per-row losses of the local rows, unscaled.

For equal per-rank batches (which open_clip assumes) this is exactly open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``: local images against all texts and local
texts (= this rank's columns) against all images, the mean of the two — same value and gradients on
every rank (tests/test_distributed.py ``open_clip_local_loss``); unequal batches are weighted by the
rank's share so that the mean over ranks stays exact.

Outside an initialised process group (or with a group of one process) everything here is the
identity: ``gather_with_grad(x) == (x, 0)``.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastbind.ops._checks import check_choice
from fastbind.ops._loss import DIRECTIONS, REDUCTIONS, directions, per_row, reduce

__all__ = [
    "all_reduce_sum_",
    "broadcast_",
    "ddp_scale",
    "gather_with_grad",
    "gather_sizes",
    "is_distributed",
    "local_rows_loss",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Number of processes in ``group`` (default group when None); 1 outside a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (default group when None); 0 outside a process group."""
    return dist.get_rank(group) if is_distributed() else 0


def ddp_scale(group=None) -> int:
    """The factor W (= world size) that turns a rank's share of a global loss into the DDP-convention
    loss every ``gather=True`` loss returns (1 outside a process group)."""
    return world_size(group)


def all_reduce_sum_(*tensors: torch.Tensor, group=None) -> None:
    """Sum each tensor over ``group``'s processes in place (nothing to do outside a process group)."""
    if world_size(group) > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def broadcast_(*tensors: torch.Tensor, group=None) -> None:
    """Overwrite each tensor in place with the first process's copy (rank 0 of ``group``; nothing to
    do outside a process group)."""
    if world_size(group) > 1:
        src = 0 if group is None else dist.get_global_rank(group, 0)
        for t in tensors:
            dist.broadcast(t, src=src, group=group)


def _uses_nccl(group) -> bool:
    try:
        return dist.get_backend(group) == "nccl"
    except (RuntimeError, ValueError):
        return False


def gather_sizes(rows: int, device: torch.device, group=None) -> list[int]:
    """Every rank's ``rows``, in rank order (one small all_gather)."""
    n = world_size(group)
    if n == 1:
        return [rows]
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones through a copy).
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(n)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's [b_r, ...] in rank order: pad each block to max(b_r), gather, strip."""
    n = len(sizes)
    biggest = max(sizes)
    if x.shape[0] < biggest:
        pad = x.new_zeros((biggest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    blocks = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(blocks, x.contiguous(), group=group)
    return torch.cat([block[:size] for block, size in zip(blocks, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int], offset: int):
        ctx.group, ctx.sizes, ctx.offset = group, sizes, offset
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor):
        group, sizes, offset = ctx.group, ctx.sizes, ctx.offset
        grad_global = grad_global.contiguous()
        mine = sizes[dist.get_rank(group)]
        if _uses_nccl(group) and len(set(sizes)) == 1:
            # Equal blocks on NCCL: one reduce-scatter moves 1/n of what an all-reduce moves.
            grad_local = grad_global.new_empty((mine, *grad_global.shape[1:]))
            dist.reduce_scatter_tensor(grad_local, grad_global, op=dist.ReduceOp.SUM, group=group)
            return grad_local, None, None, None
        # gloo has no reduce_scatter; unequal blocks would need padding on NCCL too. An all-reduce of
        # the whole [B, ...] gradient followed by this rank's slice is exact in both cases.
        total = grad_global.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total[offset : offset + mine], None, None, None


def gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated in rank order, differentiably.

    x: ``[b_r, ...]`` on this rank (``b_r`` may differ between ranks; trailing dims must agree).
    Returns ``(x_global [sum_r b_r, ...], offset)`` where ``offset = sum_{r' < rank} b_r'`` is the
    first row of this rank's block. The backward sums the gradient of ``x_global`` over all ranks and
    returns rows ``offset : offset + b_r`` (reduce-scatter on NCCL with equal blocks, all-reduce +
    slice otherwise). Without a process group (or with one process): ``(x, 0)``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"gather_with_grad: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("gather_with_grad: x has shape [], expected [b, ...] (rows are gathered)")
    if world_size(group) == 1:
        return x, 0
    sizes = gather_sizes(x.shape[0], x.device, group)
    offset = sum(sizes[: dist.get_rank(group)])
    return _GatherWithGrad.apply(x, group, sizes, offset), offset


def local_rows_loss(
    row_logits: torch.Tensor,
    col_logits: torch.Tensor,
    offset: int,
    label_smoothing: float = 0.0,
    direction: str = "both",
    reduction: str = "mean",
    group=None,
) -> torch.Tensor:
    """This rank's DDP-convention loss of a symmetric cross-entropy whose positives lie on the global diagonal.

    row_logits: ``[b, B]`` this rank's rows against all B global columns (``a2d``; the positive of
    local row i is column ``offset + i``). col_logits: ``[B, b]`` all global rows against this rank's
    columns (``d2a``; the positive of local column j is row ``offset + j``). Label smoothing spreads
    ``eps/B`` over the global batch. ``"mean"`` returns ``W·Σ_local / B`` (W = world size of
    ``group``): the mean over ranks is the single-process loss; ``"sum"`` returns ``W·Σ_local``;
    ``"none"`` gives the ``[b]`` per-row losses of the local rows (for ``"both"``: the mean of the two
    directions of row i). A plain-PyTorch helper for reference paths; the fused ops implement the
    same contract with a diagonal offset.
    """
    b, global_b = row_logits.shape
    if col_logits.shape != (global_b, b):
        raise ValueError(
            f"local_rows_loss: col_logits has shape [{', '.join(map(str, col_logits.shape))}], "
            f"expected [{global_b}, {b}] (the transpose of row_logits' shape [{b}, {global_b}])"
        )
    check_choice("local_rows_loss", "direction", direction, DIRECTIONS)
    check_choice("local_rows_loss", "reduction", reduction, REDUCTIONS)
    target = torch.arange(offset, offset + b, device=row_logits.device)
    rows, cols = directions(direction)
    ce = functools.partial(F.cross_entropy, target=target, label_smoothing=label_smoothing, reduction="none")
    row_loss = ce(row_logits) if rows else None
    col_loss = ce(col_logits.t()) if cols else None
    return reduce(per_row(row_loss, col_loss, direction), reduction, global_b, ddp_scale(group))
