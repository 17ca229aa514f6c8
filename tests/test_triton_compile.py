"""Every Triton kernel variant compiles for sm_90 and sm_80 under every supported Triton (the oldest,
3.6.0, installed beside the pinned one, and the pinned one) with zero spills, shared memory within
the sm_90 limit, wgmma in the 16-bit variants on sm_90 and no 32-bit products of sizes, strides or
row indices — checked without a GPU. And what is checked is what is launched.

The compile runs in subprocesses with TRITON_INTERPRET unset (the test session itself interprets
the kernels), two at a time; results are cached by the hash of the kernel sources
(benchmarks/triton_resources.py), so only the first run after a kernel change pays the compile.
"""

import pytest
import torch
import triton
from conftest import GPU
from triton.runtime.interpreter import InterpretedFunction

from benchmarks.triton_resources import FAMILIES, OLDEST_TRITON, SHARED_LIMIT, collect_versions, i32_index_products


@pytest.fixture(scope="module")
def rows():
    rows = collect_versions()
    assert rows, "no kernels reported"
    return rows


def test_every_version_target_and_family_compiled(rows):
    versions = {r["triton"] for r in rows}
    assert versions == {OLDEST_TRITON, triton.__version__}, versions
    for version in versions:
        mine = [r for r in rows if r["triton"] == version]
        assert {r["arch"] for r in mine} == {"sm_90", "sm_80"}
        assert {r["dtype"] for r in mine} >= {"fp32", "bf16"}
        assert {r["kernel"].split("_")[0] for r in mine} == set(FAMILIES)


def test_no_spills(rows):
    spilling = [
        (r["kernel"], r["triton"], r["arch"], r["spill_stores"], r["spill_loads"])
        for r in rows
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spilling, f"kernels spill registers: {spilling}"


def test_shared_memory_fits_sm90(rows):
    too_big = [
        (r["kernel"], r["triton"], r["arch"], r["shared_bytes"]) for r in rows if r["shared_bytes"] > SHARED_LIMIT
    ]
    assert not too_big, f"shared memory above {SHARED_LIMIT} bytes: {too_big}"


def test_16bit_uses_wgmma_on_sm90(rows):
    expected = [r for r in rows if r["expect_wgmma"]]
    assert {r["triton"] for r in expected} == {OLDEST_TRITON, triton.__version__}
    missing = [(r["kernel"], r["triton"]) for r in expected if not r["wgmma"]]
    assert not missing, f"16-bit sm_90 variants without wgmma: {missing}"


def test_offsets_are_64_bit(rows):
    """A product of a row index and a stride or size in 32 bits overflows once a tensor passes 2^31
    elements (e.g. (k-2)·B2·D for the GRAM basis): there must be none in the TTIR."""
    narrow = [(r["kernel"], r["triton"], r["arch"], r["i32_products"]) for r in rows if r["i32_products"]]
    assert not narrow, f"32-bit index products: {narrow}"


def test_i32_product_check_finds_narrow_products():
    # The TTIR check itself: what the GRAM kernels compiled to before the offsets were widened.
    ttir = """
  tt.func public @k(%q_ptr: !tt.ptr<f32>, %B2: i32, %D: i32, %stride_qr: i32) {
    %c2_i32 = arith.constant 2 : i32 loc(#loc1)
    %c1_i32 = arith.constant 1 : i32 loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc2)
    %rows = tt.make_range {end = 32 : i32, start = 0 : i32} : tensor<32xi32> loc(#loc3)
    %a = arith.muli %stride_qr, %c2_i32 : i32 loc(#loc4)
    %b = arith.muli %B2, %D : i32 loc(#loc5)
    %c = arith.muli %pid, %c2_i32 : i32 loc(#loc6)
    %d = tt.splat %D : i32 -> tensor<32xi32> loc(#loc7)
    %e = arith.muli %rows, %d : tensor<32xi32> loc(#loc8)
    %f = arith.muli %B2, %c1_i32 : i32 loc(#loc9)
    %g = arith.extsi %B2 : i32 to i64 loc(#loc10)
    %h = arith.muli %g, %g : i64 loc(#loc11)
"""
    found = i32_index_products(ttir)
    assert found == ["%a = arith.muli %stride_qr, %c2_i32 : i32", "%b = arith.muli %B2, %D : i32"], found


# --------------------------------------------------------------------------------------------
# checked = launched
# --------------------------------------------------------------------------------------------
# Launch parameters compared with the AOT specs: the tile, warps and stages, and the constexprs that
# select a kernel body (AXIS, LOSS). The size constexprs (NQ = k-1, K_TOP) are compiled for the
# extreme values only; UPCAST differs under the interpreter.
_COMPARED = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "AXIS", "LOSS", "num_warps", "num_stages")


def _key(kernel_name, params):
    return (kernel_name, tuple((n, params.get(n)) for n in _COMPARED))


def _compiled_keys():
    import importlib

    keys = set()
    for family in FAMILIES:
        for spec in importlib.import_module(f"fastbind.triton.{family}").aot_specs():
            params = dict(spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)
            keys.add(_key(spec.kernel.fn.__name__, params))
    return keys


@pytest.fixture
def launches(monkeypatch):
    """Record every Triton launch (kernel name and keyword arguments) instead of running it."""
    seen = []

    def record(self, *args, grid=None, warmup=False, **kwargs):
        seen.append(_key(self.fn.__name__, kwargs))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    return seen


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.skipif(GPU, reason="records launches through the interpreter's InterpretedFunction")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_launches_use_compiled_configs(launches, dtype):
    """Call every launch wrapper as on a GPU (meta tensors: the GPU configuration is chosen for
    non-CPU tensors, nothing runs) and check each launch's configuration was compiled above."""
    from fastbind.triton import codebook, gram, infonce

    b, d = 300, 64
    for k in (2, 3, 5, 8):
        a, basis = _meta(b, d, dtype=dtype), _meta(k - 1, b, d, dtype=dtype)
        r, asq, tau = _meta(b), _meta(b), _meta(())
        gram.gram_volume_fwd_triton._init_fn(a, basis, r, asq)
        gram.gram_loss_fwd_triton._init_fn(a, basis, r, asq, tau, 0.1, 0, True, True)
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            try:
                gram.gram_volume_bwd_triton._init_fn(_meta(b, b), a, basis, r, asq)
                args = (_meta(b), _meta(b), a, basis, r, asq, tau, _meta(b), _meta(b), 0.1, 0, True, True)
                gram.gram_loss_bwd_triton._init_fn(*args)
            finally:
                torch.use_deterministic_algorithms(False)
    q, kk = _meta(3, b, d, dtype=dtype), _meta(1, b, d, dtype=dtype)
    infonce.infonce_fwd_triton._init_fn(q, kk, _meta(()), 0.1, 0)
    infonce.infonce_bwd_triton._init_fn(_meta(3, b), _meta(3, b), q, kk, _meta(()), _meta(3, b), _meta(3, b), 0.1, 0)
    for k in (1, 2, 5, 8, 9, 32):
        codebook.codebook_lookup_fwd_triton._init_fn(_meta(b, d, dtype=dtype), _meta(100, d), k, "l2", None)
    assert launches
    compiled = _compiled_keys()
    missing = sorted({launch for launch in launches if launch not in compiled})
    assert not missing, f"launch configurations never compiled ahead of time: {missing}"
