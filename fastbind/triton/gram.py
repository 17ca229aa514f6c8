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
* ``_gram_bwd_det_kernel``: the same gradients without atomics, used under
  ``torch.use_deterministic_algorithms(True)``: AXIS=1 programs own row blocks (dA, d|a|^2, d tau
  partials), AXIS=0 programs own column blocks (dQ, dr); every sum runs in a fixed order.

Precision: fp32 operands use ``input_precision="ieee"`` (the products feed a distance); bf16/fp16
operands feed the tensor cores with float32 accumulation, and T_r is rounded to the operand dtype for
the gradient GEMMs. Under TRITON_INTERPRET=1 (CPU tensors) 16-bit operands are upcast right after
loading (the interpreter's bf16 arithmetic is wrong) and T_r is rounded exactly as on the GPU
(``round_to``) but kept float32, so the tests exercise the GPU path's precision.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastbind.triton._common import AotSpec, round_to
from fastbind.triton._saturated import ce_from_stats

# Launch configuration per kernel kind ("fwd": volume and loss forward, "bwd": the atomic backward)
# and operand dtype: the launches and the ahead-of-time compile check (aot_specs,
# tests/test_triton_compile.py) both read this table. Chosen from the sm_90/sm_80 resource report
# under triton 3.6 and 3.9 (zero spills for k = 3 and 8):
# * 16-bit operands: M = 64 with 4 warps lets the dots lower to wgmma on sm_90; the backward holds
#   the dL/dP tile and two gradient tiles, so its column tile is 16 (32 spilled on sm_80 under 3.6);
# * float32 operands: the "ieee" dot is FMA-based and holds its operands in registers, so the tile
#   is small (64 x 64 x 32 spilled hundreds of bytes), 16 rows in the backward (32 spilled a few
#   bytes on sm_80 with 4 warps under 3.6, and with 8 warps under 3.9); BLOCK_K = 16 because
#   triton < 3.8 rejects a non-8-bit tl.dot with K < 16. Software pipelining buys nothing for the
#   FMA dot (1 stage).
CONFIGS = {
    ("fwd", "fp32"): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1),
    ("bwd", "fp32"): dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1),
    ("fwd", "16bit"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2),
    ("bwd", "16bit"): dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2),
}
# The deterministic backward (_gram_bwd_det_kernel) per (LOSS, AXIS: 1 = row blocks, 0 = column
# blocks, operand dtype) holds a gradient accumulator tile besides the logit tile; chosen the same
# way (ptxas spilled a few bytes for some other tiles of the fp32 variants under one version or
# the other).
_DET_FP32_COLS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
_DET_16BIT_ROWS = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
_DET_16BIT_COLS = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=8, num_stages=2)
DET_CONFIGS = {
    (False, 1, "fp32"): dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1),
    (True, 1, "fp32"): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1),
    (False, 0, "fp32"): _DET_FP32_COLS,
    (True, 0, "fp32"): _DET_FP32_COLS,
    (False, 1, "16bit"): _DET_16BIT_ROWS,
    (True, 1, "16bit"): _DET_16BIT_ROWS,
    (False, 0, "16bit"): _DET_16BIT_COLS,
    (True, 0, "16bit"): _DET_16BIT_COLS,
}
# Backward clamp of the distance (relative to |a_i|), as in csrc/cpu/gram.cpp.
DIST_REL_EPS = 1e-4
TINY_DIST = 1e-20


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _load_operands(a_ptr, q_ptr, rows, cols, kk, B1, B2, D, stride_a, stride_qr, stride_qj, r, UPCAST: tl.constexpr):
    """A[rows, kk] and Q_r[cols, kk] (zero outside), upcast to float32 under the interpreter. Row
    offsets are int64 (rows, cols are int64; the basis offset is cast): r * stride_qr and
    rows * stride pass 2^31 for large batches."""
    k_ok = kk < D
    a = tl.load(a_ptr + rows[:, None] * stride_a + kk[None, :], mask=(rows[:, None] < B1) & k_ok[None, :], other=0.0)
    q = tl.load(
        q_ptr + tl.cast(stride_qr, tl.int64) * r + cols[:, None] * stride_qj + kk[None, :],
        mask=(cols[:, None] < B2) & k_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        a = a.to(tl.float32)
        q = q.to(tl.float32)
    return a, q


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
        a, q = _load_operands(
            a_ptr, q_ptr, rows, cols, k0 + offs_k, B1, B2, D, stride_a, stride_qr, stride_qj, r, UPCAST
        )
        acc = tl.dot(a, tl.trans(q), acc, input_precision="ieee")
    return acc


@triton.jit
def _to_operand(t, a_ptr, UPCAST: tl.constexpr):
    """dL/dP_r as the GEMM operand of the gradient GEMMs: the operand dtype on the GPU (16-bit
    tensor cores), rounded the same way but kept float32 under the interpreter."""
    if UPCAST:
        return round_to(t, a_ptr.dtype.element_ty)
    else:
        return t.to(a_ptr.dtype.element_ty)


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
    dvol, coef = _chain_coef(dvol, dist, rows, cols, r_ptr, asq_ptr, B1, B2)
    tl.atomic_add(dr_ptr + cols, tl.sum(dvol * dist, axis=0), mask=col_ok)
    tl.atomic_add(dasq_ptr + rows, 0.5 * tl.sum(coef, axis=1), mask=row_ok)
    offs_k = tl.arange(0, BLOCK_K)
    for r in tl.static_range(NQ):
        p = _sq_projection(
            a_ptr, q_ptr, rows, cols, B1, B2, D, stride_a, stride_qr, stride_qj, r, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K
        )
        t = _to_operand(-coef * p, a_ptr, UPCAST)  # dL/dP_r
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < D
            a, q = _load_operands(a_ptr, q_ptr, rows, cols, kk, B1, B2, D, stride_a, stride_qr, stride_qj, r, UPCAST)
            d_a = tl.dot(t, q, input_precision="ieee")  # [BLOCK_M, BLOCK_K]
            d_q = tl.dot(tl.trans(t), a, input_precision="ieee")  # [BLOCK_N, BLOCK_K]
            tl.atomic_add(da_ptr + rows[:, None] * D + kk[None, :], d_a, mask=row_ok[:, None] & k_ok[None, :])
            dq_r = dq_ptr + tl.cast(B2, tl.int64) * D * r  # int64: (k-2)·B2·D passes 2^31 for large batches
            tl.atomic_add(dq_r + cols[:, None] * D + kk[None, :], d_q, mask=col_ok[:, None] & k_ok[None, :])


@triton.jit
def _chain_coef(dvol, dist, rows, cols, r_ptr, asq_ptr, B1, B2):
    """(dvol zeroed outside the matrix, coef = dvol r_j / max(dist, eps)): dL/dP_r = -coef P_r."""
    row_ok = rows < B1
    col_ok = cols < B2
    dvol = tl.where(row_ok[:, None] & col_ok[None, :], dvol, 0.0)
    span_vol = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
    a_sq = tl.load(asq_ptr + rows, mask=row_ok, other=0.0)
    eps = tl.maximum(1e-4 * tl.sqrt(a_sq), 1e-20)  # DIST_REL_EPS, TINY_DIST
    # propagate NaN: a NaN distance must not become eps (NaN in gives NaN out)
    return dvol, dvol * span_vol[None, :] / tl.maximum(dist, eps[:, None], propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _loss_dlogit(
    dist, rows, cols, grow_ptr, gcol_ptr, rlse_ptr, clse_ptr, r_ptr, neg_inv_tau, label_smoothing, diag_offset, B1, B2
):
    """(dL/dlogit, logit) of the tile: g_row (softmax_row - (1-eps) delta - eps/B2) +
    g_col (softmax_col - (1-eps) delta - eps/B1), zero outside the matrix."""
    row_ok = rows < B1
    col_ok = cols < B2
    span_vol = tl.load(r_ptr + cols, mask=col_ok, other=0.0)
    logit = neg_inv_tau * span_vol[None, :] * dist
    g_row = tl.load(grow_ptr + rows, mask=row_ok, other=0.0)
    g_col = tl.load(gcol_ptr + cols, mask=col_ok, other=0.0)
    row_lse = tl.load(rlse_ptr + rows, mask=row_ok, other=0.0)
    col_lse = tl.load(clse_ptr + cols, mask=col_ok, other=0.0)
    delta = tl.where(cols[None, :] == rows[:, None] + diag_offset, 1.0 - label_smoothing, 0.0)
    g = g_row[:, None] * (tl.exp(logit - row_lse[:, None]) - label_smoothing / B2 - delta)
    g += g_col[None, :] * (tl.exp(logit - col_lse[None, :]) - label_smoothing / B1 - delta)
    return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0), logit


@triton.jit
def _gram_bwd_det_kernel(
    d_own_ptr,  # AXIS=1: dA [B1, D]; AXIS=0: dQ [NQ, B2, D] (float32, zero-initialised)
    d_stat_ptr,  # AXIS=1: d|a|^2 [B1]; AXIS=0: dr [B2]
    dtau_part_ptr,  # [programs] float32: this program's part of sum(g * logit) (LOSS and AXIS=1)
    grad_ptr,  # [B1, B2] dvol (volume backward)
    grow_ptr,  # [B1], [B2], [B1], [B2]: upstream gradients and LSEs (loss backward)
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
    AXIS: tl.constexpr,
    LOSS: tl.constexpr,
    NQ: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Deterministic backward (torch.use_deterministic_algorithms): no atomics. AXIS=1: one program
    per row block streams the column blocks in order and owns dA and d|a|^2 of its rows; AXIS=0: one
    program per column block streams the row blocks and owns dQ and dr of its columns. Each sum is
    accumulated in a fixed order, so results are bitwise repeatable; the P tiles are recomputed by
    both launches."""
    pid = tl.program_id(0).to(tl.int64)
    if AXIS == 1:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        n_other = B2
        block_other = BLOCK_N
        stat = tl.zeros((BLOCK_M,), tl.float32)
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_other = B1
        block_other = BLOCK_M
        stat = tl.zeros((BLOCK_N,), tl.float32)
    dtau = tl.zeros((BLOCK_M,), tl.float32)
    if LOSS:
        neg_inv_tau = -1.0 / tl.load(tau_ptr)
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, n_other, block_other):
        if AXIS == 1:
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        else:
            rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
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
        if LOSS:
            g, logit = _loss_dlogit(
                dist,
                rows,
                cols,
                grow_ptr,
                gcol_ptr,
                rlse_ptr,
                clse_ptr,
                r_ptr,
                neg_inv_tau,
                label_smoothing,
                diag_offset,
                B1,
                B2,
            )
            dtau += tl.sum(g * logit, axis=1)
            dvol = g * neg_inv_tau
        else:
            mask = (rows[:, None] < B1) & (cols[None, :] < B2)
            dvol = tl.load(grad_ptr + rows[:, None] * B2 + cols[None, :], mask=mask, other=0.0)
        dvol, coef = _chain_coef(dvol, dist, rows, cols, r_ptr, asq_ptr, B1, B2)
        if AXIS == 1:
            stat += 0.5 * tl.sum(coef, axis=1)
        else:
            stat += tl.sum(dvol * dist, axis=0)
        for r in tl.static_range(NQ):
            p = _sq_projection(
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
                UPCAST,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
            )
            t = _to_operand(-coef * p, a_ptr, UPCAST)  # dL/dP_r
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < D
                a, q = _load_operands(
                    a_ptr, q_ptr, rows, cols, kk, B1, B2, D, stride_a, stride_qr, stride_qj, r, UPCAST
                )
                # read-modify-write of rows only this program owns
                if AXIS == 1:
                    ptrs = d_own_ptr + rows[:, None] * D + kk[None, :]
                    own = (rows < B1)[:, None] & k_ok[None, :]
                    acc = tl.load(ptrs, mask=own, other=0.0)
                    acc = tl.dot(t, q, acc, input_precision="ieee")
                else:
                    ptrs = d_own_ptr + tl.cast(B2, tl.int64) * D * r + cols[:, None] * D + kk[None, :]
                    own = (cols < B2)[:, None] & k_ok[None, :]
                    acc = tl.load(ptrs, mask=own, other=0.0)
                    acc = tl.dot(tl.trans(t), a, acc, input_precision="ieee")
                tl.store(ptrs, acc, mask=own)
    if AXIS == 1:
        tl.store(d_stat_ptr + rows, stat, mask=rows < B1)
        if LOSS:
            tl.store(dtau_part_ptr + pid, tl.sum(dtau, axis=0))
    else:
        tl.store(d_stat_ptr + cols, stat, mask=cols < B2)


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
    """dL/dlogit (see _loss_dlogit) chained into the gradients with atomics."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
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
    g, logit = _loss_dlogit(
        dist,
        rows,
        cols,
        grow_ptr,
        gcol_ptr,
        rlse_ptr,
        clse_ptr,
        r_ptr,
        neg_inv_tau,
        label_smoothing,
        diag_offset,
        B1,
        B2,
    )
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


def _config_key(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _common(anchor, basis, kind):
    b1, d = anchor.shape
    nq, b2, _ = basis.shape
    upcast = _interpreting() and anchor.dtype != torch.float32
    sizes = dict(B1=b1, B2=b2, D=d, stride_a=anchor.stride(0), stride_qr=basis.stride(0), stride_qj=basis.stride(1))
    meta = dict(NQ=nq, UPCAST=upcast, **CONFIGS[(kind, _config_key(anchor.dtype))])
    if torch.are_deterministic_algorithms_enabled():
        key = _config_key(anchor.dtype)
        det_meta = {
            (loss, axis): dict(NQ=nq, UPCAST=upcast, **DET_CONFIGS[(loss, axis, key)])
            for loss in (False, True)
            for axis in (0, 1)
        }
    else:
        det_meta = None
    return sizes, meta, det_meta


def _grid2d(sizes, meta):
    return (triton.cdiv(sizes["B1"], meta["BLOCK_M"]), triton.cdiv(sizes["B2"], meta["BLOCK_N"]))


def _deterministic_backward(upstream, operands, sizes, det_meta, loss):
    """(dA, dQ, dR, d|a|^2, sum(g * logit)) without atomics: the row-block launch owns dA and
    d|a|^2, the column-block launch dQ and dr, and d tau is the sum of per-program partials in a
    fixed order."""
    anchor, basis = operands[0], operands[1]
    d_a, d_q, d_r, d_asq = _zero_grads(anchor, basis)
    n_row_blocks = triton.cdiv(sizes["B1"], det_meta[(loss, 1)]["BLOCK_M"])
    dtau_part = torch.zeros(n_row_blocks, device=anchor.device, dtype=torch.float32)
    n_col_blocks = triton.cdiv(sizes["B2"], det_meta[(loss, 0)]["BLOCK_N"])
    for axis, own, stat, n_blocks in ((1, d_a, d_asq, n_row_blocks), (0, d_q, d_r, n_col_blocks)):
        meta = det_meta[(loss, axis)]
        _gram_bwd_det_kernel[(n_blocks,)](
            own, stat, dtau_part, *upstream, *operands, **sizes, AXIS=axis, LOSS=loss, **meta
        )
    return d_a, d_q, d_r, d_asq, dtau_part.sum()


@torch.library.custom_op("fastbind::gram_volume_fwd_triton", mutates_args=())
def gram_volume_fwd_triton(
    anchor: torch.Tensor, basis: torch.Tensor, span_vol: torch.Tensor, anchor_sq: torch.Tensor
) -> torch.Tensor:
    anchor, basis, span_vol, anchor_sq = _operands(anchor, basis, span_vol, anchor_sq)
    sizes, meta, det_meta = _common(anchor, basis, "fwd")
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


@torch.library.custom_op("fastbind::gram_volume_bwd_triton", mutates_args=())
def gram_volume_bwd_triton(
    grad: torch.Tensor, anchor: torch.Tensor, basis: torch.Tensor, span_vol: torch.Tensor, anchor_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    anchor, basis, span_vol, anchor_sq = _operands(anchor, basis, span_vol, anchor_sq)
    sizes, meta, det_meta = _common(anchor, basis, "bwd")
    grad = grad.float().contiguous()
    if det_meta is not None:
        unused = span_vol  # placeholder pointers of the loss-only arguments
        upstream = (grad, unused, unused, unused, unused)
        operands = (anchor, basis, span_vol, anchor_sq, unused, 0.0, 0)
        return _deterministic_backward(upstream, operands, sizes, det_meta, loss=False)[:4]
    d_a, d_q, d_r, d_asq = _zero_grads(anchor, basis)
    grid = _grid2d(sizes, meta)
    _gram_volume_bwd_kernel[grid](d_a, d_q, d_r, d_asq, grad, anchor, basis, span_vol, anchor_sq, **sizes, **meta)
    return d_a, d_q, d_r, d_asq


@torch.library.custom_op("fastbind::gram_loss_fwd_triton", mutates_args=())
def gram_loss_fwd_triton(
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
    sizes, meta, det_meta = _common(anchor, basis, "fwd")
    b1, b2 = sizes["B1"], sizes["B2"]
    if rows and not (diag_offset >= 0 and b1 + diag_offset <= b2):
        raise ValueError("gram_loss_fwd_triton: every row needs its positive column (i + diag_offset < B2)")
    if cols and not (diag_offset <= 0 and b2 - diag_offset <= b1):
        raise ValueError("gram_loss_fwd_triton: every column needs its positive row (j - diag_offset < B1)")
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


@torch.library.custom_op("fastbind::gram_loss_bwd_triton", mutates_args=())
def gram_loss_bwd_triton(
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
    sizes, meta, det_meta = _common(anchor, basis, "bwd")
    dev = anchor.device
    # A disabled direction contributes nothing: zero upstream weights.
    g_row = grad_row.float().contiguous() if rows else torch.zeros(sizes["B1"], device=dev)
    g_col = grad_col.float().contiguous() if cols else torch.zeros(sizes["B2"], device=dev)
    tau = temperature.to(device=dev, dtype=torch.float32).reshape(1)
    row_lse, col_lse = row_lse.float().contiguous(), col_lse.float().contiguous()
    operands = (anchor, basis, span_vol, anchor_sq, tau, float(label_smoothing), int(diag_offset))
    if det_meta is not None:
        upstream = (g_row, g_row, g_col, row_lse, col_lse)  # no dvol matrix: g_row is a placeholder
        d_a, d_q, d_r, d_asq, d_tau = _deterministic_backward(upstream, operands, sizes, det_meta, loss=True)
    else:
        d_a, d_q, d_r, d_asq = _zero_grads(anchor, basis)
        d_tau = torch.zeros(1, device=dev, dtype=torch.float32)
        grid = _grid2d(sizes, meta)
        _gram_loss_bwd_kernel[grid](
            d_a, d_q, d_r, d_asq, d_tau, g_row, g_col, row_lse, col_lse, *operands, **sizes, **meta
        )
    d_tau = (-d_tau / tau).reshape(()).to(temperature.device)
    return d_a, d_q, d_r, d_asq, d_tau


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (tests/test_triton_compile.py, benchmarks/triton_resources.py)
# --------------------------------------------------------------------------------------------
def aot_specs(ks=(3, 8), dtypes=("fp32", "bf16")) -> list[AotSpec]:
    """Every GRAM kernel (the atomic and the deterministic backward) for k in `ks`, with the launch
    configuration of CONFIGS for each operand dtype."""
    specs = []
    sizes = dict(B1="i32", B2="i32", D="i32", stride_a="i32", stride_qr="i32", stride_qj="i32")
    for k in ks:
        for dtype in dtypes:
            op = f"*{dtype}"
            key = "fp32" if dtype == "fp32" else "16bit"
            const, warps = {}, {}
            for kind in ("fwd", "bwd"):
                cfg = dict(CONFIGS[(kind, key)])
                warps[kind] = cfg.pop("num_warps"), cfg.pop("num_stages")
                const[kind] = dict(NQ=k - 1, UPCAST=False, **cfg)
            operands = dict(a_ptr=op, q_ptr=op, r_ptr="*fp32", asq_ptr="*fp32")
            loss_args = dict(tau_ptr="*fp32", label_smoothing="fp32", diag_offset="i32")
            vol_fwd = dict(out_ptr="*fp32", **operands, **sizes)
            loss_fwd = dict(loss_ptr="*fp32", lse_ptr="*fp32", **operands, **loss_args, **sizes)
            grads = dict(da_ptr="*fp32", dq_ptr="*fp32", dr_ptr="*fp32", dasq_ptr="*fp32")
            vol_bwd = dict(**grads, grad_ptr="*fp32", **operands, **sizes)
            stats = dict(grow_ptr="*fp32", gcol_ptr="*fp32", rlse_ptr="*fp32", clse_ptr="*fp32")
            loss_bwd = dict(**grads, dtau_ptr="*fp32", **stats, **operands, **loss_args, **sizes)
            det = dict(d_own_ptr="*fp32", d_stat_ptr="*fp32", dtau_part_ptr="*fp32", grad_ptr="*fp32", **stats)
            det.update(**operands, **loss_args, **sizes)
            variants = [
                ("gram_volume_fwd", _gram_volume_fwd_kernel, vol_fwd, const["fwd"], warps["fwd"]),
                ("gram_loss_fwd[rows]", _gram_loss_fwd_kernel, loss_fwd, dict(AXIS=1, **const["fwd"]), warps["fwd"]),
                ("gram_loss_fwd[cols]", _gram_loss_fwd_kernel, loss_fwd, dict(AXIS=0, **const["fwd"]), warps["fwd"]),
                ("gram_volume_bwd", _gram_volume_bwd_kernel, vol_bwd, const["bwd"], warps["bwd"]),
                ("gram_loss_bwd", _gram_loss_bwd_kernel, loss_bwd, const["bwd"], warps["bwd"]),
            ]
            for loss in (False, True):
                for axis, side in ((1, "rows"), (0, "cols")):
                    det_cfg = dict(DET_CONFIGS[(loss, axis, key)])
                    det_warps = det_cfg.pop("num_warps"), det_cfg.pop("num_stages")
                    name = f"gram_{'loss' if loss else 'volume'}_bwd_det[{side}]"
                    consts = dict(NQ=k - 1, UPCAST=False, AXIS=axis, LOSS=loss, **det_cfg)
                    variants.append((name, _gram_bwd_det_kernel, det, consts, det_warps))
            for name, kernel, sig, consts, (num_warps, num_stages) in variants:
                signature = dict(sig, **{n: "constexpr" for n in consts})
                specs.append(
                    AotSpec(
                        name=f"{name}[k={k},{dtype}]",
                        kernel=kernel,
                        signature=signature,
                        constexprs=dict(consts),
                        dtype=dtype,
                        num_warps=num_warps,
                        num_stages=num_stages,
                        expect_wgmma=dtype != "fp32",
                    )
                )
    return specs
