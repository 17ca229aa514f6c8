"""The exact-operand bf16 products of the cpu GRAM kernels (csrc/cpu/gram.cpp, issue 14).

For bfloat16 inputs the GRAM ops also take the modalities (``modalities=`` operand of
``gram_volume_fwd/_bwd`` and ``gram_loss_fwd/_bwd``): the kernels then run one depth-D bf16 GEMM per
modality, S_s = A·M_sᵀ (exact bf16 operands, fp32 accumulation), and form the products
P_r = A·Q_rᵀ = Σ_{s<=r} C_rs,j·S_s in the epilogue, C_j = R_j⁻¹ from the Gram–Schmidt of sample j.
Where a sample's coefficients amplify the accumulation error beyond the split path's (nearly
dependent modalities), or the modalities are not those of the basis, the whole call takes the
split path (the depth-2D GEMM against hi + lo parts of the basis). ``fastbind::gram_product_form``
says which form a call takes.

Reference: float64 on the rounded inputs; tolerances as tests/test_gram_bf16_cpu.py (forward at
float32 level, gradients 2 bf16 ulps of the largest reference value).
"""

import pytest
import torch
from test_gram_bf16_cpu import _bf16, _check_loss, _check_volume, _close, _inputs, _leaves  # the bf16 acceptance checks

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64
BF16 = torch.bfloat16

pytestmark = pytest.mark.skipif(
    "bf16 brgemm" not in torch.ops.fastbind.build_info(),
    reason="no bf16 microkernel: bf16 inputs take the float32 path",
)


def _operands(anchor, mods):
    basis, span_vol, _, _ = torch.ops.fastbind.gram_basis_fwd(mods)
    a32 = anchor.float()
    return anchor, basis, span_vol, (a32 * a32).sum(-1)


def _form(anchor, mods):
    return torch.ops.fastbind.gram_product_form(anchor, _operands(anchor, mods)[1], mods)


def _check_all(anchor, mods, what):
    """Volume and (square batches) loss, forward and every gradient, at the tolerances of
    tests/test_gram_bf16_cpu.py."""
    _check_volume(anchor, mods, what)
    if anchor.shape[0] == mods[0].shape[0]:
        _check_loss(anchor, mods, what)


@pytest.mark.parametrize(
    ("b1", "b2", "d", "k"),
    [
        (515, 515, 64, 2),
        (37, 37, 32, 3),
        (7, 1101, 48, 4),
        (33, 1025, 16, 5),
        (130, 130, 24, 6),
        (1, 3, 16, 7),
        (66, 66, 40, 8),
    ],
)
def test_exact_products_against_float64(b1, b2, d, k):
    """k = 2..8 on awkward shapes (odd row tiles, 1101 = 1024 + 77 columns, a one-column last tile,
    tiny shapes): the exact form is taken, and volume, loss and every gradient match float64."""
    anchor, mods = _inputs(b1, b2, d, k, seed=b1 + k)
    assert _form(anchor, mods) == "exact"
    _check_all(anchor, mods, f"{b1}x{b2}x{d} k={k}")


def test_exact_products_match_the_basis_form():
    """The op is a function of the basis: with and without the modalities operand the volumes agree
    to float32 level (the split path is the float32-level form of the same products)."""
    anchor, mods = _inputs(70, 1030, 64, 4, seed=3)
    ops = _operands(anchor, mods)
    with_mods = torch.ops.fastbind.gram_volume_fwd(*ops, mods)
    without = torch.ops.fastbind.gram_volume_fwd(*ops)
    _close(with_mods, without, 2e-5, "exact vs split volumes")
    want = ref.gram_volume(anchor.double(), *(m.double() for m in mods))
    _close(with_mods, want, 2e-5, "exact volumes vs float64")


def test_exact_products_are_more_accurate_on_near_flat_volumes():
    """Anchors within ~0.05 of a sample's span (vol from ‖a‖² − Σ p² with cancellation): the exact
    operands give the small volumes to ~3e-4 of their largest value (the float32 basis itself is the
    limit), the split basis to ~1e-3."""
    g = torch.Generator().manual_seed(21)
    mods = [_bf16(2, 64, g) for _ in range(2)]
    coef = torch.randn(40, 2, generator=g, dtype=F64)
    near = coef[:, :1] * mods[0][:1].double() + coef[:, 1:] * mods[1][:1].double()
    anchor = (near + 0.05 * torch.randn(40, 64, generator=g, dtype=F64) / 8).to(BF16)
    assert _form(anchor, mods) == "exact"
    vol64 = ref.gram_volume(anchor.double(), *(m.double() for m in mods))
    want = vol64[:, 0]
    assert want.max() < 0.2 * vol64[:, 1].max()  # near-flat against the other sample
    ops = _operands(anchor, mods)
    exact = torch.ops.fastbind.gram_volume_fwd(*ops, mods)[:, 0]
    split = torch.ops.fastbind.gram_volume_fwd(*ops)[:, 0]
    _close(exact, want, 6e-4, "near-flat volume, exact products")
    assert (exact.double() - want).abs().max() < 0.5 * (split.double() - want).abs().max()


