"""Backend registry and dispatch (DESIGN §4).

Backends, fastest first: ``cuda`` (CUDA extension), ``triton`` (Triton kernels: CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``), ``cpu`` (C++ extension), ``torch`` (the float64-capable
reference in :mod:`fastbind.reference`, always present).

Selection for a call, first match wins:
1. the ``backend=`` keyword of the call;
2. :func:`set_backend` (process default), then the ``FASTBIND_BACKEND`` environment variable;
3. automatic: ``cuda -> triton -> torch`` for CUDA tensors, ``cpu -> torch`` for CPU tensors, and
   ``torch`` for float64 inputs (the fused kernels accumulate in float32).

A backend that is named (1 or 2) but cannot run the call raises ``RuntimeError`` with the reason;
nothing silently falls back.
"""

from __future__ import annotations

import functools
import os

import torch

from fastbind.ops._registry import FUSED_BACKENDS, FUSED_DTYPES, TABLES

BACKENDS = (*FUSED_BACKENDS, "torch")

_default: str | None = None


def _interpreting() -> bool:
    # fastbind.triton imports triton (optional, and slow to import): only asked once triton is known
    # to be installed.
    from fastbind.triton._common import _interpreting

    return _interpreting()


def _has_rows(name: str) -> bool:
    """Whether some op has a kernel row for the fused backend `name` (fastbind.ops._registry)."""
    return any(name in table.rows for table in TABLES.values())


@functools.cache
def _extension_status() -> tuple[bool, str]:
    """(fastbind._C imported, reason if not)."""
    try:
        from fastbind import _C  # noqa: F401
    except ImportError as exc:  # not built, or built against another torch
        return False, f"C++ extension fastbind._C not importable ({exc}); run `make build`"
    return True, ""


def _cuda_build_status() -> tuple[bool, str]:
    """(every cuda row has its CUDA kernels, reason if not). Read from the op tables, not from the
    build flags: a cuda row is built only where its ops have kernels for the CUDA dispatch key."""
    ok, reason = _extension_status()
    if not ok:
        return False, reason
    missing = [table.name for table in TABLES.values() if "cuda" in table.rows and not table.built("cuda")]
    if missing:
        return False, (
            f"fastbind._C built without CUDA kernels (no CUDA kernel for {', '.join(missing)}; "
            "build with FASTBIND_BUILD_CUDA=1, e.g. `make cuda-build`)"
        )
    return True, ""


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton not installed ({exc})"
    return True, ""


def triton_installed() -> bool:
    return _triton_status()[0]


def _status(name: str) -> tuple[bool, str]:
    """(backend `name` available on this machine, reason when not): the one backend a call asks
    about, without the others' checks (resolve runs on every call of every op)."""
    if name == "torch":
        return True, ""
    if name == "cpu":
        status = _extension_status()
    elif name == "cuda":
        cuda_built, cuda_reason = _cuda_build_status()
        if not cuda_built:
            status = (False, cuda_reason)
        elif not torch.cuda.is_available():
            status = (False, "no CUDA GPU visible to torch")
        else:
            status = (True, "")
    else:  # triton
        triton_ok, triton_reason = _triton_status()
        if not triton_ok:
            status = (False, triton_reason)
        elif not (torch.cuda.is_available() or _interpreting()):
            status = (False, "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton on CPU tensors)")
        else:
            status = (True, "")
    if status[0] and not _has_rows(name):
        return False, f"no op has a {name} kernel yet"
    return status


def availability() -> dict[str, tuple[bool, str]]:
    """Map each backend name to (available on this machine, reason when not)."""
    return {name: _status(name) for name in ("torch", "cpu", "cuda", "triton")}


def backends() -> list[str]:
    """Names of the backends usable on this machine that run at least one op, fastest first."""
    status = availability()
    order = BACKENDS if torch.cuda.is_available() else ("cpu", "triton", "torch")
    return [name for name in order if status[name][0]]


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores automatic selection)."""
    global _default
    if name is not None:
        _validate_name(name, "set_backend")
    _default = name


def get_backend() -> str | None:
    """The process-wide default backend: set_backend(), else FASTBIND_BACKEND, else None (auto)."""
    if _default is not None:
        return _default
    env = os.environ.get("FASTBIND_BACKEND") or None
    if env is not None:
        _validate_name(env, "FASTBIND_BACKEND")
    return env


def _validate_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _why_not(name: str, device: torch.device, dtype: torch.dtype, supported: tuple[str, ...]) -> str:
    """Reason the backend cannot run a call on (device, dtype), or '' when it can."""
    if name not in supported:
        return "this op has no such kernel"
    ok, reason = _status(name)
    if not ok:
        return reason
    if name != "torch" and dtype not in FUSED_DTYPES:
        return f"dtype {dtype} unsupported (fused kernels take float32, float16, bfloat16)"
    if name == "cpu" and device.type != "cpu":
        return f"tensors are on {device}, the cpu backend takes CPU tensors"
    if name == "cuda" and device.type != "cuda":
        return f"tensors are on {device}, the cuda backend takes CUDA tensors"
    if name == "triton" and device.type == "cpu" and not _interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 for the triton backend"
    if name == "triton" and device.type not in ("cpu", "cuda"):
        return f"tensors are on {device}"
    return ""


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (over a second)
    at ``import fastbind``: that decorator only sets this attribute, which dynamo reads when it meets
    the function while tracing (tests/test_registry.py checks both do the same)."""
    fn._dynamo_marked_constant = True
    return fn


# Selection reads the environment and the extension's build info (a str-returning op that
# torch.compile cannot trace): under torch.compile it runs once at trace time, as a constant.
@_assume_constant_result
def resolve(
    op: str,
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    supported: tuple[str, ...] = BACKENDS,
) -> str:
    """Pick the backend for one call of `op` on tensors of (device, dtype); see module docstring."""
    requested = backend if backend is not None else get_backend()
    if requested is not None:
        _validate_name(requested, f"{op}: backend")
        reason = _why_not(requested, device, dtype, supported)
        if reason:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run this call: {reason}")
        return requested
    if dtype not in FUSED_DTYPES:
        return "torch"
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in order:
        if not _why_not(name, device, dtype, supported):
            return name
    return "torch"


def extension_loaded() -> bool:
    """True when fastbind._C imported, i.e. the torch.ops.fastbind C++ schemas exist."""
    return _extension_status()[0]
