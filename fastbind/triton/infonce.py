"""Triton kernels of the fused multi-pair InfoNCE (DESIGN §2.3) and the ``fastbind::*_triton`` ops.

Layout: q [P, B1, D], k [1 or P, B2, D] (one key matrix shared by all pairs, or one per pair),
logits l = q_p·k_pᵀ/τ, positive of row i at column i + diag_offset.

* ``_infonce_fwd_kernel``: one launch, grid (row blocks of q + row blocks of k, P). A program of the
  first kind streams column tiles of k_p for BLOCK_M rows of q_p with an online log-sum-exp (running
  max, rescaled sum of exp, running logit sum for label smoothing, positive logit) and writes the
  row LSE and row cross-entropy; a program of the second kind does the same for BLOCK_M rows of
  k_p against q_p, i.e. the column statistics. No atomics, deterministic, nothing B1×B2 stored.
* ``_infonce_bwd_kernel``: same grid; recomputes each tile, forms dL/dS from the saved LSE and the
  upstream gradients of the row/column losses, and accumulates dL/dq (first kind) or the per-pair
  dL/dk (second kind) for its own rows, D chunk by D chunk.

16-bit operands stay 16-bit into ``tl.dot`` on a GPU (wgmma on sm_90 with BLOCK_M = 64 and
num_warps = 4, 8 in the backward: see GPU_CONFIGS; in the backward dS is rounded to the operand
dtype for the gradient GEMM, as flash attention does); under ``TRITON_INTERPRET=1`` they are upcast
right after loading, because the interpreter's bf16 arithmetic is wrong, and dS is rounded to the
operand dtype exactly as on the GPU
(``round_to``) but kept float32. Statistics and accumulators are float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastbind.triton._common import AotSpec, round_to
from fastbind.triton._saturated import ce_from_stats

__all__ = ["aot_specs", "infonce_bwd_triton", "infonce_fwd_triton"]

# GPU launch configuration per kernel and operand dtype: the launches and the ahead-of-time compile
# check (aot_specs, tests/test_triton_compile.py) both read this table. Chosen for zero spills on
# sm_90 and sm_80 under triton 3.6 and 3.9. 16-bit operands: 64-row tiles (BLOCK_M = 64 with 4 warps
# is what lowers to wgmma); float32 ("ieee": FMA, no tensor cores): the FMA dot keeps both operand
# chunks in registers, so smaller column tiles and D chunks.
GPU_CONFIGS = {
    ("fwd", "fp32"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=16, num_warps=4, num_stages=2),
    ("fwd", "16bit"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=2),
    ("bwd", "fp32"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=16, num_warps=4, num_stages=2),
    # 8 warps (two warpgroups) for the 16-bit backward: with 4, triton 3.6's ptxas spilled on sm_90
    ("bwd", "16bit"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=2),
}
# Interpreter tiles: the interpreter runs programs one by one, so small tiles keep the tests'
# awkward shapes multi-tile (B = 37 spans 3 tiles) while staying fast.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, num_warps=4, num_stages=2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _load_rows(base, n_rows, d0, D, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_R, BLOCK_D] chunk (columns d0...) of the rows of a row-major [*, D] matrix starting at
    `base` (already offset in int64), zero outside (row >= n_rows, d >= D). In-tile offsets are int32:
    they stay below BLOCK_R·D."""
    rows = tl.arange(0, BLOCK_R)
    ds = d0 + tl.arange(0, BLOCK_D)
    block = tl.load(
        base + rows[:, None] * D + ds[None, :], mask=(rows < n_rows)[:, None] & (ds < D)[None, :], other=0.0
    )
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def _dots(
    a_tile,
    n_a_tile,
    b_tile,
    n_b_tile,
    D,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] float32 tile of raw dot products of the rows at a_tile and at b_tile."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        a = _load_rows(a_tile, n_a_tile, d0, D, UPCAST, BLOCK_M, BLOCK_D)
        b = _load_rows(b_tile, n_b_tile, d0, D, UPCAST, BLOCK_N, BLOCK_D)
        s = tl.dot(a, tl.trans(b), s, input_precision=INPUT_PRECISION)
    return s


