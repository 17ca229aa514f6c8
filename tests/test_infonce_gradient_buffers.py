"""Issue 14 (branch s19nce), the InfoNCE backward on the cpu backend writes its gradients without a
zero pass first: the first column block's dQ GEMMs and the first dKᵀ GEMM of every row slab and key
matrix write, the later GEMMs add.

Forward and gradients of ``infonce_fwd`` / ``infonce_bwd`` themselves against float64, every upstream
direction, on shapes that cross every tile boundary: several row slabs of two row tiles, forward
column blocks of 1024 with a partial last one, backward column blocks of 512, rectangular batches with
a diagonal offset, one shared key matrix or one per pair, odd D and D = 1. The gradient buffers are
taken from the allocator right after a NaN-filled tensor of the same size was freed, so a first GEMM
that added to the buffer instead of writing it would leave NaN (checked by making it add: every test
fails).
"""

import pytest
import torch

from fastbind.reference import infonce as ref

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.fastbind, "infonce_fwd"), reason="C++ extension not built")

# (P, PK, B1, B2, D, diag_offset)
SHAPES = [
    (3, 1, 1100, 1100, 33, 0),  # 3 row slabs of 2 row tiles; forward blocks 1024 + 76, backward 512, 512, 76
    (2, 2, 300, 1030, 7, 5),  # rectangular, one key matrix per pair, positives shifted
    (1, 1, 257, 513, 1, -3),  # D = 1, a row tile of one row
    (3, 3, 70, 40, 16, 0),  # fewer columns than rows
]


def _reference(q, k, tau, eps, offset, g_row, g_col):
    """float64 row/column losses of the pairs and the gradients of Σ g_row·row + g_col·col."""
    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    keys = kd.expand(q.shape[0], -1, -1) if k.shape[0] == 1 else kd
    pairs = [ref.infonce_rows_cols(qd[p], keys[p], tau, eps, offset) for p in range(q.shape[0])]
    rows, cols = torch.stack([r for r, _ in pairs]), torch.stack([c for _, c in pairs])
    ((rows * g_row.double()).sum() + (cols * g_col.double()).sum()).backward()
    return rows.detach(), cols.detach(), qd.grad, kd.grad


def _poison_allocator(*shapes):
    """Frees NaN-filled float32 tensors of these shapes, so that the next allocations of the same
    sizes are likely to reuse their memory (glibc's malloc keeps freed chunks below its mmap
    threshold for reuse)."""
    for shape in shapes:
        t = torch.full(shape, float("nan"))
        del t


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}-PK{}-B{}x{}-D{}-off{}".format(*s))
@pytest.mark.parametrize("direction", ["both", "rows", "cols"])
def test_infonce_ops_match_float64(shape, direction):
    P, PK, b1, b2, d, offset = shape
    g = torch.Generator().manual_seed(b1 + b2 + d)
    q = torch.randn(P, b1, d, generator=g) * 0.3
    k = torch.randn(PK, b2, d, generator=g) * 0.3
    tau, eps = torch.tensor(0.1), 0.1
    g_row = torch.rand(P, b1, generator=g) * (direction != "cols")
    g_col = torch.rand(P, b2, generator=g) * (direction != "rows")
    row, col, row_lse, col_lse = torch.ops.fastbind.infonce_fwd(q, k, tau, eps, offset)
    want_row, want_col, want_dq, want_dk = _reference(q, k, 0.1, eps, offset, g_row, g_col)
    torch.testing.assert_close(row.double(), want_row, atol=2e-5 * want_row.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(col.double(), want_col, atol=2e-5 * want_col.abs().max().item(), rtol=1e-5)
    for _ in range(2):  # twice: the second call's buffers come from the first call's freed ones
        _poison_allocator(q.shape, k.shape)
        dq, dk = torch.ops.fastbind.infonce_bwd(g_row, g_col, q, k, tau, row_lse, col_lse, eps, offset)
        for got, want, name in ((dq, want_dq, "dq"), (dk, want_dk, "dk")):
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double(), want, atol=1e-4 * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_infonce_ops_nan_in_nan_out():
    """A NaN query row poisons every column's loss and so every key gradient; the other pairs' rows
    and the NaN row itself get NaN too; no NaN leaks into an unrelated pair with its own keys."""
    P, b, d = 2, 600, 9
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(P, b, d, generator=g), torch.randn(P, b, d, generator=g)
    q[0, 517, 3] = float("nan")
    tau = torch.tensor(0.2)
    row, col, row_lse, col_lse = torch.ops.fastbind.infonce_fwd(q, k, tau, 0.0, 0)
    assert row[0, 517].isnan() and col[0].isnan().all() and not row[1].isnan().any()
    ones = torch.ones(P, b)
    dq, dk = torch.ops.fastbind.infonce_bwd(ones, ones, q, k, tau, row_lse, col_lse, 0.0, 0)
    assert dq[0].isnan().any(dim=1).all() and dk[0].isnan().all()
    assert not dq[1].isnan().any() and not dk[1].isnan().any()


@pytest.mark.parametrize("shape", [(3, 1, 1100, 700, 34, 0), (2, 2, 301, 77, 16, 2)], ids=["shared-key", "per-pair"])
def test_bf16_gradient_buffers_are_written(shape):
    """bf16 inputs (the bf16 gradient GEMMs where the bf16 microkernel runs, else the fp32 path):
    the same first-write rule; bf16 tolerances (dL/dS rounded to bf16: ~2e-3 of the largest gradient)."""
    P, PK, b1, b2, d, offset = shape
    g = torch.Generator().manual_seed(b1 + d)
    q = (torch.randn(P, b1, d, generator=g) * 0.3).bfloat16()
    k = (torch.randn(PK, b2, d, generator=g) * 0.3).bfloat16()
    tau = torch.tensor(0.1)
    g_row, g_col = torch.rand(P, b1, generator=g), torch.rand(P, b2, generator=g)
    _, _, row_lse, col_lse = torch.ops.fastbind.infonce_fwd(q, k, tau, 0.0, offset)
    _, _, want_dq, want_dk = _reference(q, k, 0.1, 0.0, offset, g_row, g_col)
    for _ in range(2):
        _poison_allocator(q.shape, k.shape)
        dq, dk = torch.ops.fastbind.infonce_bwd(g_row, g_col, q, k, tau, row_lse, col_lse, 0.0, offset)
        for got, want in ((dq, want_dq), (dk, want_dk)):
            assert not got.isnan().any()
            torch.testing.assert_close(got.double(), want, atol=2e-2 * want.abs().max().item(), rtol=0)
