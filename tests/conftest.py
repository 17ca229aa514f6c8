"""The device axis of the test suite: one place decides where the op tests run.

* A machine with a CUDA GPU: the fused tests run the ``triton`` backend on CUDA tensors, compiled
  for the GPU (TRITON_INTERPRET is *not* set), at the kernels' GPU tiles, and with larger shapes
  that cross several tiles; the ``cpu`` backend (when the C++ extension is built) still runs on CPU
  tensors.
* Without a GPU (or with TRITON_INTERPRET=1 set by the caller): everything runs on CPU tensors and
  the Triton kernels through Triton's interpreter, as before.

Tests take the ``device`` fixture (derived from their ``backend`` parameter) or call
:func:`device_for`, and build every input of a fused backend on that device (float64 references
may stay on CPU; move results with ``.cpu()`` before comparing). Modules that only make sense on
CPU tensors under the interpreter (patching it, recording its launches) mark themselves
``pytest.mark.interpreter_only``: skipped on a GPU.

The device audit (``FASTBIND_DEVICE_AUDIT=1``) proves this without a GPU. It runs only the tests
whose ``backend`` parameter is a GPU backend (triton, cuda) and gives them the ``meta`` device as
a stand-in for CUDA: like CUDA tensors, meta tensors refuse to mix with CPU tensors, and a tensor
built without the test's device lands on CPU. Each test runs until its first call of a fused op
(fastbind's backend selection, or a ``fastbind::`` custom op called directly, e.g. by opcheck):

* inputs on the stand-in device: the test built them right; it stops there and passes (nothing
  runs on meta tensors, so the audit is cheap). The same where fastbind's own code first reads a
  value of a stand-in tensor (e.g. the finiteness check of ``VectorQuantizer``'s input);
* a triton or cuda kernel asked to run on CPU tensors: the test fails with "device audit: ...",
  as it would on a GPU, where CPU tensors cannot go to a compiled kernel;
* CPU tensors to the cpu backend or the float64 reference run as usual (CPU-side by design).

A test must therefore take the values it compares against from CPU data before moving it to the
device (meta tensors hold none), as it would anyway to keep its float64 reference on CPU.
``make test`` runs the audit over the whole suite (tests/test_device_axis.py); by hand:
``FASTBIND_DEVICE_AUDIT=1 .venv/bin/python -m pytest -q tests``. Meta accepts a CPU generator
where CUDA refuses it: the audit fails such draws itself. Not covered: calls after the first
fused one.
"""

import os
import sys

import torch

# TRITON_INTERPRET must be decided before triton.jit decorates anything, i.e. before fastbind is
# imported. torch.cuda.is_available() does not initialise a CUDA context (forked test helpers stay
# safe). A caller who sets TRITON_INTERPRET=1 on a GPU machine gets the CPU suite.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = torch.device("cuda" if GPU else "cpu")
# The device audit (module docstring): meta stands in for CUDA in the tests of the GPU backends.
AUDIT = os.environ.get("FASTBIND_DEVICE_AUDIT", "0") not in ("", "0")
GPU_BACKENDS = ("triton", "cuda")
STAND_IN = torch.device("meta")

import pytest  # noqa: E402

import fastbind  # noqa: E402
from fastbind import _backend  # noqa: E402
from fastbind.ops._registry import FUSED_BACKENDS, TABLES  # noqa: E402


def device_for(backend: str | None) -> torch.device:
    """Where a test of `backend` builds its tensors: the cpu backend takes CPU tensors, the cuda
    backend CUDA tensors, every other backend (triton, torch, automatic) runs on the suite's device.
    Under the device audit the GPU backends get the stand-in device."""
    if AUDIT and backend in GPU_BACKENDS:
        return STAND_IN
    if backend in ("cpu", "cuda"):
        return torch.device(backend)
    return DEVICE


def interpreted(backend: str | None) -> bool:
    """True when `backend` runs through Triton's interpreter (slow: keep those shapes small)."""
    return backend == "triton" and not GPU