@pytest.mark.parametrize("k", [3, 5])
def test_nearly_dependent_modalities_take_the_split_path(k):
    """Modality 2 = modality 1 + a 1e-2 perturbation: C_j is large (cond(R_j) ~ 100), the exact
    form's error estimate exceeds the split path's, so the call falls back; results stay at tolerance."""
    g = torch.Generator().manual_seed(11)
    anchor = _bf16(41, 64, g)
    m1 = _bf16(41, 64, g)
    near = (m1.double() + 1e-2 * _bf16(41, 64, g).double()).to(BF16)
    mods = [m1, near] + [_bf16(41, 64, g) for _ in range(k - 3)]
    assert _form(anchor, mods) == "split"
    _check_all(anchor, mods, f"near-dependent k={k}")
    # one nearly dependent sample among well-conditioned ones is enough: the whole call falls back
    anchor, good = _inputs(41, 41, 64, 3, seed=2)
    assert _form(anchor, good) == "exact"
    good[1][17] = (good[0][17].double() + 1e-3 * good[1][17].double()).to(BF16)
    assert _form(anchor, good) == "split"


def test_degenerate_and_foreign_modalities_take_the_split_path():
    """A zero modality (r_j = 0: a zero pivot), exactly dependent modalities, and modalities that are
    not those of the basis all fall back; the results are those of the basis (the op's meaning)."""
    anchor, mods = _inputs(20, 30, 32, 3, seed=4)
    zero = [mods[0], mods[1].clone()]
    zero[1][5] = 0
    assert _form(anchor, zero) == "split"
    dup = [mods[0], mods[0].clone()]
    assert _form(anchor, dup) == "split"
    ops = _operands(anchor, mods)
    _, others = _inputs(20, 30, 32, 3, seed=5)
    assert torch.ops.fastbind.gram_product_form(anchor, ops[1], others) == "split"
    assert torch.equal(torch.ops.fastbind.gram_volume_fwd(*ops, others), torch.ops.fastbind.gram_volume_fwd(*ops))


def test_other_dtypes_ignore_the_modalities():
    """float32 anchors keep the float32 path; bf16 anchors with float32 modalities the split one."""
    anchor, mods = _inputs(9, 12, 16, 3, seed=6)
    basis = _operands(anchor, mods)[1]
    assert torch.ops.fastbind.gram_product_form(anchor.float(), basis, mods) == "float32"
    assert torch.ops.fastbind.gram_product_form(anchor, basis, [m.float() for m in mods]) == "split"
    assert torch.ops.fastbind.gram_product_form(anchor, basis) == "split"


def test_bad_modalities_operand_raises():
    anchor, mods = _inputs(9, 12, 16, 3, seed=7)
    ops = _operands(anchor, mods)
    with pytest.raises(RuntimeError, match="modalities given for a basis of 2"):
        torch.ops.fastbind.gram_volume_fwd(*ops, mods[:1])
    with pytest.raises(RuntimeError, match="modalities must be"):
        torch.ops.fastbind.gram_volume_fwd(*ops, [mods[0], mods[1][:5]])


def test_nan_in_nan_out():
    """A NaN modality entry: its sample's coefficients are NaN, the call falls back, the NaN column
    stays NaN; a NaN anchor row on the exact path gives a NaN row, and NaN loss gradients."""
    anchor, mods = _inputs(9, 600, 32, 3, seed=3)
    nan_mod = [mods[0], mods[1].clone()]
    nan_mod[1][511, 0] = float("nan")
    assert _form(anchor, nan_mod) == "split"
    vol = fb.gram_volume(anchor, *nan_mod, backend="cpu").float()
    assert vol[:, 511].isnan().all() and not vol[:, :511].isnan().any()
    bad = anchor.clone()
    bad[4, 7] = float("nan")
    assert _form(bad, mods) == "exact"
    vol = fb.gram_volume(bad, *mods, backend="cpu").float()
    assert vol[4].isnan().all() and not vol[torch.arange(9) != 4].isnan().any()
    a, *ms = _leaves(bad[:9], [m[:9] for m in mods], BF16)
    loss = fb.gram_loss(a, *ms, temperature=0.1, backend="cpu")
    assert loss.isnan()
    assert all(gr.isnan().any() for gr in torch.autograd.grad(loss, [a, *ms]))


def test_opcheck_with_modalities():
    """The fake kernels and autograd registrations take the modalities operand (volume: the Python
    autograd of the VOLUME table; loss: B1 = B2 for the positives)."""
    anchor, mods = _inputs(7, 7, 16, 3, seed=8)
    anchor_, basis, span_vol, a_sq = _operands(anchor, mods)
    torch.library.opcheck(torch.ops.fastbind.gram_volume_fwd.default, (anchor_, basis, span_vol, a_sq, mods))
    grad = torch.randn(7, 7)
    torch.library.opcheck(torch.ops.fastbind.gram_volume_bwd.default, (grad, anchor_, basis, span_vol, a_sq, mods))
    tau = torch.tensor(0.1)
    flags = (0.1, 0, True, True)
    torch.library.opcheck(torch.ops.fastbind.gram_loss_fwd.default, (anchor_, basis, span_vol, a_sq, tau, *flags, mods))
    row_loss, col_loss, row_lse, col_lse = torch.ops.fastbind.gram_loss_fwd(
        anchor_, basis, span_vol, a_sq, tau, *flags, mods
    )
    g = torch.ones(7)
    bwd_args = (g, g, anchor_, basis, span_vol, a_sq, tau, row_lse, col_lse, *flags, mods)
    torch.library.opcheck(torch.ops.fastbind.gram_loss_bwd.default, bwd_args)
