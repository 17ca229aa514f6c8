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


# ---------------------------------------------------------------------------------------------
# GRAM (csrc/cuda/gram.cu) and the multi-pair InfoNCE (csrc/cuda/infonce.cu) against the float64
# reference, forward and every gradient, with the operands prepared as fastbind/ops/gram.py does

import torch.nn.functional as F  # noqa: E402

from fastbind.ops import gram as gram_ops  # noqa: E402
from fastbind.reference import gram as ref_gram  # noqa: E402
from fastbind.reference import infonce as ref_infonce  # noqa: E402

F64 = torch.float64
# relative to the largest reference value / gradient, as tests/test_gram.py (16-bit: compared on the
# rounded inputs, so only the kernels' own precision counts) and tests/test_infonce.py
GRAM_REL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}
INFONCE_TOL = {torch.float32: (2e-5, 2e-5, 2e-5), torch.float16: (2e-3, 2e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2, 3e-2)}


def _emu_ops():
    return torch.ops.fastbind_emu


class _EmuVolume(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, basis, span_vol, anchor_sq):
        ctx.save_for_backward(anchor, basis, span_vol, anchor_sq)
        return _emu_ops().gram_volume_fwd(anchor, basis, span_vol, anchor_sq)

    @staticmethod
    def backward(ctx, grad):
        a, q, r, a_sq = ctx.saved_tensors
        d_a, d_q, d_r, d_asq = _emu_ops().gram_volume_bwd(grad.contiguous(), a, q, r, a_sq)
        return d_a.to(a.dtype), d_q.to(q.dtype), d_r, d_asq


class _EmuGramLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, basis, span_vol, anchor_sq, tau, eps, offset, rows, cols):
        out = _emu_ops().gram_loss_fwd(anchor, basis, span_vol, anchor_sq, tau, eps, offset, rows, cols)
        ctx.save_for_backward(anchor, basis, span_vol, anchor_sq, tau, out[2], out[3])
        ctx.flags = (eps, offset, rows, cols)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, g_row, g_col):
        a, q, r, a_sq, tau, row_lse, col_lse = ctx.saved_tensors
        grads = (g_row.contiguous(), g_col.contiguous())
        d = _emu_ops().gram_loss_bwd(*grads, a, q, r, a_sq, tau, row_lse, col_lse, *ctx.flags)
        return (d[0].to(a.dtype), d[1].to(q.dtype), d[2], d[3], d[4]) + (None,) * 4


class _EmuInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, tau, eps, offset):
        out = _emu_ops().infonce_fwd(q, k, tau, eps, offset)
        ctx.save_for_backward(q, k, tau, out[2], out[3])
        ctx.flags = (eps, offset)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, g_row, g_col):
        q, k, tau, row_lse, col_lse = ctx.saved_tensors
        gq, gk = _emu_ops().infonce_bwd(g_row.contiguous(), g_col.contiguous(), q, k, tau, row_lse, col_lse, *ctx.flags)
        return gq.to(q.dtype), gk.to(k.dtype), None, None, None


def _gram_operands(anchor, modalities):
    """(anchor, basis, span_vol, anchor_sq) as fastbind/ops/gram.py prepares them for a 16-bit GEMM
    backend: the per-sample Gram-Schmidt in float32 (differentiable), GEMM operands in the input dtype."""
    basis, span_vol = gram_ops.span_basis([m.float() for m in modalities])
    a32 = anchor.float()
    return anchor.contiguous(), basis.to(anchor.dtype).contiguous(), span_vol.contiguous(), (a32 * a32).sum(-1)


def _gram_close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, what
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def _gram_inputs(b1, b2, d, k, dtype, seed, normalize=False):
    """Anchor [b1, d] and k-1 modalities [b2, d] with non-unit norms (unit norms for the losses, as
    the GRAM release feeds them), drawn in float64 and rounded to dtype."""
    g = torch.Generator().manual_seed(seed)

    def rnd(b):
        x = torch.randn(b, d, generator=g, dtype=F64) * (0.5 + torch.rand(b, 1, generator=g, dtype=F64))
        return (F.normalize(x, dim=-1) if normalize else x / d**0.5).to(dtype)

    return rnd(b1), [rnd(b2) for _ in range(k - 1)]


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _grad_rel(dtype):
    # 16-bit gradients are returned in 16 bits: 2 ulp more (as tests/test_gram.py)
    rel = GRAM_REL[dtype]
    return 5e-4 if dtype == torch.float32 else max(5 * rel, 2 * torch.finfo(dtype).eps)


