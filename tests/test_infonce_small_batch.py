"""Issue 14, CentroBind/InfoNCE on the cpu backend: small batches (split over row slabs, never one
slab per call for B >= 2 units), bf16 inputs keeping bf16 operands in the backward's gradient GEMMs
(dL/dS rounded to bf16), against the float64 reference: forward and every gradient (inputs and the
temperature) at small and awkward batch sizes, NaN in -> NaN out, thread-count determinism."""

import os
import subprocess
import sys

import pytest
import torch
from test_infonce import check_against_reference, inputs

import fastbind as fb
from fastbind.reference import infonce as ref

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.fastbind, "infonce_fwd"), reason="C++ extension not built")

SMALL_B = [1, 2, 3, 17, 64, 255, 257]


def _bf16_gemm():
    """bf16 operands stay bf16 on this machine (the bf16 brgemm microkernel runs here)."""
    return "bf16 brgemm" in torch.ops.fastbind.build_info()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", SMALL_B)
def test_centroid_loss_small_batches(b, dtype):
    """Every gradient (the M modalities and a learnable temperature) against float64, label smoothing
    on; D even so that bf16 runs the bf16 GEMMs."""
    low, high = inputs(3, b, 48, dtype, scale=0.5)
    tau = (torch.tensor(0.1, requires_grad=True), torch.tensor(0.1, dtype=torch.float64, requires_grad=True))
    check_against_reference(
        lambda *z: fb.centroid_loss(*z[:-1], temperature=z[-1], label_smoothing=0.1, backend="cpu"),
        lambda *z: ref.centroid_loss(*z[:-1], temperature=z[-1], label_smoothing=0.1),
        low,
        high,
        dtype,
        tau=tau,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [3, 64, 257])
def test_anchor_and_leave_one_out_small_batches(b, dtype):
    """Per-pair keys (leave-one-out centroids) and the fixed anchor, with an odd number of rows per
    tile (the bf16 VNNI pad row)."""
    low, high = inputs(3, b, 32, dtype, scale=0.5)
    check_against_reference(
        lambda *z: fb.centroid_loss(*z, temperature=0.07, leave_one_out=True, backend="cpu"),
        lambda *z: ref.centroid_loss(*z, temperature=0.07, leave_one_out=True),
        low,
        high,
        dtype,
    )
    check_against_reference(
        lambda *z: fb.anchor_loss(*z, temperature=0.07, backend="cpu"),
        lambda *z: ref.anchor_loss(*z, temperature=0.07),
        low,
        high,
        dtype,
    )


def _op_grads(q, k, tau, eps, offset, gr, gc):
    _, _, row_lse, col_lse = torch.ops.fastbind.infonce_fwd(q, k, tau, eps, offset)
    return torch.ops.fastbind.infonce_bwd(gr, gc, q, k, tau, row_lse, col_lse, eps, offset)


def _reference_dlogits(q, k, tau, eps, offset, gr, gc):
    """float64 dL/dS of the pairs (q [P, B1, D], k [1|P, B2, D]) for upstream gradients gr, gc."""
    keys = k.expand(q.shape[0], -1, -1).double()
    s = (q.double() @ keys.transpose(1, 2)).requires_grad_()
    loss = 0
    for p in range(q.shape[0]):
        logits = s[p] / tau
        b1, b2 = logits.shape
        rows = torch.arange(b1)
        valid = (rows + offset >= 0) & (rows + offset < b2)
        r, c = rows[valid], rows[valid] + offset
        loss = loss + (ref.cross_entropy_rows(logits, r, c, eps) * gr[p].double()).sum()
        loss = loss + (ref.cross_entropy_rows(logits.T, c, r, eps) * gc[p].double()).sum()
    return torch.autograd.grad(loss, s)[0], keys


