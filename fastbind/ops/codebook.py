"""Codebook lookup, quantisation and TOC dimension selection (DESIGN §1, §2.4): public functions.

Each public function checks its arguments, picks a backend (:func:`fastbind._backend.resolve`) and
runs either the reference (:mod:`fastbind.reference.codebook`, backend ``"torch"``) or the fused
custom op of the backend's row of :data:`LOOKUP`: ``fastbind::codebook_lookup_fwd`` (C++,
``csrc/cpu/codebook.cpp``) or ``fastbind::codebook_lookup_fwd_triton`` (:mod:`fastbind.triton.codebook`).
The fused ops never build the N×K distance matrix (extra memory O(N·k + K·D) plus one tile).

Gradients: the fused ops return integer indices and carry no gradient themselves. ``dist`` of
:func:`codebook_lookup` *is* differentiable w.r.t. x, codebook and weight: when any of them requires
grad, the distances of the k winners are recomputed by plain torch ops from the gathered codes
(O(N·k·D) memory) — the same values, now on the autograd tape. :func:`quantize` is plain torch
around the lookup: a straight-through estimator for ``quantized`` and a differentiable ``sqdist``.

Dtypes: x and codebook may differ (e.g. bf16 activations, fp32 codebook). ``dist``/``sqdist`` are
float32 for float32/float16/bfloat16 inputs (DESIGN §5) and float64 when an input is float64 (which
runs on the reference).
"""

from __future__ import annotations

import torch

from fastbind._backend import BACKENDS, extension_loaded, resolve, triton_installed
from fastbind._constants import MAX_K, METRICS, NORM_EPS
from fastbind.ops._checks import check_choice, check_tensor, shape_str
from fastbind.ops._registry import (
    AS_GIVEN,
    FUSED_DTYPES,
    Kernels,
    OpTable,
    check_dtype,
    check_shape,
    declare,
    register_built,
)
from fastbind.reference import codebook as torch_backend  # the "torch" backend (DESIGN §4)

# ---------------------------------------------------------------------------------------------
# custom op: the kernel table (fake kernel; the op has no gradient of its own)


def _lookup_fake(x, codebook, k, metric, weight):
    op = "codebook_lookup_fwd"
    torch._check(x.dim() == 2, lambda: f"{op}: x has shape {shape_str(x)}, expected [N, D]")
    n, d = x.shape
    check_shape(op, "codebook", codebook, (None, d))
    num_codes = codebook.shape[0]
    torch._check(1 <= k <= MAX_K and k <= num_codes, lambda: f"{op}: k = {k}, expected 1 <= k <= min({MAX_K}, K)")
    torch._check(metric in METRICS, lambda: f"{op}: metric {metric!r}, expected one of {METRICS}")
    check_dtype(op, "x", x, FUSED_DTYPES)
    check_dtype(op, "codebook", codebook, FUSED_DTYPES)
    if weight is not None:
        check_shape(op, "weight", weight, (d,))
    return x.new_empty((n, k), dtype=torch.float32), x.new_empty((n, k), dtype=torch.int64)


LOOKUP = declare(OpTable("codebook_lookup", _lookup_fake))
# Every backend takes float32, float16 and bfloat16 rows and codebooks as they are.
LOOKUP.add("cuda", Kernels("fastbind::codebook_lookup_fwd", None, AS_GIVEN))
LOOKUP.add("cpu", Kernels("fastbind::codebook_lookup_fwd", None, AS_GIVEN))
LOOKUP.add("triton", Kernels("fastbind::codebook_lookup_fwd_triton", None, AS_GIVEN))

extension_loaded()  # imports fastbind._C, which defines the C++ ops (when built)
if triton_installed():
    import fastbind.triton.codebook  # noqa: F401  (defines the fastbind::codebook_lookup_fwd_triton op)
register_built(LOOKUP)


# ---------------------------------------------------------------------------------------------
# per-row math of the production path (the reference keeps its own: it is the tests' oracle)


