"""The bf16 product tiles of the cpu GRAM kernels (s20gemm, issue 14) against the float64 reference.

On the bf16 path the product GEMMs write their float32 tiles with padded rows (row stride
nc + kProductPadBf16, csrc/cpu/gram.cpp) in microkernel calls of 32 rows (kMicroMBf16,
csrc/include/fastbind/tiled.h); every epilogue (volumes, the loss forward's one-pass and shifted
forms, the backward's recompute) reads the products at that stride. Shapes here put a partial
32-row strip at the end of a row tile (B1 = 300: tiles of 256 + 44 rows) and a partial last column
tile (B2 = 1100 = 1024 + 76 columns), so a wrong row stride or strip offset anywhere shows as wrong
values. Tolerances as tests/test_gram_bf16_cpu.py: forward 2e-4 of the largest reference magnitude
(float32 level), gradients 2 bf16 ulps; references on the bf16-rounded inputs.
"""

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64
BF16 = torch.bfloat16
FWD_TOL = 2e-4
GRAD_TOL = 2 * torch.finfo(BF16).eps

pytestmark = pytest.mark.skipif("cpu" not in fb.backends(), reason="C++ extension not built")


def _assert_close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, what
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def _unit_rows(b, d, g, tilt=None):
    x = torch.randn(b, d, generator=g, dtype=F64)
    if tilt is not None:  # nearly parallel to `tilt`: the split (hi + lo) product form
        x = tilt.to(F64) + 0.02 * x
    return F.normalize(x, dim=-1).to(BF16)


def _leaves(xs, dtype):
    return [x.detach().to(dtype).clone().requires_grad_(True) for x in xs]


# tau = 0.1: the one-pass unshifted forward; tau = 0.01 (|logit| up to 100): the shifted two-pass form
@pytest.mark.parametrize(
    ("parallel", "tau"), [(False, 0.1), (True, 0.1), (False, 0.01)], ids=["exact", "split", "shifted"]
)
def test_bf16_loss_partial_strips_and_tiles(parallel, tau):
    g = torch.Generator().manual_seed(20)
    b, d = 1100, 64
    anchor = _unit_rows(b, d, g)
    first = _unit_rows(b, d, g)
    mods = [first, _unit_rows(b, d, g, tilt=first if parallel else None)]
    basis = torch.ops.fastbind.gram_basis_fwd(mods)[0]
    form = torch.ops.fastbind.gram_product_form(anchor, basis, mods)
    bf16_kernel = "bf16 brgemm" in torch.ops.fastbind.build_info()  # else the float32 path
    assert form == (("split" if parallel else "exact") if bf16_kernel else "float32")
    x64 = _leaves([anchor, *mods], F64)
    x16 = _leaves([anchor, *mods], BF16)
    t64 = torch.tensor(tau, dtype=F64, requires_grad=True)
    t32 = torch.tensor(tau, requires_grad=True)
    want = ref.gram_loss(*x64, temperature=t64, label_smoothing=0.1)
    got = fb.gram_loss(*x16, temperature=t32, label_smoothing=0.1, backend="cpu")
    _assert_close(got, want, FWD_TOL, "loss")
    g_want = torch.autograd.grad(want, [*x64, t64])
    g_got = torch.autograd.grad(got, [*x16, t32])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _assert_close(x, y, GRAD_TOL, f"grad {i}")


def test_bf16_volume_partial_strips_and_tiles():
    g = torch.Generator().manual_seed(21)
    d = 32
    anchor = _unit_rows(300, d, g)
    mods = [_unit_rows(1100, d, g) for _ in range(3)]
    x64 = _leaves([anchor, *mods], F64)
    x16 = _leaves([anchor, *mods], BF16)
    want = ref.gram_volume(*x64)
    got = fb.gram_volume(*x16, backend="cpu")
    _assert_close(got, want, FWD_TOL + torch.finfo(BF16).eps, "volume")  # + the bf16 output rounding
    w = torch.randn(want.shape, dtype=F64, generator=g)
    g_want = torch.autograd.grad((want * w).sum(), x64)
    g_got = torch.autograd.grad((got.double() * w).sum(), x16)
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _assert_close(x, y, GRAD_TOL, f"volume grad {i}")