@triton.jit
def _infonce_fwd_kernel(
    row_loss_ptr,  # [P, B1] float32 out
    col_loss_ptr,  # [P, B2] float32 out
    row_lse_ptr,  # [P, B1] float32 out
    col_lse_ptr,  # [P, B2] float32 out
    q_ptr,  # [P, B1, D]
    k_ptr,  # [PK, B2, D]
    temp_ptr,  # [] float32
    B1,
    B2,
    D,
    k_pair_stride,  # B2·D, or 0 when one key matrix is shared by all pairs
    n_row_blocks,  # cdiv(B1, BLOCK_M): programs below it do rows, the others columns
    diag_offset,
    label_smoothing,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pair = tl.program_id(1).to(tl.int64)
    q_base = q_ptr + pair * B1 * D
    k_base = k_ptr + pair * k_pair_stride
    if pid < n_row_blocks:  # rows of q_p against the columns k_p
        a_base, b_base, n_a, n_b, offset, block = q_base, k_base, B1, B2, diag_offset, pid
        lse_out, loss_out = row_lse_ptr + pair * B1, row_loss_ptr + pair * B1
    else:  # rows of k_p against q_p: the column statistics; column j's positive is row j - diag_offset
        a_base, b_base, n_a, n_b, offset, block = k_base, q_base, B2, B1, -diag_offset, pid - n_row_blocks
        lse_out, loss_out = col_lse_ptr + pair * B2, col_loss_ptr + pair * B2
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)

    zero64 = pid * 0  # int64 zero: the loop index is int32 on the GPU and a Python int when interpreted
    row0 = block * BLOCK_M  # int64: the first row of this program
    a_tile = a_base + row0 * D
    n_a_tile = n_a - row0
    rows = tl.arange(0, BLOCK_M)  # local row index (int32)
    row_mask = rows < n_a_tile
    # positives: local row i pairs with b row row0 + i + offset = local column i + (pos_shift - start)
    pos_shift = row0 + offset
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, n_b, BLOCK_N):
        cols = tl.arange(0, BLOCK_N)  # local column index (int32)
        col_mask = cols < n_b - start
        b_tile = b_base + (zero64 + start) * D  # int64 offset of the column tile
        logits = _dots(a_tile, n_a_tile, b_tile, n_b - start, D, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        logits = logits * inv_t
        valid = col_mask[None, :]
        masked = tl.where(valid, logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(masked, axis=1))
        is_pos = valid & (cols[None, :] == rows[:, None] + (pos_shift - start).to(tl.int32))
        # the positive's exp term is kept out of run_sum and added back exactly by ce_from_stats
        off_pos = tl.where(is_pos, 0.0, tl.exp(masked - new_max[:, None]))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(off_pos, axis=1)
        run_max = new_max
        logit_sum += tl.sum(tl.where(valid, logits, 0.0), axis=1)
        positive += tl.sum(tl.where(is_pos, logits, 0.0), axis=1)
    has_pos = (rows + pos_shift >= 0) & (rows + pos_shift < n_b)
    # without the cancellation of lse − positive (fastbind/triton/_saturated.py); rows without a
    # positive in range keep lse of everything and the smoothing part
    loss_pos, lse_pos = ce_from_stats(run_max, run_sum, positive, logit_sum, label_smoothing, n_b)
    lse_alone = run_max + tl.log(tl.where(has_pos, 1.0, run_sum))  # (run_sum is 0 for a lone positive)
    lse = tl.where(has_pos, lse_pos, lse_alone)
    loss = tl.where(has_pos, loss_pos, lse_alone - (label_smoothing / n_b) * logit_sum)
    tl.store(lse_out + row0 + rows, lse, mask=row_mask)
    tl.store(loss_out + row0 + rows, loss, mask=row_mask)


@triton.jit
def _infonce_bwd_kernel(
    grad_q_ptr,  # [P, B1, D] float32 out (zero-initialised)
    grad_k_ptr,  # [P, B2, D] float32 out (zero-initialised; per pair, summed by the caller if shared)
    grad_row_ptr,  # [P, B1] upstream gradient of the row losses
    grad_col_ptr,  # [P, B2] upstream gradient of the column losses
    q_ptr,
    k_ptr,
    temp_ptr,
    row_lse_ptr,  # [P, B1]
    col_lse_ptr,  # [P, B2]
    B1,
    B2,
    D,
    k_pair_stride,
    n_row_blocks,
    diag_offset,
    label_smoothing,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pair = tl.program_id(1).to(tl.int64)
    q_base = q_ptr + pair * B1 * D
    k_base = k_ptr + pair * k_pair_stride
    # dL/dl_ij = g_r_i (softmax_row_ij - ε/B2) + g_c_j (softmax_col_ij - ε/B1) - (1-ε)(g_r_i + g_c_j) δ;
    # symmetric under swapping the roles of rows and columns, so one body serves dq and dk
    if pid < n_row_blocks:
        a_base, b_base, n_a, n_b, offset, block = q_base, k_base, B1, B2, diag_offset, pid
        g_a_ptr, lse_a_ptr = grad_row_ptr + pair * B1, row_lse_ptr + pair * B1
        g_b_ptr, lse_b_ptr = grad_col_ptr + pair * B2, col_lse_ptr + pair * B2
        out = grad_q_ptr + pair * B1 * D
    else:
        a_base, b_base, n_a, n_b, offset, block = k_base, q_base, B2, B1, -diag_offset, pid - n_row_blocks
        g_a_ptr, lse_a_ptr = grad_col_ptr + pair * B2, col_lse_ptr + pair * B2
        g_b_ptr, lse_b_ptr = grad_row_ptr + pair * B1, row_lse_ptr + pair * B1
        out = grad_k_ptr + pair * B2 * D
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    smooth_a = label_smoothing / n_b  # the a-side cross-entropy runs over the n_b entries of its row
    smooth_b = label_smoothing / n_a

    zero64 = pid * 0  # int64 zero: the loop index is int32 on the GPU and a Python int when interpreted
    row0 = block * BLOCK_M  # int64: the first row of this program
    a_tile = a_base + row0 * D
    out_tile = out + row0 * D
    n_a_tile = n_a - row0
    rows = tl.arange(0, BLOCK_M)  # local row index (int32)
    row_mask = rows < n_a_tile
    pos_shift = row0 + offset
    g_a = tl.load(g_a_ptr + row0 + rows, mask=row_mask, other=0.0).to(tl.float32)
    lse_a = tl.load(lse_a_ptr + row0 + rows, mask=row_mask, other=0.0)
    for start in range(0, n_b, BLOCK_N):
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_b - start
        b_tile = b_base + (zero64 + start) * D  # int64 offset of the column tile
        g_b = tl.load(g_b_ptr + start + cols, mask=col_mask, other=0.0).to(tl.float32)
        lse_b = tl.load(lse_b_ptr + start + cols, mask=col_mask, other=0.0)
        logits = _dots(a_tile, n_a_tile, b_tile, n_b - start, D, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        logits = logits * inv_t
        grad = g_a[:, None] * (tl.exp(logits - lse_a[:, None]) - smooth_a)
        grad += g_b[None, :] * (tl.exp(logits - lse_b[None, :]) - smooth_b)
        is_pos = cols[None, :] == rows[:, None] + (pos_shift - start).to(tl.int32)
        grad -= tl.where(is_pos, (1.0 - label_smoothing) * (g_a[:, None] + g_b[None, :]), 0.0)
        grad = tl.where(row_mask[:, None] & col_mask[None, :], grad * inv_t, 0.0)  # dL/dS
        # dS in the operand dtype for the gradient GEMM (16-bit tensor cores on the GPU); under the
        # interpreter (operands upcast) rounded the same way but kept in float32
        if UPCAST:
            grad_op = round_to(grad, q_ptr.dtype.element_ty)
        else:
            grad_op = grad.to(q_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            b = _load_rows(b_tile, n_b - start, d0, D, UPCAST, BLOCK_N, BLOCK_D)
            out_ptrs = out_tile + rows[:, None] * D + ds[None, :]
            out_mask = row_mask[:, None] & (ds < D)[None, :]
            acc = tl.load(out_ptrs, mask=out_mask, other=0.0)
            acc = tl.dot(grad_op, b, acc, input_precision=INPUT_PRECISION)
            tl.store(out_ptrs, acc, mask=out_mask)


def _launch_config(kernel: str, q: torch.Tensor) -> dict:
    """Block sizes, num_warps and num_stages of `kernel` ("fwd"/"bwd") from GPU_CONFIGS."""
    if q.device.type == "cpu":
        cfg = INTERPRETER_CONFIG
    else:
        cfg = GPU_CONFIGS[(kernel, "fp32" if q.dtype == torch.float32 else "16bit")]
    upcast = _interpreting() or q.dtype == torch.float32
    return dict(UPCAST=upcast, INPUT_PRECISION="ieee", **cfg)


def _prepare(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor):
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    q, k = q.contiguous(), k.contiguous()
    temp = temperature.detach().to(device=q.device, dtype=torch.float32).reshape(())
    p, b1, d = q.shape
    b2 = k.shape[1]
    k_pair_stride = 0 if k.shape[0] == 1 else b2 * d
    return q, k, temp, p, b1, b2, d, k_pair_stride


@torch.library.custom_op("fastbind::infonce_fwd_triton", mutates_args=())
def infonce_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor, label_smoothing: float, diag_offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``fastbind::infonce_fwd``: (row_loss, col_loss, row_lse, col_lse), float32."""
    q, k, temp, p, b1, b2, d, k_pair_stride = _prepare(q, k, temperature)
    cfg = _launch_config("fwd", q)
    f32 = dict(device=q.device, dtype=torch.float32)
    row_loss, row_lse = torch.empty((p, b1), **f32), torch.empty((p, b1), **f32)
    col_loss, col_lse = torch.empty((p, b2), **f32), torch.empty((p, b2), **f32)
    n_row_blocks = triton.cdiv(b1, cfg["BLOCK_M"])
    grid = (n_row_blocks + triton.cdiv(b2, cfg["BLOCK_M"]), p)
    _infonce_fwd_kernel[grid](
        row_loss,
        col_loss,
        row_lse,
        col_lse,
        q,
        k,
        temp,
        b1,
        b2,
        d,
        k_pair_stride,
        n_row_blocks,
        int(diag_offset),
        float(label_smoothing),
        **cfg,
    )
    return row_loss, col_loss, row_lse, col_lse


@torch.library.custom_op("fastbind::infonce_bwd_triton", mutates_args=())
def infonce_bwd_triton(
    grad_row_loss: torch.Tensor,
    grad_col_loss: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: torch.Tensor,
    row_lse: torch.Tensor,
    col_lse: torch.Tensor,
    label_smoothing: float,
    diag_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``fastbind::infonce_bwd``: float32 (grad_q [P, B1, D], grad_k [PK, B2, D])."""
    shared = k.shape[0] == 1
    q, k, temp, p, b1, b2, d, k_pair_stride = _prepare(q, k, temperature)
    cfg = _launch_config("bwd", q)
    grad_q = torch.zeros((p, b1, d), device=q.device, dtype=torch.float32)
    grad_k = torch.zeros((p, b2, d), device=q.device, dtype=torch.float32)  # per pair
    n_row_blocks = triton.cdiv(b1, cfg["BLOCK_M"])
    grid = (n_row_blocks + triton.cdiv(b2, cfg["BLOCK_M"]), p)
    _infonce_bwd_kernel[grid](
        grad_q,
        grad_k,
        grad_row_loss.float().contiguous(),
        grad_col_loss.float().contiguous(),
        q,
        k,
        temp,
        row_lse.contiguous(),
        col_lse.contiguous(),
        b1,
        b2,
        d,
        k_pair_stride,
        n_row_blocks,
        int(diag_offset),
        float(label_smoothing),
        **cfg,
    )
    return grad_q, grad_k.sum(0, keepdim=True) if shared else grad_k


def aot_specs(dtypes=("fp32", "bf16")) -> list[AotSpec]:
    """fp32 and 16-bit variants of the forward and backward kernels for the ahead-of-time compile test."""
    specs = []
    sizes = dict(
        B1="i32", B2="i32", D="i32", k_pair_stride="i32", n_row_blocks="i32", diag_offset="i32", label_smoothing="fp32"
    )
    for dtype in dtypes:
        op = f"*{dtype}"
        fwd = dict(
            row_loss_ptr="*fp32",
            col_loss_ptr="*fp32",
            row_lse_ptr="*fp32",
            col_lse_ptr="*fp32",
            q_ptr=op,
            k_ptr=op,
            temp_ptr="*fp32",
            **sizes,
        )
        bwd = dict(
            grad_q_ptr="*fp32",
            grad_k_ptr="*fp32",
            grad_row_ptr="*fp32",
            grad_col_ptr="*fp32",
            q_ptr=op,
            k_ptr=op,
            temp_ptr="*fp32",
            row_lse_ptr="*fp32",
            col_lse_ptr="*fp32",
            **sizes,
        )
        for name, kernel, sig in (("fwd", _infonce_fwd_kernel, fwd), ("bwd", _infonce_bwd_kernel, bwd)):
            cfg = dict(GPU_CONFIGS[(name, "fp32" if dtype == "fp32" else "16bit")])
            num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            consts = dict(UPCAST=dtype == "fp32", INPUT_PRECISION="ieee", **cfg)
            specs.append(
                AotSpec(
                    name=f"infonce_{name}[{dtype}]",
                    kernel=kernel,
                    signature=dict(sig, **{n: "constexpr" for n in consts}),
                    constexprs=consts,
                    dtype=dtype,
                    num_warps=num_warps,
                    num_stages=num_stages,
                    expect_wgmma=dtype != "fp32",
                )
            )
    return specs
