"""The CUDA kernels of csrc/cuda/, executed on the CPU by our SIMT emulator (issue 11).

The emulated build compiles every ``csrc/cuda/*.cu`` (kernels + the very launchers the CUDA build
registers under ``TORCH_LIBRARY_IMPL(fastbind, CUDA)``) with the host compiler and
``-DFASTBIND_SIMT_EMULATOR``: the launchers then register under the test-only namespace
``fastbind_emu`` for CPU tensors (csrc/cuda/aten_glue.h), with the schemas of the ``fastbind`` ops
copied from the loaded extension. ``csrc/cuda/emulator/selftest_ops.cpp`` adds the emulator's own
self-tests as the module's functions.

Families add their op tests here (``torch.ops.fastbind_emu.<op>``, fixture ``emu``) and their
sanitizer cases as ``csrc/cuda/emulator/driver_<family>.cpp`` (see driver.h): the ASan / TSan test
builds every driver file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_codebook import check_lookup  # the fused codebook backends' acceptance check

import fastbind  # noqa: F401  (loads fastbind._C: the schemas copied below)
from fastbind._backend import extension_loaded
from fastbind.reference import codebook as ref

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = CUDA_DIR / "emulator"
BUILD = ROOT / "build" / "cuda-emu"
INCLUDES = [ROOT / "csrc" / "include", CUDA_DIR]
CXXFLAGS = ["-O2", "-std=c++20", "-DFASTBIND_SIMT_EMULATOR"]

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="fastbind._C not built (`make build`)")


def _define_emu_schemas() -> None:
    """fastbind_emu::<op> with the schema of every fastbind::<op> of the loaded extension."""
    lib = torch.library.Library("fastbind_emu", "FRAGMENT")
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("fastbind::"):
            continue
        try:
            schema = str(torch._C._get_schema(name, ""))
        except RuntimeError:  # a name with kernels registered but no schema (e.g. an impl of an old op)
            continue
        lib.define(schema.split("::", 1)[1])
    _define_emu_schemas.lib = lib  # the definitions live as long as the Library object


@pytest.fixture(scope="session")
def emu():
    """The emulated extension module (built once, incrementally, under build/cuda-emu)."""
    from torch.utils.cpp_extension import load

    _define_emu_schemas()
    BUILD.mkdir(parents=True, exist_ok=True)
    # .cu files are C++ for the emulated build: one wrapper translation unit per file.
    sources = []
    for cu in sorted(CUDA_DIR.glob("*.cu")) + [EMU_DIR / "selftest_ops.cpp"]:
        wrapper = BUILD / f"emu_{cu.stem}.cpp"
        text = f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    return load(
        name="fastbind_cuda_emu",
        sources=sources,
        extra_cflags=CXXFLAGS,
        extra_include_paths=[str(p) for p in INCLUDES],
        build_directory=str(BUILD),
        verbose=False,
    )


# ---------------------------------------------------------------------------------------------
# the emulator's self-tests


def test_tiled_shared_memory_kernel(emu):
    a = torch.randn(37, 45)
    b = torch.randn(45, 21)
    torch.testing.assert_close(emu.tiled_matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)


def test_warp_shuffles(emu):
    n = 100  # the last warp is partly past n
    x = torch.arange(n, dtype=torch.float32) % 17
    out = emu.warp_ops(x)
    padded = torch.zeros(128)
    padded[:n] = x
    warps = padded.view(4, 32)
    lane0 = warps[:, 0].repeat_interleave(32)[:n]
    assert torch.equal(out[:, 0], warps.sum(1).repeat_interleave(32)[:n])
    assert torch.equal(out[:, 1], lane0)
    assert torch.equal(out[::32, 2], warps.sum(1))  # the shfl_down tree ends in lane 0
    half = warps[:, :16].sum(1).repeat_interleave(16)
    want = torch.stack([half.view(4, 16), torch.zeros(4, 16)], 1).reshape(-1)[:n]
    assert torch.equal(out[:, 3], want)


def test_atomics(emu):
    x = torch.arange(1000, dtype=torch.float32)
    want = torch.zeros(7).index_add_(0, torch.arange(1000) % 7, x)
    assert torch.equal(emu.atomics(x, 7), want)  # integers: exact in any order


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_layout(emu, dtype):
    """Fragments loaded with the kernels' helpers (simt::frag) through the emulated mma.sync
    (which follows its own statement of the PTX tables) give the plain matmul; a fragment index
    broken on purpose (A's halves, B's registers, D's rows) does not."""
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    want = a.double() @ b.double() + c.double()
    torch.testing.assert_close(emu.mma_layout(a, b, c, 0).double(), want, rtol=1e-6, atol=1e-5)
    for wrong in (1, 2, 3):
        assert not torch.allclose(emu.mma_layout(a, b, c, wrong).double(), want, rtol=1e-2, atol=1e-2), wrong


def _interesting_floats() -> torch.Tensor:
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), dtype=torch.int64).to(torch.int32)
    special = torch.tensor(
        [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 65536.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-9, 3.0e38]
        + [float("inf"), -float("inf"), 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11],
        dtype=torch.float32,
    )
    grid = torch.linspace(-70000, 70000, 100_001)  # every half exponent, incl. ties and overflow
    tiny = torch.linspace(-(2**-13), 2**-13, 100_001)  # half subnormals and their ties
    return torch.cat([bits.view(torch.float32), special, -special, grid, tiny])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_rounding_is_round_to_nearest_even(emu, dtype):
    """simt::from_float<bf16/half> matches torch's conversion bit for bit (NaN: the device's
    canonical 0x7fff), and to_float is exact."""
    x = _interesting_floats()
    got = emu.round16(x, dtype == torch.bfloat16)
    want = x.to(dtype).view(torch.int16)
    nan = torch.isnan(x)
    assert torch.equal(got[~nan], want[~nan])
    assert bool((got[nan] == 0x7FFF).all())
    back = emu.widen16(want, dtype == torch.bfloat16)
    assert torch.equal(back[~nan], x.to(dtype).float()[~nan])


