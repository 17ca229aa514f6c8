"""GRAM volumes and loss (DESIGN §1, §2.1-2.2): checks, dispatch, custom ops, fake kernels, autograd.

Decomposition used by the fused backends (``cpu``: C++ ``fastbind::gram_*``; ``triton``:
``fastbind::gram_*_triton``). For anchor row i and sample j with non-anchor modalities
m^1_j ... m^{k-1}_j (the Schur complement of the k x k Gram matrix)::

    vol_ij = r_j * sqrt(max(||a_i||^2 - sum_r (a_i . q^r_j)^2, 0))

where q^r_j is an orthonormal basis of span(m^1_j ... m^{k-1}_j) and r_j = sqrt(det M_j) the volume
of sample j's own modalities. The per-sample part (q, r, ||a||^2: O((B1 + B2) k^2 D)) is float32
torch code that autograd differentiates (:func:`span_basis`), on the cpu backend one C++ op pair
(``fastbind::gram_basis_fwd/_bwd``, csrc/cpu/span_basis.cpp, the same computation); the B1 x B2 part is the
fused op: k-1 GEMM tiles A . Q_r^T with the volume / log-sum-exp epilogue, and a backward that
recomputes the tiles. Nothing of size B1 x B2 is kept by the loss. On the cpu backend the whole loss
is one op with its autograd in C++ (``fastbind::gram_loss_fused_fwd``, csrc/cpu/gram_autograd.cpp:
basis, loss statistics, the reduction, and their backward), so a call runs no Python autograd.

Degenerate inputs: a sample whose modalities are dependent has r_j = 0 (its basis vector for the
dependent direction is 0 or an arbitrary unit vector; both give r_j ~ 0 and finite gradients);
the backward clamps dist_ij at 1e-4 ||a_i|| (forward values are exact). See csrc/cpu/gram.cpp.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fastbind._backend import extension_loaded, resolve, triton_installed
from fastbind._constants import GRAM_K_RANGE
from fastbind.ops._checks import (
    MIN_TEMPERATURE,
    check_loss_args,
    check_modalities,
    check_no_functorch,
    check_same_rows,
    cpu_temperature,
    shape_str,
    temperature_tensor,
)
from fastbind.ops._loss import DIRECTIONS, REDUCTIONS, directions, loss_weight, per_row, reduce
from fastbind.ops._registry import (
    AS_GIVEN,
    FUSED_DTYPES,
    Kernels,
    OperandDtypes,
    OpTable,
    check_dtype,
    check_shape,
    declare,
    make_first_order_backward,
    register_built,
)
from fastbind.reference import gram as torch_backend  # the "torch" backend (DESIGN §4)
from fastbind.reference.infonce import cross_entropy_rows

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["gram_volume", "gram_volume_paired", "gram_loss", "span_basis"]

K_RANGE = GRAM_K_RANGE
# Guards the division by a residual norm that is exactly 0 (dependent modalities); any value
# far below float32 round-off of a norm works.
_TINY_NORM = 1e-30


# --------------------------------------------------------------------------------------------
# per-sample part (torch version; the cpu backend's C++ op pair computes the same)
# --------------------------------------------------------------------------------------------
def span_basis(modalities: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis and volume of each sample's modalities.

    modalities: n tensors [B, D] (float32/float64). Returns (basis [n, B, D], volume [B]) with
    basis[:, j] an orthonormal basis of span(m^1_j ... m^n_j) from Gram-Schmidt with one
    re-orthogonalisation pass (orthogonal to working precision for n <= 8), and
    volume_j = prod of the residual norms = sqrt(det M_j). Differentiable; finite gradients for
    dependent modalities (a zero residual has a zero basis vector and contributes r_j = 0).
    """
    basis: list[torch.Tensor] = []
    volume = torch.ones_like(modalities[0][:, 0])
    for m in modalities:
        u = m
        for _ in range(2):  # classical Gram-Schmidt twice ("CGS2")
            for q in basis:
                u = u - (u * q).sum(-1, keepdim=True) * q
        norm = torch.linalg.vector_norm(u, dim=-1)
        basis.append(u / norm.clamp_min(_TINY_NORM)[:, None])
        volume = volume * norm
    return torch.stack(basis), volume