def _weighted_norm(v: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    sq = v * v if weight is None else v * v * weight
    # clamped before the sqrt: a zero vector has a finite (zero) gradient
    return sq.sum(-1, keepdim=True).clamp_min(NORM_EPS * NORM_EPS).sqrt()


def paired_distance(x: torch.Tensor, codes: torch.Tensor, metric: str, weight: torch.Tensor | None) -> torch.Tensor:
    """Distance [...] of each row of x [..., D] to the code at the same position of codes [..., D]
    (broadcasting), for `metric` (DESIGN §2.4); differentiable."""
    if metric == "l2":
        sq = (x - codes).square()
        return (sq if weight is None else sq * weight).sum(-1)
    if metric == "cosine":
        x, codes = x / _weighted_norm(x, weight), codes / _weighted_norm(codes, weight)
    prod = (x * codes if weight is None else x * codes * weight).sum(-1)
    return 1.0 - prod if metric == "cosine" else -prod


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """The value of `quantized` with the gradient of the identity w.r.t. x (straight-through estimator)."""
    return x + (quantized - x).detach()


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_lookup(fn: str, x, codebook, metric, weight) -> None:
    check_tensor(fn, "x", x, ndim=None)
    check_tensor(fn, "codebook", codebook, ndim=2)
    if codebook.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{fn}: codebook has shape {shape_str(codebook)}, expected [K, {x.shape[-1]}] "
            f"(D of x, which has shape {shape_str(x)})"
        )
    if codebook.device != x.device:
        raise ValueError(
            f"{fn}: codebook is on {codebook.device} but x is on {x.device}; all inputs must be on one device"
        )
    check_choice(fn, "metric", metric, METRICS)
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: weight has dtype {weight.dtype}; expected a floating dtype")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{fn}: weight has shape {shape_str(weight)}, expected [{x.shape[-1]}] (one entry per dim)")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but x is on {x.device}; all inputs must be on one device")
    # Data-dependent (a host sync on GPU): skipped while torch.compile traces.
    if not torch.compiler.is_compiling() and weight.device.type != "meta" and bool((weight < 0).any()):
        raise ValueError(f"{fn}: weight must be non-negative, got a minimum of {weight.min().item():g}")


