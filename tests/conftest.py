"""The device axis of the test suite: one place decides where the op tests run.

* A machine with a CUDA GPU: the fused tests run the ``triton`` backend on CUDA tensors, compiled
  for the GPU (TRITON_INTERPRET is *not* set), at the kernels' GPU tiles, and with larger shapes
  that cross several tiles; the ``cpu`` backend (when the C++ extension is built) still runs on CPU
  tensors.
* Without a GPU (or with TRITON_INTERPRET=1 set by the caller): everything runs on CPU tensors and
  the Triton kernels through Triton's interpreter, as before.

Tests take the ``device`` fixture (derived from their ``backend`` parameter) or call
:func:`device_for`, and build every input on that device.
"""

import os

import torch

# TRITON_INTERPRET must be decided before triton.jit decorates anything, i.e. before fastbind is
# imported. torch.cuda.is_available() does not initialise a CUDA context (forked test helpers stay
# safe). A caller who sets TRITON_INTERPRET=1 on a GPU machine gets the CPU suite.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = torch.device("cuda" if GPU else "cpu")

import pytest  # noqa: E402

import fastbind  # noqa: E402
from fastbind.ops._registry import FUSED_BACKENDS  # noqa: E402


def device_for(backend: str | None) -> torch.device:
    """Where a test of `backend` builds its tensors: the cpu backend takes CPU tensors, the cuda
    backend CUDA tensors, every other backend (triton, torch, automatic) runs on the suite's device."""
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
    return f"fastbind test device: {DEVICE}{name}: {how}; fused backends {FUSED}"
