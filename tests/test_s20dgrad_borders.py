"""The bf16 gradient GEMMs of the cpu GRAM backward (csrc/cpu/gram.cpp, bf16_gradient_gemms) across
their tile borders, against the float64 reference (issue 14).

Backward tiles on the bf16 path are 256 rows x 1024 columns; the dA GEMM runs in depth-256
microkernel calls over a tile's columns (kDaDepth), the dQ GEMM over the tile's rows in VNNI pairs
with a rank-1 update for an odd last row. B = 1025 gives four full row tiles and a one-row tile (no
pair at all: only the rank-1 update), a full column tile (four depth calls) and a one-column tile
(depth padded to 2). The volume at 513 x 1025 has an odd one-row last tile after two full ones.
D = 16 keeps the float64 reference cheap (D even: the bf16 kernels, where the CPU has them); at
D = 6 the anchor gradient's cancellation alone takes the bf16 rounding of dL/dP past 2 ulps of its
largest value (measured ~1-3%, on one tile as on many), so it cannot tell a tiling bug from rounding.
Checks and tolerances of tests/test_gram_bf16_cpu.py (gradients: 2 bf16 ulps of the largest
reference value).
"""

import pytest
from test_gram_bf16_cpu import _check_loss, _check_volume, _inputs  # the bf16 acceptance checks


@pytest.mark.parametrize("k", [2, 3])
def test_bf16_loss_gradients_across_tile_borders(k):
    anchor, mods = _inputs(1025, 1025, 16, k, seed=20 + k)
    _check_loss(anchor, mods, f"k={k} B=1025")


def test_bf16_volume_gradients_across_tile_borders():
    anchor, mods = _inputs(513, 1025, 16, 3, seed=7)
    _check_volume(anchor, mods, "513x1025")
