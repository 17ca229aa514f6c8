"""The per-call buffers of the cpu GRAM backward (csrc/cpu/gram.cpp backward_tiles, issue 14) against
the float64 reference.

The gradient outputs are no longer zero-filled: d_anchor's rows are written by the first column tile
of their row block, each chunk's dQ part by the chunk's first row block (a chunk of one row has no
VNNI pair: its rank-1 update writes), and the chunks' dQᵀ parts are merged and transposed back in one
pass (transposed_sum). The bf16 backward's operands are packed without intermediate copies: Q_r
rounded to bf16 while packed (exact form), the anchor transposed through 32-bit words
(transposed_copy_16; odd B1 scalar), the bf16 anchor gradient rounded as it is formed. Shapes: one
row, odd and even B1, two row blocks, odd column tiles, and B1·B2·D·(k-1) above the one-slab bound so
that 2 threads run 2 chunks; both product forms (exact, split) and float32. Tolerances and reference
of tests/test_gram_bf16_cpu.py (bf16) and tests/test_gram.py (float32 level).
"""

import pytest
import torch
from test_gram_bf16_cpu import GRAD_TOL, _close, _inputs, _leaves

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64
BF16 = torch.bfloat16
F32_TOL = 2e-4


def _threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _form(anchor, mods):
    basis = torch.ops.fastbind.gram_basis_fwd([m.float() for m in mods])[0]
    return torch.ops.fastbind.gram_product_form(anchor, basis, list(mods))


def _loss_grads(anchor, mods, dtype, tau=0.1, eps=0.1):
    a, *ms = _leaves(anchor, mods, dtype)
    t = torch.tensor(tau, requires_grad=True)
    loss = fb.gram_loss(a, *ms, temperature=t, label_smoothing=eps, backend="cpu")
    return [loss.detach(), *torch.autograd.grad(loss, [a, *ms, t])]


def _volume_grads(anchor, mods, dtype, w):
    a, *ms = _leaves(anchor, mods, dtype)
    vol = fb.gram_volume(a, *ms, backend="cpu")
    return [vol.detach(), *torch.autograd.grad((vol.double() * w).sum(), [a, *ms])]


def _check(got, want, dtype, what):
    tol = GRAD_TOL if dtype == BF16 else F32_TOL
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == (dtype if i > 0 and x.dim() > 0 else x.dtype), f"{what} output {i} dtype"
        _close(x, y, tol, f"{what} output {i}")


def _near_parallel(mods, g):
    """Modality 2 as modality 1 plus a small perturbation: the split product form."""
    m1 = mods[0].double()
    m2 = m1 + 1e-2 * torch.randn(m1.shape, generator=g, dtype=F64)
    return [mods[0], torch.nn.functional.normalize(m2, dim=-1).to(BF16), *mods[2:]]


LOSS_SHAPES = [(1, 16), (2, 16), (3, 32), (9, 16), (301, 64)]


# (dtype, product form): the two forms of bf16 anchors, and float32
PATHS = [(BF16, "exact"), (BF16, "split"), (torch.float32, "float32")]


@pytest.mark.parametrize(("dtype", "form"), PATHS)
@pytest.mark.parametrize(("b", "d"), LOSS_SHAPES)
def test_loss_gradients_without_zeroed_buffers(b, d, dtype, form):
    anchor, mods = _inputs(b, b, d, 3, seed=b + d)
    if form == "split":
        mods = _near_parallel(mods, torch.Generator().manual_seed(b))
    if dtype == BF16 and "bf16 brgemm" in torch.ops.fastbind.build_info():
        assert _form(anchor, mods) == form
    a64, *m64 = _leaves(anchor, mods, F64)
    t64 = torch.tensor(0.1, dtype=F64, requires_grad=True)
    want = ref.gram_loss(a64, *m64, temperature=t64, label_smoothing=0.1)
    want = [want.detach(), *torch.autograd.grad(want, [a64, *m64, t64])]
    for threads in (1, 2):
        got = _threads(threads, lambda: _loss_grads(anchor, mods, dtype))
        _check(got, want, dtype, f"{form} {dtype} B={b} D={d} {threads} threads")


VOLUME_SHAPES = [(1, 7, 16), (7, 1101, 16), (300, 513, 32), (513, 9, 16)]


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize(("b1", "b2", "d"), VOLUME_SHAPES)
def test_volume_gradients_without_zeroed_buffers(b1, b2, d, dtype):
    anchor, mods = _inputs(b1, b2, d, 3, seed=b1 * b2)
    w = torch.randn(b1, b2, dtype=F64, generator=torch.Generator().manual_seed(3))
    a64, *m64 = _leaves(anchor, mods, F64)
    want = ref.gram_volume(a64, *m64)
    want = [want.detach(), *torch.autograd.grad((want * w).sum(), [a64, *m64])]
    for threads in (1, 2):
        got = _threads(threads, lambda: _volume_grads(anchor, mods, dtype, w))
        got[0] = got[0].double()
        tol_fwd = F32_TOL + (torch.finfo(BF16).eps if dtype == BF16 else 0)
        _close(got[0], want[0], tol_fwd, f"{b1}x{b2} {dtype} volume")
        _check([want[0], *got[1:]], want, dtype, f"{b1}x{b2}x{d} {dtype} {threads} threads")


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_two_chunks_deterministic(dtype):
    """Two threads (two chunks: 300·300·64·2 multiply-adds is above the one-slab bound): the merged
    dQ parts are bit-identical run to run."""
    anchor, mods = _inputs(300, 300, 64, 3, seed=11)
    first = _threads(2, lambda: _loss_grads(anchor, mods, dtype))
    again = _threads(2, lambda: _loss_grads(anchor, mods, dtype))
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize(("n", "b", "d"), [(1, 3, 2), (2, 5, 33), (3, 70, 64)])
def test_basis_bf16_rows_and_gradients_exact(n, b, d):
    """gram_basis_fwd widens bf16 modalities per sample (no float32 copy): bit-identical to the op on
    their float32 values. Its autograd writes bf16 gradients from float32 rows: bit-identical to the
    float32 gradient op rounded with .to(bfloat16)."""
    g = torch.Generator().manual_seed(n * b + d)
    mods = [(torch.randn(b, d, generator=g) * 3).to(BF16) for _ in range(n)]
    op = torch.ops.fastbind
    got = op.gram_basis_fwd(mods)
    want = op.gram_basis_fwd([m.float() for m in mods])
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and torch.equal(x, y)
    leaves = [m.clone().requires_grad_(True) for m in mods]
    basis, volume, norms, coefs = op.gram_basis_fwd(leaves)
    w_basis = torch.randn(basis.shape, generator=g)
    w_volume = torch.randn(volume.shape, generator=g)
    grads = torch.autograd.grad((basis * w_basis).sum() + (volume * w_volume).sum(), leaves)
    expect = op.gram_basis_bwd(w_basis, w_volume, basis.detach(), norms, coefs)
    for x, y in zip(grads, expect):
        assert x.dtype == BF16 and torch.equal(x, y.to(BF16))
