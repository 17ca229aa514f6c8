"""Reference (plain PyTorch) anchored InfoNCE family: CLIP, ImageBind-style fixed anchor, CentroBind.

Follows DESIGN §2.3 literally and is the ``torch`` backend and the oracle of the tests. Works in any
floating dtype (float64 for the tests); everything is differentiable by autograd, the temperature
included when it is a tensor that requires grad. It materialises the [B1, B2] logits of each pair:
fine for an oracle, which is exactly what the fused kernels avoid.

Conventions shared with the fused op (``fastbind/ops/infonce.py``):

* logits S = x·yᵀ / τ, [B1, B2]; the positive of row i is column i + diag_offset (0 for one
  process; the gathered multi-process path uses offsets). A row (column) without a positive
  in range keeps only the label-smoothing part of its target.
* row cross-entropy (direction ``"a2d"``) of row i over the B2 columns, with label smoothing ε:
  CE_i = lse_j S_ij − (1−ε)·S_i,i+off − (ε/B2)·Σ_j S_ij; column cross-entropy (``"d2a"``) likewise
  over the B1 rows of column j; ``"both"`` is the mean of the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "anchor_loss",
    "centroid",
    "centroid_loss",
    "centroid_similarity",
    "cross_entropy_rows",
    "infonce",
    "infonce_rows_cols",
]


def _inv_temperature(temperature, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(temperature, torch.Tensor):
        return 1.0 / temperature.to(device=like.device, dtype=like.dtype)
    return 1.0 / float(temperature)


def cross_entropy_rows(
    logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Label-smoothed cross-entropy of every row of ``logits`` [b1, b2]; row ``rows[k]`` has its
    positive at column ``cols[k]``, the other rows have none (smoothing part only) -> [b1].

    A row with a positive is computed as softplus(logsumexp_{j≠pos}(l_j − l_pos)) + ε·(l_pos − mean l),
    which equals lse − (1−ε)·l_pos − ε·mean l but keeps its relative precision for a nearly
    saturated row (loss ~1e-4), where lse − l_pos cancels two O(1/τ) numbers (the fused kernels do
    the same: csrc/include/fastbind/saturated_ce.h).
    """
    b2 = logits.shape[1]
    eps = float(label_smoothing)
    loss = torch.logsumexp(logits, dim=1) - (eps / b2) * logits.sum(dim=1)
    if rows.numel() == 0:
        return loss
    mine = logits[rows]
    positive = mine[torch.arange(rows.numel(), device=logits.device), cols]
    if b2 > 1:
        is_pos = torch.zeros_like(mine, dtype=torch.bool)
        is_pos[torch.arange(rows.numel(), device=logits.device), cols] = True
        others = (mine - positive[:, None]).masked_fill(is_pos, float("-inf"))
        gap = torch.nn.functional.softplus(torch.logsumexp(others, dim=1))
    else:  # the positive alone: lse = positive
        gap = torch.zeros_like(positive)
    return loss.index_put((rows,), gap + eps * (positive - mine.sum(dim=1) / b2))


def infonce_rows_cols(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature=0.07,
    label_smoothing: float = 0.0,
    diag_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row and per-column cross-entropies of the logits x·yᵀ/τ.

    x [B1, D], y [B2, D] -> (row_loss [B1], col_loss [B2]) in the inputs' dtype.
    """
    logits = (x @ y.T) * _inv_temperature(temperature, x)
    b1, b2 = logits.shape
    eps = float(label_smoothing)
    rows = torch.arange(b1, device=x.device)
    cols = rows + diag_offset
    valid = (cols >= 0) & (cols < b2)
    rows, cols = rows[valid], cols[valid]
    return cross_entropy_rows(logits, rows, cols, eps), cross_entropy_rows(logits.T, cols, rows, eps)


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def infonce(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature=0.07,
    label_smoothing: float = 0.0,
    direction: str = "both",
    reduction: str = "mean",
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE of paired batches x [B, D] and y [B, D] (positives on the diagonal).

    Equals open_clip's ``ClipLoss`` with ``logit_scale = 1/τ`` for one process and
    ``label_smoothing = 0``. ``direction``: "a2d" (rows x rank the columns y), "d2a" (columns rank
    the rows), "both" (mean). ``reduction``: "mean", "sum", or "none" -> [B] (for "both", the mean
    of row i of each direction).
    """
    row_loss, col_loss = infonce_rows_cols(x, y, temperature, label_smoothing)
    if direction == "a2d":
        per_row = row_loss
    elif direction == "d2a":
        per_row = col_loss
    else:
        per_row = 0.5 * (row_loss + col_loss)
    return _reduce(per_row, reduction)


def anchor_loss(anchor: torch.Tensor, *modalities: torch.Tensor, temperature=0.07, label_smoothing: float = 0.0):
    """ImageBind-style fixed anchor: Σ_m infonce(modality_m, anchor) (symmetric, mean over rows)."""
    return sum(infonce(z, anchor, temperature, label_smoothing) for z in modalities)


def _weights(m: int, weights, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
    return torch.as_tensor(weights).to(dtype=like.dtype, device=like.device)


def centroid(
    modalities: Sequence[torch.Tensor],
    weights=None,
    normalize_anchor: bool = False,
    detach_anchor: bool = False,
    leave_one_out: bool = False,
) -> list[torch.Tensor]:
    """The CentroBind anchors, one [B, D] tensor per modality (the same tensor M times unless LOO).

    c_b = Σ_m w_m z^m_b (w_m = 1/M unless ``weights``; weights are used as given, as in DESIGN §2.3);
    ``leave_one_out``: c^(m)_b = Σ_{n≠m} w_n z^n_b / Σ_{n≠m} w_n. Optionally L2-normalised per row,
    optionally detached (no gradient through the anchor).
    """
    stacked = torch.stack(list(modalities))  # [M, B, D]
    m = stacked.shape[0]
    w = _weights(m, weights, stacked)
    weighted = stacked * w[:, None, None]
    if leave_one_out:
        total = weighted.sum(0)
        anchors = [(total - weighted[i]) / (w.sum() - w[i]) for i in range(m)]
    else:
        anchors = [weighted.sum(0)] * m
    if normalize_anchor:
        anchors = [torch.nn.functional.normalize(a, dim=-1) for a in anchors]
    if detach_anchor:
        anchors = [a.detach() for a in anchors]
    return anchors


def centroid_loss(
    *modalities: torch.Tensor,
    temperature=0.07,
    label_smoothing: float = 0.0,
    weights=None,
    normalize_anchor: bool = False,
    detach_anchor: bool = False,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """CentroBind: Σ_m symmetric InfoNCE(z^m, c^(m)) with the centroid anchor(s) of :func:`centroid`."""
    anchors = centroid(modalities, weights, normalize_anchor, detach_anchor, leave_one_out)
    return sum(infonce(z, c, temperature, label_smoothing) for z, c in zip(modalities, anchors))


def centroid_similarity(*modalities: torch.Tensor, normalize_anchor: bool = False) -> torch.Tensor:
    """Retrieval scores against the (un-weighted mean) centroid: [M, B, B], S[m, i, j] = <z^m_i, c_j>."""
    c = centroid(modalities, normalize_anchor=normalize_anchor)[0]
    return torch.stack([z @ c.T for z in modalities])