def _check_k(fn: str, k, num_codes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(MAX_K, num_codes):
        raise ValueError(f"{fn}: k = {k} out of range, expected 1 <= k <= min({MAX_K}, K = {num_codes})")


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64 (reference only), else float32 (fused accumulation dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _dispatch_dtype(x: torch.Tensor, *others) -> torch.dtype:
    """The dtype `resolve` sees: x's own dtype, or float64 when any input is float64."""
    return torch.float64 if _compute_dtype(x, *others) == torch.float64 else x.dtype


# ---------------------------------------------------------------------------------------------
# public functions


def codebook_lookup(
    x: torch.Tensor,
    codebook: torch.Tensor,
    k: int = 1,
    metric: str = "l2",
    weight: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codes of every row of x (DESIGN §2.4).

    Args:
        x: [..., D] rows to look up (any leading shape, non-contiguous accepted).
        codebook: [K, D] codes.
        k: number of codes per row, 1 <= k <= min(32, K).
        metric: ``"l2"`` (squared weighted Euclidean), ``"cosine"`` (1 − x̂·ê) or ``"dot"`` (−x·e).
        weight: optional non-negative [D] per-dimension weight (e.g. the 0/1 TOC mask of
            :func:`toc_select`); see :mod:`fastbind.reference.codebook` for the weighted formulas.

    Returns:
        ``(dist [..., k], index [..., k] int64)`` sorted by increasing distance, ties to the lowest
        index. ``dist`` is float32 (float64 for float64 inputs), differentiable w.r.t. x, codebook
        and weight; ``index`` carries no gradient.
    """
    fn = "codebook_lookup"
    _check_lookup(fn, x, codebook, metric, weight)
    _check_k(fn, k, codebook.shape[0])
    name = resolve(fn, backend, x.device, _dispatch_dtype(x, codebook, weight), supported=LOOKUP.supported)
    lead, dim = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, dim)
    if name == "torch":
        dtype = _compute_dtype(x, codebook, weight)
        w = None if weight is None else weight.to(dtype)
        dist, index = torch_backend.codebook_lookup(flat.to(dtype), codebook.to(dtype), k, metric, w)
    else:
        operands = LOOKUP.rows[name].operands
        rows, codes = flat.detach(), codebook.detach()
        rows, codes = rows.to(operands.lhs_dtype(rows.dtype)), codes.to(operands.rhs_dtype(codes.dtype))
        w = None if weight is None else weight.detach()
        dist, index = LOOKUP.forward_op(name)(rows, codes, k, metric, w)
        needs_grad = x.requires_grad or codebook.requires_grad or (weight is not None and weight.requires_grad)
        if needs_grad and torch.is_grad_enabled():
            w = None if weight is None else weight.float()
            dist = paired_distance(flat.float()[:, None, :], codebook.float()[index], metric, w)
    return dist.reshape(*lead, k), index.reshape(*lead, k)


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    weight: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-code quantisation with a straight-through gradient (DESIGN §2.4).

    x [..., D], codebook [K, D] -> (quantized [..., D] in x's dtype, index [...] int64, sqdist [...]).

    * ``quantized`` has the value ``codebook[index]``; its gradient passes unchanged to x
      (straight-through) and not to the codebook.
    * ``sqdist`` = Σ_d w_d (x_d − e_d)² of the chosen code (for every metric: it is the commitment
      term), float32 (float64 for float64 inputs), differentiable w.r.t. x and the codebook:
      ``sqdist.mean()`` is the commitment loss ‖z − e‖² when the codebook is a buffer, or
      compute it on ``x.detach()`` for a codebook loss.
    """
    fn = "quantize"
    _check_lookup(fn, x, codebook, metric, weight)
    _, index = codebook_lookup(
        x.detach(),
        codebook.detach(),
        1,
        metric,
        None if weight is None else weight.detach(),
        backend=backend,
    )
    index = index[..., 0]
    dtype = _compute_dtype(x, codebook, weight)
    code = codebook[index]
    sqdist = paired_distance(x.to(dtype), code.to(dtype), "l2", None if weight is None else weight.to(dtype))
    return straight_through(x, code.to(x.dtype)), index, sqdist


def _check_toc(fn: str, codebook, alpha, beta) -> None:
    check_tensor(fn, "codebook", codebook, ndim=2)
    if codebook.shape[0] < 2:
        raise ValueError(
            f"{fn}: codebook has shape {shape_str(codebook)}, expected K >= 2 codes (sim_d divides by K−1)"
        )
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")


def _toc_dtype(codebook: torch.Tensor) -> torch.dtype:
    return torch.float64 if codebook.dtype == torch.float64 else torch.float32


def _toc_scores(codebook: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """-α·sim_d + β·Var_d over the K codes of codebook [K, D] (DESIGN §2.4)."""
    num_codes = codebook.shape[0]
    col_sum = codebook.sum(0)
    sim = (col_sum.square() - codebook.square().sum(0)) / (num_codes * (num_codes - 1))
    return -alpha * sim + beta * codebook.var(0, correction=1) if beta != 0.0 else -alpha * sim


def toc_scores(
    codebook: torch.Tensor, alpha: float = 0.7, beta: float = 0.0, *, backend: str | None = None
) -> torch.Tensor:
    """TOC score of each dimension of codebook [K, D] -> [D] (float32, float64 for float64 input).

    score_d = −α·sim_d + β·Var_d with sim_d = ((Σ_i E_id)² − Σ_i E_id²)/(K(K−1)) (DESIGN §2.4) and
    Var_d the unbiased variance (divisor K − 1) of dimension d over the codes, as CMG's TOC.
    An O(K·D) column reduction: every backend computes it with torch ops on the codebook's device
    (``backend`` is validated, not needed).
    """
    fn = "toc_scores"
    _check_toc(fn, codebook, alpha, beta)
    resolve(fn, backend, codebook.device, codebook.dtype, supported=BACKENDS)
    return _toc_scores(codebook.to(_toc_dtype(codebook)), float(alpha), float(beta))


def toc_select(
    codebook: torch.Tensor, keep: int, alpha: float = 0.7, beta: float = 0.0, *, backend: str | None = None
) -> torch.Tensor:
    """Indices [keep] (int64) of the `keep` best TOC dimensions of codebook [K, D], best first.

    Turn them into a lookup ``weight`` with ``w = torch.zeros(D); w[idx] = 1``.
    """
    fn = "toc_select"
    _check_toc(fn, codebook, alpha, beta)
    dim = codebook.shape[1]
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"{fn}: keep must be an int, got {type(keep).__name__}")
    if not 1 <= keep <= dim:
        raise ValueError(
            f"{fn}: keep = {keep} out of range, expected 1 <= keep <= D = {dim} (codebook {shape_str(codebook)})"
        )
    resolve(fn, backend, codebook.device, codebook.dtype, supported=BACKENDS)
    scores = _toc_scores(codebook.to(_toc_dtype(codebook)), float(alpha), float(beta))
    # stable: equal scores keep the lower dimension first
    return torch.sort(scores.detach(), descending=True, stable=True).indices[:keep]
