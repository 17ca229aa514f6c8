"""The GRAM loss's one-pass forward in steps of several tile rows (csrc/cpu/gram.cpp,
rows_unshifted_sums, s21fwd): the column operands are loaded once per step of kUnshiftedStep rows,
each row keeps its own sums, the rest of a tile runs one row at a time, and each row slot of a step
leaves its positive out through its own 0/1 factor array.

* tiles whose row count is not a multiple of the step (1, 3, 5, 6, 7 rows; a full row tile and 1, 3
  or 5 more), both directions, float32 and the exact bf16 path, against float64;
* the step's positives across a column-tile border, the border column in every row slot of a step;
* a NaN row gives its own row loss NaN and every column loss NaN, and leaves the other rows of its
  step (and the remainder's) bitwise as without it.
"""

import pytest
import torch
from test_s20fwd_forward import DTYPES, EPS, REL, _check_stats, _unit

# rows of one tile (kRowBlock / kRowBlockBf16 in csrc/cpu/gram.cpp)
TILE_ROWS = {torch.float32: 512, torch.bfloat16: 256}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [1, 3, 5, 6, 7, "tile+1", "tile+3", "tile+5"])
def test_tile_rows_not_a_multiple_of_the_step(dtype, extra):
    """B1 rows with a last tile of 1, 3, 5, 6 or 7 rows (alone, or after a full row tile): both
    directions (B1 = B2, offset 0) and the rows against more columns with an offset."""
    b1 = extra if isinstance(extra, int) else TILE_ROWS[dtype] + int(extra[5:])
    g = torch.Generator().manual_seed(b1)
    anchor = _unit(b1, 16, g, 1)[0]
    mods = _unit(b1, 16, g, 2)
    _check_stats(anchor, mods, 0.1, 0, True, True, dtype, REL[dtype])
    wide = _unit(b1 + 9, 16, g, 2)
    _check_stats(anchor, wide, 0.1, 7, True, False, dtype, REL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1020, 1021, 1022, 1023])
def test_step_positives_across_the_column_tile_border(dtype, offset):
    """77 rows against 1100 columns (column tiles [0, 1024) and [1024, 1100)); row i's positive on
    column i + offset: column 1024 falls on row slot 0 (offset 1020), 3, 2 and 1 of a 4-row step, the
    step's other positives in the tile before."""
    g = torch.Generator().manual_seed(offset)
    anchor = _unit(77, 16, g, 1)[0]
    mods = _unit(1100, 16, g, 2)
    _check_stats(anchor, mods, 0.1, offset, True, False, dtype, REL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_row_stays_in_its_row(dtype):
    """70 rows = 17 steps of 4 and 2 single rows; NaN anchor rows in slots 0, 1, 2, 3 of a step and in
    the remainder (‖a‖² given finite, so the bound admits the one-pass path): exactly those row losses
    and LSE are NaN, every other row's statistics are bitwise those without the NaN rows, and every
    column loss is NaN (each column has the NaN rows)."""
    g = torch.Generator().manual_seed(21)
    anchor, m1, m2 = (x.to(dtype) for x in _unit(70, 16, g, 3))
    basis, span_vol, _, _ = torch.ops.fastbind.gram_basis_fwd([m1, m2])
    a32 = anchor.float()
    asq = (a32 * a32).sum(-1)
    tau = torch.tensor(0.1)
    mods = [m1, m2] if dtype == torch.bfloat16 else None

    def stats(a):
        return torch.ops.fastbind.gram_loss_fwd(a, basis, span_vol, asq, tau, EPS, 0, True, True, mods)

    clean = stats(anchor)
    nan_rows = [8, 13, 18, 23, 69]
    bad = anchor.clone()
    bad[nan_rows, 3] = float("nan")
    row_loss, col_loss, row_lse, _ = stats(bad)
    assert row_loss.isnan().nonzero().flatten().tolist() == nan_rows
    assert row_lse.isnan().nonzero().flatten().tolist() == nan_rows
    assert col_loss.isnan().all()
    keep = torch.ones(70, dtype=torch.bool)
    keep[nan_rows] = False
    assert torch.equal(row_loss[keep], clean[0][keep])
    assert torch.equal(row_lse[keep], clean[2][keep])
    assert torch.isfinite(clean[1]).all()
