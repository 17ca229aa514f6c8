"""Kernel-level behaviour of the Triton path (issue 9): exact ties with duplicated float codes, the
16-bit rounding the GPU path applies (reproduced under the interpreter), and determinism.

All of it runs under TRITON_INTERPRET=1 on CPU tensors (see conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F
import triton.runtime.interpreter as interpreter
from conftest import FUSED

import fastbind as fb
from fastbind.reference import codebook as ref_codebook

if "triton" in FUSED:  # registers the fastbind::*_triton ops used directly below
    import fastbind.triton.gram  # noqa: F401
    import fastbind.triton.infonce  # noqa: F401

needs_triton = pytest.mark.skipif("triton" not in FUSED, reason="triton backend unavailable")
# These tests patch or emulate the interpreter (its tl.dot, its 16-bit rounding) on CPU tensors; on a
# machine with a GPU the op tests of test_gram/test_infonce/test_codebook run the compiled kernels.
pytestmark = pytest.mark.interpreter_only  # skipped on a GPU, left out of the device audit (conftest.py)


@pytest.fixture
def gemm_rounds_columns_apart(monkeypatch):
    """Make the interpreter's tl.dot round identical columns differently, as tensor cores and some
    BLAS builds do: each output column is scaled by (1 + c_j 2^-21) with c_j in {-2..2} depending on
    its position in the tile. Distances recomputed without a dot are unaffected."""
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = original(self, a, b, d, input_precision, max_num_imprecise_acc)
        n = out.data.shape[-1]
        c = ((torch.arange(n) * 7) % 5 - 2).numpy().astype(out.data.dtype)
        out.data = out.data + abs(out.data) * c * out.data.dtype.type(2.0**-21)
        return out

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _duplicate_codebook(seed, num_base=24, copies=(0, 5, 11, 3), dim=40):
    """Random float codes with exact duplicates at scattered higher indices, and rows near them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(num_base, dim, generator=g)
    extra = base[list(copies)]
    e = torch.cat([base, extra, base[: num_base // 2]])  # every code of the first half appears twice
    x = base[torch.randint(0, num_base, (60,), generator=g)] + 0.2 * torch.randn(60, dim, generator=g)
    return x, e


@pytest.mark.parametrize("backend", ["torch", *FUSED])
@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_duplicate_float_codes_lowest_index(backend, metric, gemm_rounds_columns_apart):
    for seed in (0, 1):
        x, e = _duplicate_codebook(seed)
        full = ref_codebook.pairwise_distance(x.double(), e.double(), metric)
        expected = torch.sort(full, dim=1, stable=True).indices
        for k in (1, 2, 3):
            _, index = fb.codebook_lookup(x, e, k, metric, backend=backend)
            wrong = (index != expected[:, :k]).any(1).sum().item()
            assert wrong == 0, f"{backend} {metric} k={k}: {wrong} of {x.shape[0]} rows not the lowest index"


@needs_triton
def test_rounding_gemm_fixture_is_effective(gemm_rounds_columns_apart):
    # The fixture must actually separate identical columns, or the test above proves nothing.
    a = torch.tensor([[1.0, 2.0]]).repeat(16, 1)
    b = torch.tensor([[3.0], [0.5]]).repeat(1, 16)
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, o_ptr):
        i = tl.arange(0, 16)
        j = tl.arange(0, 16)
        kk = tl.arange(0, 16)
        av = tl.load(a_ptr + i[:, None] * 2 + kk[None, :], mask=kk[None, :] < 2, other=0.0)
        bv = tl.load(b_ptr + kk[:, None] * 16 + j[None, :], mask=kk[:, None] < 2, other=0.0)
        tl.store(o_ptr + i[:, None] * 16 + j[None, :], tl.dot(av, bv, input_precision="ieee"))

    out = torch.empty(16, 16)
    _dot_kernel[(1,)](a.contiguous(), b.contiguous(), out)
    assert len(set(out[0].tolist())) > 1  # identical columns, different results


# --------------------------------------------------------------------------------------------
# 16-bit rounding as on the GPU
# --------------------------------------------------------------------------------------------
def _round(t, dtype):
    return t.to(dtype).double()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_infonce_backward_rounds_ds_like_the_gpu(dtype):
    """The GPU path feeds dS to the gradient GEMM in the operand dtype. Under the interpreter the
    kernel must round dS the same way: its gradient matches a float64 emulation that rounds dS
    (tight) much better than one that does not."""
    b, d, tau = 37, 24, 0.05
    q = F.normalize(torch.randn(1, b, d), dim=-1).to(dtype)
    k = F.normalize(torch.randn(1, b, d), dim=-1).to(dtype)
    temp = torch.tensor(tau)
    row_loss, col_loss, row_lse, col_lse = torch.ops.fastbind.infonce_fwd_triton(q, k, temp, 0.1, 0)
    g_row, g_col = torch.rand(1, b), torch.rand(1, b)
    grad_q, grad_k = torch.ops.fastbind.infonce_bwd_triton(g_row, g_col, q, k, temp, row_lse, col_lse, 0.1, 0)
    # float64 emulation of dL/dS (rows i of q, columns j of k)
    q64, k64 = q[0].double(), k[0].double()
    logits = q64 @ k64.T / tau
    eye = torch.eye(b, dtype=torch.float64)
    gr, gc = g_row[0].double(), g_col[0].double()
    ds = gr[:, None] * (logits.softmax(1) - 0.1 / b) + gc[None, :] * (logits.softmax(0) - 0.1 / b)
    ds = (ds - 0.9 * (gr[:, None] + gc[None, :]) * eye) / tau
    exact_q, exact_k = ds @ k64, ds.T @ q64
    rounded_q, rounded_k = _round(ds, dtype) @ k64, _round(ds.T, dtype) @ q64
    for got, rounded, exact in ((grad_q[0], rounded_q, exact_q), (grad_k[0], rounded_k, exact_k)):
        err_rounded = (got.double() - rounded).abs().max().item()
        err_exact = (got.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err_rounded < 1e-3 * scale, (err_rounded, scale)
        assert err_rounded < 0.2 * err_exact, (err_rounded, err_exact)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gram_backward_rounds_dp_like_the_gpu(dtype, deterministic):
    """Same for the GRAM backward: dL/dP_r = -coef P_r enters the gradient GEMMs in the operand
    dtype (both the atomic and the deterministic kernel)."""
    b1, b2, d = 21, 19, 24
    anchor = F.normalize(torch.randn(b1, d), dim=-1).to(dtype)
    q, _ = torch.linalg.qr(torch.randn(d, 2))  # an orthonormal pair spanning each sample's modalities
    basis = torch.stack([q.T[0].expand(b2, d), q.T[1].expand(b2, d)]).clone()
    basis += 0.3 * torch.randn_like(basis)
    basis = basis.to(dtype)
    span_vol = torch.rand(b2) + 0.5
    a64, q64 = anchor.double(), basis.double()
    anchor_sq = (a64 * a64).sum(1).float()
    grad = torch.randn(b1, b2)
    with torch.inference_mode():
        torch.use_deterministic_algorithms(deterministic)
        try:
            d_a, d_q, _, _ = torch.ops.fastbind.gram_volume_bwd_triton(grad, anchor, basis, span_vol, anchor_sq)
        finally:
            torch.use_deterministic_algorithms(False)
    p = torch.einsum("id,rjd->rij", a64, q64)
    dist = (anchor_sq.double()[:, None] - (p * p).sum(0)).clamp_min(0).sqrt()
    eps = (1e-4 * anchor_sq.double().sqrt()).clamp_min(1e-20)
    coef = grad.double() * span_vol.double()[None, :] / torch.maximum(dist, eps[:, None])
    t = -coef[None] * p  # [r, i, j]
    for name, got, make in (
        ("dA", d_a, lambda tt: torch.einsum("rij,rjd->id", tt, q64)),
        ("dQ", d_q, lambda tt: torch.einsum("rij,id->rjd", tt, a64)),
    ):
        exact, rounded = make(t), make(_round(t, dtype))
        err_rounded = (got.double() - rounded).abs().max().item()
        err_exact = (got.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err_rounded < 2e-3 * scale, (name, err_rounded, scale)
        assert err_rounded < 0.3 * err_exact, (name, err_rounded, err_exact)


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def no_atomics(monkeypatch):
    """Fail any Triton atomic issued under the interpreter (the interpreter runs programs one after
    another, so atomics are repeatable there; on a GPU their order, and the float sums, vary)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton atomic ran with torch.use_deterministic_algorithms(True)")

    for name in ("create_atomic_rmw", "create_atomic_cas"):
        monkeypatch.setattr(interpreter.InterpreterBuilder, name, refuse)


def _gram_inputs(b=23, d=17, k=3):
    return [F.normalize(torch.randn(b, d), dim=-1).requires_grad_() for _ in range(k)]


def _run_all_ops(backend, dtype=torch.float32):
    """Every op with its gradients: a list of result tensors."""
    xs = _gram_inputs()
    tau = torch.tensor(0.07, requires_grad=True)
    out = []
    loss = fb.gram_loss(*[x.to(dtype) for x in xs], temperature=tau, label_smoothing=0.1, backend=backend)
    vol = fb.gram_volume(*[x.to(dtype) for x in xs], backend=backend)
    (loss + (vol * torch.linspace(-1, 1, vol.numel()).reshape(vol.shape)).sum()).backward()
    out += [loss.detach(), vol.detach(), tau.grad, *[x.grad for x in xs]]
    zs = [F.normalize(torch.randn(29, 16), dim=-1).requires_grad_() for _ in range(3)]
    closs = fb.centroid_loss(*[z.to(dtype) for z in zs], temperature=0.1, label_smoothing=0.1, backend=backend)
    closs.backward()
    out += [closs.detach(), *[z.grad for z in zs]]
    x, e = _duplicate_codebook(2)
    dist, index = fb.codebook_lookup(x.to(dtype), e, 3, backend=backend)
    out += [dist, index]
    return out


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_deterministic_results_are_bitwise_repeatable(backend, deterministic, no_atomics):
    dtypes = [torch.float32] + ([torch.bfloat16] if backend == "triton" else [])
    for dtype in dtypes:
        torch.manual_seed(0)
        first = _run_all_ops(backend, dtype)
        torch.manual_seed(0)
        again = _run_all_ops(backend, dtype)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"{backend} {dtype}: result {i} differs between two runs"


@needs_triton
def test_deterministic_gram_backward_matches_atomic_one(deterministic):
    """The atomic-free GRAM backward gives the same gradients as the default one (float64 tolerance
    of float32 sums in another order), for the loss with label smoothing and for the volume."""
    torch.manual_seed(1)
    xs = _gram_inputs(b=37, d=21, k=4)
    tau = torch.tensor(0.1, requires_grad=True)

    def grads():
        for t in (*xs, tau):
            t.grad = None
        loss = fb.gram_loss(*xs, temperature=tau, label_smoothing=0.1, backend="triton")
        vol = fb.gram_volume(*xs, backend="triton")
        (loss + vol.sin().sum()).backward()
        return [t.grad.clone() for t in (*xs, tau)]

    det = grads()
    torch.use_deterministic_algorithms(False)
    atomic = grads()
    for a, b in zip(det, atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
