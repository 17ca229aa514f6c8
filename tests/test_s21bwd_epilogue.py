"""The GRAM backward epilogue of the cpu kernels (csrc/cpu/gram.cpp, backward_rows): one pass per tile
row over products, distance, g, dr, coef and T_r, and on the bf16 path two rows per pass that write
T_r's VNNI pairs directly (an odd last row alone), against a float64 reference.

The op-level checks call `gram_loss_fwd` / `gram_loss_bwd` / `gram_volume_bwd` with their own float64
version of the same function of (anchor, basis, span_vol, ‖a‖², τ), so that any diagonal offset can be
tested (gather's positives: column i + offset for row i), and every output is compared: d_anchor,
d_basis (through the bf16 gradient GEMMs on the bf16 path: 2 bf16 ulps of the largest value, as
tests/test_gram_bf16_cpu.py), d_span_vol, d_anchor_sq and d_τ (the epilogue's float32 sums).
Tiles of the bf16 path are 256 rows x 1024 columns, 512 x 1024 on the float32 path.
"""

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
GEMM_TOL = {torch.float32: 2e-4, BF16: 2 * torch.finfo(BF16).eps}  # d_anchor, d_basis
SUM_TOL = 2e-4  # d_span_vol, d_anchor_sq, d_tau: float32 sums of the epilogue on either path


def _rows(b, d, g, scale=None):
    x = F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1)
    return x if scale is None else x * scale[:, None]


def _op_inputs(b1, b2, d, k, dtype, seed, row_scale=None):
    """anchor (dtype), modalities (dtype), and the ops' float32 operands basis, span_vol, ‖a‖²."""
    g = torch.Generator().manual_seed(seed)
    anchor = _rows(b1, d, g, row_scale).to(dtype)
    mods = [_rows(b2, d, g).to(dtype) for _ in range(k - 1)]
    basis, span_vol, _, _ = torch.ops.fastbind.gram_basis_fwd([m.float() for m in mods])
    a32 = anchor.float()
    return anchor, mods, basis, span_vol, (a32 * a32).sum(-1)


def _close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, what
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def _ref_logits(anchor, basis, span_vol, a_sq, tau):
    prods = torch.einsum("id,rjd->rij", anchor, basis)
    dist = (a_sq[:, None] - (prods * prods).sum(0)).clamp_min(0).sqrt()
    return -span_vol[None, :] * dist / tau


def _ref_loss(anchor, basis, span_vol, a_sq, tau, eps, offset, rows, cols, grad_row, grad_col):
    """Σ_i grad_row_i·CE_row_i + Σ_j grad_col_j·CE_col_j in float64 (the op's backward's function)."""
    logits = _ref_logits(anchor, basis, span_vol, a_sq, tau)
    b1, b2 = logits.shape
    total = logits.new_zeros(())
    if rows:
        i = torch.arange(b1)
        ce = logits.logsumexp(1) - (1 - eps) * logits[i, i + offset] - eps / b2 * logits.sum(1)
        total = total + (grad_row * ce).sum()
    if cols:
        j = torch.arange(b2)
        ce = logits.logsumexp(0) - (1 - eps) * logits[j - offset, j] - eps / b1 * logits.sum(0)
        total = total + (grad_col * ce).sum()
    return total


def _check_loss_op(anchor, mods, basis, span_vol, a_sq, *, tau, eps, offset, rows, cols, what, seed=0):
    b1, b2 = anchor.shape[0], basis.shape[1]
    g = torch.Generator().manual_seed(seed)
    grad_row = torch.rand(b1, generator=g) + 0.5 if rows else torch.zeros(b1)
    grad_col = torch.rand(b2, generator=g) + 0.5 if cols else torch.zeros(b2)
    t = torch.tensor(tau)
    flags = (eps, offset, rows, cols)
    operand = mods if anchor.dtype == BF16 else None
    _, _, row_lse, col_lse = torch.ops.fastbind.gram_loss_fwd(anchor, basis, span_vol, a_sq, t, *flags, operand)
    got = torch.ops.fastbind.gram_loss_bwd(
        grad_row, grad_col, anchor, basis, span_vol, a_sq, t, row_lse, col_lse, *flags, operand
    )
    leaves = [x.detach().to(F64).requires_grad_() for x in (anchor, basis, span_vol, a_sq, t)]
    total = _ref_loss(*leaves, eps, offset, rows, cols, grad_row.double(), grad_col.double())
    want = torch.autograd.grad(total, leaves)
    tols = [GEMM_TOL[anchor.dtype], GEMM_TOL[anchor.dtype], SUM_TOL, SUM_TOL, SUM_TOL]
    for name, x, y, tol in zip(("d_anchor", "d_basis", "d_span_vol", "d_anchor_sq", "d_tau"), got, want, tols):
        _close(x, y, tol, f"{what} {name}")