# ---------------------------------------------------------------------------------------------
# sanitizers: the emulated kernels under AddressSanitizer and ThreadSanitizer (small shapes)

SANITIZERS = {
    "address": ("ERROR: AddressSanitizer", {"ASAN_OPTIONS": "detect_leaks=0"}),
    "thread": ("WARNING: ThreadSanitizer", {"TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1"}),
}


def _driver_sources() -> list[Path]:
    return sorted(EMU_DIR.glob("driver*.cpp"))


def _driver(sanitizer: str) -> Path:
    """The sanitizer build of the driver, cached by a hash of every source it can include."""
    flags = ["g++", "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitizer}", "-pthread"]
    flags += ["-DFASTBIND_SIMT_EMULATOR"] + [f"-I{p}" for p in INCLUDES]
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(CUDA_DIR.rglob("*")) + sorted((ROOT / "csrc" / "include").rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    exe = ROOT / "build" / "cuda-san" / f"driver-{sanitizer}-{digest.hexdigest()[:16]}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(flags + [str(p) for p in _driver_sources()] + ["-o", str(tmp)], check=True)
        tmp.rename(exe)
    return exe


@pytest.mark.parametrize("sanitizer", sorted(SANITIZERS))
def test_sanitizers(sanitizer):
    marker, env = SANITIZERS[sanitizer]
    proc = subprocess.run(
        [str(_driver(sanitizer))], capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )
    report = proc.stdout + proc.stderr
    assert marker not in report, report[-6000:]
    assert proc.returncode == 0, report[-6000:]
    assert "ok" in proc.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("misuse_shuffle_lane_outside_mask", "which does not name the lane"),
        ("misuse_shuffle_mask_names_absent_lanes", "wait for it in __shfl_xor_sync"),
        ("misuse_shuffle_reads_lane_outside_mask", "reads lane 20, which mask 0x0000ffff does not name"),
    ],
)
def test_warp_misuse_aborts_with_a_message(case, message):
    proc = subprocess.run(
        [str(_driver("address")), case],
        capture_output=True,
        text=True,
        env={**os.environ, "FASTBIND_SIMT_TIMEOUT_S": "5", "ASAN_OPTIONS": "detect_leaks=0"},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "fastbind SIMT emulator error" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# the tile skeleton (csrc/cuda/tile.cuh) that every family kernel uses


@pytest.mark.parametrize(
    "dtype, tensor_cores",
    [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)],
)
@pytest.mark.parametrize("a_cols, b_cols", [(False, False), (True, False), (False, True), (True, True)])
def test_tile_gemm(emu, dtype, tensor_cores, a_cols, b_cols):
    """A·Bᵀ for M, N, D that are no multiple of the 64×32×32 tile, row strides wider than the
    rows, both operand layouts; fp32 through FMAs (fp32 accuracy), 16-bit through the mma."""
    m, n, d = 70, 45, 50
    a_full = torch.randn(d + 3, m + 5).to(dtype) if a_cols else torch.randn(m, d + 7).to(dtype)
    b_full = torch.randn(d + 2, n + 3).to(dtype) if b_cols else torch.randn(n, d + 1).to(dtype)
    a = a_full[:d, :m] if a_cols else a_full[:, :d]
    b = b_full[:d, :n] if b_cols else b_full[:, :d]
    am = a.t() if a_cols else a
    bm = b.t() if b_cols else b
    got = emu.tile_gemm(a, b, a_cols, b_cols, tensor_cores)
    want = am.double() @ bm.double().t()
    tol = 1e-5 if dtype == torch.float32 or not tensor_cores else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * d)


