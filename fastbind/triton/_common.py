"""Helpers shared by the Triton kernels of every family (DESIGN §3): when the interpreter runs,
the one masked tile loader, the one online log-sum-exp update, the 16-bit rounding of the
interpreter path, the launch of a config table entry (one tile, or an autotune space on a GPU),
and `AotSpec`.

`AotSpec` describes one kernel variant to compile ahead of time for a GPU target without a GPU
(`benchmarks/triton_resources.py` and `tests/test_triton_compile.py` compile every spec returned
by the `aot_specs()` function of each `fastbind/triton/<family>.py` module for sm_90 and sm_80,
and check spills, shared memory and, for 16-bit operands on sm_90, wgmma).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import triton
import triton.language as tl


def _interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1: CPU tensors, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class AotSpec:
    name: str  # e.g. "gram_loss_fwd[rows,bf16]"
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    dtype: str = "fp32"  # operand dtype of the variant: "fp32", "bf16" or "fp16"
    num_warps: int = 4
    num_stages: int = 2
    expect_wgmma: bool = field(default=False)  # True for the 16-bit GEMM variants (checked on sm_90)


def aot_spec(name, kernel, signature, constexprs, cfg, dtype) -> AotSpec:
    """The AotSpec of `kernel` launched with the config-table entry `cfg` (block sizes, num_warps,
    num_stages) and the other constexprs `constexprs`; `signature` lists the runtime arguments."""
    consts = dict(constexprs, **{n: v for n, v in cfg.items() if n not in ("num_warps", "num_stages")})
    return AotSpec(
        name=name,
        kernel=kernel,
        signature=dict(signature, **{n: "constexpr" for n in consts}),
        constexprs=consts,
        dtype=dtype,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        expect_wgmma=dtype != "fp32",
    )


DTYPES = ("fp32", "bf16", "fp16")  # every operand dtype a launch accepts


# --------------------------------------------------------------------------------------------
# launch of one config-table entry: a fixed tile, or an autotune space on a GPU
# --------------------------------------------------------------------------------------------
def space(entry) -> list[dict]:
    """The configs of a config-table entry: a dict (one tile) or a list (an autotune space)."""
    return [entry] if isinstance(entry, dict) else list(entry)


def _autotuning(x) -> bool:
    """Autotune only compiled launches on a GPU: under the interpreter (and for CPU tensors) the
    first config of a space runs, with no benchmarking."""
    return x.device.type != "cpu" and not _interpreting()


_TUNERS: dict = {}


def _tuner(kernel, configs, key):
    ident = (kernel, tuple(tuple(sorted(c.items())) for c in configs), tuple(key))
    if ident not in _TUNERS:
        tconfigs = [
            triton.Config(
                {n: v for n, v in c.items() if n not in ("num_warps", "num_stages")},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in configs
        ]
        _TUNERS[ident] = triton.autotune(configs=tconfigs, key=list(key))(kernel)
    return _TUNERS[ident]


def launch(kernel, entry, grid, args, consts, x, key=()):
    """Launch `kernel` with the config-table entry `entry` and return the config that ran (None
    when the autotuner chose). `grid(meta)` maps the block sizes to the grid; `args` are the
    positional runtime arguments and `consts` the other constexprs. An autotune space (a list) is
    tuned over `key` on a GPU; every config of it is in the table the AOT check compiles."""
    configs = space(entry)
    if len(configs) > 1 and _autotuning(x):
        _tuner(kernel, configs, key)[grid](*args, **consts)
        return None
    cfg = configs[0]
    kernel[grid(cfg)](*args, **consts, **cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# @triton.jit helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def load_tile(base, rows, n_rows, stride, d0, D, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """[len(rows), BLOCK_D] chunk (columns d0 .. d0 + BLOCK_D) of the rows `rows` of a matrix at
    `base` with row stride `stride` and unit column stride, zero outside (row >= n_rows, column
    >= D); upcast to float32 when UPCAST (16-bit operands under the interpreter, whose 16-bit
    arithmetic is wrong). The row offset is rows * stride in the width of `rows`: callers pass
    int64 global row indices wherever that product can pass 2^31, or int32 in-tile rows against a
    base pointer already offset in int64."""
    ds = d0 + tl.arange(0, BLOCK_D)
    block = tl.load(
        base + rows[:, None] * stride + ds[None, :], mask=(rows < n_rows)[:, None] & (ds < D)[None, :], other=0.0
    )
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def online_lse_update(run_max, off_sum, logit_sum, positive, logits, valid, is_pos, AXIS: tl.constexpr):
    """One tile of the online log-sum-exp along AXIS of `logits` (float32 [M, N]; entries outside
    `valid` ignored): the running max, the rescaled sum of exp(l - max) without the positive's own
    term (added back exactly by _saturated.ce_from_stats), the sum of the logits (label smoothing)
    and the positive logit (`is_pos`)."""
    masked = tl.where(valid, logits, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(masked, axis=AXIS))
    off = tl.where(is_pos, 0.0, tl.exp(masked - tl.expand_dims(new_max, AXIS)))
    off_sum = off_sum * tl.exp(run_max - new_max) + tl.sum(off, axis=AXIS)
    logit_sum += tl.sum(tl.where(valid, logits, 0.0), axis=AXIS)
    positive += tl.sum(tl.where(is_pos & valid, logits, 0.0), axis=AXIS)
    return new_max, off_sum, logit_sum, positive


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (round to nearest even, as the GPU's cvt.rn) and back to float32.

    Under TRITON_INTERPRET=1 the 16-bit operands are upcast after loading, and a value the GPU path
    casts to the operand dtype before a tensor-core GEMM (dS in the backward) must be rounded the same
    way for the tests to exercise that precision. The interpreter truncates float32 -> bfloat16, so
    bfloat16 rounds here with integer arithmetic on the bits (NaN kept as is); float16 casts are exact
    round-to-nearest-even there already."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        lsb = (bits >> 16) & 1
        rounded = ((bits + 0x7FFF + lsb) & -65536).to(tl.float32, bitcast=True)  # -65536 = 0xFFFF0000
        return tl.where(x == x, rounded, x)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def gemm_operand(t, dtype_ptr, UPCAST: tl.constexpr):
    """A float32 tile as the operand of a gradient GEMM: the operand dtype of `dtype_ptr` on the
    GPU (16-bit tensor cores), rounded the same way but kept float32 under the interpreter."""
    if UPCAST:
        return round_to(t, dtype_ptr.dtype.element_ty)
    else:
        return t.to(dtype_ptr.dtype.element_ty)
