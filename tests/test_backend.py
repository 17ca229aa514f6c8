"""Backend registry, selection order and error messages (DESIGN §4), and `fastbind info`."""

import pytest
import torch

import fastbind
from fastbind import _backend
from fastbind.cli import main as cli_main
from fastbind.ops import gram as gram_ops
from fastbind.ops._registry import TABLES


def test_torch_always_available_and_listed_last():
    names = fastbind.backends()
    assert names[-1] == "torch"
    assert set(names) <= set(_backend.BACKENDS)


def test_cpu_backend_built_here():
    # make test builds the extension first; a missing one must be reported, not hidden
    ok, reason = _backend.availability()["cpu"]
    assert ok, reason
    assert "cpu" in fastbind.backends()


def test_unavailable_backends_have_reasons():
    for name, (ok, reason) in _backend.availability().items():
        assert ok or reason, f"{name} is missing without a reason"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reasons")
def test_no_gpu_reasons():
    status = _backend.availability()
    assert not status["cuda"][0]
    assert "cuda" not in fastbind.backends()


def _cuda_rows_built(monkeypatch, built: bool) -> None:
    """Set every cuda row's state as a CUDA build (built=True) or a CPU-only build would have it."""
    for table in TABLES.values():
        if built:
            monkeypatch.setitem(table._forward_ops, "cuda", table.forward_op("cpu"))
        else:
            monkeypatch.delitem(table._forward_ops, "cuda", raising=False)


def test_without_cuda_kernels_cuda_is_unavailable_even_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _cuda_rows_built(monkeypatch, False)
    ok, reason = _backend.availability()["cuda"]
    assert not ok and "built without CUDA kernels" in reason and "FASTBIND_BUILD_CUDA=1" in reason
    after_cuda = "triton" if _backend.triton_installed() else "torch"
    for table in TABLES.values():
        got = _backend.resolve("op", None, torch.device("cuda"), torch.float32, supported=table.supported)
        assert got == after_cuda, table.name
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call: fastbind._C built without CUDA"):
        _backend.resolve("op", "cuda", torch.device("cuda"), torch.float32, supported=gram_ops.LOSS.supported)


def test_auto_selection_picks_cuda_first_for_cuda_tensors_when_built(monkeypatch):
    """backend=None: cuda -> triton -> torch for CUDA tensors once the cuda rows are built and a GPU
    is visible (both simulated: the row state as a CUDA build of fastbind._C registers it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _cuda_rows_built(monkeypatch, True)
    assert _backend.availability()["cuda"] == (True, "")
    assert fastbind.backends()[0] == "cuda"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for table in TABLES.values():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert _backend.resolve("op", None, cuda, dtype, supported=table.supported) == "cuda", (table.name, dtype)
        assert _backend.resolve("op", None, cuda, torch.float64, supported=table.supported) == "torch"
        assert _backend.resolve("op", None, cpu, torch.float32, supported=table.supported) == "cpu"
    with pytest.raises(RuntimeError, match="tensors are on cpu, the cuda backend takes CUDA tensors"):
        _backend.resolve("op", "cuda", cpu, torch.float32, supported=gram_ops.LOSS.supported)
    # a GPU-less machine never picks it, built or not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _backend.availability()["cuda"] == (False, "no CUDA GPU visible to torch")


def test_auto_selection_cpu_tensors():
    assert _backend.resolve("op", None, torch.device("cpu"), torch.float32) == "cpu"
    assert _backend.resolve("op", None, torch.device("cpu"), torch.bfloat16) == "cpu"
    # float64 is the reference's job: the fused kernels accumulate in float32
    assert _backend.resolve("op", None, torch.device("cpu"), torch.float64) == "torch"
    # an op without a cpu kernel falls through to the reference
    assert _backend.resolve("op", None, torch.device("cpu"), torch.float32, supported=("torch",)) == "torch"


def test_auto_never_picks_triton_for_cpu_tensors():
    assert _backend.resolve("op", None, torch.device("cpu"), torch.float32, supported=("triton", "torch")) == "torch"


def test_explicit_keyword_wins_and_unavailable_raises_with_reason():
    assert _backend.resolve("op", "torch", torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(RuntimeError, match=r"op: backend 'cuda' cannot run this call: .*(CUDA|cuda)"):
        _backend.resolve("op", "cuda", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="dtype torch.float64 unsupported"):
        _backend.resolve("op", "cpu", torch.device("cpu"), torch.float64)
    with pytest.raises(RuntimeError, match="no such kernel"):
        _backend.resolve("op", "cpu", torch.device("cpu"), torch.float32, supported=("torch",))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastbind.set_backend("fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        _backend.resolve("op", "fast", torch.device("cpu"), torch.float32)


def test_set_backend_then_environment(monkeypatch):
    monkeypatch.setenv("FASTBIND_BACKEND", "torch")
    assert fastbind.get_backend() == "torch"
    assert _backend.resolve("op", None, torch.device("cpu"), torch.float32) == "torch"
    fastbind.set_backend("cpu")  # the process default beats the environment
    assert _backend.resolve("op", None, torch.device("cpu"), torch.float32) == "cpu"
    assert _backend.resolve("op", "torch", torch.device("cpu"), torch.float32) == "torch"  # keyword beats both
    fastbind.set_backend(None)
    monkeypatch.setenv("FASTBIND_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTBIND_BACKEND"):
        _backend.resolve("op", None, torch.device("cpu"), torch.float32)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.resolve("op", "triton", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("op", "triton", torch.device("cpu"), torch.float32) == "triton"


def test_public_functions_take_backend_keyword():
    import inspect

    for name in fastbind.__all__:
        fn = getattr(fastbind, name)
        if name in ("nn", "backends", "set_backend", "get_backend"):
            continue
        assert "backend" in inspect.signature(fn).parameters, name


def test_info_lists_backends_and_reasons(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch    {torch.__version__}" in out
    assert "backends (fastest first): " + ", ".join(fastbind.backends()) in out
    for name, (ok, reason) in _backend.availability().items():
        assert (f"{name:<7} available" if ok else f"{name:<7} missing: {reason}") in out
