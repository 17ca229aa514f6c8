"""The cpu GRAM kernels' small-call path (issue 14, stop 19: the fixed cost of B = 64).

A call whose products are small (B1·B2·D·(k-1) <= 2^22 multiply-adds, csrc/cpu/gram.cpp
``kOneSlabWork``) runs as one row slab on the calling thread, whatever the thread count; larger
calls keep one slab per thread. Both sides of that threshold against the float64 reference, forward
and every gradient, both directions and reductions, k = 2..8, positives off the diagonal (the
``gather=True`` offsets), and the slab count itself through the test hook ``fastbind::gram_row_slabs``.
The loss's statistics and its weighting are written by C++ loops rather than ATen ops; these
tests check their values (NaN included) against the reference.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.ops import _loss
from fastbind.ops import gram as gram_ops

pytestmark = pytest.mark.skipif("cpu" not in fb.backends(), reason="the C++ extension is not built")

F64 = torch.float64
ONE_SLAB_WORK = 1 << 22  # csrc/cpu/gram.cpp kOneSlabWork
slabs = torch.ops.fastbind.gram_row_slabs


@contextlib.contextmanager
def threads(n):
    """torch.set_num_threads(n) inside the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _inputs(b, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1).float() for _ in range(k)]


def _close(got, want, rel, what, atol=1e-6):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + atol, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g} + {atol:g}"


def _close_grads(got, want, what):
    """Input gradients to 1e-3 of their largest entry. The temperature's, Σ g·logit over the whole
    B1 x B2 tile with g summing to ~0 along each row, cancels: its float32 value is off by up to ~1%
    of itself on these sizes (the code before this path alike, bit for bit at B = 91: 0.8-1.1%)."""
    for i, (x, y) in enumerate(zip(got[:-1], want[:-1])):
        _close(x, y, 1e-3, f"{what}: gradient {i}")
    _close(got[-1], want[-1], 2e-2, f"{what}: temperature gradient", atol=2e-5)


def test_small_calls_are_one_slab_and_large_ones_one_per_thread():
    with threads(2):
        assert slabs(64, 64, 256, 2) == 1  # the issue-14 case: k = 3, D = 256, B = 64
        assert slabs(90, 90, 256, 2) == 1 and slabs(91, 91, 256, 2) == 2  # k = 3, D = 256: the last one-slab B
        assert slabs(64, 128, 256, 2) == 1 and slabs(65, 128, 256, 2) == 2  # exactly 2^22, and one row more
        assert slabs(512, 512, 256, 2) == 2 and slabs(4096, 4096, 256, 2) == 2
        assert slabs(1, 1 << 20, 4, 1) == 1 and slabs(2, 1 << 20, 4, 1) == 2
        assert slabs(0, 10, 8, 1) == 1  # (no rows: one empty slab)
    with threads(1):
        assert slabs(4096, 4096, 256, 2) == 1
    with threads(3):
        assert slabs(64, 64, 256, 4) == 1 and slabs(64, 64, 256, 5) == 3  # k = 5 at the threshold, k = 6 above


def _fused_and_grads(xs, tau, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    t = torch.tensor(tau, requires_grad=True)
    loss = fb.gram_loss(*leaves, temperature=t, backend="cpu", **kw)
    up = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    grads = torch.autograd.grad((loss * up).sum(), [*leaves, t])
    return loss.detach(), grads


def test_small_calls_do_not_depend_on_the_thread_count():
    """One slab whatever the thread count: 1, 2 and 3 threads give the same bits (a call with one
    slab per thread would merge column statistics and dQ parts in another order)."""
    xs = _inputs(90, 256, 3, seed=5)
    with threads(1):
        want = _fused_and_grads(xs, 0.07, label_smoothing=0.1)
    for n in (2, 3):
        with threads(n):
            assert slabs(90, 90, 256, 2) == 1
            got = _fused_and_grads(xs, 0.07, label_smoothing=0.1)
        assert torch.equal(got[0], want[0]), n
        for i, (x, y) in enumerate(zip(got[1], want[1])):
            assert torch.equal(x, y), (n, i)


def test_larger_calls_repeat_per_thread_count():
    xs = _inputs(200, 64, 4, seed=6)
    with threads(2):
        assert slabs(200, 200, 64, 3) == 2
        first = _fused_and_grads(xs, 0.1, label_smoothing=0.05)
        again = _fused_and_grads(xs, 0.1, label_smoothing=0.05)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(x, y) for x, y in zip(first[1], again[1]))


# B across the one-slab threshold of k = 3, D = 256 (90 | 91), small B with every k, and the two-thread
# split of a mid-size call; each both directions and reductions.
CASES = [(1, 3, 256), (2, 2, 256), (3, 8, 40), (63, 3, 256), (64, 3, 256), (65, 3, 256), (90, 3, 256), (91, 3, 256)]
CASES += [(17, k, 33) for k in (2, 4, 5, 6, 7)]


