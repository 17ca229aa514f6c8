"""Triton kernels of the GRAM family (DESIGN §2.1-2.2) and their ``fastbind::*_triton`` custom ops.

Operands (prepared by fastbind/ops/gram.py): anchor A [B1, D], basis Q [k-1, B2, D] (orthonormal
basis of each sample's non-anchor modalities), span_vol r [B2], anchor_sq [B1] (float32). A tile
(BLOCK_M rows x BLOCK_N columns) is k-1 GEMMs P_r = A Q_r^T accumulated in float32, then

    dist = sqrt(max(|a_i|^2 - sum_r P_r^2, 0)),  vol = r_j dist,  logit = -vol / tau.

NQ = k-1 is a compile-time parameter: one kernel source for every k.

* ``_gram_volume_fwd_kernel``: one program per tile, writes vol.
* ``_gram_loss_fwd_kernel``: online log-sum-exp; AXIS=1: one program per row block streaming the
  column blocks (row statistics), AXIS=0: per column block streaming the row blocks (column
  statistics). Only O(B) statistics are written.
* ``_gram_volume_bwd_kernel`` / ``_gram_loss_bwd_kernel``: one program per tile, recompute P,
  form T_r = dvol * (-r_j P_r / max(dist, eps)), and accumulate dA += T_r Q_r and
  dQ_r += T_r^T A with atomics, plus the row/column reductions (d|a|^2, dr) and d tau.

Precision: fp32 operands use ``input_precision="ieee"`` (the products feed a distance); bf16/fp16
operands feed the tensor cores with float32 accumulation. Under TRITON_INTERPRET=1 (CPU tensors)
16-bit operands are upcast right after loading (the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastbind.triton._common import AotSpec
from fastbind.triton._saturated import ce_from_stats

OP_NAMES = (
    "fastbind::gram_volume_triton",
    "fastbind::gram_volume_backward_triton",
    "fastbind::gram_loss_forward_triton",
    "fastbind::gram_loss_backward_triton",
)

# Tile (BLOCK_M, BLOCK_N, BLOCK_K) per operand dtype, chosen from the sm_90 resource report (zero
# spills for k = 2..8 with 4 warps):
# * 16-bit operands: M = 64 with 4 warps lets the dot lower to wgmma on sm_90;
# * float32 operands: the "ieee" dot is FMA-based and holds its operands in registers, so the
#   tile is small (64 x 64 x 32 spilled hundreds of bytes).
TILES = {"fp32": (32, 32, 8), "16bit": (64, 32, 16)}
# Software pipelining buys nothing for the FMA-based fp32 dot and cost a few spilled registers.
NUM_STAGES = {"fp32": 1, "16bit": 2}
BLOCK_M, BLOCK_N, BLOCK_K = TILES["16bit"]
NUM_WARPS = 4
# Backward clamp of the distance (relative to |a_i|), as in csrc/cpu/gram.cpp.
DIST_REL_EPS = 1e-4
TINY_DIST = 1e-20


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _sq_projection(
    a_ptr,
    q_ptr,
    rows,
    cols,
    B1,
    B2,
    D,
    stride_a,
    stride_qr,
    stride_qj,
    r,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """P_r = A[rows] Q_r[cols]^T as a float32 [BLOCK_M, BLOCK_N] tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + kk[None, :], mask=(rows[:, None] < B1) & (kk[None, :] < D), other=0.0
        )
        q = tl.load(
            q_ptr + r * stride_qr + cols[:, None] * stride_qj + kk[None, :],
            mask=(cols[:, None] < B2) & (kk[None, :] < D),
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(a, tl.trans(q), acc, input_precision="ieee")
    return acc


@triton.jit
def _distance_tile(
    a_ptr,
    q_ptr,
    asq_ptr,
    rows,
    cols,
    B1,
    B2,
    D,
    stride_a,
    stride_qr,
    stride_qj,
    NQ: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dist_ij = sqrt(max(|a_i|^2 - sum_r P_r,ij^2, 0)) as a float32 tile."""
    ssq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(NQ):
        p = _sq_projection(
            a_ptr, q_ptr, rows, cols, B1, B2, D, stride_a, stride_qr, stride_qj, r, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K
        )
        ssq += p * p
    a_sq = tl.load(asq_ptr + rows, mask=rows < B1, other=0.0)
    return tl.sqrt(tl.maximum(a_sq[:, None] - ssq, 0.0, propagate_nan=tl.PropagateNan.ALL))  # NaN in, NaN out


@triton.jit
def _gram_volume_fwd_kernel(
    out_ptr,
    a_ptr,
    q_ptr,
    r_ptr,
    asq_ptr,
    B1,
    B2,
    D,
    stride_a,
    stride_qr,
    stride_qj,
    NQ: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dist = _distance_tile(
        a_ptr,
        q_ptr,
        asq_ptr,
        rows,
        cols,
        B1,
        B2,
        D,
        stride_a,
        stride_qr,
        stride_qj,
        NQ,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    span_vol = tl.load(r_ptr + cols, mask=cols < B2, other=0.0)
    mask = (rows[:, None] < B1) & (cols[None, :] < B2)
    tl.store(out_ptr + rows[:, None] * B2 + cols[None, :], span_vol[None, :] * dist, mask=mask)


@triton.jit
def _gram_loss_fwd_kernel(
    loss_ptr,
    lse_ptr,
    a_ptr,
    q_ptr,
    r_ptr,
    asq_ptr,
    tau_ptr,
    label_smoothing,
    diag_offset,
    B1,
    B2,
    D,
    stride_a,
    stride_qr,
    stride_qj,
    AXIS: tl.constexpr,
    NQ: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """AXIS=1: CE of each row over the B2 columns; AXIS=0: CE of each column over the B1 rows."""
    neg_inv_tau = -1.0 / tl.load(tau_ptr)
    if AXIS == 1:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mine = rows
        n_other = B2
        m_run = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s_run = tl.zeros((BLOCK_M,), tl.float32)
        sum_run = tl.zeros((BLOCK_M,), tl.float32)
        pos_run = tl.zeros((BLOCK_M,), tl.float32)
        block_other = BLOCK_N
    else:
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mine = cols
        n_other = B1
        m_run = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s_run = tl.zeros((BLOCK_N,), tl.float32)
        sum_run = tl.zeros((BLOCK_N,), tl.float32)
        pos_run = tl.zeros((BLOCK_N,), tl.float32)
        block_other = BLOCK_M
    for start in range(0, n_other, block_other):
        if AXIS == 1:
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            valid_other = cols < B2
        else:
            rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
            valid_other = rows < B1
        dist = _distance_tile(
            a_ptr,
            q_ptr,
            asq_ptr,
            rows,
            cols,
            B1,
            B2,
            D,
            stride_a,
            stride_qr,
            stride_qj,
            NQ,
            UPCAST,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        span_vol = tl.load(r_ptr + cols, mask=cols < B2, other=0.0)
        logit = neg_inv_tau * span_vol[None, :] * dist
        is_pos = cols[None, :] == rows[:, None] + diag_offset
        if AXIS == 1:
            logit = tl.where(valid_other[None, :], logit, float("-inf"))
        else:
            logit = tl.where(valid_other[:, None], logit, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(logit, axis=AXIS))
        # the positive's exp term is kept out of s_run and added back exactly by ce_from_stats
        if AXIS == 1:
            p = tl.where(is_pos, 0.0, tl.exp(logit - m_new[:, None]))
            finite = tl.where(valid_other[None, :], logit, 0.0)
        else:
            p = tl.where(is_pos, 0.0, tl.exp(logit - m_new[None, :]))
            finite = tl.where(valid_other[:, None], logit, 0.0)
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(p, axis=AXIS)
        m_run = m_new
        sum_run += tl.sum(finite, axis=AXIS)
        pos_run += tl.sum(tl.where(is_pos, finite, 0.0), axis=AXIS)
    # every row (column) has its positive (checked by the caller): no cancellation of lse − positive
    loss, lse = ce_from_stats(m_run, s_run, pos_run, sum_run, label_smoothing, n_other)
    n_mine = B1 if AXIS == 1 else B2
    tl.store(lse_ptr + mine, lse, mask=mine < n_mine)
    tl.store(loss_ptr + mine, loss, mask=mine < n_mine)


@triton.jit
def _accumulate_grads(
    dvol,
    dist,
    rows,
    cols,
    da_ptr,
    dq_ptr,
    dr_ptr,
    dasq_ptr,
    a_ptr,
    q_ptr,
    r_ptr,
    asq_ptr,
    B1,
    B2,
    D,
    stride_a,
    stride_qr,
    stride_qj,
    NQ: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Chain dvol [BLOCK_M, BLOCK_N] through vol = r dist into dA, dQ, dr, d|a|^2 (atomics)."""
    row_ok = rows < B1
    col_ok = cols < B2
    mask = row_ok[:, None] & col_ok[None, :]
    dvol = tl.where(mask, dvol, 0.0)
    span_vol = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
    a_sq = tl.load(asq_ptr + rows, mask=row_ok, other=0.0)
    eps = tl.maximum(1e-4 * tl.sqrt(a_sq), 1e-20)  # DIST_REL_EPS, TINY_DIST
    coef = dvol * span_vol[None, :] / tl.maximum(dist, eps[:, None], propagate_nan=tl.PropagateNan.ALL)
    tl.atomic_add(dr_ptr + cols, tl.sum(dvol * dist, axis=0), mask=col_ok)
    tl.atomic_add(dasq_ptr + rows, 0.5 * tl.sum(coef, axis=1), mask=row_ok)
    offs_k = tl.arange(0, BLOCK_K)
    for r in tl.static_range(NQ):
        p = _sq_projection(
            a_ptr, q_ptr, rows, cols, B1, B2, D, stride_a, stride_qr, stride_qj, r, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K
        )
        t = -coef * p  # dL/dP_r
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < D
            a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            q = tl.load(
                q_ptr + r * stride_qr + cols[:, None] * stride_qj + kk[None, :],
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                q = q.to(tl.float32)
                tt = t
            else:
                tt = t.to(a.dtype)
            d_a = tl.dot(tt, q, input_precision="ieee")  # [BLOCK_M, BLOCK_K]
            d_q = tl.dot(tl.trans(tt), a, input_precision="ieee")  # [BLOCK_N, BLOCK_K]
            tl.atomic_add(da_ptr + rows[:, None] * D + kk[None, :], d_a, mask=row_ok[:, None] & k_ok[None, :])
            tl.atomic_add(
                dq_ptr + r * B2 * D + cols[:, None] * D + kk[None, :], d_q, mask=col_ok[:, None] & k_ok[None, :]
            )


@triton.jit
def _gram_volume_bwd_kernel(
    da_ptr,
    dq_ptr,
    dr_ptr,
    dasq_ptr,
    grad_ptr,
    a_ptr,
    q_ptr,
    r_ptr,
    asq_ptr,
    B1,
    B2,
    D,
    stride_a,
    stride_qr,
    stride_qj,
    NQ: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dist = _distance_tile(
        a_ptr,
        q_ptr,
        asq_ptr,
        rows,
        cols,
        B1,
        B2,
        D,
        stride_a,
        stride_qr,
        stride_qj,
        NQ,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    mask = (rows[:, None] < B1) & (cols[None, :] < B2)
    dvol = tl.load(grad_ptr + rows[:, None] * B2 + cols[None, :], mask=mask, other=0.0)
    _accumulate_grads(
        dvol,
        dist,
        rows,
        cols,
        da_ptr,
        dq_ptr,
        dr_ptr,
        dasq_ptr,
        a_ptr,
        q_ptr,
        r_ptr,
        asq_ptr,
        B1,
        B2,
        D,
        stride_a,
        stride_qr,
        stride_qj,
        NQ,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )


@triton.jit
def _gram_loss_bwd_kernel(
    da_ptr,
    dq_ptr,
    dr_ptr,
    dasq_ptr,
    dtau_ptr,
    grow_ptr,
    gcol_ptr,
    rlse_ptr,
    clse_ptr,
    a_ptr,
    q_ptr,
    r_ptr,
    asq_ptr,
    tau_ptr,
    label_smoothing,
    diag_offset,
    B1,
    B2,
    D,
    stride_a,
    stride_qr,
    stride_qj,
    NQ: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dL/dlogit = g_row (softmax_row - (1-eps) delta - eps/B2) + g_col (softmax_col - (1-eps) delta - eps/B1)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B1
    col_ok = cols < B2
    neg_inv_tau = -1.0 / tl.load(tau_ptr)
    dist = _distance_tile(
        a_ptr,
        q_ptr,
        asq_ptr,
        rows,
        cols,
        B1,
        B2,
        D,
        stride_a,
        stride_qr,
        stride_qj,
        NQ,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    span_vol = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
    logit = neg_inv_tau * span_vol[None, :] * dist
    g_row = tl.load(grow_ptr + rows, mask=row_ok, other=0.0)
    g_col = tl.load(gcol_ptr + cols, mask=col_ok, other=0.0)
    row_lse = tl.load(rlse_ptr + rows, mask=row_ok, other=0.0)
    col_lse = tl.load(clse_ptr + cols, mask=col_ok, other=0.0)
    delta = tl.where(cols[None, :] == rows[:, None] + diag_offset, 1.0 - label_smoothing, 0.0)
    g = g_row[:, None] * (tl.exp(logit - row_lse[:, None]) - label_smoothing / B2 - delta)
    g += g_col[None, :] * (tl.exp(logit - col_lse[None, :]) - label_smoothing / B1 - delta)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    tl.atomic_add(dtau_ptr, tl.sum(tl.sum(g * logit, axis=1), axis=0))
    _accumulate_grads(
        g * neg_inv_tau,
        dist,
        rows,
        cols,
        da_ptr,
        dq_ptr,
        dr_ptr,
        dasq_ptr,
        a_ptr,
        q_ptr,
        r_ptr,
        asq_ptr,
        B1,
        B2,
        D,
        stride_a,
        stride_qr,
        stride_qj,
        NQ,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )


# --------------------------------------------------------------------------------------------
# launches and custom ops
# --------------------------------------------------------------------------------------------
def _operands(anchor, basis, span_vol, anchor_sq):
    anchor, basis = anchor.contiguous(), basis.contiguous()
    return anchor, basis, span_vol.float().contiguous(), anchor_sq.float().contiguous()


def _tile(dtype: torch.dtype) -> tuple[int, int, int]:
    return TILES["fp32" if dtype == torch.float32 else "16bit"]


def _common(anchor, basis):
    b1, d = anchor.shape
    nq, b2, _ = basis.shape
    upcast = _interpreting() and anchor.dtype != torch.float32
    bm, bn, bk = _tile(anchor.dtype)
    sizes = dict(B1=b1, B2=b2, D=d, stride_a=anchor.stride(0), stride_qr=basis.stride(0), stride_qj=basis.stride(1))
    stages = NUM_STAGES["fp32" if anchor.dtype == torch.float32 else "16bit"]
    meta = dict(NQ=nq, UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS, num_stages=stages)
    return sizes, meta


def _grid2d(sizes, meta):
    return (triton.cdiv(sizes["B1"], meta["BLOCK_M"]), triton.cdiv(sizes["B2"], meta["BLOCK_N"]))


@torch.library.custom_op("fastbind::gram_volume_triton", mutates_args=())
def gram_volume_triton(
    anchor: torch.Tensor, basis: torch.Tensor, span_vol: torch.Tensor, anchor_sq: torch.Tensor
) -> torch.Tensor:
    anchor, basis, span_vol, anchor_sq = _operands(anchor, basis, span_vol, anchor_sq)
    sizes, meta = _common(anchor, basis)
    out = torch.empty(sizes["B1"], sizes["B2"], device=anchor.device, dtype=torch.float32)
    grid = _grid2d(sizes, meta)
    _gram_volume_fwd_kernel[grid](out, anchor, basis, span_vol, anchor_sq, **sizes, **meta)
    return out


def _zero_grads(anchor, basis):
    b1, d = anchor.shape
    dev = anchor.device
    return (
        torch.zeros(b1, d, device=dev, dtype=torch.float32),
        torch.zeros(basis.shape, device=dev, dtype=torch.float32),
        torch.zeros(basis.shape[1], device=dev, dtype=torch.float32),
        torch.zeros(b1, device=dev, dtype=torch.float32),
    )


@torch.library.custom_op("fastbind::gram_volume_backward_triton", mutates_args=())
def gram_volume_backward_triton(
    grad: torch.Tensor, anchor: torch.Tensor, basis: torch.Tensor, span_vol: torch.Tensor, anchor_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    anchor, basis, span_vol, anchor_sq = _operands(anchor, basis, span_vol, anchor_sq)
    sizes, meta = _common(anchor, basis)
    d_a, d_q, d_r, d_asq = _zero_grads(anchor, basis)
    grid = _grid2d(sizes, meta)
    _gram_volume_bwd_kernel[grid](
        d_a, d_q, d_r, d_asq, grad.float().contiguous(), anchor, basis, span_vol, anchor_sq, **sizes, **meta
    )
    return d_a, d_q, d_r, d_asq


@torch.library.custom_op("fastbind::gram_loss_forward_triton", mutates_args=())
def gram_loss_forward_triton(
    anchor: torch.Tensor,
    basis: torch.Tensor,
    span_vol: torch.Tensor,
    anchor_sq: torch.Tensor,
    temperature: torch.Tensor,
    label_smoothing: float,
    diag_offset: int,
    rows: bool,
    cols: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    anchor, basis, span_vol, anchor_sq = _operands(anchor, basis, span_vol, anchor_sq)
    sizes, meta = _common(anchor, basis)
    b1, b2 = sizes["B1"], sizes["B2"]
    if rows and not (diag_offset >= 0 and b1 + diag_offset <= b2):
        raise ValueError("gram_loss_forward_triton: every row needs its positive column (i + diag_offset < B2)")
    if cols and not (diag_offset <= 0 and b2 - diag_offset <= b1):
        raise ValueError("gram_loss_forward_triton: every column needs its positive row (j - diag_offset < B1)")
    dev = anchor.device
    tau = temperature.to(device=dev, dtype=torch.float32).reshape(1)
    row_loss, row_lse = torch.zeros(b1, device=dev), torch.zeros(b1, device=dev)
    col_loss, col_lse = torch.zeros(b2, device=dev), torch.zeros(b2, device=dev)
    args = (anchor, basis, span_vol, anchor_sq, tau, float(label_smoothing), int(diag_offset))
    if rows:
        _gram_loss_fwd_kernel[(triton.cdiv(b1, meta["BLOCK_M"]),)](row_loss, row_lse, *args, **sizes, AXIS=1, **meta)
    if cols:
        _gram_loss_fwd_kernel[(triton.cdiv(b2, meta["BLOCK_N"]),)](col_loss, col_lse, *args, **sizes, AXIS=0, **meta)
    return row_loss, col_loss, row_lse, col_lse


@torch.library.custom_op("fastbind::gram_loss_backward_triton", mutates_args=())
def gram_loss_backward_triton(
    grad_row: torch.Tensor,
    grad_col: torch.Tensor,
    anchor: torch.Tensor,
    basis: torch.Tensor,
    span_vol: torch.Tensor,
    anchor_sq: torch.Tensor,
    temperature: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    label_smoothing: float,
    diag_offset: int,
    rows: bool,
    cols: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    anchor, basis, span_vol, anchor_sq = _operands(anchor, basis, span_vol, anchor_sq)
    sizes, meta = _common(anchor, basis)
    d_a, d_q, d_r, d_asq = _zero_grads(anchor, basis)
    dev = anchor.device
    d_tau = torch.zeros(1, device=dev, dtype=torch.float32)
    # A disabled direction contributes nothing: zero upstream weights.
    g_row = grad_row.float().contiguous() if rows else torch.zeros(sizes["B1"], device=dev)
    g_col = grad_col.float().contiguous() if cols else torch.zeros(sizes["B2"], device=dev)
    tau = temperature.to(device=dev, dtype=torch.float32).reshape(1)
    grid = _grid2d(sizes, meta)
    _gram_loss_bwd_kernel[grid](
        d_a,
        d_q,
        d_r,
        d_asq,
        d_tau,
        g_row,
        g_col,
        row_lse.float().contiguous(),
        col_lse.float().contiguous(),
        anchor,
        basis,
        span_vol,
        anchor_sq,
        tau,
        float(label_smoothing),
        int(diag_offset),
        **sizes,
        **meta,
    )
    d_tau = (-d_tau / tau).reshape(()).to(temperature.device)
    return d_a, d_q, d_r, d_asq, d_tau


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/test_triton_compile.py, benchmarks/triton_resources.py)
# --------------------------------------------------------------------------------------------
def aot_specs(ks=(3, 8)) -> list[AotSpec]:
    """Every GRAM kernel for k in `ks`, with float32 and bfloat16 operands."""
    specs = []
    sizes = dict(B1="i32", B2="i32", D="i32", stride_a="i32", stride_qr="i32", stride_qj="i32")
    for k in ks:
        for dtype in ("fp32", "bf16"):
            op = f"*{dtype}"
            bm, bn, bk = TILES["fp32" if dtype == "fp32" else "16bit"]
            tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
            const = dict(NQ=k - 1, UPCAST=False, **tile)
            vol_fwd = dict(out_ptr="*fp32", a_ptr=op, q_ptr=op, r_ptr="*fp32", asq_ptr="*fp32", **sizes)
            loss_fwd = dict(
                loss_ptr="*fp32",
                lse_ptr="*fp32",
                a_ptr=op,
                q_ptr=op,
                r_ptr="*fp32",
                asq_ptr="*fp32",
                tau_ptr="*fp32",
                label_smoothing="fp32",
                diag_offset="i32",
                **sizes,
            )
            grads = dict(da_ptr="*fp32", dq_ptr="*fp32", dr_ptr="*fp32", dasq_ptr="*fp32")
            vol_bwd = dict(**grads, grad_ptr="*fp32", a_ptr=op, q_ptr=op, r_ptr="*fp32", asq_ptr="*fp32", **sizes)
            loss_bwd = dict(
                **grads,
                dtau_ptr="*fp32",
                grow_ptr="*fp32",
                gcol_ptr="*fp32",
                rlse_ptr="*fp32",
                clse_ptr="*fp32",
                a_ptr=op,
                q_ptr=op,
                r_ptr="*fp32",
                asq_ptr="*fp32",
                tau_ptr="*fp32",
                label_smoothing="fp32",
                diag_offset="i32",
                **sizes,
            )
            variants = [
                ("gram_volume_fwd", _gram_volume_fwd_kernel, vol_fwd, const),
                ("gram_loss_fwd[rows]", _gram_loss_fwd_kernel, loss_fwd, dict(AXIS=1, **const)),
                ("gram_loss_fwd[cols]", _gram_loss_fwd_kernel, loss_fwd, dict(AXIS=0, **const)),
                ("gram_volume_bwd", _gram_volume_bwd_kernel, vol_bwd, const),
                ("gram_loss_bwd", _gram_loss_bwd_kernel, loss_bwd, const),
            ]
            for name, kernel, sig, consts in variants:
                signature = dict(sig, **{n: "constexpr" for n in consts})
                specs.append(
                    AotSpec(
                        name=f"{name}[k={k},{dtype}]",
                        kernel=kernel,
                        signature=signature,
                        constexprs=dict(consts),
                        dtype=dtype,
                        num_warps=NUM_WARPS,
                        num_stages=NUM_STAGES["fp32" if dtype == "fp32" else "16bit"],
                        expect_wgmma=dtype == "bf16",
                    )
                )
    return specs