# (B1, B2, D) off every tile (64 lines, 32/64-wide D chunks): one partial tile, and B1 > 64 (two row
# blocks) with B1 != B2. k = 8 stays at one tile per side (the emulator runs one OS thread per lane).
GRAM_SHAPES = {2: [(5, 9, 17), (70, 37, 33)], 3: [(70, 37, 33)], 8: [(9, 37, 20)]}
GRAM_LOSS_SHAPES = [(2, 70, 20), (3, 37, 33), (8, 20, 17)]  # (k, B, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_gram_volume_fwd_bwd(emu, dtype, k):
    for b1, b2, d in GRAM_SHAPES[k]:
        anchor, mods = _gram_inputs(b1, b2, d, k, dtype, seed=k * 100 + b1)
        a64, m64 = _leaf(anchor, F64), [_leaf(m, F64) for m in mods]
        want = ref_gram.gram_volume(a64, *m64)
        a, ms = _leaf(anchor), [_leaf(m) for m in mods]
        got = _EmuVolume.apply(*_gram_operands(a, ms))
        tag = f"k={k} {b1}x{b2}x{d} {dtype}"
        _gram_close(got, want, GRAM_REL[dtype], f"volume {tag}")
        w = torch.randn(b1, b2, dtype=F64)
        g_want = torch.autograd.grad((want * w).sum(), [a64, *m64])
        g_got = torch.autograd.grad((got.double() * w).sum(), [a, *ms])
        for i, (x, y) in enumerate(zip(g_got, g_want)):
            assert x.dtype == dtype
            _gram_close(x, y, _grad_rel(dtype), f"volume grad {i} {tag}")


@pytest.mark.parametrize(
    "dtype, k, b, d, direction",
    [(dt, k, b, d, "both") for dt in (torch.float32, torch.bfloat16, torch.float16) for k, b, d in GRAM_LOSS_SHAPES]
    + [(torch.float32, 3, 37, 9, "a2d"), (torch.float32, 3, 37, 9, "d2a")],  # the flags: dtype-independent
)
def test_gram_loss_fwd_bwd(emu, dtype, k, b, d, direction):
    """Per-row loss (row and column CEs, label smoothing 0.1) and the gradients of the anchor, every
    modality and the temperature."""
    anchor, mods = _gram_inputs(b, b, d, k, dtype, seed=k + b, normalize=True)
    a64, m64 = _leaf(anchor, F64), [_leaf(m, F64) for m in mods]
    t64 = torch.tensor(0.1, dtype=F64, requires_grad=True)
    want = ref_gram.gram_loss(a64, *m64, temperature=t64, label_smoothing=0.1, direction=direction, reduction="none")
    a, ms = _leaf(anchor), [_leaf(m) for m in mods]
    t = torch.tensor(0.1, requires_grad=True)
    rows, cols = direction in ("both", "a2d"), direction in ("both", "d2a")
    row, col = _EmuGramLoss.apply(*_gram_operands(a, ms), t, 0.1, 0, rows, cols)
    got = (row + col) / 2 if rows and cols else (row if rows else col)
    tag = f"gram loss k={k} b={b} d={d} {direction} {dtype}"
    _gram_close(got, want, GRAM_REL[dtype], tag)
    w = torch.rand(b, dtype=F64) + 0.5
    g_want = torch.autograd.grad((want * w).sum(), [a64, *m64, t64])
    g_got = torch.autograd.grad((got.double() * w).sum(), [a, *ms, t])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _gram_close(x, y, _grad_rel(dtype), f"grad {i} {tag}")


