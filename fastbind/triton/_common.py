"""Helpers shared by the Triton kernels of every family.

`AotSpec` describes one kernel variant to compile ahead of time for a GPU target without a GPU
(`benchmarks/triton_resources.py` and `tests/test_triton_compile.py` compile every spec returned
by the `aot_specs()` function of each `fastbind/triton/<family>.py` module for sm_90 and sm_80,
and check spills, shared memory and, for bfloat16 on sm_90, wgmma).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