# ---------------------------------------------------------------------------------------------
# codebook top-k lookup (csrc/cuda/codebook.cu) against the float64 oracle of tests/test_codebook.py

CODEBOOK_TOL = (2e-4, 2e-5)


def _lookup(x, e, k, metric="l2", w=None):
    return torch.ops.fastbind_emu.codebook_lookup_fwd(x, e, k, metric, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("weighted", [False, True])
def test_codebook_lookup(emu, dtype, metric, weighted):
    """N, K, D off the 64×64×32 tile (2 row blocks, 2 code tiles, 2 D chunks); k = 1, 5, 32 in
    turn. 16-bit l2/dot without weights run on the (emulated) tensor cores, the rest on fp32 FMAs."""
    k = {torch.float32: 1, torch.float16: 5, torch.bfloat16: 32}[dtype] if not weighted else 3
    x = torch.randn(70, 40).to(dtype)
    e = torch.randn(75, 40).to(dtype)
    w = torch.rand(40) if weighted else None
    dist, index = _lookup(x, e, k, metric, w)
    check_lookup(dist, index, x, e, k, metric, w, *CODEBOOK_TOL)


def test_codebook_lookup_mixed_dtypes_and_row_stride(emu):
    """x bfloat16 with a row stride wider than D, codebook float32 (fp32 path, x converted exactly)."""
    x = torch.randn(33, 50).to(torch.bfloat16)[:, 3:40]
    e = torch.randn(66, 37)
    dist, index = _lookup(x, e, 4)
    check_lookup(dist, index, x, e, 4, "l2", None, *CODEBOOK_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codebook_exact_ties_lowest_index(emu, dtype):
    """Duplicated codes and integer data (exact in every dtype and summation order): exactly the
    stable-sort order, i.e. equal distances to the lowest index, for k = 1 and k = 32."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (30, 6), generator=g).float()
    e = torch.cat([base, base, base[:10]]).to(dtype)  # codes j, j + 30 (and j + 60) identical
    x = torch.randint(-3, 4, (41, 6), generator=g).float().to(dtype)
    expected = torch.sort(ref.pairwise_distance(x.double(), e.double()), dim=1, stable=True).indices
    for k in (1, 32):
        _, index = _lookup(x, e, k)
        assert torch.equal(index, expected[:, :k]), k


def test_codebook_matches_cpu_op_on_non_finite_inputs(emu):
    """NaN / inf rows and a NaN code: the same indices and NaN pattern as the CPU kernel."""
    x = torch.randn(9, 8)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    e = torch.randn(70, 8)
    e[5, 2] = float("nan")
    for k in (1, 3):
        for metric in ("l2", "cosine", "dot"):
            got = _lookup(x, e, k, metric)
            want = torch.ops.fastbind.codebook_lookup_fwd(x, e, k, metric, None)
            assert torch.equal(got[1], want[1]), (k, metric)
            torch.testing.assert_close(got[0], want[0], equal_nan=True, atol=1e-5, rtol=1e-5)


def test_codebook_k_equals_num_codes_and_errors(emu):
    x, e = torch.randn(5, 3), torch.randn(32, 3)
    dist, index = _lookup(x, e, 32)
    assert torch.equal(index.sort(1).values, torch.arange(32).expand(5, 32))
    check_lookup(dist, index, x, e, 32, "l2", None, *CODEBOOK_TOL)
    with pytest.raises(RuntimeError, match="outside 1..min"):
        _lookup(x, torch.randn(40, 3), 33)
    with pytest.raises(RuntimeError, match="metric"):
        _lookup(x, e, 1, "manhattan")
    assert _lookup(x[:0], e, 2)[0].shape == (0, 2)