@pytest.mark.parametrize("b, k, d", CASES)
@pytest.mark.parametrize("direction", ["both", "a2d", "d2a"])
def test_across_the_threshold_against_float64(b, k, d, direction):
    xs = _inputs(b, d, k, seed=b * 10 + k)
    with threads(2):
        for reduction in ("mean", "sum", "none"):
            got, g_got = _fused_and_grads(xs, 0.07, label_smoothing=0.1, direction=direction, reduction=reduction)
            x64 = [x.double().requires_grad_() for x in xs]
            t64 = torch.tensor(0.07, dtype=F64, requires_grad=True)
            want = fb.gram_loss(
                *x64, temperature=t64, backend="torch", label_smoothing=0.1, direction=direction, reduction=reduction
            )
            up = torch.linspace(0.5, 2.0, want.numel(), dtype=F64).reshape(want.shape)
            g_want = torch.autograd.grad((want * up).sum(), [*x64, t64])
            _close(got, want, 2e-4, f"loss ({reduction})")
            _close_grads(g_got, g_want, reduction)


@pytest.mark.parametrize("b1, b2, offset", [(5, 12, 0), (5, 12, 7), (64, 128, 64), (65, 128, 3), (40, 300, 100)])
def test_positives_off_the_diagonal(b1, b2, offset):
    """The fused op of gather=True: local rows against more columns, positive of row i at column
    i + offset (and the transposed case), one slab (64 x 128) and two (65 x 128) on two threads."""
    g = torch.Generator().manual_seed(b1 + b2 + offset)
    d, k, tau, eps = 256, 3, 0.1, 0.1
    local = [F.normalize(torch.randn(b1, d, generator=g, dtype=F64), dim=-1) for _ in range(k)]
    glob = [F.normalize(torch.randn(b2, d, generator=g, dtype=F64), dim=-1) for _ in range(k)]
    for m, lo in zip(glob, local):
        m[offset : offset + b1] = lo  # the local batch is a slice of the global one
    weight = _loss.loss_weight("both", "mean", b2)
    op = gram_ops.LOSS_FUSED.built_op("cpu")
    with threads(2):
        for rows in (True, False):
            anchor, mods, diag = (local[0], glob[1:], offset) if rows else (glob[0], local[1:], -offset)
            a32 = anchor.float().requires_grad_()
            m32 = [m.float().requires_grad_() for m in mods]
            t32 = torch.tensor(tau, requires_grad=True)
            got = op(a32, m32, t32, eps, diag, rows, not rows, weight, True)
            g_got = torch.autograd.grad(got, [a32, *m32, t32])
            a64 = anchor.clone().requires_grad_()
            m64 = [m.clone().requires_grad_() for m in mods]
            t64 = torch.tensor(tau, dtype=F64, requires_grad=True)
            row_ce, col_ce = gram_ops._ce_blocks_reference(
                a64 if rows else local[0],
                m64 if not rows else local[1:],
                glob[0] if rows else a64,
                m64 if rows else glob[1:],
                offset,
                t64,
                eps,
                rows,
                not rows,
            )
            want = (row_ce if rows else col_ce).sum() * weight
            g_want = torch.autograd.grad(want, [a64, *m64, t64])
            _close(got, want, 2e-4, f"loss (rows={rows})")
            _close_grads(g_got, g_want, f"rows={rows}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_in_one_sample_reaches_the_loss_and_gradients(reduction):
    xs = _inputs(64, 256, 3, seed=9)
    xs[0][10, 3] = float("nan")  # one anchor row: its row CE and every column CE see it
    with threads(2):
        loss, grads = _fused_and_grads(xs, 0.07, reduction=reduction)
    assert loss.isnan().all()
    assert all(g.isnan().any() for g in grads)


def test_two_row_blocks_in_one_slab():
    """A slab of more than 512 rows (kRowBlock) streams two row blocks: the second accumulates into
    the dQ part the first one wrote (on the BLAS path that part is not zeroed first)."""
    xs = _inputs(600, 8, 3, seed=12)
    with threads(1):
        assert slabs(600, 600, 8, 2) == 1
        got, g_got = _fused_and_grads(xs, 0.2, label_smoothing=0.1)
    x64 = [x.double().requires_grad_() for x in xs]
    t64 = torch.tensor(0.2, dtype=F64, requires_grad=True)
    want = fb.gram_loss(*x64, temperature=t64, backend="torch", label_smoothing=0.1)
    g_want = torch.autograd.grad(want * 0.5, [*x64, t64])  # (_fused_and_grads: upstream 0.5 on a scalar)
    _close(got, want, 2e-4, "loss")
    _close_grads(g_got, g_want, "B = 600")
