"""The GRAM loss backward's bounded row exp (csrc/cpu/gram.cpp, kBoundedExpArg): on the one-exp path a
row takes fast_exp_bounded for exp(l − lse_row) only when the call's logit bound (‖a‖·r/τ) plus
|lse_row| is at most 80, so that every argument lies inside its range (|x| <= 87). Close positives
and far negatives at a small τ put the row and column LSE within the one-exp range of each other while
the negatives' l − lse_row fall far below −87: the guard must send those rows to the clamped exp
(without it their exps come out as garbage). Every gradient against the float64 reference."""

import pytest
import torch
from test_s20bwd_one_exp import ONE_EXP_RANGE, _check

from fastbind.reference import gram as ref

F64 = torch.float64


def _close_positives(n, d, noise, seed):
    """m1_i ⟂ m2_i unit (span volume 1) and anchor_i = normalize(m1_i + noise·u_i), u_i a unit vector
    orthogonal to both: every positive at the same distance noise/√(1 + noise²) from its span (the
    row and column LSE, dominated by the positive at a small τ, all close), the negatives at ~1."""
    g = torch.Generator().manual_seed(seed)

    def unit(x):
        return torch.nn.functional.normalize(x, dim=-1)

    def off(x, v):  # x without its component along the unit vectors v
        return x - (x * v).sum(-1, keepdim=True) * v

    m1 = unit(torch.randn(n, d, generator=g, dtype=F64))
    m2 = unit(off(torch.randn(n, d, generator=g, dtype=F64), m1))
    u = unit(off(off(torch.randn(n, d, generator=g, dtype=F64), m1), m2))
    return [unit(m1 + noise * u), m1, m2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_one_exp_rows_outside_the_bounded_range(dtype):
    xs = _close_positives(300, 32, 0.2, seed=4)
    tau = 0.005
    logits = -ref.gram_volume(*[x.to(dtype).double() for x in xs]) / tau
    row_lse, col_lse = logits.logsumexp(1), logits.logsumexp(0)
    lse = torch.cat([row_lse, col_lse])
    assert (lse.max() - lse.min()).item() < ONE_EXP_RANGE  # the one-exp path
    assert (logits - row_lse[:, None]).min().item() < -87.0  # outside fast_exp_bounded's range
    _check(xs, tau, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.05, 0.2])
def test_backward_bounded_rows(dtype, tau):
    """The same inputs where the bound allows the bounded exp (bound 1/τ = 20 or 5)."""
    _check(_close_positives(300, 32, 0.2, seed=5), tau, dtype)
