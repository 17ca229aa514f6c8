"""The GRAM loss/volume forward of the cpu kernels after stop 20 (csrc/cpu/gram.cpp, s20fwd):

* one pass per tile row where |logit| <= ‖a‖·r/τ <= 60 is known before the GEMMs (unshifted
  statistics, `fast_exp_bounded`, itself checked in tests/cpp/epilogue_check.cpp), the positive left
  out of the exp sums by a 0/1 factor per column; the shifted path above that bound; both against
  float64 with positives at column-tile borders (1024-column tiles), rows and columns that are not
  multiples of the tiles, and diagonal offsets;
* NaN products in the one-pass path give NaN losses where the logit enters;
* the bf16 B operand packed as 32-bit words, and element by element when a modality starts on an odd
  bf16 element (a contiguous view at an odd storage offset);
"""

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64
BF16 = torch.bfloat16
BOUND = 60.0  # kSharedShiftRange in csrc/cpu/gram.cpp
EPS = 0.1
HAS_BF16_KERNEL = "bf16 brgemm" in torch.ops.fastbind.build_info()


def _unit(b, d, g, k):
    return [F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1) for _ in range(k)]


def _ce(logits, pos_cols, eps):
    """Label-smoothed CE of each row of float64 logits, positive of row i at column pos_cols[i];
    and the rows' LSE."""
    lse = torch.logsumexp(logits, dim=1)
    pos = logits[torch.arange(logits.shape[0]), pos_cols]
    return lse - (1 - eps) * pos - eps * logits.mean(1), lse


def _op_stats(anchor, mods, tau, offset, rows, cols, dtype):
    """fastbind::gram_loss_fwd on `dtype` operands (bf16: the modalities passed, the exact form)."""
    a = anchor.to(dtype)
    m = [x.to(dtype) for x in mods]
    basis, span_vol, _, _ = torch.ops.fastbind.gram_basis_fwd(m)
    a32 = a.float()
    out = torch.ops.fastbind.gram_loss_fwd(
        a,
        basis,
        span_vol,
        (a32 * a32).sum(-1),
        torch.tensor(tau),
        EPS,
        offset,
        rows,
        cols,
        m if dtype == BF16 else None,
    )
    return [t.double() for t in out]


def _check_stats(anchor, mods, tau, offset, rows, cols, dtype, rel):
    """Row / column losses and LSE of the op against float64 on the dtype-rounded inputs."""
    a = anchor.to(dtype).double()
    m = [x.to(dtype).double() for x in mods]
    logits = -ref.gram_volume(a, *m) / tau  # [B1, B2]
    b1, b2 = logits.shape
    row_loss, col_loss, row_lse, col_lse = _op_stats(anchor, mods, tau, offset, rows, cols, dtype)
    scale = logits.abs().max()
    if rows:
        want, lse = _ce(logits, torch.arange(b1) + offset, EPS)
        assert (row_loss - want).abs().max() <= rel * scale, (row_loss - want).abs().max()
        assert (row_lse - lse).abs().max() <= rel * scale
    if cols:
        want, lse = _ce(logits.t(), torch.arange(b2) - offset, EPS)
        assert (col_loss - want).abs().max() <= rel * scale, (col_loss - want).abs().max()
        assert (col_lse - lse).abs().max() <= rel * scale
    return logits


DTYPES = [torch.float32] + ([BF16] if HAS_BF16_KERNEL else [])
REL = {torch.float32: 2e-6, BF16: 2e-5}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 983, 1023])
def test_row_positives_across_column_tiles(dtype, offset):
    """77 rows against 1100 columns (a full 1024-column tile and one of 76): positives from column 0,
    across the tile border (rows 41/40 of offset 983 sit on columns 1023/1024) up to the last column
    (offset 1023)."""
    g = torch.Generator().manual_seed(offset)
    anchor = _unit(77, 24, g, 1)[0]
    mods = _unit(1100, 24, g, 2)
    _check_stats(anchor, mods, 0.1, offset, True, False, dtype, REL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, -983, -1023])
