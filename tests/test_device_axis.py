"""The device axis without a GPU (issue 9, point 4): the device audit of tests/conftest.py.

On a GPU machine the tests of the triton (and cuda) backend get CUDA tensors from the ``device``
fixture / ``device_for``; a test that builds a fused backend's inputs on CPU instead passes here and
fails there. The audit (``FASTBIND_DEVICE_AUDIT=1``, conftest.py's docstring) finds such tests on a
CPU machine: it runs every GPU-backend test with the meta device standing in for CUDA, up to its
first fused call. Here it runs over the whole suite, and on a scratch module with one test of each
kind, to show that it fails what it must fail (and that the plain suite does not).
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import FUSED, GPU

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

pytestmark = pytest.mark.skipif("triton" not in FUSED, reason="the audit checks the triton backend's tests")


def _pytest(args, cwd, audit: bool, timeout=600, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "FASTBIND_DEVICE_AUDIT"}
    if audit:
        env["FASTBIND_DEVICE_AUDIT"] = "1"
    env.update(env_changes)
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _counts(output):
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|deselected|error)", output))
    found = re.search(r"device audit: (\d+) tests stopped", output)
    return counts, (int(found.group(1)) if found else None)


@pytest.mark.skipif(GPU, reason="on a GPU the suite itself runs its GPU-backend tests on CUDA tensors")
def test_every_gpu_backend_test_builds_its_inputs_on_the_test_device():
    """The whole suite under the audit: no GPU-backend test hands a triton kernel CPU tensors. The
    audited tests stop at their first fused call, so this costs about a collection of the suite."""
    rc, out = _pytest(["tests"], ROOT, audit=True)
    counts, stopped = _counts(out)
    assert rc == 0 and counts.get("failed", 0) == 0, out[-6000:]
    # every test of the triton backend was audited (none skipped), nearly all up to a fused call
    assert counts["passed"] >= 150 and stopped >= counts["passed"] - 10, out[-3000:]


SCRATCH = """
import pytest
import torch
from conftest import FUSED

import fastbind as fb
from fastbind.ops.infonce import INFONCE


@pytest.mark.parametrize("backend", FUSED)
def test_built_on_cpu(backend):
    x = torch.randn(5, 4)
    fb.infonce(x, x, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_error_swallowed_by_a_broad_raises(backend):
    with pytest.raises(Exception):
        fb.infonce(torch.randn(5, 4), torch.randn(5, 4), backend=backend)
        raise ValueError("unreached on a working backend")


@pytest.mark.parametrize("backend", FUSED)
def test_op_called_directly_on_cpu(backend):
    x = torch.randn(1, 5, 4)
    INFONCE.forward_op(backend)(x, x, torch.tensor(0.1), 0.0, 0)


@pytest.mark.parametrize("backend", FUSED)
def test_cpu_generator_on_device(backend, device):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), device=device)
    fb.infonce(x, x, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_built_on_device(backend, device):
    x = torch.randn(5, 4, device=device)
    want = fb.infonce(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    assert fb.infonce(x, x, backend=backend).shape == want.shape


@pytest.mark.parametrize("backend", FUSED)
def test_moved_to_device(backend, device):
    x = torch.randn(5, 4)
    want = fb.infonce(x.double(), x.double(), backend="torch")
    got = fb.infonce(x.to(device), x.to(device), backend=backend)
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter_only
@pytest.mark.parametrize("backend", FUSED)
def test_interpreter_only(backend):
    x = torch.randn(5, 4)
    fb.infonce(x, x, backend=backend)
"""


@pytest.mark.skipif(GPU, reason="the scratch tests of the CPU build are CPU tests")
def test_the_audit_fails_tests_that_build_cpu_inputs(tmp_path):
    """A scratch module beside a copy of conftest.py: the plain run passes every test (CPU tensors
    under the interpreter run fine); the audit fails exactly the four that would fail on a GPU
    (three hand a triton kernel CPU tensors, one even under `pytest.raises(Exception)`; one draws
    with a CPU generator on the device), and passes the others."""
    shutil.copy(os.path.join(TESTS, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_scratch.py").write_text(SCRATCH)
    rc, out = _pytest(["test_scratch.py"], tmp_path, audit=False)
    assert rc == 0 and "failed" not in out, out[-3000:]
    rc, out = _pytest(["test_scratch.py"], tmp_path, audit=True)
    failed = sorted(re.findall(r"^FAILED test_scratch.py::(\w+)\[triton\]", out, re.M))
    assert failed == [
        "test_built_on_cpu",
        "test_cpu_generator_on_device",
        "test_error_swallowed_by_a_broad_raises",
        "test_op_called_directly_on_cpu",
    ], out[-3000:]
    assert rc == 1 and "device audit: infonce runs the triton backend on tensors on cpu" in out, out[-3000:]
    assert "device audit: fastbind::infonce_fwd_triton called on tensors on ['cpu']" in out, out[-3000:]
    assert "with a CPU generator" in out, out[-3000:]
    counts, stopped = _counts(out)
    # audited: the six tests of triton (the interpreter-only one and the cpu backend's are left out)
    assert (counts["passed"], counts["failed"], stopped) == (2, 4, 2), out[-3000:]


@pytest.mark.skipif(GPU, reason="simulates a GPU machine")
def test_interpreter_only_tests_are_skipped_on_a_gpu(tmp_path):
    """On a machine with a GPU (simulated by a plugin loaded before conftest.py) the tests marked
    interpreter_only are skipped: they would run triton on CPU tensors without the interpreter."""
    shutil.copy(os.path.join(TESTS, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_scratch.py").write_text(SCRATCH)
    (tmp_path / "fake_gpu.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    args = ["-p", "fake_gpu", "-rs", "-k", "interpreter_only", "test_scratch.py"]
    rc, out = _pytest(args, tmp_path, audit=False, TRITON_INTERPRET=None, PYTHONPATH=str(tmp_path))
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected)", out))
    assert rc == 0 and counts.get("skipped") == len(FUSED) and "passed" not in counts, out[-3000:]
    assert "interpreter-only test" in out, out[-3000:]
