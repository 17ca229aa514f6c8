"""The GRAM loss backward of the cpu kernels (csrc/cpu/gram.cpp, gram_loss_backward_cpu): with both
directions a row whose LSE lies within 30 of the call's midpoint LSE, on a tile whose columns' LSE all
do, takes one exp per element (the column softmax as exp(l − lse_row)·f_i·h_j); other rows, and
every row of a tile holding an out-of-range column, take two. Rows only: one exp; columns only: two.
Every gradient of each kind (and calls that mix them) against the float64 reference, the exact zero
gradient of B = 1 with label smoothing, and NaN in -> NaN out.
"""

import pytest
import torch
from test_gram_forward_one_exp import _inputs  # k = 3, modalities scaled per sample

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64
ONE_EXP_RANGE = 30.0  # kOneExpRange in csrc/cpu/gram.cpp


def _lse_spread(xs, tau):
    """max − min of the row and column LSE of the float64 logits (the kernel's range test)."""
    logits = -ref.gram_volume(*xs) / tau
    lse = torch.cat([logits.logsumexp(1), logits.logsumexp(0)])
    return (lse.max() - lse.min()).item()


def _grads(xs, tau, dtype, backend, direction="both", eps=0.1):
    leaves = [x.to(dtype).requires_grad_() for x in xs]
    t = torch.tensor(tau, dtype=F64 if backend is None else torch.float32, requires_grad=True)
    if backend is None:
        loss = ref.gram_loss(*leaves, temperature=t, label_smoothing=eps, direction=direction)
    else:
        loss = fb.gram_loss(*leaves, temperature=t, label_smoothing=eps, direction=direction, backend=backend)
    return torch.autograd.grad(loss, [*leaves, t])


def _check(xs, tau, dtype, direction="both"):
    xs = [x.to(dtype).double() for x in xs]  # the reference takes the rounded inputs
    want = _grads(xs, tau, F64, None, direction)
    got = _grads(xs, tau, dtype, "cpu", direction)
    # float32: float32 round-off; bf16: the gradient GEMMs' bf16 dL/dP (tests/test_gram_bf16_cpu.py)
    rel = 2e-4 if dtype == torch.float32 else 2e-2
    for i, (g, w) in enumerate(zip(got, want)):
        err, scale = (g.double() - w).abs().max(), w.abs().max()
        what = f"tau={tau} {dtype} {direction} gradient {i}"
        assert err <= rel * scale + 1e-7, f"{what}: {err:.3g} > {rel:g} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_one_exp_and_two_exp_tiles(dtype):
    """1100 samples = two column tiles. Half of the first tile's samples have scale 3 (volumes 9x):
    at τ = 0.02 their column LSE lie ~300 below the others' (out of range: that tile takes two exps,
    the second tile one); at τ = 0.5 everything is in range. The premise is checked on the float64 logits."""
    scale = torch.ones(1100, dtype=F64)
    scale[:1024:2] = 3.0
    xs = _inputs(1100, 32, seed=1, col_scale=scale)
    assert _lse_spread(xs, 0.02) > 4 * ONE_EXP_RANGE
    assert _lse_spread(xs, 0.5) < ONE_EXP_RANGE
    for tau in (0.02, 0.5):
        _check(xs, tau, dtype)


@pytest.mark.parametrize("direction", ["a2d", "d2a"])
def test_backward_one_direction(direction):
    """Rows only (one exp, zero column factors) and columns only (two exps), a spread LSE (τ = 0.02)."""
    scale = torch.ones(300, dtype=F64)
    scale[::3] = 2.0
    xs = _inputs(300, 16, seed=2, col_scale=scale)
    assert _lse_spread(xs, 0.02) > 2 * ONE_EXP_RANGE
    for tau in (0.02, 0.3):
        _check(xs, tau, torch.float32, direction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.07, 0.003])
def test_backward_b1_label_smoothing_exact_zero(dtype, tau):
    """B = 1, ε > 0: the softmax is exactly 1 = (1 − ε) + ε, so every gradient is exactly zero
    (a product e·f·h of factors that are not exactly 1 would leave round-off)."""
    xs = [x.to(dtype) for x in _inputs(1, 24, seed=3, col_scale=torch.full((1,), 1.3, dtype=F64))]
    for g in _grads(xs, tau, dtype, "cpu"):
        assert (g == 0).all(), g


def test_backward_nan_in_nan_out_with_spread_lse():
    """A NaN in one sample: its column LSE is NaN (out of range, two exps there), and the NaN
    reaches the gradients; the other samples' gradients stay finite where they do not see it."""
    scale = torch.ones(300, dtype=F64)
    scale[::3] = 2.0
    xs = [x.float() for x in _inputs(300, 16, seed=4, col_scale=scale)]
    xs[1][7, 0] = float("nan")
    got = _grads(xs, 0.05, torch.float32, "cpu")
    assert all(g.isnan().any() for g in got)
