"""Helpers shared by the Triton kernels of every family.

`AotSpec` describes one kernel variant to compile ahead of time for a GPU target without a GPU
(`benchmarks/triton_resources.py` and `tests/test_triton_compile.py` compile every spec returned
by the `aot_specs()` function of each `fastbind/triton/<family>.py` module for sm_90 and sm_80,
and check spills, shared memory and, for bfloat16 on sm_90, wgmma).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import triton
import triton.language as tl


def _interpreting() -> bool:
    """True when TRITON_INTERPRET is set: the Triton kernels run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class AotSpec:
    name: str  # e.g. "gram_loss_fwd[k=3,bf16]"
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    dtype: str = "fp32"  # operand dtype of the variant: "fp32" or "bf16"
    num_warps: int = 4
    num_stages: int = 2
    expect_wgmma: bool = field(default=False)  # True for the bf16 GEMM variants (checked on sm_90)


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
