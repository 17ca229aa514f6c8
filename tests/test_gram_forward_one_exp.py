"""The GRAM loss forward of the cpu kernels with both directions (csrc/cpu/gram.cpp,
gram_loss_forward_cpu): a tile whose column maxima lie within 60 of the tile's max takes one exp
per element for the row and the column sums (one shared column shift); other tiles take two.
Both kinds, and calls that mix them, against the float64 reference (float32 and bf16 inputs).
"""

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64
SHARED_RANGE = 60.0  # kSharedShiftRange in csrc/cpu/gram.cpp


def _inputs(b, d, seed, col_scale):
    """k = 3; sample j's two modalities scaled by col_scale[j] (its volumes by col_scale[j]²)."""
    g = torch.Generator().manual_seed(seed)
    xs = [F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1) for _ in range(3)]
    return [xs[0]] + [x * col_scale[:, None] for x in xs[1:]]


def _column_max_range(xs, tau, rows, cols):
    """max − min over the tile's columns of the column maxima of the logits (the kernel's test)."""
    logits = -ref.gram_volume(xs[0][rows], *(x[cols] for x in xs[1:])) / tau
    col_max = logits.max(0).values
    return (col_max.max() - col_max.min()).item()


def _check(xs, tau, dtype):
    xs = [x.to(dtype).double() for x in xs]  # the reference takes the rounded inputs
    want = ref.gram_loss(*xs, temperature=tau, label_smoothing=0.1, reduction="none")
    got = fb.gram_loss(
        *(x.to(dtype) for x in xs), temperature=tau, label_smoothing=0.1, reduction="none", backend="cpu"
    )
    rel = 2e-5 if dtype == torch.float32 else 2e-4  # float32-level products (tests/test_gram_bf16_cpu.py)
    err, scale = (got.double() - want).abs().max(), want.abs().max()
    assert err <= rel * scale, f"tau={tau} {dtype}: max error {err:.3g} > {rel:g} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_tiles_of_both_kinds_in_one_call(dtype):
    """1100 columns = two column tiles. The first mixes samples of scale 1 and 3 (column maxima ~100
    apart at τ = 0.02: two exps), the second has scale 1 only (one shared shift); at τ = 0.5 both
    tiles share. The premise is checked on the float64 logits of the first row tile (256 rows, bf16;
    the float32 path's 512-row tile contains it)."""
    scale = torch.ones(1100, dtype=F64)
    scale[:1024:2] = 3.0
    xs = _inputs(1100, 32, seed=1, col_scale=scale)
    rows = slice(0, 256)
    assert _column_max_range(xs, 0.02, rows, slice(0, 1024)) > 2 * SHARED_RANGE
    assert _column_max_range(xs, 0.02, rows, slice(1024, 1100)) < SHARED_RANGE / 2
    assert _column_max_range(xs, 0.5, rows, slice(0, 1024)) < SHARED_RANGE / 2
    for tau in (0.02, 0.5):
        _check(xs, tau, dtype)
