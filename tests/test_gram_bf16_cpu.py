"""The bfloat16 path of the cpu GRAM kernels (csrc/cpu/gram.cpp, issue 14) against the float64 reference.

Where oneDNN has its bf16 microkernel (AVX-512; "bf16 brgemm" in build_info) a bfloat16 anchor stays
bf16: the products run as one bf16 GEMM per modality with the Gram–Schmidt coefficients in the
epilogue (the exact form, tests/test_gram_bf16_exact.py), or, for nearly dependent modalities, as one
depth-2D bf16 GEMM against hi + lo parts of the float32 basis (the split form); the backward's
gradient GEMMs take dL/dP rounded to bf16 (written by the epilogue straight into the VNNI operand).
Elsewhere, and for odd D, the anchor is upcast (the float32 path); the tests hold for both.

Reference: the float64 GRAM volume / loss on the *rounded* inputs, so only the kernel's precision
counts. Tolerances relative to the largest reference magnitude: forward 2e-4 (float32 level: the
hi + lo products), gradients 1.6e-2 (2 bf16 ulps: the bf16 gradient GEMMs), as tests/test_gram.py.

Shapes cross the kernel's 512 x 1024 tiles with odd remainders: an odd last row of a row tile (the
rank-1 update of the dQ GEMM) and an odd tile width (the zero pad of the dA GEMM's depth).
"""

import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64
BF16 = torch.bfloat16
FWD_TOL = 2e-4
GRAD_TOL = 2 * torch.finfo(BF16).eps


def _close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, what
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def _bf16(b, d, g, scale=1.0):
    x = torch.randn(b, d, generator=g, dtype=F64) * (0.5 + torch.rand(b, 1, generator=g, dtype=F64))
    return (F.normalize(x, dim=-1) * scale).to(BF16)