@pytest.mark.skipif(not _bf16_gemm(), reason="no bf16 microkernel on this CPU: bf16 inputs are upcast")
@pytest.mark.parametrize(
    ("b1", "b2", "shared", "offset"), [(257, 600, True, 3), (300, 1030, False, -5), (5, 7, True, 0)]
)
def test_bf16_backward_gemms_round_dlogits_to_bf16(b1, b2, shared, offset):
    """bf16 inputs: the gradient GEMMs take dL/dS rounded to bf16 (RNE) with the bf16 q and k, fp32
    accumulation. The op's gradients match float64 GEMMs of the bf16-rounded dL/dS to float32 level,
    and are ~2^-9 away from those of the exact dL/dS (the float32 gradient GEMMs of the old path were
    ~1e-7 away from those). Multi-tile shapes: 2 and 3 column blocks, odd tile heights and widths."""
    g = torch.Generator().manual_seed(7)
    p, d = 2, 64
    # |q| = |k| ~ 2: logits within a few units, no single dL/dS element dominates a gradient row
    q = (torch.randn(p, b1, d, generator=g) / 4).bfloat16()
    k = (torch.randn(1 if shared else p, b2, d, generator=g) / 4).bfloat16()
    tau, eps = torch.tensor(0.3), 0.1
    gr, gc = torch.rand(p, b1, generator=g), torch.rand(p, b2, generator=g)
    dq, dk = _op_grads(q, k, tau, eps, offset, gr, gc)
    dlogits, keys = _reference_dlogits(q, k, 0.3, eps, offset, gr, gc)
    rounded = dlogits.float().bfloat16().double()

    def grads(gs):
        gq = gs @ keys
        gk = gs.transpose(1, 2) @ q.double()
        return gq, (gk.sum(0, keepdim=True) if shared else gk)

    for got, want_rounded, want_exact in zip((dq, dk), grads(rounded), grads(dlogits)):
        # relative Frobenius errors: the float32 dL/dS of the kernel rounds the few elements that
        # sit on a bf16 rounding boundary the other way than the float64 one does
        err_rounded = ((got.double() - want_rounded).norm() / want_exact.norm()).item()
        err_exact = ((got.double() - want_exact).norm() / want_exact.norm()).item()
        assert err_rounded < 3e-5, err_rounded
        assert 5e-4 < err_exact < 1e-2, err_exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 3, 64])
def test_nan_in_nan_out_small_batches(b, dtype):
    """One NaN element of one modality: the loss and the gradients are NaN (not silently finite)."""
    zs = [torch.randn(b, 32).to(dtype) for _ in range(3)]
    zs[1][b // 2, 5] = float("nan")
    zs = [z.requires_grad_() for z in zs]
    loss = fb.centroid_loss(*zs, temperature=0.07, backend="cpu")
    assert loss.isnan()
    grads = torch.autograd.grad(loss, zs)
    assert all(gr.isnan().any() for gr in grads)


def check_small_batch_determinism(counts, dtypes):
    """Losses and every gradient equal bit for bit for the thread counts in `counts` (small batches,
    which now run several row slabs)."""
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(5)
    try:
        for dtype in dtypes:
            for b in (64, 100, 257):
                xs = [torch.randn(b, 64, generator=g).to(dtype) for _ in range(3)]
                results = []
                for n in counts:
                    torch.set_num_threads(n)
                    xl = [x.clone().requires_grad_() for x in xs]
                    loss = fb.centroid_loss(*xl, temperature=0.07, label_smoothing=0.1, backend="cpu")
                    results.append((loss.detach(), *torch.autograd.grad(loss, xl)))
                for other in results[1:]:
                    for a, c in zip(results[0], other):
                        assert torch.equal(a, c), (dtype, b, counts)
    finally:
        torch.set_num_threads(threads)


def test_small_batch_thread_count_determinism():
    """1 and 2 threads bitwise equal: bf16 (the brgemm microkernel) in this process; float32 on the
    brgemm path in a subprocess (FASTBIND_CPU_GEMM=brgemm; MKL's sgemm, the default float32 path on
    Intel CPUs, rounds differently outside a parallel region, see csrc/cpu/infonce.cpp), and 2 vs 3
    threads on the default path."""
    check_small_batch_determinism((2, 3), (torch.float32,))
    if _bf16_gemm():
        check_small_batch_determinism((1, 2), (torch.bfloat16,))
    if "avx2" not in open("/proc/cpuinfo").read() or not torch.backends.mkldnn.is_available():
        return
    code = "import test_infonce_small_batch as t, torch; t.check_small_batch_determinism((1, 2), (torch.float32,))"
    env = dict(os.environ, OMP_NUM_THREADS="2", FASTBIND_CPU_GEMM="brgemm")
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