def _check_volume_op(anchor, mods, basis, span_vol, a_sq, what, seed=0):
    w = torch.randn(anchor.shape[0], basis.shape[1], generator=torch.Generator().manual_seed(seed))
    operand = mods if anchor.dtype == BF16 else None
    got = torch.ops.fastbind.gram_volume_bwd(w, anchor, basis, span_vol, a_sq, operand)
    leaves = [x.detach().to(F64).requires_grad_() for x in (anchor, basis, span_vol, a_sq)]
    vol = -_ref_logits(*leaves, 1.0)
    want = torch.autograd.grad((vol * w.double()).sum(), leaves)
    tols = [GEMM_TOL[anchor.dtype], GEMM_TOL[anchor.dtype], SUM_TOL, SUM_TOL]
    for name, x, y, tol in zip(("d_anchor", "d_basis", "d_span_vol", "d_anchor_sq"), got, want, tols):
        _close(x, y, tol, f"{what} {name}")


DTYPES = [torch.float32, BF16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [1, 2, 3, 257, 258])
def test_loss_rows_per_tile(b, dtype):
    """Tile row counts: 1 (no pair), 2 (one pair), 3 (a pair and an odd row), 257 = 256 + 1 and
    258 = 256 + 2 (a full bf16 tile, then an odd one-row tile or a one-pair tile); k = 3, both
    directions (one exp per element)."""
    x = _op_inputs(b, b, 16, 3, dtype, seed=b)
    _check_loss_op(*x, tau=0.1, eps=0.1, offset=0, rows=True, cols=True, what=f"B={b} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b1", "b2", "k"), [(1, 5, 2), (3, 1030, 3), (258, 7, 4), (257, 33, 8)])
