"""Anchored InfoNCE family (DESIGN §2.3): CLIP ``infonce``, ImageBind-style ``anchor_loss``,
CentroBind ``centroid_loss`` and ``centroid_similarity``.

Every loss is a sum over P (query, key) pairs of [B, D] matrices of symmetric InfoNCE, computed by
ONE fused custom op per backend for all pairs in one launch:

* ``fastbind::infonce_fwd`` (C++, csrc/cpu/infonce.cpp) / ``fastbind::infonce_fwd_triton``
  (fastbind/triton/infonce.py): q [P, B1, D], k [1 or P, B2, D] (one key matrix shared by all pairs,
  e.g. the centroid, or one per pair) -> per-row and per-column cross-entropies [P, B1], [P, B2]
  plus the row/column log-sum-exp [P, B1], [P, B2] it saves for the backward. Online LSE over
  GEMM tiles: nothing of size B1 × B2 is kept.
* ``fastbind::infonce_bwd`` / ``fastbind::infonce_bwd_triton``: recompute the tiles and return the
  float32 gradients of q and k for any upstream gradients of the row and column losses (so the
  reductions, directions and pair weights are plain O(P·B) torch code around the op).

The centroid (weights, normalisation, detach, leave-one-out) is O(M·B·D) torch code with autograd.
With ``gather=True`` each process computes its rows against the gathered columns (a2d) and its
columns against the gathered rows (d2a), with a diagonal offset, and returns the DDP-convention loss
(:mod:`fastbind.distributed`): W times its share, so that the mean over the W processes is the
single-process loss on the concatenated batch and DDP's gradient averaging is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fastbind._backend import extension_loaded, resolve, triton_installed
from fastbind.ops._checks import (
    check_label_smoothing,
    check_loss_args,
    check_modalities,
    check_no_functorch,
    check_temperature,
    data_checks_possible,
    shape_str,
    temperature_tensor,
)
from fastbind.ops._loss import per_row, reduce
from fastbind.ops._registry import (
    AS_GIVEN,
    FUSED_DTYPES,
    Kernels,
    OpTable,
    check_dtype,
    check_shape,
    declare,
    make_first_order_backward,
    register_built,
)
from fastbind.reference import infonce as torch_backend  # the "torch" backend (DESIGN §4)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["anchor_loss", "centroid_loss", "centroid_similarity", "infonce"]

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# custom ops: the kernel table (fake kernels, autograd, one row per fused backend)
# ---------------------------------------------------------------------------------------------
def _check_pairs(op: str, q, k, temperature) -> None:
    """The operand contract of the InfoNCE ops, for the fake kernels (shapes and dtypes)."""
    torch._check(q.dim() == 3, lambda: f"{op}: q has shape {shape_str(q)}, expected [P, B1, D]")
    p, _, d = q.shape
    torch._check(
        k.dim() == 3 and k.shape[0] in (1, p) and k.shape[2] == d,
        lambda: f"{op}: k has shape {shape_str(k)}, expected [1 or {p}, B2, {d}]",
    )
    check_dtype(op, "q", q, FUSED_DTYPES)
    check_dtype(op, "k", k, FUSED_DTYPES)
    check_shape(op, "temperature", temperature, ())


def _fwd_fake(q, k, temperature, label_smoothing, diag_offset):
    _check_pairs("infonce_fwd", q, k, temperature)
    p, b1, _ = q.shape
    b2 = k.shape[1]
    return tuple(q.new_empty(shape, dtype=torch.float32) for shape in ((p, b1), (p, b2), (p, b1), (p, b2)))


def _bwd_fake(grad_row_loss, grad_col_loss, q, k, temperature, row_lse, col_lse, label_smoothing, diag_offset):
    _check_pairs("infonce_bwd", q, k, temperature)
    p, b1, _ = q.shape
    b2 = k.shape[1]
    stats = (("grad_row_loss", grad_row_loss, b1), ("grad_col_loss", grad_col_loss, b2))
    for name, t, n in (*stats, ("row_lse", row_lse, b1), ("col_lse", col_lse, b2)):
        check_shape("infonce_bwd", name, t, (p, n))
    return q.new_empty(q.shape, dtype=torch.float32), k.new_empty(k.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, temperature, label_smoothing, diag_offset = inputs
    _, _, row_lse, col_lse = output
    ctx.save_for_backward(q, k, temperature, row_lse, col_lse)
    ctx.label_smoothing = label_smoothing
    ctx.diag_offset = diag_offset


def _backward(ctx, bwd_op, grad_row_loss, grad_col_loss, _grad_row_lse, _grad_col_lse):
    # the LSE outputs are saved statistics; only the two losses are differentiated
    q, k, temperature, row_lse, col_lse = ctx.saved_tensors
    grad_row_loss = torch.zeros_like(row_lse) if grad_row_loss is None else grad_row_loss
    grad_col_loss = torch.zeros_like(col_lse) if grad_col_loss is None else grad_col_loss
    grad_q, grad_k = bwd_op(
        grad_row_loss, grad_col_loss, q, k, temperature, row_lse, col_lse, ctx.label_smoothing, ctx.diag_offset
    )
    grad_t = None
    if ctx.needs_input_grad[2]:
        # logits = S/τ, so dL/dτ = -(1/τ)·Σ_ij dL/dlogit_ij·logit_ij = -(1/τ)·<q, dL/dq>
        # (summed in float64: the terms cancel, and the sum runs over P·B·D products), one pair at a
        # time: float64 copies of all of q and dL/dq would be 4x the float32 gradient (peak memory)
        dot = sum(torch.dot(qp.reshape(-1).double(), gp.reshape(-1).double()) for qp, gp in zip(q, grad_q))
        grad_t = (-dot / temperature.double()).to(temperature.dtype)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_t, None, None


INFONCE = declare(OpTable("infonce", _fwd_fake, _bwd_fake, _setup_context, make_first_order_backward(_backward)))
# Every backend takes float32, float16 and bfloat16 queries and keys as they are (16-bit GEMM
# operands; the CUDA launcher converts k to q's dtype, which the public losses give both).
INFONCE.add("cuda", Kernels("fastbind::infonce_fwd", "fastbind::infonce_bwd", AS_GIVEN))
INFONCE.add("cpu", Kernels("fastbind::infonce_fwd", "fastbind::infonce_bwd", AS_GIVEN))
INFONCE.add("triton", Kernels("fastbind::infonce_fwd_triton", "fastbind::infonce_bwd_triton", AS_GIVEN))

extension_loaded()  # imports fastbind._C, which defines the C++ ops (when built)
if triton_installed():
    import fastbind.triton.infonce  # noqa: F401  (defines the fastbind::infonce_*_triton ops)
register_built(INFONCE)


# ---------------------------------------------------------------------------------------------
# pair losses: the one place every public loss goes through
# ---------------------------------------------------------------------------------------------
def _rows_cols(backend, q, k, temperature, label_smoothing, diag_offset):
    """Per-row / per-column cross-entropies of the pairs (q [P, B1, D], k [1|P, B2, D]): [P, B1], [P, B2]."""
    if backend == "torch":
        if q.dtype in _HALF:  # float32 accumulation, like the fused kernels (DESIGN §5)
            q, k = q.float(), k.float()
        keys = [k[0]] * q.shape[0] if k.shape[0] == 1 else list(k)
        rows_cols = torch_backend.infonce_rows_cols
        pairs = [rows_cols(qp, kp, temperature, label_smoothing, diag_offset) for qp, kp in zip(q, keys)]
        return torch.stack([r for r, _ in pairs]), torch.stack([c for _, c in pairs])
    operands = INFONCE.rows[backend].operands
    q, k = q.to(operands.lhs_dtype(q.dtype)), k.to(operands.rhs_dtype(k.dtype))
    temp = temperature_tensor(temperature, q)
    row_loss, col_loss, _, _ = INFONCE.forward_op(backend)(q, k, temp, float(label_smoothing), int(diag_offset))
    return row_loss, col_loss


def _gather(x: torch.Tensor, group):
    from fastbind.distributed import gather_with_grad

    return gather_with_grad(x, group=group)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n, B, D] from n tensors [B, D]: a view for n = 1 (a copy would be kept for the backward)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def _directional_losses(backend, q, k, temperature, label_smoothing, gather, group):
    """(row_loss [P, b], col_loss [P, b], global batch size, DDP scale) for the pairs (q[p], k[p or 0]),
    q [P, b, D] and k [1 or P, b, D].

    Without gather b = B and the scale is 1. With gather, rows are this process's queries against all
    processes' keys and columns this process's keys against all processes' queries, and the scale is
    the world size W (the DDP convention: W·sum_local/B averages over ranks to the global mean).
    """
    if not gather:
        row_loss, col_loss = _rows_cols(backend, q, k, temperature, label_smoothing, 0)
        return row_loss, col_loss, q.shape[1], 1
    from fastbind import distributed as dist_utils

    # gather along the batch dimension ([b, P, D] per process), keep the autograd path of every rank
    q_all, offset = _gather(q.transpose(0, 1).contiguous(), group)
    k_all, _ = _gather(k.transpose(0, 1).contiguous(), group)
    q_all, k_all = q_all.transpose(0, 1), k_all.transpose(0, 1)
    # local row i is global row i + offset: its positive is global column i + offset
    row_loss, _ = _rows_cols(backend, q, k_all, temperature, label_smoothing, offset)
    # local column j pairs with global row j + offset, i.e. column j's positive row is j - (-offset)
    _, col_loss = _rows_cols(backend, q_all, k, temperature, label_smoothing, -offset)
    return row_loss, col_loss, q_all.shape[1], dist_utils.ddp_scale(group)


def _symmetric_sum(row_loss, col_loss, batch, scale):
    """Σ over pairs of the symmetric mean-reduced InfoNCE, from [P, b] row and column losses
    (times the DDP scale with gather)."""
    return reduce(per_row(row_loss, col_loss, "both"), "mean", batch, scale)


DEFAULT_TEMPERATURE = 0.07


def resolve_temperature(
    fn: str,
    temperature: float | torch.Tensor | None,
    logit_scale: float | torch.Tensor | None,
    device: torch.device,
) -> float | torch.Tensor:
    """The temperature from exactly one of ``temperature=`` and open_clip's ``logit_scale=`` (= 1/τ).

    Neither: the default 0.07. A tensor ``logit_scale`` (e.g. ``log_scale.exp()``) becomes
    ``1 / logit_scale`` by autograd, so a learnable log-scale parameter receives its gradient.
    """
    if logit_scale is None:
        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        check_temperature(fn, temperature, device)
        return temperature
    if temperature is not None:
        raise ValueError(
            f"{fn}: got both temperature={temperature!r} and logit_scale={logit_scale!r}; pass exactly one "
            "(logit_scale = 1/temperature, as open_clip's ClipLoss takes it)"
        )
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.dim() != 0:
            raise ValueError(f"{fn}: logit_scale has shape {shape_str(logit_scale)}, expected a 0-d tensor")
        if not logit_scale.is_floating_point():
            raise TypeError(f"{fn}: logit_scale has dtype {logit_scale.dtype}, expected a floating dtype")
        # Checked as the scale itself: 1/0 = inf would pass as a (useless) infinite temperature.
        value = logit_scale.detach().item() if data_checks_possible(logit_scale) else 1.0
        temperature = logit_scale.reciprocal()
    else:
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
            raise TypeError(f"{fn}: logit_scale must be a float or a 0-d tensor, got {type(logit_scale).__name__}")
        value = logit_scale
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{fn}: logit_scale must be finite and > 0 (it is 1/temperature), got {value}")
    if not isinstance(logit_scale, torch.Tensor):
        temperature = 1.0 / logit_scale
    check_temperature(fn, temperature, device)
    return temperature


def centroids(
    modalities: Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    normalize_anchor: bool = False,
    detach_anchor: bool = False,
    leave_one_out: bool = False,
) -> list[torch.Tensor]:
    """The CentroBind anchors (DESIGN §2.3): one [B, D] tensor per modality, the same one M times
    unless ``leave_one_out``. c = Σ_m w_m z^m with w = ``weights`` [M] as given (1/M when None);
    leave-one-out: c^(m) = Σ_{n≠m} w_n z^n / Σ_{n≠m} w_n. Computed in the modalities' dtype.
    ``modalities``: M tensors [B, D], or them stacked [M, B, D]."""
    z = modalities if isinstance(modalities, torch.Tensor) else torch.stack(list(modalities))  # [M, B, D]
    m = z.shape[0]
    if weights is None:
        w = torch.full((m,), 1.0 / m, dtype=z.dtype, device=z.device)
    else:
        w = weights.to(dtype=z.dtype, device=z.device)
    # one [M] x [M, B·D] product: no weighted [M, B, D] copy (peak memory). The uniform mean is a
    # sum over the modalities instead: its backward is an expanded view of the anchor's gradient,
    # where tensordot's is an [M, B·D] outer-product GEMM (and its forward a GEMV through sgemm;
    # ~12 ms each on one thread at B = 4096, D = 512, issue 14)
    total = z.sum(0) / m if weights is None else torch.tensordot(w, z, dims=1)
    if leave_one_out:
        anchors = [(total - w[i] * z[i]) / (w.sum() - w[i]) for i in range(m)]
    else:
        anchors = [total] * m
    if normalize_anchor:
        anchors = [torch.nn.functional.normalize(a, dim=-1) for a in anchors]
    return [a.detach() for a in anchors] if detach_anchor else anchors


def _operands(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Non-contiguous inputs are accepted: the kernels take contiguous rows."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


# ---------------------------------------------------------------------------------------------
# public API (DESIGN §1)
# ---------------------------------------------------------------------------------------------
def infonce(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature: float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    direction: str = "both",
    reduction: str = "mean",
    *,
    logit_scale: float | torch.Tensor | None = None,
    backend: str | None = None,
    gather: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE of paired batches x [B, D], y [B, D]; logits x·yᵀ/τ.

    Equals open_clip's ``ClipLoss`` (single process) on the same inputs with
    ``logit_scale=logit_scale`` (keyword only; = 1/τ).
    ``temperature``: float or 0-d tensor (a tensor that requires grad gets its gradient); default
    0.07. ``logit_scale``: the alternative to ``temperature`` (exactly one of the two), e.g.
    ``logit_scale=log_scale.exp()`` with a learnable ``log_scale`` (it gets its gradient).
    ``direction``: "both" (mean of the two), "a2d" (rows of x rank the columns of y), "d2a".
    ``reduction``: "mean" | "sum" | "none" ([B], per row; with gather, this process's rows).
    ``gather=True``: the DDP-convention loss over the batch gathered on ``process_group`` (the
    mean over processes is the single-process loss; see :mod:`fastbind.distributed`).
    Returns a float32 scalar (float64 for float64 inputs).
    """
    fn = "infonce"
    check_modalities(fn, [x, y], ["x", "y"], like="x")
    temperature = resolve_temperature(fn, temperature, logit_scale, x.device)
    check_loss_args(fn, temperature, label_smoothing, direction, reduction, x.device)
    name = resolve(fn, backend, x.device, x.dtype, supported=INFONCE.supported)
    check_no_functorch(fn, name, [x, y, temperature])
    x, y = _operands([x, y])
    row_loss, col_loss, batch, scale = _directional_losses(
        name, _stack([x]), _stack([y]), temperature, label_smoothing, gather, process_group
    )
    return reduce(per_row(row_loss[0], col_loss[0], direction), reduction, batch, scale)


