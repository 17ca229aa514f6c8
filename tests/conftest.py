import os

# The Triton kernels run on CPU tensors through Triton's interpreter in the test suite. This must
# be set before triton.jit decorates anything, i.e. before fastbind is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastbind  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    torch.manual_seed(0)
    fastbind.set_backend(None)
    yield
    fastbind.set_backend(None)


def available(name: str) -> bool:
    return name in fastbind.backends()


FUSED = [b for b in ("cpu", "triton") if b in fastbind.backends()]
