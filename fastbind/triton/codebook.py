"""Triton codebook lookup: GEMM tiles x·Bᵀ + an epilogue keeping a running top-k per row (DESIGN §2.4).

One program owns BLOCK_M rows and streams the codebook in BLOCK_N-code tiles; each tile's scores
``x_i·b_j + bias_j`` (see ``csrc/cpu/codebook.cpp`` for the per-metric b and bias) are merged into a
per-row list of the KP >= k smallest (score, index) pairs kept in registers, so nothing of size N×K
is ever written to memory (FAISS GPU writes N×K tiles to global memory and reads them back). After the
last tile the KP candidates' distances are recomputed directly from x and the fp32 codes and the k
smallest by (distance, index) are returned: ties go to the lowest index (identical codes have
bitwise identical recomputed distances, whatever the GEMM's rounding of their columns), and a
bf16/TF32 GEMM can only reorder near-ties.

Runs on CUDA and, for the tests, on CPU tensors under ``TRITON_INTERPRET=1`` (UPCAST: the interpreter
stores bf16 as uint16, so operands are upcast right after the load there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastbind.triton._common import AotSpec

METRIC_IDS = {"l2": 0, "cosine": 1, "dot": 2}
_NORM_EPS = 1e-12  # as fastbind.reference.codebook: a zero vector is at cosine distance 1 from every code
# Index sentinels, ordered: real code indices < empty-slot indices (2^60 + slot) < taken (2^61) < "none" (2^62).
# In-register code indices are int32 (K < 2^29); sentinels order after every real index:
# empty slots (2^29 + slot) < taken (2^30) < "none" (2^31 - 1).
_EMPTY = tl.constexpr(1 << 29)
_TAKEN = tl.constexpr(1 << 30)
_NONE = tl.constexpr(2147483647)
# Non-finite scores of real codes become the largest float, so that +inf is free to mean "already
# taken / padded column": a real code then always beats a padded one, and k <= K real codes exist.
_FMAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _lex_min(s, i, NONE: tl.constexpr):
    """Row-wise lexicographic minimum of (s, i) pairs [M, C] -> (s_min [M], i_min [M])."""
    s_min = tl.min(s, 1)
    i_min = tl.min(tl.where(s == s_min[:, None], i, NONE), 1)
    return s_min, i_min


@triton.jit
def _merge_tile(best_s, best_i, score, cols, slots, KP: tl.constexpr, NONE: tl.constexpr):
    """The KP lexicographically smallest (score, index) pairs of the list best [M, KP] and the tile
    score [M, BLOCK_N] (indices cols [BLOCK_N]), ascending. Taken entries become +inf."""
    new_s = tl.full(best_s.shape, float("inf"), tl.float32)
    new_i = tl.full(best_i.shape, NONE, tl.int32)
    for r in range(KP):
        ms = tl.min(score, 1)
        js = tl.min(tl.where(score == ms[:, None], cols[None, :], NONE), 1)
        mo, jo = _lex_min(best_s, best_i, NONE)
        take_tile = (ms < mo) | ((ms == mo) & (js < jo))
        put = slots[None, :] == r
        new_s = tl.where(put, tl.where(take_tile, ms, mo)[:, None], new_s)
        new_i = tl.where(put, tl.where(take_tile, js, jo)[:, None], new_i)
        score = tl.where(take_tile[:, None] & (cols[None, :] == js[:, None]), float("inf"), score)
        best_s = tl.where((~take_tile)[:, None] & (best_i == jo[:, None]), float("inf"), best_s)
    return new_s, new_i


@triton.jit
def _codebook_lookup_fwd_kernel(
    dist_ptr,  # [N, K_TOP] fp32
    index_ptr,  # [N, K_TOP] int64
    x_ptr,  # [N, D] fp32/bf16/fp16, unit inner stride
    b_ptr,  # [K, D] GEMM operand (x's dtype), unit inner stride
    bias_ptr,  # [K] fp32
    e_ptr,  # [K, D] fp32 codes, for the exact distances of the winners
    w_ptr,  # [D] fp32 weight (unused without HAS_WEIGHT)
    N,
    K,
    D,
    stride_x,
    stride_b,
    stride_e,
    METRIC: tl.constexpr,  # 0 l2, 1 cosine, 2 dot
    HAS_WEIGHT: tl.constexpr,
    K_TOP: tl.constexpr,
    KP: tl.constexpr,  # candidates kept: candidates(K_TOP) >= K_TOP, a power of two (tl.arange)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,  # upcast GEMM operands to fp32 after the load (interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 (distances), ignored for bf16/fp16 operands
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    slots = tl.arange(0, KP)
    best_s = tl.full((BLOCK_M, KP), float("inf"), tl.float32)
    best_i = tl.full((BLOCK_M, KP), _EMPTY, tl.int32) + slots[None, :]

    for n0 in range(0, K, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = dd < D
            a = tl.load(
                x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
            )
            bt = tl.load(
                b_ptr + cols.to(tl.int64)[None, :] * stride_b + dd[:, None],
                mask=col_mask[None, :] & d_mask[:, None],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
        score = acc + bias[None, :]
        score = tl.where((score == score) & (score < float("inf")), score, _FMAX)  # NaN/inf: worst real
        score = tl.where(col_mask[None, :], score, float("inf"))  # padded columns: never before a real code
        # merge only when some row of the tile beats its current KP-th best
        worst = tl.max(best_s, 1)
        if tl.max((tl.min(score, 1) <= worst).to(tl.int32), 0) > 0:
            best_s, best_i = _merge_tile(best_s, best_i, score, cols, slots, KP, _NONE)

    # Exact distances of the KP candidates (the k winners of the GEMM screen and, when KP > K_TOP, the
    # next ones), recomputed from x and the fp32 codes: identical codes get bitwise identical exact
    # distances, while the screening GEMM may round identical columns differently.
    exact = tl.full((BLOCK_M, KP), float("inf"), tl.float32)
    for r in range(KP):
        j = tl.sum(tl.where(slots[None, :] == r, best_i, 0), 1).to(tl.int64)
        j_mask = row_mask & (j < K)
        acc_xe = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_xx = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_ee = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = dd < D
            xv = tl.load(
                x_ptr + rows[:, None] * stride_x + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
            )
            xv = xv.to(tl.float32)
            ev = tl.load(e_ptr + j[:, None] * stride_e + dd[None, :], mask=j_mask[:, None] & d_mask[None, :], other=0.0)
            if HAS_WEIGHT:
                wv = tl.load(w_ptr + dd, mask=d_mask, other=0.0)[None, :]
            else:
                wv = tl.where(d_mask, 1.0, 0.0)[None, :]
            if METRIC == 0:
                diff = xv - ev
                acc_xe += tl.sum(wv * diff * diff, 1)
            else:
                acc_xe += tl.sum(wv * xv * ev, 1)
                acc_xx += tl.sum(wv * xv * xv, 1)
                acc_ee += tl.sum(wv * ev * ev, 1)
        if METRIC == 0:
            d_r = acc_xe
        elif METRIC == 1:
            d_r = 1.0 - acc_xe / (tl.maximum(tl.sqrt(acc_xx), 1e-12) * tl.maximum(tl.sqrt(acc_ee), 1e-12))
        else:
            d_r = -acc_xe
        exact = tl.where(slots[None, :] == r, d_r[:, None], exact)

    # The K_TOP smallest candidates by (exact distance, index); NaN distances order as the largest.
    out_s = tl.full((BLOCK_M, KP), float("inf"), tl.float32)
    out_i = tl.full((BLOCK_M, KP), _NONE, tl.int32)
    # real codes: empty slots hold sentinels >= 2^29 > K, and once a tile's real codes are all taken
    # the merge fills the remaining slots with +inf scores (padded or already taken columns)
    live = (best_i < K) & (best_s < float("inf"))
    keyed = tl.where((exact == exact) & (exact < float("inf")), exact, _FMAX)
    keyed = tl.where(live, keyed, float("inf"))
    cand_i = tl.where(live, best_i, _TAKEN)
    for r in range(K_TOP):
        m, j = _lex_min(keyed, cand_i, _NONE)
        hit = cand_i == j[:, None]
        d_true = tl.sum(tl.where(hit, exact, 0.0), 1)  # the distance itself (NaN stays NaN)
        put = slots[None, :] == r
        out_s = tl.where(put, d_true[:, None], out_s)
        out_i = tl.where(put, j[:, None], out_i)
        keyed = tl.where(hit, float("inf"), keyed)
        cand_i = tl.where(hit, _TAKEN, cand_i)

    out_mask = row_mask[:, None] & (slots[None, :] < K_TOP)
    offs = rows[:, None] * K_TOP + slots[None, :]
    tl.store(dist_ptr + offs, out_s, mask=out_mask)
    tl.store(index_ptr + offs, out_i.to(tl.int64), mask=out_mask)


def candidates(k: int) -> int:
    """Codes kept per row by the GEMM screen and re-ranked by exact distance: at least 4 (a power of
    two), so that for k < 4 exactly duplicated codes that the screening GEMM rounds apart (tensor
    cores and some BLAS builds round identical columns differently) are all re-ranked and the lowest
    index wins."""
    return max(4, triton.next_power_of_2(k))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(dtype: torch.dtype, k: int) -> dict:
    """Launch configuration (block sizes, num_warps, num_stages); the launch and the ahead-of-time
    compile check (aot_specs) both read it. Chosen from the sm_90/sm_80 ptxas reports under triton
    3.6 and 3.9 (zero spills for k = 1, 8 and 32).

    fp32 ("ieee": no tensor cores) runs the dot on FMA units, whose operand layouts are register
    hungry: 8 warps over a 64×64 tile. bf16/fp16: a 64-row M tile with 4 warps (one warpgroup) is
    what lowers to wgmma on sm_90; 64 codes × 32 dims per step keeps the top-k list, the tile and
    the operand stages within 255 registers. Larger k holds more per-row state, so fp32 shrinks the
    code tile to 32 and the D step to 16 for k > 8 (k = 32 spilled on sm_80 with 32). Two pipeline
    stages (three spilled on sm_80 at k = 1).
    """
    if dtype == torch.float32:
        if k <= 8:
            return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 16, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}


def prepare_codebook(codebook: torch.Tensor, metric: str, weight: torch.Tensor | None, dtype: torch.dtype):
    """(b [K, D] in `dtype`, bias [K] fp32, e [K, D] fp32) of the score x·b + bias (smaller is closer)."""
    e = codebook.float().contiguous()
    ew = e if weight is None else e * weight.float()
    if metric == "l2":
        b, bias = -2.0 * ew, (ew * e).sum(1)
    elif metric == "dot":
        b, bias = -ew, torch.zeros(e.shape[0], device=e.device)
    else:
        norm = (ew * e).sum(1).clamp_min(_NORM_EPS * _NORM_EPS).sqrt()
        b, bias = -ew / norm[:, None], torch.zeros(e.shape[0], device=e.device)
    return b.to(dtype).contiguous(), bias.contiguous(), e


@torch.library.custom_op("fastbind::codebook_lookup_fwd_triton", mutates_args=())
def codebook_lookup_fwd_triton(
    x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] (fp32/bf16/fp16), codebook [K, D] -> (dist [N, k] fp32, index [N, k] int64). Not differentiable."""
    n, d = x.shape
    num_codes = codebook.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    b, bias, e = prepare_codebook(codebook, metric, weight, x.dtype)
    w = weight.float().contiguous() if weight is not None else bias  # placeholder pointer when unused
    dist = torch.empty((n, k), device=x.device, dtype=torch.float32)
    index = torch.empty((n, k), device=x.device, dtype=torch.int64)
    cfg = _config(x.dtype, k)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    _codebook_lookup_fwd_kernel[grid](
        dist,
        index,
        x,
        b,
        bias,
        e,
        w,
        n,
        num_codes,
        d,
        x.stride(0),
        b.stride(0),
        e.stride(0),
        METRIC=METRIC_IDS[metric],
        HAS_WEIGHT=weight is not None,
        K_TOP=k,
        KP=candidates(k),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        UPCAST=_interpreting() or x.device.type == "cpu",
        INPUT_PRECISION="ieee",
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return dist, index


def aot_specs() -> list[AotSpec]:
    """Variants compiled ahead of time for sm_90/sm_80: fp32 and bf16 operands, k = 1, 8 and 32
    (the two fp32 tiles and the largest per-row state), l2."""
    specs = []
    for dtype, tname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for k in (1, 8, 32):
            cfg = _config(dtype, k)
            op = f"*{tname}"
            signature = {
                "dist_ptr": "*fp32",
                "index_ptr": "*i64",
                "x_ptr": op,
                "b_ptr": op,
                "bias_ptr": "*fp32",
                "e_ptr": "*fp32",
                "w_ptr": "*fp32",
                "N": "i32",
                "K": "i32",
                "D": "i32",
                "stride_x": "i64",
                "stride_b": "i64",
                "stride_e": "i64",
            }
            constexprs = {
                "METRIC": 0,
                "HAS_WEIGHT": False,
                "K_TOP": k,
                "KP": candidates(k),
                "BLOCK_M": cfg["BLOCK_M"],
                "BLOCK_N": cfg["BLOCK_N"],
                "BLOCK_D": cfg["BLOCK_D"],
                "UPCAST": False,
                "INPUT_PRECISION": "ieee",
            }
            signature.update({name: "constexpr" for name in constexprs})
            specs.append(
                AotSpec(
                    name=f"codebook_lookup_fwd[k={k},{tname}]",
                    kernel=_codebook_lookup_fwd_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    dtype=tname,
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                    expect_wgmma=tname == "bf16",
                )
            )
    return specs
