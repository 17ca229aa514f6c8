"""Plain-PyTorch reference of the GRAM family (DESIGN §2.1-2.2): the ``torch`` backend and the oracle.

Volumes are computed from explicit k x k Gram matrices and ``torch.linalg.det`` (independent of the
Schur/QR decomposition used by the fused kernels), in the input dtype (float64 for tests). The
release takes ``sqrt(|det|)``; fastbind takes ``sqrt(max(det, 0))``, identical wherever the
determinant is not round-off.

Degenerate inputs: ``sqrt`` has an infinite derivative at 0 and ``det`` back-propagates through
singular matrices, so a zero volume (coincident modalities, zero vectors) would give NaN gradients.
:func:`_safe_sqrt` keeps the forward value exact and gives a zero gradient where ``det`` is at or
below round-off level, and the determinant's gradient is taken only from matrices kept away from
singularity (a ``where`` on the input), so every gradient stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gram_volume", "gram_volume_paired", "gram_loss", "gram_logits"]


def _det_tiny(dtype: torch.dtype) -> float:
    # Scaled determinants (see _safe_sqrt_det) below this are treated as round-off for the gradient
    # (the forward value stays exact).
    return 1e-24 if dtype == torch.float64 else 1e-12


def _safe_sqrt_det(gram: torch.Tensor) -> torch.Tensor:
    """sqrt(max(det(gram), 0)) over the last two dims, with finite gradients at det ~ 0.

    Each matrix is divided by its largest diagonal entry s (a constant for autograd) and the
    result multiplied by s^(k/2) = sqrt(s)^k: the same value, but LU never sees denormal pivots
    (float32 inputs of scale 1e-20 have Gram entries ~1e-40, whose plain det is NaN), and a volume
    below the dtype's range underflows to 0. NaN entries stay NaN (s = 1 keeps them).
    """
    k = gram.shape[-1]
    scale = gram.detach().diagonal(dim1=-2, dim2=-1).amax(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero matrices and NaN: s = 1
    gram = gram / scale[..., None, None]
    tiny = _det_tiny(gram.dtype)
    det_value = torch.linalg.det(gram.detach())
    ok = det_value > tiny
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    # Singular matrices get their determinant from the identity in the differentiable path (the
    # result is masked out below), so det's backward never sees them.
    det = torch.linalg.det(torch.where(ok[..., None, None], gram, eye))
    vol_ok = torch.sqrt(torch.where(ok, det, torch.ones_like(det)))
    return torch.where(ok, vol_ok, torch.sqrt(det_value.clamp(min=0))) * scale.sqrt() ** k


def _upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # 16-bit inputs: Gram entries and determinants in float32 (DESIGN §5; CPU det has no bf16 kernel)
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def gram_volume(anchor: torch.Tensor, *modalities: torch.Tensor) -> torch.Tensor:
    """GRAM volumes [B1, B2]: vol_ij = sqrt(max(det G_ij, 0)), G_ij = Gram of (a_i, m^1_j, ..., m^{k-1}_j).

    anchor [B1, D], each modality [B2, D]. Equals ``volume_computation3/4/5`` of the GRAM release
    (which takes ``abs`` of the determinant) wherever the determinant is not round-off. Computed in
    float32 for 16-bit inputs and returned in the input dtype.
    """
    return _gram_volume_accumulated(anchor, *modalities).to(anchor.dtype)


def _gram_volume_accumulated(anchor: torch.Tensor, *modalities: torch.Tensor) -> torch.Tensor:
    anchor, *modalities = _upcast(anchor, *modalities)
    b1, b2 = anchor.shape[0], modalities[0].shape[0]
    mods = torch.stack(modalities, dim=0)  # [k-1, B2, D]
    aa = (anchor * anchor).sum(-1)  # [B1]
    am = torch.einsum("id,pjd->ijp", anchor, mods)  # [B1, B2, k-1]
    mm = torch.einsum("pjd,qjd->jpq", mods, mods)  # [B2, k-1, k-1]
    k = len(modalities) + 1
    gram = anchor.new_empty(b1, b2, k, k)
    gram[..., 0, 0] = aa[:, None]
    gram[..., 0, 1:] = am
    gram[..., 1:, 0] = am
    gram[..., 1:, 1:] = mm[None]
    return _safe_sqrt_det(gram)


def gram_volume_paired(*modalities: torch.Tensor) -> torch.Tensor:
    """Volume of each sample's own k-tuple [B]: sqrt(max(det(V_b^T V_b), 0)), V_b = [m^1_b ... m^k_b]."""
    mods = torch.stack(_upcast(*modalities), dim=1)  # [B, k, D]
    return _safe_sqrt_det(mods @ mods.transpose(1, 2)).to(modalities[0].dtype)


def gram_logits(anchor, *modalities, temperature=0.07) -> torch.Tensor:
    """logits_ij = -vol_ij / temperature [B1, B2] (float32 for 16-bit inputs)."""
    return -_gram_volume_accumulated(anchor, *modalities) / temperature


def gram_loss(
    anchor: torch.Tensor,
    *modalities: torch.Tensor,
    temperature=0.07,
    label_smoothing: float = 0.0,
    direction: str = "both",
    reduction: str = "mean",
) -> torch.Tensor:
    """GRAM contrastive loss (DESIGN §2.2) with targets on the diagonal (B1 = B2 = B).

    a2d: cross-entropy of each row of logits = -vol/temperature; d2a: of each column; both: their
    mean. ``reduction="none"`` gives the per-row loss [B] (for "both" the mean of row i of each
    direction). A temperature tensor that requires grad gets its gradient.
    """
    logits = gram_logits(anchor, *modalities, temperature=temperature)
    target = torch.arange(logits.shape[0], device=logits.device)
    row = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
    col = F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing, reduction="none")
    per_row = {"a2d": row, "d2a": col, "both": (row + col) / 2}[direction]
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()