# Fake kernels of the C++ op pair fastbind::gram_basis_fwd/_bwd (span_basis in one call per
# direction, the same computation as the torch version). Its autograd is C++ (a native-autograd row,
# csrc/cpu/span_basis.cpp): the Python autograd wrapper cost more than the kernels at small B.
def _basis_fake(modalities):
    n = len(modalities)
    torch._check(1 <= n <= K_RANGE[1], lambda: f"gram_basis_fwd: expected 1..{K_RANGE[1]} modalities, got {n}")
    first = modalities[0]
    torch._check(first.dim() == 2, lambda: "gram_basis_fwd: modalities must be [B, D]")
    for m in modalities:
        torch._check(m.shape == first.shape, lambda: "gram_basis_fwd: modalities must share [B, D]")
    b, d = first.shape
    f32 = dict(dtype=torch.float32)
    return (
        first.new_empty(n, b, d, **f32),
        first.new_empty(b, **f32),
        first.new_empty(n, b, **f32),
        first.new_empty(b, 2, n, n, **f32),
    )


def _basis_backward_fake(grad_basis, grad_volume, basis, norms, coefs):
    n, b, d = basis.shape
    torch._check(norms.shape == (n, b), lambda: "gram_basis_bwd: norms must be [n, B]")
    torch._check(coefs.shape == (b, 2, n, n), lambda: "gram_basis_bwd: coefs must be [B, 2, n, n]")
    return [basis.new_empty(b, d) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# custom ops: the kernel tables (fake kernels, autograd, one row per fused backend)
# --------------------------------------------------------------------------------------------
def _check_operands(op: str, anchor, basis, span_vol, anchor_sq) -> None:
    """The operand contract of every GRAM op, for the fake kernels (shapes and dtypes)."""
    torch._check(basis.dim() == 3, lambda: f"{op}: basis has shape {shape_str(basis)}, expected [k-1, B2, D]")
    nq, b2, d = basis.shape
    torch._check(K_RANGE[0] - 1 <= nq <= K_RANGE[1] - 1, lambda: f"{op}: basis has k-1 = {nq} vectors, expected 1..7")
    check_shape(op, "anchor", anchor, (None, d))
    check_shape(op, "span_vol", span_vol, (b2,))
    check_shape(op, "anchor_sq", anchor_sq, (anchor.shape[0],))
    check_dtype(op, "anchor", anchor, FUSED_DTYPES)
    check_dtype(op, "basis", basis, FUSED_DTYPES)
    check_dtype(op, "span_vol", span_vol, (torch.float32,))
    check_dtype(op, "anchor_sq", anchor_sq, (torch.float32,))


def _check_modalities_operand(op: str, basis, modalities) -> None:
    """The optional `modalities` operand of the cpu/cuda GRAM ops: k-1 tensors [B2, D] (the
    modalities the basis was built from; csrc/ops.cpp)."""
    if not modalities:
        return
    nq, b2, d = basis.shape
    torch._check(len(modalities) == nq, lambda: f"{op}: {len(modalities)} modalities for k-1 = {nq} basis vectors")
    for i, m in enumerate(modalities):
        check_shape(op, f"modality {i}", m, (b2, d))


def _grads_like(*tensors) -> tuple[torch.Tensor, ...]:
    return tuple(t.new_empty(t.shape, dtype=torch.float32) for t in tensors)


def _volume_fake(anchor, basis, span_vol, anchor_sq, modalities=None):
    _check_operands("gram_volume_fwd", anchor, basis, span_vol, anchor_sq)
    _check_modalities_operand("gram_volume_fwd", basis, modalities)
    return anchor.new_empty(anchor.shape[0], basis.shape[1], dtype=torch.float32)


def _volume_backward_fake(grad, anchor, basis, span_vol, anchor_sq, modalities=None):
    _check_operands("gram_volume_bwd", anchor, basis, span_vol, anchor_sq)
    _check_modalities_operand("gram_volume_bwd", basis, modalities)
    check_shape("gram_volume_bwd", "grad", grad, (anchor.shape[0], basis.shape[1]))
    return _grads_like(anchor, basis, span_vol, anchor_sq)


def _save_with_modalities(ctx, tensors, optional) -> None:
    """Saves `tensors` and the optional modalities operand. `optional`: () for ops without it (the
    Triton rows), else (modalities or None,); the backward passes it on and returns no gradient for it
    (the ops are functions of the basis; the modalities are a faster form of its products)."""
    ctx.takes_modalities = bool(optional)
    mods = list(optional[0]) if optional and optional[0] else []
    ctx.save_for_backward(*tensors, *mods)


def _saved_with_modalities(ctx, n: int):
    """(the n saved tensors, the extra arguments of the backward op: () or (modalities or None,))."""
    saved = ctx.saved_tensors
    extra = (list(saved[n:]) or None,) if ctx.takes_modalities else ()
    return saved[:n], extra


def _with_modality_grads(ctx, grads: tuple, extra) -> tuple:
    """`grads` and the return for the modalities operand (None, or a list of Nones: autograd wants
    the structure of the input), as many as the call passed: the dispatcher drops a trailing argument
    equal to its default, and autograd counts the arguments as passed (ctx.needs_input_grad), while
    setup_context sees them with the defaults filled in."""
    full = grads + tuple(None if mods is None else [None] * len(mods) for mods in extra)
    return full[: len(ctx.needs_input_grad)]


def _volume_setup(ctx, inputs, output):
    _save_with_modalities(ctx, inputs[:4], tuple(inputs[4:]))


def _volume_grad(ctx, backward_op, grad):
    (anchor, basis, span_vol, anchor_sq), extra = _saved_with_modalities(ctx, 4)
    d_a, d_q, d_r, d_asq = backward_op(grad.contiguous(), anchor, basis, span_vol, anchor_sq, *extra)
    return _with_modality_grads(ctx, (d_a.to(anchor.dtype), d_q.to(basis.dtype), d_r, d_asq), extra)


def _check_loss_args(op: str, anchor, basis, span_vol, anchor_sq, temperature, diag_offset, rows, cols) -> None:
    _check_operands(op, anchor, basis, span_vol, anchor_sq)
    check_shape(op, "temperature", temperature, ())
    _check_positives(op, anchor.shape[0], basis.shape[1], diag_offset, rows, cols)


def _check_positives(op: str, b1, b2, diag_offset, rows, cols) -> None:
    # every loss row (column) needs its positive column i + diag_offset (row j - diag_offset)
    torch._check(
        not rows or (diag_offset >= 0 and b1 + diag_offset <= b2),
        lambda: f"{op}: rows need their positive column: B1 = {b1}, B2 = {b2}, diag_offset = {diag_offset}",
    )
    torch._check(
        not cols or (diag_offset <= 0 and b2 - diag_offset <= b1),
        lambda: f"{op}: columns need their positive row: B1 = {b1}, B2 = {b2}, diag_offset = {diag_offset}",
    )


def _loss_fake(
    anchor, basis, span_vol, anchor_sq, temperature, label_smoothing, diag_offset, rows, cols, modalities=None
):
    _check_loss_args("gram_loss_fwd", anchor, basis, span_vol, anchor_sq, temperature, diag_offset, rows, cols)
    _check_modalities_operand("gram_loss_fwd", basis, modalities)
    b1, b2 = anchor.shape[0], basis.shape[1]
    return tuple(anchor.new_empty(n, dtype=torch.float32) for n in (b1, b2, b1, b2))


def _loss_backward_fake(grad_row, grad_col, anchor, basis, span_vol, anchor_sq, temperature, row_lse, col_lse, *flags):
    label_smoothing, diag_offset, rows, cols, *modalities = flags
    _check_loss_args("gram_loss_bwd", anchor, basis, span_vol, anchor_sq, temperature, diag_offset, rows, cols)
    _check_modalities_operand("gram_loss_bwd", basis, modalities[0] if modalities else None)
    b1, b2 = anchor.shape[0], basis.shape[1]
    stats = (("grad_row", grad_row, b1), ("grad_col", grad_col, b2), ("row_lse", row_lse, b1), ("col_lse", col_lse, b2))
    for name, t, n in stats:
        check_shape("gram_loss_bwd", name, t, (n,))
    return (*_grads_like(anchor, basis, span_vol, anchor_sq), temperature.new_empty((), dtype=torch.float32))


def _loss_setup(ctx, inputs, output):
    anchor, basis, span_vol, anchor_sq, temperature, label_smoothing, diag_offset, rows, cols = inputs[:9]
    _save_with_modalities(ctx, (anchor, basis, span_vol, anchor_sq, temperature, output[2], output[3]), inputs[9:])
    ctx.flags = (label_smoothing, diag_offset, rows, cols)


def _loss_grad(ctx, backward_op, grad_row, grad_col, _grad_row_lse, _grad_col_lse):
    (anchor, basis, span_vol, anchor_sq, temperature, row_lse, col_lse), extra = _saved_with_modalities(ctx, 7)
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row.contiguous()
    grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col.contiguous()
    d_a, d_q, d_r, d_asq, d_tau = backward_op(
        grad_row, grad_col, anchor, basis, span_vol, anchor_sq, temperature, row_lse, col_lse, *ctx.flags, *extra
    )
    grads = (d_a.to(anchor.dtype), d_q.to(basis.dtype), d_r, d_asq, d_tau.to(temperature.dtype))
    return _with_modality_grads(ctx, grads + (None,) * 4, extra)


VOLUME = declare(
    OpTable(
        "gram_volume",
        _volume_fake,
        _volume_backward_fake,
        _volume_setup,
        make_first_order_backward(_volume_grad),
    )
)
LOSS = declare(
    OpTable("gram_loss", _loss_fake, _loss_backward_fake, _loss_setup, make_first_order_backward(_loss_grad))
)


def _fused_loss_fake(anchor, modalities, temperature, label_smoothing, diag_offset, rows, cols, weight, reduce):
    op = "gram_loss_fused_fwd"
    n = len(modalities)
    torch._check(1 <= n < K_RANGE[1], lambda: f"{op}: expected 1..{K_RANGE[1] - 1} modalities, got {n}")
    check_shape(op, "anchor", anchor, (None, None))
    check_dtype(op, "anchor", anchor, FUSED_DTYPES)
    b2 = modalities[0].shape[0] if modalities[0].dim() == 2 else -1
    for i, m in enumerate(modalities):
        check_shape(op, f"modality {i}", m, (b2, anchor.shape[1]))
        check_dtype(op, f"modality {i}", m, FUSED_DTYPES)
    check_shape(op, "temperature", temperature, ())
    b1 = anchor.shape[0]
    torch._check(rows or cols, lambda: f"{op}: neither rows nor columns asked for")
    torch._check(
        reduce or not (rows and cols) or b1 == b2,
        lambda: f"{op}: per-row losses of both directions need B1 == B2, got {b1} and {b2}",
    )
    _check_positives(op, b1, b2, diag_offset, rows, cols)
    return anchor.new_empty(() if reduce else (b1 if rows else b2,), dtype=torch.float32)


# Native-autograd tables (fastbind/ops/_registry.py), internal to this module, cpu rows only: the
# per-sample basis (gram_volume's and gram_volume_paired's on the cpu backend) and the whole cpu
# GRAM loss, whose C++ autograd runs gram_basis_fwd/_bwd and the LOSS row's gram_loss_fwd/_bwd.
BASIS = OpTable("gram_basis", _basis_fake, _basis_backward_fake)
BASIS.add("cpu", Kernels("fastbind::gram_basis_fwd", "fastbind::gram_basis_bwd", native_autograd=True))
LOSS_FUSED = OpTable("gram_loss_fused", _fused_loss_fake)
LOSS_FUSED.add("cpu", Kernels("fastbind::gram_loss_fused_fwd", None, native_autograd=True))

# The C++ kernels take a float32 or bfloat16 anchor and a float32 basis (a bfloat16 anchor runs
# bf16 GEMMs against hi + lo bf16 parts of the basis, csrc/cpu/gram.cpp); Triton takes both as given
# (16-bit operands feed tensor cores, accumulation in float32). The CUDA kernels (csrc/cuda/gram.cu)
# take anchor and basis in one dtype, the anchor's (AS_GIVEN: both in the input dtype); their basis
# comes from span_basis (the C++ per-sample op of gram.BASIS has CPU kernels only).
_CPU_OPERANDS = OperandDtypes(lhs=frozenset({torch.float32, torch.bfloat16}), rhs=frozenset({torch.float32}))
for _table in (VOLUME, LOSS):
    _table.add("cuda", Kernels(f"fastbind::{_table.name}_fwd", f"fastbind::{_table.name}_bwd", AS_GIVEN))
    _table.add("cpu", Kernels(f"fastbind::{_table.name}_fwd", f"fastbind::{_table.name}_bwd", _CPU_OPERANDS))
    _table.add("triton", Kernels(f"fastbind::{_table.name}_fwd_triton", f"fastbind::{_table.name}_bwd_triton"))

extension_loaded()  # imports fastbind._C, which defines the C++ ops (when built)
if triton_installed():
    import fastbind.triton.gram  # noqa: F401  (defines the fastbind::gram_*_triton ops)
register_built(VOLUME, LOSS, BASIS, LOSS_FUSED)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
# Argument names of the error messages, built once (not per call: the checks run on every call).
_NAMES = ("anchor", *(f"modality {i}" for i in range(1, K_RANGE[1])))


def _check_gram_inputs(fn: str, anchor, modalities) -> None:
    tensors = [anchor, *modalities]
    names = _NAMES[: len(tensors)]  # (more than K_RANGE[1] tensors: check_modalities raises first)
    check_modalities(fn, tensors, names, same_batch=False, k_range=K_RANGE, like="the anchor")
    if modalities:
        check_same_rows(fn, list(modalities), names[1:])


def _prepare(anchor: torch.Tensor, modalities, kernels: Kernels, backend: str):
    """Operands of the fused ops: (A, basis, span_vol, anchor_sq) with autograd to the inputs.

    Per-sample math in float32; the GEMM operands A and basis in the dtypes of the row's operand
    policy (the input dtype where the kernels take it, else float32).
    """
    a32 = anchor.float()
    basis_op = BASIS.built_op(backend)
    if basis_op is not None:  # one C++ op for the per-sample part (it upcasts 16-bit modalities itself)
        basis, span_vol, _, _ = basis_op(modalities)
        a_op = anchor if anchor.dtype == torch.bfloat16 else a32
        return a_op.contiguous(), basis, span_vol, (a32 * a32).sum(-1)
    basis, span_vol = span_basis([m.float() for m in modalities])
    a_op = anchor.to(kernels.operands.lhs_dtype(anchor.dtype)).contiguous()
    q_op = basis.to(kernels.operands.rhs_dtype(anchor.dtype)).contiguous()
    return a_op, q_op, span_vol.contiguous(), (a32 * a32).sum(-1)


def gram_volume(anchor: torch.Tensor, *modalities: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """GRAM volumes [B1, B2] of anchor rows [B1, D] against samples of k-1 modalities [B2, D].

    vol_ij = sqrt(max(det G_ij, 0)), G_ij the Gram matrix of (a_i, m^1_j, ..., m^{k-1}_j), 2 <= k <= 8.
    Equals ``volume_computation3/4/5`` of the GRAM release (``sqrt(abs(det))``) wherever the
    determinant is not round-off. Differentiable in every input; output in the input dtype.
    """
    fn = "gram_volume"
    _check_gram_inputs(fn, anchor, modalities)
    name = resolve(fn, backend, anchor.device, anchor.dtype, supported=VOLUME.supported)
    if name == "torch":
        return torch_backend.gram_volume(anchor, *modalities)
    check_no_functorch(fn, name, [anchor, *modalities])
    volume_op = VOLUME.forward_op(name)
    operands = _prepare(anchor, modalities, VOLUME.rows[name], name)
    # The cpu kernels take the modalities too, the operands of their exact bf16 products, and decide
    # themselves where they can use them (a bf16 anchor; csrc/cpu/gram.cpp, Operands). Passed on
    # every call: which anchors that is is decided in C++ only (the fused loss skips them for the
    # others, bf16_modalities in csrc/cpu/gram_autograd.cpp). The Triton ops have no such operand.
    if name == "cpu":
        operands = (*operands, list(modalities))
    return volume_op(*operands).to(anchor.dtype)


def gram_volume_paired(*modalities: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Volume of each sample's own k-tuple [B] (k tensors [B, D], 2 <= k <= 8).

    O(B k^2 D): the fused backends use the same Gram-Schmidt as the loss (float32, differentiable,
    finite gradients for dependent modalities); ``torch`` uses explicit determinants.
    """
    fn = "gram_volume_paired"
    names = [f"modality {i}" for i in range(len(modalities))]
    check_modalities(fn, list(modalities), names, same_batch=True, k_range=K_RANGE, like="modality 0")
    # The fused backends share the loss's per-sample Gram-Schmidt (ordinary torch code, no custom op).
    name = resolve(fn, backend, modalities[0].device, modalities[0].dtype, supported=VOLUME.supported)
    if name == "torch":
        return torch_backend.gram_volume_paired(*modalities)
    basis_op = BASIS.built_op(name)
    if basis_op is not None:
        return basis_op(list(modalities))[1].to(modalities[0].dtype)
    return span_basis([m.float() for m in modalities])[1].to(modalities[0].dtype)


def _ce_blocks_reference(anchor, modalities, anchor_g, modalities_g, offset, tau, eps, rows, cols):
    """Reference per-row / per-column CE of local rows vs global columns and vice versa (without the
    cancellation of lse − positive, as the fused kernels)."""
    b = anchor.shape[0]
    local = torch.arange(b, device=anchor.device)
    row_ce = col_ce = None
    if rows:
        logits = torch_backend.gram_logits(anchor, *modalities_g, temperature=tau)  # [b, B]
        row_ce = cross_entropy_rows(logits, local, local + offset, eps)
    if cols:
        logits = torch_backend.gram_logits(anchor_g, *modalities, temperature=tau)  # [B, b]
        col_ce = cross_entropy_rows(logits.t(), local, local + offset, eps)
    return row_ce, col_ce


# The fast path of gram_loss (below): (direction, reduction) -> (rows, cols, reduced) of the fused op.
_LOSS_FLAGS = {(d, r): (*directions(d), r != "none") for d in DIRECTIONS for r in REDUCTIONS}
# Exact types the fast path takes for tensors (a subclass with __torch_function__ may redefine
# what the checks read; nn.Parameter disables it) and for a float temperature (bool is an int).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_NUMBERS = (float, int)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _cpu_loss_fast(anchor, modalities, temperature, label_smoothing, direction, reduction, backend):
    """gram_loss without gather on the cpu backend for a call that passes every check, in few
    Python operations; None where any condition below fails, and gram_loss then takes its full path,
    which runs the checks and raises their errors (so the conditions imply the checks pass; what
    they do not cover just takes the full path). At B = 64 the Python work of a call cost more than
    its own time: the checks' code also slowed the op and its backward (measured: issue 14, DESIGN
    §2.2). Conditions: a built cpu row asked for by name or by the default; 1..7 modalities, each
    of the anchor's exact shape, dtype (a fused one) and device (CPU); a float temperature (one
    cached 0-d tensor per value) or a 0-d float32 CPU tensor, in [MIN_TEMPERATURE, inf); a
    label_smoothing in [0, 1]; known direction and reduction; no torch.compile trace, no torch.func
    wrapper. Same op call as the full path (tests/test_s20small_fast_path.py)."""
    if torch.compiler.is_compiling():  # (first: dynamo traces none of the checks below)
        return None
    fused = LOSS_FUSED.built_op("cpu")
    if fused is None or not (backend is None or backend == "cpu") or not 0 < len(modalities) < K_RANGE[1]:
        return None
    flags = _LOSS_FLAGS.get((direction, reduction)) if type(direction) is str and type(reduction) is str else None
    if flags is None or type(label_smoothing) not in _NUMBERS or not 0 <= label_smoothing <= 1:
        return None
    if type(anchor) not in _PLAIN_TENSORS or _is_wrapped(anchor):
        return None
    dtype, device, shape = anchor.dtype, anchor.device, anchor.shape
    if device.type != "cpu" or dtype not in FUSED_DTYPES or len(shape) != 2 or not shape[0] or not shape[1]:
        return None
    for m in modalities:
        if type(m) not in _PLAIN_TENSORS or m.shape != shape or m.dtype != dtype or m.device != device:
            return None
        if _is_wrapped(m):
            return None
    if type(temperature) in _NUMBERS:
        value = float(temperature)
        tau = cpu_temperature(value) if MIN_TEMPERATURE <= value < math.inf else None
    elif (
        type(temperature) in _PLAIN_TENSORS
        and temperature.dtype == torch.float32
        and temperature.device.type == "cpu"
        and not temperature.dim()
        and not _is_wrapped(temperature)
    ):
        tau = temperature if MIN_TEMPERATURE <= temperature.item() < math.inf else None
    else:
        tau = None
    if tau is None:
        return None
    # what the full path's resolve() returns (and raises) for these inputs
    if resolve("gram_loss", backend, device, dtype, supported=LOSS.supported) != "cpu":
        return None
    rows, cols, reduced = flags
    weight = loss_weight(direction, reduction, shape[0])
    return fused(anchor, list(modalities), tau, float(label_smoothing), 0, rows, cols, weight, reduced)


def gram_loss(
    anchor: torch.Tensor,
    *modalities: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    label_smoothing: float = 0.0,
    direction: str = "both",
    reduction: str = "mean",
    backend: str | None = None,
    gather: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """GRAM contrastive loss (DESIGN §2.2): cross-entropy of logits = -vol/temperature, targets on the diagonal.

    anchor and k-1 modalities [B, D] (2 <= k <= 8). ``direction``: "a2d" (rows), "d2a" (columns),
    "both" (their mean); ``reduction``: "mean", "sum" or "none" (per-row [B]). ``temperature``: a
    float or a 0-d tensor (gets its gradient when it requires grad). On L2-normalised inputs with
    ``label_smoothing=0.1`` this equals the GRAM release's ``(CE(-vol/τ) + CE(-volᵀ/τ))/2``.
    Result: float32 (float64 for float64 inputs).

    ``gather=True``: every process passes its local batch and computes its local rows against the
    columns gathered over ``process_group`` and its local columns against the gathered rows. It
    returns the DDP-convention loss (see :mod:`fastbind.distributed`): the mean over processes equals
    the single-process loss on the concatenated batch (equal batches: each process's loss is the mean
    over its own rows and columns), so DDP's gradient averaging gives the single-process gradients.
    """
    if not gather:
        loss = _cpu_loss_fast(anchor, modalities, temperature, label_smoothing, direction, reduction, backend)
        if loss is not None:
            return loss
    fn = "gram_loss"
    _check_gram_inputs(fn, anchor, modalities)
    if modalities[0].shape[0] != anchor.shape[0]:
        raise ValueError(
            f"{fn}: modality 1 has shape {shape_str(modalities[0])}, expected "
            f"[{anchor.shape[0]}, {anchor.shape[1]}] like the anchor (targets are on the diagonal)"
        )
    check_loss_args(fn, temperature, label_smoothing, direction, reduction, anchor.device)
    name = resolve(fn, backend, anchor.device, anchor.dtype, supported=LOSS.supported)
    tau = temperature_tensor(temperature, anchor)
    eps = float(label_smoothing)
    rows, cols = directions(direction)

    anchor_g, modalities_g, offset, scale = anchor, list(modalities), 0, 1
    if gather:
        from fastbind import distributed as dist_utils

        anchor_g, offset = dist_utils.gather_with_grad(anchor, process_group)
        modalities_g = [dist_utils.gather_with_grad(m, process_group)[0] for m in modalities]
        scale = dist_utils.ddp_scale(process_group)
    total = anchor_g.shape[0]

    if name == "torch":
        row_ce, col_ce = _ce_blocks_reference(anchor, modalities, anchor_g, modalities_g, offset, tau, eps, rows, cols)
        return reduce(per_row(row_ce, col_ce, direction), reduction, total, scale)

    check_no_functorch(fn, name, [anchor, *modalities, temperature])
    fused = LOSS_FUSED.built_op(name)
    if fused is not None:  # one C++ op, autograd included: no per-call Python tensor work
        reduced = reduction != "none"
        weight = loss_weight(direction, reduction, total, scale)  # the op: weight · Σ(row_loss + col_loss)
        if not gather:
            return fused(anchor, list(modalities), tau, eps, 0, rows, cols, weight, reduced)
        # local rows against the gathered columns (row i's positive: column i + offset), and the
        # gathered rows against the local columns
        parts = []
        if rows:
            parts.append(fused(anchor, modalities_g, tau, eps, offset, True, False, weight, reduced))
        if cols:
            parts.append(fused(anchor_g, list(modalities), tau, eps, -offset, False, True, weight, reduced))
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]
    loss_op, kernels = LOSS.forward_op(name), LOSS.rows[name]
    local = _prepare(anchor, modalities, kernels, name)
    if not gather:
        row_ce, col_ce, _, _ = loss_op(*local, tau.float(), eps, 0, rows, cols)
    else:
        glob = _prepare(anchor_g, modalities_g, kernels, name)
        row_ce = col_ce = None
        if rows:  # local rows against the global columns: row i's positive is column i + offset
            a, _, _, a_sq = local
            row_ce = loss_op(a, glob[1], glob[2], a_sq, tau.float(), eps, offset, True, False)[0]
        if cols:  # global rows against the local columns: column j's positive is row j + offset
            col_ce = loss_op(glob[0], local[1], local[2], glob[3], tau.float(), eps, -offset, False, True)[1]
    out_dtype = torch.float64 if anchor.dtype == torch.float64 else torch.float32
    return reduce(per_row(row_ce, col_ce, direction), reduction, total, scale).to(out_dtype)
