"""Cross-entropy of a row from its online log-sum-exp statistics without the cancellation of
``lse − positive`` (shared by the InfoNCE and GRAM loss kernels; the C++ twin is
csrc/include/fastbind/saturated_ce.h).

The kernels keep per row the running max of its logits (the positive included), ``off_sum`` =
Σ_{j≠pos} exp(l_j − max) (the positive's own term left out), the positive logit and Σ_j l_j. Then
``lse − pos = log1p(off_sum · exp(max − pos))`` keeps its relative precision for a nearly
saturated row (loss ~1e-4), where ``max + log(1 + tiny) − pos`` in float32 cancels two O(1/τ)
numbers. A very wrong positive (max − pos > 30) takes ``(max − pos) + log(off_sum + exp(pos − max))``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _log1p(u):
    """log(1 + u) to a few ulp for u >= 0 with float32 log: log(v)·u/(v − 1), v = 1 + u (Goldberg's
    trick: the rounding of v cancels); v == 1 means log1p(u) = u to float32 precision."""
    v = 1.0 + u
    denominator = tl.where(v == 1.0, 1.0, v - 1.0)  # no 0/0 in the branch that is not taken
    return tl.where(v == 1.0, u, tl.log(v) * (u / denominator))


@triton.jit
def ce_from_stats(run_max, off_sum, positive, logit_sum, label_smoothing, n):
    """(loss, lse) of rows with a positive: loss = (lse − pos) + ε·(pos − Σ l / n)."""
    gap_to_max = run_max - positive
    near = _log1p(off_sum * tl.exp(tl.minimum(gap_to_max, 30.0)))
    gap = tl.where(gap_to_max < 30.0, near, gap_to_max + tl.log(off_sum + tl.exp(-gap_to_max)))
    return gap + label_smoothing * (positive - logit_sum / n), positive + gap