def _inputs(b1, b2, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return _bf16(b1, d, g), [_bf16(b2, d, g) for _ in range(k - 1)]


def _leaves(anchor, mods, dtype):
    return [t.detach().to(dtype).clone().requires_grad_(True) for t in (anchor, *mods)]


def _check_volume(anchor, mods, what):
    a64, *m64 = _leaves(anchor, mods, F64)
    a16, *m16 = _leaves(anchor, mods, BF16)
    want = ref.gram_volume(a64, *m64)
    got = fb.gram_volume(a16, *m16, backend="cpu")
    assert got.dtype == BF16
    _close(got, want, FWD_TOL + torch.finfo(BF16).eps, f"{what} volume")  # + the bf16 output rounding
    w = torch.randn(want.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    g_want = torch.autograd.grad((want * w).sum(), [a64, *m64])
    g_got = torch.autograd.grad((got.double() * w).sum(), [a16, *m16])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        assert x.dtype == BF16
        _close(x, y, GRAD_TOL, f"{what} volume grad {i}")


def _check_loss(anchor, mods, what, tau=0.1, eps=0.1, direction="both"):
    a64, *m64 = _leaves(anchor, mods, F64)
    a16, *m16 = _leaves(anchor, mods, BF16)
    t64 = torch.tensor(tau, dtype=F64, requires_grad=True)
    t32 = torch.tensor(tau, requires_grad=True)
    want = ref.gram_loss(a64, *m64, temperature=t64, label_smoothing=eps, direction=direction)
    got = fb.gram_loss(a16, *m16, temperature=t32, label_smoothing=eps, direction=direction, backend="cpu")
    _close(got, want, FWD_TOL, f"{what} loss")
    g_want = torch.autograd.grad(want, [a64, *m64, t64])
    g_got = torch.autograd.grad(got, [a16, *m16, t32])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _close(x, y, GRAD_TOL, f"{what} loss grad {i}")


def test_bf16_kernel_in_use_where_avx512():
    """Where the CPU has AVX-512 the tests below run the bf16 microkernel path, not the upcast."""
    info = torch.ops.fastbind.build_info()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512bw" in flags and "avx512vl" in flags and "avx512dq" in flags and "mm tile GEMM" not in info:
        assert "bf16 brgemm" in info, info


@pytest.mark.parametrize("k", [2, 3, 5])
def test_bf16_loss_across_row_tiles(k):
    """B = 515: a full 512-row tile and an odd 3-row one; 515 columns (odd width, one column tile)."""
    anchor, mods = _inputs(515, 515, 64, k, seed=k)
    _check_loss(anchor, mods, f"k={k} B=515")


def test_bf16_loss_one_direction():
    anchor, mods = _inputs(37, 37, 32, 3, seed=5)
    _check_loss(anchor, mods, "a2d", direction="a2d", eps=0.0)
    _check_loss(anchor, mods, "d2a", direction="d2a", tau=0.05)


@pytest.mark.parametrize(("b1", "b2", "d", "k"), [(7, 1101, 48, 3), (33, 1025, 16, 5), (1, 3, 2, 2), (9, 20, 33, 3)])
def test_bf16_volume_awkward_shapes(b1, b2, d, k):
    """Columns across two column tiles with an odd last width (1101 = 1024 + 77), a one-column last
    tile (1025), tiny shapes, and odd D (33: the upcast float32 path)."""
    anchor, mods = _inputs(b1, b2, d, k, seed=b1 + b2)
    _check_volume(anchor, mods, f"{b1}x{b2}x{d} k={k}")


@pytest.mark.parametrize("k", [3, 5])
def test_bf16_nearly_parallel_modalities(k):
    """Modality 2 = modality 1 plus a small bf16 perturbation (angles ~1e-2 rad): large Gram–Schmidt
    coefficients, tiny span volumes; the kernels must stay at their tolerances relative to the
    reference's largest value, and finite."""
    g = torch.Generator().manual_seed(11)
    anchor = _bf16(41, 64, g)
    m1 = _bf16(41, 64, g)
    near = (m1.double() + 1e-2 * _bf16(41, 64, g).double()).to(BF16)
    mods = [m1, near] + [_bf16(41, 64, g) for _ in range(k - 3)]
    _check_volume(anchor, mods, f"near-parallel k={k}")
    _check_loss(anchor, mods, f"near-parallel k={k}")


def test_bf16_near_flat_volumes():
    """Anchors within ~0.05 of sample 0's span: vol[:, 0] is small against the others and comes from
    ‖a‖² − Σ p² with cancellation, so it needs the products at float32 level (exact bf16 operands, or
    hi + lo parts of the basis; bf16-rounded basis vectors put ~10% errors into it). Checked against
    its own scale.
    Forward only: the anchor gradient there is a residual a − Σ p_r q_r that the bf16 gradient GEMMs
    (bf16 dL/dP and Q_hi) resolve to ~12% of its size at this flatness (not a 2-ulp quantity)."""
    g = torch.Generator().manual_seed(21)
    mods = [_bf16(2, 64, g) for _ in range(2)]
    coef = torch.randn(40, 2, generator=g, dtype=F64)
    near = coef[:, :1] * mods[0][:1].double() + coef[:, 1:] * mods[1][:1].double()
    anchor = (near + 0.05 * torch.randn(40, 64, generator=g, dtype=F64) / 8).to(BF16)
    a64, *m64 = _leaves(anchor, mods, F64)
    a16, *m16 = _leaves(anchor, mods, BF16)
    want = ref.gram_volume(a64, *m64)[:, 0]
    got = fb.gram_volume(a16, *m16, backend="cpu")[:, 0]
    assert want.max() < 0.2 * ref.gram_volume(a64, *m64)[:, 1].max()  # near-flat against the other sample
    _close(got, want, 5e-3, "near-flat volume")


def test_bf16_nan_in_nan_out():
    """A NaN anchor row gives a NaN volume row (a NaN sample a NaN column), the others stay finite;
    the loss and its gradients are NaN."""
    anchor, mods = _inputs(9, 600, 32, 3, seed=3)
    anchor[4, 7] = float("nan")
    mods[1][511, 0] = float("nan")
    vol = fb.gram_volume(anchor, *mods, backend="cpu").float()
    nan = torch.zeros_like(vol, dtype=torch.bool)
    nan[4, :] = True
    nan[:, 511] = True
    assert torch.equal(vol.isnan(), nan)
    a, *ms = _leaves(anchor[:9], [m[:9] for m in mods], BF16)
    a.data[4, 7] = float("nan")
    loss = fb.gram_loss(a, *ms, temperature=0.1, backend="cpu")
    assert loss.isnan()
    grads = torch.autograd.grad(loss, [a, *ms])
    assert all(gr.isnan().any() for gr in grads)


def _loss_and_grads(anchor, mods, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, *ms = _leaves(anchor, mods, BF16)
        loss = fb.gram_loss(a, *ms, temperature=0.1, label_smoothing=0.1, backend="cpu")
        return [loss.detach(), *torch.autograd.grad(loss, [a, *ms])]
    finally:
        torch.set_num_threads(before)


def test_bf16_thread_determinism():
    """Bit-identical results run to run for a given thread count; the same values (to round-off) for
    another thread count (the column statistics merge in a different chunk order)."""
    anchor, mods = _inputs(530, 530, 32, 3, seed=9)
    one = _loss_and_grads(anchor, mods, 1)
    for threads in (1, 3):
        first = _loss_and_grads(anchor, mods, threads)
        again = _loss_and_grads(anchor, mods, threads)
        for x, y in zip(first, again):
            assert torch.equal(x, y), f"{threads} threads: not deterministic"
        for x, y in zip(first, one):
            _close(x, y, GRAD_TOL, f"{threads} threads vs 1")


def _clone_disassembly(symbol_part, clone):
    """objdump of the `clone` (e.g. arch_x86_64_v4) of the fastbind._C function whose demangled name
    contains `symbol_part`."""
    so = fb._C.__file__  # the loaded extension
    nm = subprocess.run(["nm", "-C", so], capture_output=True, text=True, check=True).stdout
    mangled = subprocess.run(["nm", so], capture_output=True, text=True, check=True).stdout.splitlines()
    names = [line for line in nm.splitlines() if symbol_part in line and f"[clone .{clone}]" in line]
    assert len(names) == 1, names
    addr = names[0].split()[0]
    sym = next(line.split()[2] for line in mangled if line.startswith(addr) and clone in line)
    return subprocess.run(["objdump", "-d", f"--disassemble={sym}", so], capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="no binutils")
def test_distance_epilogue_vectorised():
    """The distance loops' sqrt is a vector sqrt in the AVX-512 clone: with errno semantics gcc kept
    a scalar sqrtss loop with a libm call for negative inputs (the extension is built with
    -fno-math-errno for this). A scalar sqrt is left in the loop's remainder only."""
    nm = subprocess.run(["nm", fb._C.__file__], capture_output=True, text=True, check=True).stdout
    if "arch_x86_64_v4" not in nm:
        pytest.skip("the extension has no x86-64-v4 clones (not gcc >= 11 on x86-64)")
    for loop in ("row_scaled_volumes",):  # (the backward's loops: tests/test_s21bwd_epilogue.py)
        asm = _clone_disassembly(loop, "arch_x86_64_v4")
        assert re.search(r"vsqrtps\s+%zmm", asm), (loop, asm[-2000:])
        assert not re.search(r"call.*sqrtf", asm), (loop, asm[-2000:])  # no libm fallback for errno