def anchor_loss(
    anchor: torch.Tensor,
    *modalities: torch.Tensor,
    temperature: float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    logit_scale: float | torch.Tensor | None = None,
    backend: str | None = None,
    gather: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """ImageBind-style fixed anchor: Σ_m infonce(modality_m, anchor), all pairs in one fused launch.

    anchor [B, D], each modality [B, D]; symmetric InfoNCE with mean reduction per pair.
    ``temperature`` (default 0.07) or ``logit_scale`` (= 1/τ), exactly one, as in :func:`infonce`;
    ``gather`` as in :func:`infonce`.
    """
    fn = "anchor_loss"
    if not modalities:
        raise ValueError(f"{fn}: got the anchor only; expected the anchor and at least one modality")
    tensors = [anchor, *modalities]
    names = ["anchor"] + [f"modality {i}" for i in range(1, len(tensors))]
    check_modalities(fn, tensors, names, like="the anchor")
    temperature = resolve_temperature(fn, temperature, logit_scale, anchor.device)
    check_label_smoothing(fn, label_smoothing)
    name = resolve(fn, backend, anchor.device, anchor.dtype, supported=INFONCE.supported)
    check_no_functorch(fn, name, [*tensors, temperature])
    anchor, *modalities = _operands(tensors)
    row_loss, col_loss, batch, scale = _directional_losses(
        name, _stack(modalities), _stack([anchor]), temperature, label_smoothing, gather, process_group
    )
    return _symmetric_sum(row_loss, col_loss, batch, scale)


def _check_weights(fn: str, weights, m: int, device, leave_one_out: bool) -> torch.Tensor | None:
    """weights [M] (a sequence of numbers or a tensor on the inputs' device or on CPU): finite,
    non-negative, positive sum (and, for leave_one_out, a positive weight outside every modality).

    The value checks read a tensor's values (one host sync), except while torch.compile traces or
    on the meta device, where they are skipped as for codebook_lookup's weight; a sequence is
    checked as Python numbers, so it is checked under torch.compile too.
    """
    if weights is None:
        return None  # uniform 1/M: leave-one-out always has (M-1)/M > 0 outside a modality
    if isinstance(weights, torch.Tensor):
        if not (weights.is_floating_point() or weights.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{fn}: weights has dtype {weights.dtype}, expected a floating dtype")
        if weights.shape != (m,):
            raise ValueError(f"{fn}: weights has shape {shape_str(weights)}, expected [{m}] (one per modality)")
        if weights.device != device and weights.device.type != "cpu":
            raise ValueError(f"{fn}: weights is on {weights.device} but the inputs are on {device}")
        if not data_checks_possible(weights):
            return weights
        values = weights.detach().double().cpu().tolist()
    else:
        try:
            values = [float(v) for v in weights]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{fn}: weights must be a sequence of M = {m} numbers or a [M] tensor ({exc})") from None
        if len(values) != m:
            raise ValueError(f"{fn}: weights has shape [{len(values)}], expected [{m}] (one per modality)")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{fn}: weights must be finite and non-negative, got {values}")
    total = sum(values)
    if not total > 0:
        raise ValueError(f"{fn}: weights sum to 0; at least one modality must have a positive weight")
    if leave_one_out and not all(total - v > 0 for v in values):
        raise ValueError(f"{fn}: leave_one_out needs a positive weight outside every modality, got {values}")
    return weights if isinstance(weights, torch.Tensor) else torch.tensor(values, dtype=torch.float64)


def centroid_loss(
    *modalities: torch.Tensor,
    temperature: float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    weights: Sequence[float] | torch.Tensor | None = None,
    normalize_anchor: bool = False,
    detach_anchor: bool = False,
    leave_one_out: bool = False,
    logit_scale: float | torch.Tensor | None = None,
    backend: str | None = None,
    gather: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """CentroBind: Σ_m symmetric InfoNCE(z^m, c^(m)) against the per-sample centroid anchor.

    modalities: M >= 2 tensors [B, D]. c_b = Σ_m w_m z^m_b (w_m = 1/M, or ``weights`` [M] used as
    given); ``normalize_anchor`` L2-normalises c; ``detach_anchor`` stops its gradient;
    ``leave_one_out`` aligns z^m with c^(m) = Σ_{n≠m} w_n z^n / Σ_{n≠m} w_n. All M pairs run in one
    fused launch (one shared key matrix unless leave-one-out); nothing M×B×B is kept.
    ``temperature`` (default 0.07) or ``logit_scale`` (= 1/τ), exactly one, and ``gather`` as in
    :func:`infonce`.
    """
    fn = "centroid_loss"
    m = len(modalities)
    if m < 2:
        raise ValueError(f"{fn}: got M = {m} modalities, expected at least 2")
    names = [f"modality {i}" for i in range(m)]
    check_modalities(fn, list(modalities), names)
    temperature = resolve_temperature(fn, temperature, logit_scale, modalities[0].device)
    check_label_smoothing(fn, label_smoothing)
    w = _check_weights(fn, weights, m, modalities[0].device, leave_one_out)
    name = resolve(fn, backend, modalities[0].device, modalities[0].dtype, supported=INFONCE.supported)
    check_no_functorch(fn, name, [*modalities, temperature, weights])
    # the queries, stacked once: the centroid is computed from them (peak memory: one [M, B, D] copy)
    q = torch.stack(list(modalities))
    # the centroid in float32 for half inputs (a sum of M bf16 rows loses digits), then back to the
    # GEMM operand dtype
    anchors = centroids(q.float() if q.dtype in _HALF else q, w, normalize_anchor, detach_anchor, leave_one_out)
    keys = [a.to(q.dtype) for a in (anchors if leave_one_out else anchors[:1])]
    row_loss, col_loss, batch, scale = _directional_losses(
        name, q, _stack(keys), temperature, label_smoothing, gather, process_group
    )
    return _symmetric_sum(row_loss, col_loss, batch, scale)


def centroid_similarity(
    *modalities: torch.Tensor, normalize_anchor: bool = False, backend: str | None = None
) -> torch.Tensor:
    """Retrieval scores against the mean centroid: [M, B, B] with S[m, i, j] = <z^m_i, c_j>.

    The output is M×B×B by definition, so this is one batched GEMM on every backend (float32
    accumulation; the result has the inputs' dtype).
    """
    fn = "centroid_similarity"
    m = len(modalities)
    if m < 2:
        raise ValueError(f"{fn}: got M = {m} modalities, expected at least 2")
    check_modalities(fn, list(modalities), [f"modality {i}" for i in range(m)])
    name = resolve(fn, backend, modalities[0].device, modalities[0].dtype, supported=INFONCE.supported)
    zs = _operands(modalities)
    if name == "torch":
        return torch_backend.centroid_similarity(*zs, normalize_anchor=normalize_anchor)
    work = [z.float() for z in zs] if zs[0].dtype in _HALF else zs
    c = centroids(work, normalize_anchor=normalize_anchor)[0].to(zs[0].dtype)
    return torch.matmul(torch.stack(zs), c.T)