@pytest.fixture
def device(request) -> torch.device:
    """The device of the current test, from its `backend` parameter (see :func:`device_for`)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    return device_for(params.get("backend"))


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    torch.manual_seed(0)
    fastbind.set_backend(None)
    yield
    fastbind.set_backend(None)


def available(name: str) -> bool:
    return name in fastbind.backends()


# Fused backends under test: every backend with kernel rows (fastbind/ops/_registry.py) that is
# available here. With a GPU, triton runs on CUDA tensors; without one, under the interpreter on
# CPU tensors. The cpu backend runs wherever the extension is built.
FUSED = [b for b in reversed(FUSED_BACKENDS) if b in fastbind.backends()]


def pytest_report_header(config):
    how = "CUDA tensors, compiled Triton kernels" if GPU else "CPU tensors, Triton interpreter"
    name = f" ({torch.cuda.get_device_name()})" if GPU else ""
    audit = "; device audit: the GPU backends' tests on the meta device, up to their first fused call"
    return f"fastbind test device: {DEVICE}{name}: {how}; fused backends {FUSED}" + (audit if AUDIT else "")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter_only: CPU tensors under the Triton interpreter by design")


# --------------------------------------------------------------------------------------------
# The device audit (FASTBIND_DEVICE_AUDIT=1; module docstring)
# --------------------------------------------------------------------------------------------
class DeviceAuditStop(BaseException):
    """The audited test reached a fused call with its inputs on the stand-in device: it passes there.
    A BaseException, so that no `pytest.raises(Exception)` or `except Exception` in a test takes it."""


class DeviceAuditError(BaseException):
    """A GPU backend's kernel was asked to run on tensors off the test's device (reported as a
    failure; a BaseException for the same reason as DeviceAuditStop)."""


def _gpu_row_ops() -> frozenset[str]:
    """Names ("fastbind::op") of the custom ops only a GPU backend runs: the triton rows' ops. The
    cuda rows share the cpu rows' C++ schemas and are told apart by the tensors' device only."""
    rows = [table.rows["triton"] for table in TABLES.values() if "triton" in table.rows]
    return frozenset(name for row in rows for name in (row.forward, row.backward) if name)


def _audited_resolve(real, nodeid: str):
    def resolve(op, backend, device, dtype, supported=_backend.BACKENDS):
        if device == STAND_IN:
            # what the call would pick on CUDA tensors (and the errors it would raise there)
            name = real(op, backend, torch.device("cuda"), dtype, supported)
            if name in GPU_BACKENDS:
                raise DeviceAuditStop(op)
            return name  # the torch reference runs on meta tensors (shapes only)
        name = real(op, backend, device, dtype, supported)
        if name in GPU_BACKENDS:
            raise DeviceAuditError(
                f"device audit: {op} runs the {name} backend on tensors on {device} in {nodeid}; build "
                "its inputs on the test's device (the `device` fixture or device_for(backend))"
            )
        return name

    resolve._dynamo_marked_constant = True  # as the real one: called once at trace time
    return resolve


def _audit_dispatch_mode(nodeid: str):
    from torch.utils._python_dispatch import TorchDispatchMode

    gpu_ops = _gpu_row_ops()

    class AuditMode(TorchDispatchMode):
        """Direct calls of fastbind's custom ops (opcheck, tests of one kernel), and random draws."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            devices = {t.device for t in flat if isinstance(t, torch.Tensor)}
            if any(isinstance(a, torch.Generator) for a in flat) and STAND_IN in {kwargs.get("device"), *devices}:
                # meta takes a CPU generator; CUDA refuses it (a gap of the stand-in, closed here)
                raise DeviceAuditError(
                    f"device audit: {func.name()} draws on the test's device with a CPU generator in "
                    f"{nodeid}; CUDA refuses that: draw on CPU, then .to(device)"
                )
            if func.namespace == "fastbind":
                if STAND_IN in devices:
                    raise DeviceAuditStop(func.name())
                if func.name().split(".")[0] in gpu_ops:
                    raise DeviceAuditError(
                        f"device audit: {func.name()} called on tensors on {sorted(map(str, devices))} "
                        f"in {nodeid}; build its inputs on the test's device (`device` / device_for)"
                    )
            try:
                return func(*args, **kwargs)
            except (RuntimeError, NotImplementedError):
                # fastbind itself reading the values of a stand-in tensor (a module's input checks,
                # .item() / .tolist()): the inputs reached fastbind on the test's device
                if STAND_IN in devices and _in_fastbind():
                    raise DeviceAuditStop(func.name()) from None
                raise

    return AuditMode()


def _in_fastbind() -> bool:
    """Whether fastbind's own code (not a test) is on the call stack."""
    package = os.path.dirname(fastbind.__file__) + os.sep
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(package):
            return True
        frame = frame.f_back
    return False


_audit = {"stopped": 0, "ran through": []}


def pytest_collection_modifyitems(config, items):
    """On a GPU, skip the interpreter-only tests; under the audit, keep only the tests of the GPU
    backends (the interpreter-only ones stay out: they are CPU-only by design)."""
    if GPU:
        skip = pytest.mark.skip(reason="interpreter-only test (CPU tensors under TRITON_INTERPRET=1)")
        for item in items:
            if item.get_closest_marker("interpreter_only"):
                item.add_marker(skip)
    if not AUDIT:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        audited = params.get("backend") in GPU_BACKENDS and not item.get_closest_marker("interpreter_only")
        (keep if audited else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    if not AUDIT:
        return (yield)
    real = _backend.resolve
    patched = [m for m in list(sys.modules.values()) if getattr(m, "resolve", None) is real]
    for module in patched:
        module.resolve = _audited_resolve(real, pyfuncitem.nodeid)
    failure = None
    try:
        with _audit_dispatch_mode(pyfuncitem.nodeid):
            result = yield
        _audit["ran through"].append(pyfuncitem.nodeid)
        return result
    except DeviceAuditStop:
        _audit["stopped"] += 1
        return True
    except DeviceAuditError as exc:
        failure = str(exc)
    finally:
        for module in patched:
            module.resolve = real
    pytest.fail(failure, pytrace=False)


def pytest_terminal_summary(terminalreporter):
    if AUDIT:
        through = _audit["ran through"]
        terminalreporter.write_line(
            f"device audit: {_audit['stopped']} tests stopped at their first fused call on the stand-in "
            f"device, {len(through)} ran through without one"
        )
        for nodeid in through:  # e.g. tests of argument errors raised before any kernel is chosen
            terminalreporter.write_line(f"  ran through: {nodeid}")