def test_column_positives_across_row_tiles(dtype, offset):
    """The transpose: 1100 rows (row tiles of 512 / 256) against 77 columns, column j's positive on
    row j − offset."""
    g = torch.Generator().manual_seed(-offset + 1)
    anchor = _unit(1100, 24, g, 1)[0]
    mods = _unit(77, 24, g, 2)
    _check_stats(anchor, mods, 0.1, offset, False, True, dtype, REL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize("k", [2, 4])
def test_both_directions_at_the_logit_bound(dtype, side, k):
    """τ just below / above max_j r_j / 60 (unit anchors: the one-pass path / the shifted path), so
    that logits reach ≈ −60; 1030 × 1030 (two column tiles), both directions. Both agree with float64."""
    g = torch.Generator().manual_seed(k)
    xs = [x.to(dtype) for x in _unit(1030, 16, g, k)]
    # the kernel's bound: sqrt(max ‖a‖²) · max r_j / τ, from the operands it is given
    span_vol = torch.ops.fastbind.gram_basis_fwd(xs[1:])[1]
    a_max = xs[0].float().pow(2).sum(-1).max().sqrt()
    tau = float(a_max * span_vol.max()) / (BOUND * (0.999 if side == "below" else 1.001))
    logits = _check_stats(xs[0], xs[1:], tau, 0, True, True, dtype, REL[dtype])
    assert logits.min() < -50  # the bounded exp's range is used


def test_full_loss_matches_float64_on_both_paths():
    """gram_loss (fused op, autograd) forward on both sides of the bound, float32."""
    g = torch.Generator().manual_seed(5)
    xs = _unit(300, 32, g, 3)
    for tau in (0.1, 0.01):  # bound 1/τ: 10 (one pass) and 100 (shifted)
        want = ref.gram_loss(*xs, temperature=tau, label_smoothing=EPS)
        got = fb.gram_loss(*(x.float() for x in xs), temperature=tau, label_smoothing=EPS, backend="cpu")
        assert abs(got.double() - want) <= 2e-6 * abs(want) + 1e-6, (tau, got, want)


def test_nan_products_in_the_one_pass_path():
    """A NaN in one sample's basis (span volumes and ‖a‖² finite, so the bound admits the one-pass
    path): every row loss is NaN (each row has that column), column losses NaN exactly there, the
    other columns as without it."""
    g = torch.Generator().manual_seed(3)
    anchor, m1, m2 = (x.float() for x in _unit(70, 16, g, 3))
    basis, span_vol, _, _ = torch.ops.fastbind.gram_basis_fwd([m1, m2])
    asq = (anchor * anchor).sum(-1)
    tau = torch.tensor(0.1)
    clean = torch.ops.fastbind.gram_loss_fwd(anchor, basis, span_vol, asq, tau, EPS, 0, True, True, None)
    bad = basis.clone()
    bad[1, 33, 5] = float("nan")
    row_loss, col_loss, _, _ = torch.ops.fastbind.gram_loss_fwd(
        anchor, bad, span_vol, asq, tau, EPS, 0, True, True, None
    )
    assert row_loss.isnan().all()
    assert col_loss.isnan().nonzero().flatten().tolist() == [33]
    keep = torch.arange(70) != 33
    assert torch.equal(col_loss[keep], clean[1][keep])


@pytest.mark.skipif(not HAS_BF16_KERNEL, reason="no bf16 microkernel")
def test_modalities_at_an_odd_bf16_offset():
    """Modalities that are contiguous views starting on an odd bf16 element (their word pairs are not
    32-bit aligned: packed element by element) give the same volumes and losses as aligned copies, and
    match float64."""
    g = torch.Generator().manual_seed(11)
    b, d = 300, 40
    anchor, m1, m2 = (x.to(BF16) for x in _unit(b, d, g, 3))
    odd = []
    for m in (m1, m2):
        buf = torch.empty(b * d + 1, dtype=BF16)
        view = buf[1:].view(b, d)
        view.copy_(m)
        assert view.is_contiguous() and view.data_ptr() % 4 == 2
        odd.append(view)
    basis = torch.ops.fastbind.gram_basis_fwd([m1, m2])[0]
    assert torch.ops.fastbind.gram_product_form(anchor, basis, odd) == "exact"
    want = fb.gram_volume(anchor, m1, m2, backend="cpu")
    got = fb.gram_volume(anchor, *odd, backend="cpu")
    assert torch.equal(got, want)
    loss = fb.gram_loss(anchor, *odd, label_smoothing=EPS, backend="cpu")
    assert torch.equal(loss, fb.gram_loss(anchor, m1, m2, label_smoothing=EPS, backend="cpu"))
    ref_vol = ref.gram_volume(anchor.double(), m1.double(), m2.double())
    assert got.dtype == BF16  # the volumes are returned in the inputs' dtype: bf16 rounding
    assert (got.double() - ref_vol).abs().max() <= 2**-8 * ref_vol.abs().max()
