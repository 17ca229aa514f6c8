"""Argument checks shared by every public function.

All checks run before any kernel: a violation raises ``TypeError`` (wrong type / dtype) or
``ValueError`` (wrong shape, value) whose message names the function, the argument and the expected
and actual shapes. Non-contiguous tensors are accepted (the ops make them contiguous).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastbind.ops._loss import DIRECTIONS, REDUCTIONS


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(fn: str, name: str, t, ndim: int | None = 2) -> None:
    """A floating tensor of rank `ndim` (any rank >= 1 when None) with a non-empty leading dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{fn}: {name} has dtype {t.dtype}; expected a floating dtype "
            "(float32, float16, bfloat16, or float64 for the reference)"
        )
    if ndim is not None and t.dim() != ndim:
        expected = "[B, D]" if ndim == 2 else f"rank {ndim}"
        raise ValueError(f"{fn}: {name} has shape {shape_str(t)}, expected {expected}")
    if ndim is None and t.dim() < 1:
        raise ValueError(f"{fn}: {name} has shape {shape_str(t)}, expected [..., D]")
    if t.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {shape_str(t)}); an empty batch has no loss")


def check_same_device_dtype(fn: str, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; all inputs must be on one device"
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"{fn}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; all inputs must share one dtype"
            )


def check_modalities(
    fn: str,
    tensors: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    same_batch: bool = True,
    k_range: tuple[int, int] | None = None,
    like: str = "the first modality",
) -> None:
    """k matrices [B, D] on one device and dtype with equal D (and equal B when `same_batch`).

    `names[i]` names tensors[i] in messages, e.g. "anchor", "modality 1".
    """
    if k_range is not None:
        lo, hi = k_range
        if not lo <= len(tensors) <= hi:
            raise ValueError(f"{fn}: got k = {len(tensors)} modalities, expected {lo} <= k <= {hi}")
    for name, t in zip(names, tensors):
        check_tensor(fn, name, t)
    check_same_device_dtype(fn, list(zip(names, tensors)))
    ref = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        rows_ok = (not same_batch) or t.shape[0] == ref.shape[0]
        if t.shape[1] != ref.shape[1] or not rows_ok:
            want = f"[{ref.shape[0] if same_batch else 'B2'}, {ref.shape[1]}]"
            raise ValueError(f"{fn}: {name} has shape {shape_str(t)}, expected {want} like {like}")


def check_same_rows(fn: str, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Every tensor has the batch size of tensors[0] (used for the non-anchor modalities)."""
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                f"{fn}: {name} has shape {shape_str(t)}, expected [{tensors[0].shape[0]}, {t.shape[1]}] "
                f"like {names[0]} (non-anchor modalities are grouped by sample)"
            )


# The fused kernels scale by 1/temperature in float32: below this, 1/temperature overflows to inf
# and every logit becomes inf or NaN (1e-45 is a float32 denormal whose reciprocal is inf).
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max  # ~2.94e-39


def data_checks_possible(t: torch.Tensor) -> bool:
    """Whether a tensor's values can be read for a check: not while torch.compile traces (a
    data-dependent branch breaks fullgraph), not on the meta device, not inside torch.func."""
    return not (
        torch.compiler.is_compiling() or t.device.type == "meta" or torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def check_temperature(fn: str, temperature, device: torch.device) -> None:
    """A number or a 0-d floating tensor (on the inputs' device or on CPU) with a value in
    [MIN_TEMPERATURE, inf]: zero, negative, NaN and float32-underflowing temperatures are rejected in
    both forms (a tensor's value is read, one host sync, except under torch.compile / meta)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"{fn}: temperature has shape {shape_str(temperature)}, expected a 0-d tensor")
        if not temperature.is_floating_point():
            raise TypeError(f"{fn}: temperature has dtype {temperature.dtype}, expected a floating dtype")
        if temperature.device != device and temperature.device.type != "cpu":
            raise ValueError(f"{fn}: temperature is on {temperature.device} but the inputs are on {device}")
        if not data_checks_possible(temperature):
            return
        value = temperature.detach().item()
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{fn}: temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")
    else:
        value = float(temperature)
    if not (value > 0 and value < math.inf):  # NaN fails too; inf would make every logit 0
        raise ValueError(f"{fn}: temperature must be finite and > 0, got {value}")
    if value < MIN_TEMPERATURE:
        raise ValueError(
            f"{fn}: temperature {value:g} is below {MIN_TEMPERATURE:.3g}, where 1/temperature overflows float32"
        )


def check_no_functorch(fn: str, backend: str, tensors: Sequence) -> None:
    """The fused kernels have first-order autograd formulas only: refuse torch.func transforms.

    Without this check ``torch.func.grad`` fails inside torch with a message about an
    ``autograd.Function`` the user never wrote. Skipped while torch.compile traces (fake tensors).
    """
    if backend == "torch" or torch.compiler.is_compiling():
        return
    if any(isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise RuntimeError(
            f"{fn}: backend {backend!r} cannot run this call: torch.func transforms (grad, vjp, jacrev, "
            "vmap, ...) need backend='torch' (the fused kernels have first-order gradients only)"
        )


def check_first_order(op: str) -> None:
    """Called first in a fused op's backward: refuse double backward instead of returning zeros.

    Autograd runs a backward with grad mode on exactly when the caller asked for
    ``create_graph=True``; the fused backward kernels are not differentiable themselves.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: second-order gradients (create_graph=True, torch.func.grad of a gradient) are not "
            "supported by the fused kernels; use backend='torch' for double backward"
        )


def check_choice(fn: str, name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_label_smoothing(fn: str, label_smoothing) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{fn}: label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")


def check_loss_args(fn: str, temperature, label_smoothing, direction, reduction, device) -> None:
    check_temperature(fn, temperature, device)
    check_label_smoothing(fn, label_smoothing)
    check_choice(fn, "direction", direction, DIRECTIONS)
    check_choice(fn, "reduction", reduction, REDUCTIONS)


# The 0-d float32 CPU tensors of float temperatures handed out by cpu_temperature, one per value.
_CPU_TEMPERATURES: dict[float, torch.Tensor] = {}
_CPU_TEMPERATURES_KEPT = 16


def cpu_temperature(value: float) -> torch.Tensor:
    """``temperature_tensor(value, x)`` for float32 CPU x, made once per value and then reused: at
    small batches making a 0-d tensor per call was a visible part of the call (issue 14). For ops
    that only read it (the fused cpu ops: their input, never written, no gradient). A few values
    are kept; a temperature that changes on every call replaces them."""
    tau = _CPU_TEMPERATURES.get(value)
    if tau is None:
        if len(_CPU_TEMPERATURES) >= _CPU_TEMPERATURES_KEPT:
            _CPU_TEMPERATURES.clear()
        # a normal tensor even when first asked for under inference mode: the op saves it for backward
        with torch.inference_mode(False):
            tau = torch.tensor(value, dtype=torch.float32, device="cpu")
        _CPU_TEMPERATURES[value] = tau
    return tau


def temperature_tensor(temperature, like: torch.Tensor) -> torch.Tensor:
    """The temperature as a 0-d float32 tensor (float64 for float64 inputs) on like's device."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        return temperature.to(device=like.device, dtype=dtype)
    return torch.tensor(float(temperature), device=like.device, dtype=dtype)