def _infonce_reference(q64, k64, tau, eps, offset):
    rows, cols = [], []
    for p in range(q64.shape[0]):
        r, c = ref_infonce.infonce_rows_cols(q64[p], k64[0 if k64.shape[0] == 1 else p], tau, eps, offset)
        rows.append(r)
        cols.append(c)
    return torch.cat([torch.stack(rows).flatten(), torch.stack(cols).flatten()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "p, pk, b1, b2, d, offset", [(2, 1, 70, 37, 33, 0), (2, 2, 37, 70, 40, 5), (1, 1, 5, 9, 17, -2)]
)
def test_infonce_fwd_bwd(emu, dtype, p, pk, b1, b2, d, offset):
    """P pairs with one shared key matrix (CentroBind) or one per pair, B1 != B2 off the tiles,
    positives at i + offset (rows / columns without one keep the smoothing term)."""
    g = torch.Generator().manual_seed(b1 * 7 + b2 + d + p)
    q = (torch.randn(p, b1, d, generator=g) * (0.5 + torch.rand(p, b1, 1, generator=g))).to(dtype)
    k = (torch.randn(pk, b2, d, generator=g) * (0.5 + torch.rand(pk, b2, 1, generator=g))).to(dtype)
    q64, k64 = _leaf(q, F64), _leaf(k, F64)
    want = _infonce_reference(q64, k64, 0.2, 0.1, offset)
    ql, kl = _leaf(q), _leaf(k)
    row, col = _EmuInfoNCE.apply(ql, kl, torch.tensor(0.2), 0.1, offset)
    got = torch.cat([row.flatten(), col.flatten()])
    atol, rtol, gtol = INFONCE_TOL[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol)
    up = torch.randn_like(want)
    g_want = torch.autograd.grad((want * up).sum(), [q64, k64])
    g_got = torch.autograd.grad((got.double() * up).sum(), [ql, kl])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        assert x.dtype == dtype
        scale = max(y.abs().max().item(), 1e-3)
        torch.testing.assert_close(x.double(), y, atol=gtol * scale, rtol=0, msg=lambda m, i=i: f"grad {i}: {m}")


def test_gram_infonce_nan_propagation(emu):
    """A NaN in one anchor row / query row: NaN exactly where the CPU kernels have it (its row, every
    column CE), finite elsewhere."""
    anchor, mods = _gram_inputs(20, 20, 12, 3, torch.float32, seed=1)
    anchor[3, 5] = float("nan")
    ops_ = _gram_operands(anchor, mods)
    vol = _emu_ops().gram_volume_fwd(*ops_)
    want = torch.ops.fastbind.gram_volume_fwd(*ops_)
    assert torch.equal(vol.isnan(), want.isnan()) and bool(vol[3].isnan().all()) and bool(vol[:3].isfinite().all())
    tau = torch.tensor(0.1)
    got = _emu_ops().gram_loss_fwd(*ops_, tau, 0.1, 0, True, True)
    want = torch.ops.fastbind.gram_loss_fwd(*ops_, tau, 0.1, 0, True, True)
    for x, y in zip(got, want):
        assert torch.equal(x.isnan(), y.isnan())
    assert bool(got[0][3].isnan()) and bool(got[1].isnan().all())
    q, k = torch.randn(1, 20, 12), torch.randn(1, 20, 12)
    q[0, 7, 1] = float("nan")
    got = _emu_ops().infonce_fwd(q, k, tau, 0.0, 0)
    want = torch.ops.fastbind.infonce_fwd(q, k, tau, 0.0, 0)
    for x, y in zip(got, want):
        assert torch.equal(x.isnan(), y.isnan())
    assert bool(got[0][0, 7].isnan()) and int(got[0].isnan().sum()) == 1 and bool(got[1].isnan().all())


def test_gram_infonce_backward_is_deterministic(emu):
    """No atomics: two runs of each backward are bitwise equal."""
    anchor, mods = _gram_inputs(70, 37, 20, 3, torch.float32, seed=2)
    ops_ = _gram_operands(anchor, mods)
    tau = torch.tensor(0.1)
    fwd = _emu_ops().gram_loss_fwd(*ops_, tau, 0.1, -3, False, True)  # B1 > B2: the column CEs
    g_row, g_col = torch.zeros(70), torch.rand(37)
    runs = [_emu_ops().gram_loss_bwd(g_row, g_col, *ops_, tau, fwd[2], fwd[3], 0.1, -3, False, True) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    q, k = torch.randn(2, 70, 20), torch.randn(1, 37, 20)
    out = _emu_ops().infonce_fwd(q, k, tau, 0.0, 0)
    g_row, g_col = torch.rand(2, 70), torch.rand(2, 37)
    runs = [_emu_ops().infonce_bwd(g_row, g_col, q, k, tau, out[2], out[3], 0.0, 0) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_gram_infonce_errors(emu):
    anchor, mods = _gram_inputs(5, 6, 4, 3, torch.float32, seed=3)
    a, q, r, a_sq = _gram_operands(anchor, mods)
    with pytest.raises(RuntimeError, match="basis has 8 vectors"):
        _emu_ops().gram_volume_fwd(a, q.repeat(4, 1, 1), r, a_sq)
    with pytest.raises(RuntimeError, match="anchor's dtype"):
        _emu_ops().gram_volume_fwd(a, q.to(torch.bfloat16), r, a_sq)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _emu_ops().gram_volume_fwd(a.double(), q.double(), r, a_sq)
    with pytest.raises(RuntimeError, match="rows need positives"):
        _emu_ops().gram_loss_fwd(a, q, r, a_sq, torch.tensor(0.1), 0.0, 2, True, False)
    with pytest.raises(RuntimeError, match="1 or P"):
        _emu_ops().infonce_fwd(torch.randn(3, 4, 5), torch.randn(2, 4, 5), torch.tensor(0.1), 0.0, 0)