def test_volume_rows_per_tile(b1, b2, k, dtype):
    """The volume's backward (dvol = the upstream gradient) with 1, 3, 256 + 2 and 256 + 1 rows,
    across a column tile border (1030 = 1024 + 6) and up to k = 8 (seven products per element)."""
    x = _op_inputs(b1, b2, 16, k, dtype, seed=b1 + b2)
    _check_volume_op(*x, what=f"{b1}x{b2} k={k} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_positives_across_pair_and_tile_borders(dtype):
    """Odd diagonal offsets (gather's positives): rows 0..5 against 1030 columns with positives
    1021..1026 (the pair (2, 3) has its positives on both sides of the column tile border at 1024),
    and 1030 rows against 6 columns whose positive rows 1021..1026 cross the row tile border at
    1024 in the middle of the pairs; row and column CEs with two exps, label smoothing."""
    x = _op_inputs(6, 1030, 16, 3, dtype, seed=1)
    _check_loss_op(*x, tau=0.1, eps=0.2, offset=1021, rows=True, cols=False, what=f"rows {dtype}")
    x = _op_inputs(1030, 6, 16, 3, dtype, seed=2)
    _check_loss_op(*x, tau=0.1, eps=0.2, offset=-1021, rows=False, cols=True, what=f"cols {dtype}")


def _lse_midpoint_shifts(anchor, basis, span_vol, a_sq, tau):
    """|lse − c| of the rows and of the columns (c the midpoint of all LSE: one_exp_factors' test)."""
    logits = _ref_logits(anchor.double(), basis.double(), span_vol.double(), a_sq.double(), tau)
    row, col = logits.logsumexp(1), logits.logsumexp(0)
    lse = torch.cat([row, col])
    c = 0.5 * (lse.max() + lse.min())
    return (row - c).abs(), (col - c).abs()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_exp_and_two_exp_rows_in_one_pair(dtype):
    """Row 1 with a tiny anchor (LSE the largest, log B above the columns'), row 4 scaled 8.8 (the
    smallest LSE), the others scaled 3: at τ = 0.1 rows 1 and 4 lie > 30 from the midpoint of all LSE
    (two exps) while their partners 0 and 5 and every column lie within (one exp): the pairs (0, 1)
    and (4, 5) mix both kinds, the out-of-range row second in one, first in the other. (Row 1's
    column softmax terms are large: a pair taking one exp for it would be far off.) The premise is
    checked on the float64 logits."""
    b = 64
    scale = torch.full((b,), 3.0, dtype=F64)
    scale[1], scale[4] = 1e-3, 8.8
    x = _op_inputs(b, b, 16, 3, dtype, seed=5, row_scale=scale)
    row_shift, col_shift = _lse_midpoint_shifts(*x[:1], *x[2:], 0.1)
    inside = torch.ones(b, dtype=torch.bool)
    inside[[1, 4]] = False
    assert (row_shift[~inside] > 30).all() and (row_shift[inside] < 30).all() and (col_shift < 30).all()
    _check_loss_op(*x, tau=0.1, eps=0.1, offset=0, rows=True, cols=True, what=f"mixed pairs {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nan_row", [4, 7])
def test_nan_row_does_not_reach_its_partner(dtype, nan_row):
    """A NaN in anchor row 4 (first of the pair (4, 5)) or 7 (second of (6, 7)): with rows only
    (a2d, reduction none) and for the volume, that row's anchor gradient has NaN and every other
    row's is finite and right (the partner shares its pass and its VNNI pairs); the modalities'
    gradients are NaN (the row reaches every column), as in the reference."""
    g = torch.Generator().manual_seed(nan_row)
    anchor = _rows(12, 16, g)
    anchor[nan_row, 3] = float("nan")
    mods = [_rows(12, 16, g) for _ in range(2)]
    other = torch.arange(12) != nan_row

    def grads(fn, dt):  # (the reference takes the inputs rounded to dtype)
        leaves = [t.to(dtype).to(dt).requires_grad_() for t in (anchor, *mods)]
        out = fn(leaves)
        w = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
        return torch.autograd.grad(out, leaves, w.to(out.dtype))

    for what, fn in (
        ("loss", lambda ls: fb.gram_loss(*ls, temperature=0.1, direction="a2d", reduction="none", backend="cpu")),
        ("volume", lambda ls: fb.gram_volume(*ls, backend="cpu")),
    ):

        def reference(ls, fn=fn, what=what):
            if what == "loss":
                return ref.gram_loss(*ls, temperature=0.1, direction="a2d", reduction="none")
            return ref.gram_volume(*ls)

        got = grads(fn, dtype)
        want = grads(reference, F64)
        assert got[0][nan_row].isnan().any() and want[0][nan_row].isnan().any(), what
        assert got[0][other].isfinite().all(), f"{what}: the NaN row leaked into another row"
        _close(got[0][other], want[0][other], GEMM_TOL[dtype], f"{what} anchor grad")
        assert all(m.isnan().any() for m in got[1:]), what


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="no binutils")
def test_element_loops_vectorised():
    """Every x86-64-v4 clone of the element loop (one per R, product form, row count, output and g
    policy) runs vector sqrt and has no division at all (gram_reciprocal) and no scalar sqrt outside
    its remainder. (gcc once reported these loops vectorised while the binary ran them scalar: local
    arrays in the omp simd body; the bf16 backward was 3x slower.)"""
    so = fb._C.__file__
    nm = subprocess.run(["nm", so], capture_output=True, text=True, check=True).stdout
    if "arch_x86_64_v4" not in nm:
        pytest.skip("the extension has no x86-64-v4 clones (not gcc >= 11 on x86-64)")
    lines = nm.splitlines()
    syms = [ln.split()[2] for ln in lines if "backward_rows_loop" in ln and ln.endswith("arch_x86_64_v4")]
    assert len(syms) >= 7 * 5, len(syms)  # R = 1..7 x (bf16 exact/split one or two rows, float32) x policies
    for sym in syms:
        asm = subprocess.run(["objdump", "-d", f"--disassemble={sym}", so], capture_output=True, text=True).stdout
        assert re.search(r"vsqrtps\s+%[yz]mm", asm), sym
        assert not re.search(r"vdivp|vdivs|call", asm), sym
