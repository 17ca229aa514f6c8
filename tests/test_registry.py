"""The kernel registry (fastbind/ops/_registry.py, DESIGN §4): one table per fused op, rows per
backend, fake kernels that validate, registration in any import order, and a light `import fastbind`."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import FUSED
from torch._subclasses.fake_tensor import FakeTensorMode

import fastbind
from fastbind import _backend
from fastbind.ops import _registry
from fastbind.ops import codebook as codebook_ops
from fastbind.ops import gram as gram_ops
from fastbind.ops import infonce as infonce_ops

TABLES = {"gram_volume": gram_ops.VOLUME, "gram_loss": gram_ops.LOSS, "infonce": infonce_ops.INFONCE}
TABLES["codebook_lookup"] = codebook_ops.LOOKUP


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_one_table_per_op_with_the_naming_scheme():
    assert _registry.TABLES == TABLES
    for name, table in TABLES.items():
        assert set(table.rows) <= set(_registry.FUSED_BACKENDS)
        assert table.supported == (*table.rows, "torch")
        for backend, row in table.rows.items():
            suffix = "_triton" if backend == "triton" else ""
            assert row.forward == f"fastbind::{name}_fwd{suffix}"
            assert row.backward == (None if name == "codebook_lookup" else f"fastbind::{name}_bwd{suffix}")
        # the C++ kernels of both devices: one schema, two dispatch keys
        assert table.op_names("cuda") == table.op_names("cpu")


@pytest.mark.parametrize("backend", FUSED)
def test_every_built_row_is_registered(backend):
    for table in TABLES.values():
        op = table.forward_op(backend)
        assert op.name() == table.rows[backend].forward


def test_a_backend_without_a_row_raises_instead_of_running_another_row():
    src = infonce_ops.INFONCE
    table = _registry.OpTable("cpu_only", src.fake_forward, src.fake_backward, src.setup_context, src.make_backward)
    table.add("cpu", src.rows["cpu"])
    with pytest.raises(RuntimeError, match=r"cpu_only: no 'cuda' kernel \(rows: cpu\)"):
        table.forward_op("cuda")
    with pytest.raises(ValueError, match="not a fused backend"):
        gram_ops.VOLUME.add("torch", gram_ops.VOLUME.rows["cpu"])


def _has_cuda_kernels(table) -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in table.op_names("cuda"))


def test_a_cuda_row_is_built_exactly_when_its_ops_have_cuda_kernels():
    """The cuda rows name the cpu rows' ops, which exist in every build of fastbind._C: without CUDA
    kernels (a CPU-only build, as in `make test`) the row must raise, not run the CPU kernel."""
    for table in TABLES.values():
        assert table.built("cuda") == _has_cuda_kernels(table), table.name
        if table.built("cuda"):
            assert table.forward_op("cuda").name() == table.rows["cuda"].forward
        else:
            with pytest.raises(RuntimeError, match=rf"{table.name}: the 'cuda' ops \(.*\) are not built here"):
                table.forward_op("cuda")


def test_registering_a_cuda_kernel_makes_the_shared_row_dispatchable():
    """One schema with a CPU kernel: the cpu row is built, the cuda row naming the same op is not
    until the op gets a CUDA kernel; then both rows dispatch to the one op, registered once."""
    lib = torch.library.Library("fastbind_test_registry", "DEF")
    try:
        lib.define("twice(Tensor x) -> Tensor")
        lib.impl("twice", lambda x: 2 * x, "CPU")
        table = _registry.OpTable("twice", lambda x: torch.empty_like(x))
        row = _registry.Kernels("fastbind_test_registry::twice", None)
        table.add("cuda", row)
        table.add("cpu", row)
        _registry.register_built(table)
        assert table.built("cpu") and not table.built("cuda")
        with pytest.raises(RuntimeError, match="not built here"):
            table.forward_op("cuda")
        lib.impl("twice", lambda x: 3 * x, "CUDA")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second register_fake of the op would warn
            _registry.register_built(table)
        assert table.forward_op("cuda") is table.forward_op("cpu")
        assert table.forward_op("cpu")(torch.ones(2)).tolist() == [2.0, 2.0]  # CPU tensors: the CPU kernel
    finally:
        lib._destroy()


@pytest.mark.skipif("cpu" not in FUSED, reason="C++ extension not built")
def test_rows_of_two_backends_may_share_ops():
    """The cuda row names the cpu row's ops (one schema, two dispatch keys): registering the table
    registers each op once; the cpu row is dispatchable, the cuda row where the build has CUDA kernels."""
    src = infonce_ops.INFONCE
    table = _registry.OpTable("shared", src.fake_forward, src.fake_backward, src.setup_context, src.make_backward)
    table.add("cpu", src.rows["cpu"])
    table.add("cuda", src.rows["cpu"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second register_fake / register_autograd of an op warns
        _registry.register_built(table)
    assert table.forward_op("cpu") is src.forward_op("cpu")
    assert table.built("cuda") == src.built("cuda") == _has_cuda_kernels(src)
    assert "shared" not in _registry.TABLES  # not declared: backends() does not see it


def test_backends_lists_only_backends_with_a_row(monkeypatch):
    assert "cpu" in fastbind.backends()
    for table in TABLES.values():
        monkeypatch.setattr(table, "rows", {k: v for k, v in table.rows.items() if k != "cpu"})
    assert "cpu" not in fastbind.backends()
    ok, reason = _backend.availability()["cpu"]
    assert not ok and reason == "no op has a cpu kernel yet"


def test_operand_dtypes_come_from_the_row():
    cpu = gram_ops.LOSS.rows["cpu"].operands
    assert cpu.lhs_dtype(torch.bfloat16) == torch.bfloat16 and cpu.rhs_dtype(torch.bfloat16) == torch.float32
    assert cpu.lhs_dtype(torch.float16) == torch.float32
    triton = gram_ops.LOSS.rows["triton"].operands
    assert triton.lhs_dtype(torch.float16) == torch.float16 and triton.rhs_dtype(torch.bfloat16) == torch.bfloat16
    # the CUDA launchers take every fused dtype as given (GRAM: anchor and basis in the anchor's)
    for table in TABLES.values():
        cuda = table.rows["cuda"].operands
        for dtype in _registry.FUSED_DTYPES:
            assert cuda.lhs_dtype(dtype) == cuda.rhs_dtype(dtype) == dtype, (table.name, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gram_cuda_operands_share_the_anchor_dtype_and_use_the_torch_basis(monkeypatch, dtype):
    """csrc/cuda/gram.cu takes anchor and basis in one dtype; the per-sample basis of the cuda row is
    span_basis (differentiable torch code): the C++ gram_basis op has CPU kernels only."""
    assert "cuda" not in gram_ops.BASIS.rows
    calls, span_basis = [], gram_ops.span_basis

    def spy(modalities):
        calls.append(len(modalities))
        return span_basis(modalities)

    monkeypatch.setattr(gram_ops, "span_basis", spy)
    anchor, m1, m2 = (torch.randn(5, 7).to(dtype) for _ in range(3))
    a_op, q_op, span_vol, anchor_sq = gram_ops._prepare(anchor, [m1, m2], gram_ops.LOSS.rows["cuda"], "cuda")
    assert calls == [2]
    assert a_op.dtype == q_op.dtype == dtype and q_op.shape == (2, 5, 7)
    assert span_vol.dtype == anchor_sq.dtype == torch.float32
    assert a_op.is_contiguous() and q_op.is_contiguous()


# ---------------------------------------------------------------------------- fake kernels validate


def _bad_calls(backend):
    """(forward op, args with one wrong shape or dtype, expected message) for every table."""
    f32 = dict(dtype=torch.float32)
    anchor, basis, vol, asq = torch.empty(5, 7), torch.empty(2, 6, 7), torch.empty(6), torch.empty(5)
    tau = torch.tensor(0.1)
    q, k = torch.empty(3, 5, 7), torch.empty(1, 6, 7)
    return [
        (gram_ops.VOLUME, (anchor, torch.empty(2, 6, 8), vol, asq), r"anchor has shape \[5, 7\], expected \[\*, 8\]"),
        (gram_ops.VOLUME, (anchor, torch.empty(8, 6, 7), vol, asq), r"k-1 = 8 vectors"),
        (gram_ops.VOLUME, (anchor, basis, vol.double(), asq), r"span_vol has dtype torch.float64"),
        (gram_ops.LOSS, (anchor, basis, vol, asq, tau, 0.1, 2, True, False), r"rows need their positive column"),
        (gram_ops.LOSS, (anchor, basis, vol, torch.empty(4), tau, 0.1, 1, True, False), r"anchor_sq has shape"),
        (infonce_ops.INFONCE, (q, torch.empty(2, 6, 7), tau, 0.0, 0), r"k has shape \[2, 6, 7\]"),
        (infonce_ops.INFONCE, (q.int(), k, tau, 0.0, 0), r"q has dtype torch.int32"),
        (infonce_ops.INFONCE, (q, k, torch.empty(1, **f32), 0.0, 0), r"temperature has shape \[1\]"),
        (codebook_ops.LOOKUP, (torch.empty(5, 7), torch.empty(9, 6), 1, "l2", None), r"codebook has shape"),
        (codebook_ops.LOOKUP, (torch.empty(5, 7), torch.empty(9, 7), 33, "l2", None), r"k = 33"),
        (codebook_ops.LOOKUP, (torch.empty(5, 7), torch.empty(9, 7), 2, "l2", torch.empty(6)), r"weight has shape"),
    ]


@pytest.mark.parametrize("backend", FUSED)
def test_fake_kernels_reject_bad_calls(backend, device):
    """Under FakeTensorMode (what torch.compile traces with) the fake kernel itself raises."""
    with torch.device(device):  # the backend's device, as where torch.compile traces its calls
        calls = _bad_calls(backend)
    for table, args, message in calls:
        op = table.forward_op(backend)
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(RuntimeError, match=message):
                op(*fake)


@pytest.mark.parametrize("backend", FUSED)
def test_fake_kernels_accept_good_calls(backend, device):
    with torch.device(device):
        anchor, basis, vol, asq = torch.randn(5, 7), torch.randn(2, 6, 7), torch.rand(6), torch.rand(5)
        tau = torch.tensor(0.1)
    with FakeTensorMode() as mode:
        a, b, v, s, t = (mode.from_tensor(x) for x in (anchor, basis, vol, asq, tau))
        assert gram_ops.VOLUME.forward_op(backend)(a, b, v, s).shape == (5, 6)
        assert gram_ops.LOSS.forward_op(backend)(a, b, v, s, t, 0.1, 1, True, False)[0].shape == (5,)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_of_a_bad_op_call_raises(backend, device):
    op = infonce_ops.INFONCE.forward_op(backend)
    with torch.device(device):
        q, k, tau = torch.randn(2, 5, 7), torch.randn(2, 6, 8), torch.tensor(0.1)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, tau):
        return op(q, k, tau, 0.0, 0)[0].sum()

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"k has shape \[2, 6, 8\], expected \[1 or 2, B2, 7\]"):
        f(q, k, tau)


# ---------------------------------------------------------------------------- imports


@pytest.mark.skipif("triton" not in FUSED, reason="triton backend unavailable")
@pytest.mark.parametrize(
    "first", ["fastbind.triton.infonce", "fastbind.triton.gram", "fastbind.triton.codebook", "fastbind.ops", "fastbind"]
)
def test_any_import_order_registers_every_triton_op(first):
    """Importing a Triton module first (or the ops package) still gives fastbind every Triton row with
    its fake kernel and autograd: a gradient through each Triton op right after the import."""
    res = _run(
        f"""
        import importlib, torch
        importlib.import_module({first!r})
        import fastbind as fb
        from fastbind.ops import _registry
        for table in _registry.TABLES.values():
            assert table.forward_op("triton").name() == table.rows["triton"].forward, table.name
        x = torch.randn(6, 5, requires_grad=True)
        y, z = torch.randn(6, 5), torch.randn(6, 5)
        for loss in (fb.infonce(x, y, backend="triton"), fb.gram_loss(x, y, z, backend="triton")):
            (g,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(g).all()
        print("ok")
        """,
        TRITON_INTERPRET="1",
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_import_does_not_load_dynamo():
    """`import fastbind` must stay light: torch._dynamo (over a second) loads only when compiling."""
    res = _run("import sys, fastbind; print('torch._dynamo' in sys.modules)")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "False"


def test_constant_marker_is_what_torch_compiler_sets():
    def ours():
        pass

    def torchs():
        pass

    _backend._assume_constant_result(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}
    assert _backend.resolve._dynamo_marked_constant
