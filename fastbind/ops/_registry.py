"""The kernel registry (DESIGN §4): which custom ops run one fused op on each backend.

Each fused op (GRAM volume, GRAM loss, InfoNCE, codebook lookup) has one :class:`OpTable`, declared
in its family's module (``fastbind/ops/<family>.py``) together with its fake kernels and autograd
formula. A table maps a fused backend name (:data:`FUSED_BACKENDS`) to a :class:`Kernels` row: the
qualified names of the forward and backward custom ops and the dtypes their GEMM operands take.
Adding a backend to an op is one ``table.add(...)`` per table (docs/adding-an-op.md).

A row may be *native autograd* (``Kernels(..., native_autograd=True)``): its forward op
differentiates itself, with a C++ ``torch::autograd::Function`` registered for the Autograd
dispatch key that calls the backward ops through the dispatcher (no Python in the backward, which
at small batches cost more than the kernels). Such a row gets its fake kernels registered and no
``register_autograd``; its table has no Python autograd formula. The GRAM per-sample basis and the
cpu backend's whole GRAM loss are such rows (``fastbind/ops/gram.py``).

:func:`register_built` is the one place that registers fake kernels and autograd, for every row
whose ops exist in this process (the C++ ops once ``fastbind._C`` is loaded, the Triton ops once
their ``fastbind.triton.<family>`` module is imported). Rows of different backends may share ops
(the C++ ``cpu`` and ``cuda`` kernels are two dispatch keys of one schema): each op is registered
once, and a ``cuda`` row counts as built only where its ops have CUDA kernels (:data:`DISPATCH_KEYS`).
Dispatch reads the table (:meth:`OpTable.forward_op`), so a backend without a row, or with a row
whose ops or kernels do not exist here, raises instead of running some other backend's ops.

The ``torch`` backend has no row: it is the plain-PyTorch reference (:mod:`fastbind.reference`),
which every table supports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastbind.ops._checks import check_first_order

# The backends that run fastbind's fused custom ops, fastest first; "torch" runs the reference.
FUSED_BACKENDS = ("cuda", "triton", "cpu")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OperandDtypes:
    """The input dtypes a row's kernels take as GEMM operands unchanged; any other (fused) input
    dtype is converted to float32 before the op. ``lhs`` is the row side (anchor, queries, x),
    ``rhs`` the column side (basis, keys, codebook)."""

    lhs: frozenset = frozenset(FUSED_DTYPES)
    rhs: frozenset = frozenset(FUSED_DTYPES)

    def lhs_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype in self.lhs else torch.float32

    def rhs_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype in self.rhs else torch.float32


AS_GIVEN = OperandDtypes()  # float32 and both 16-bit dtypes go to the kernels as they are


@dataclass(frozen=True)
class Kernels:
    """One backend's row of an :class:`OpTable`: qualified custom-op names ("fastbind::<op>_fwd")
    and the operand dtype policy. ``backward`` is None for an op that is not differentiable itself
    (the codebook lookup), or, with ``native_autograd``, for one whose C++ autograd calls other
    rows' backward ops (the fused cpu GRAM loss)."""

    forward: str
    backward: str | None
    operands: OperandDtypes = AS_GIVEN
    native_autograd: bool = False  # the forward op's own C++ autograd kernel differentiates it


def _op(name: str) -> torch._ops.OpOverload:
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op).default


def _exists(name: str) -> bool:
    namespace, op = name.split("::")
    return hasattr(getattr(torch.ops, namespace), op)


# Backends whose rows name ops of another backend (one schema, several dispatch keys): such a row is
# built only where every op has a kernel for its key. The cuda row names the cpu row's C++ ops, which
# exist in every build of fastbind._C but have CUDA kernels only in a FASTBIND_BUILD_CUDA=1 build;
# without this check a CPU-only build would "run" cuda by dispatching CPU tensors to the CPU kernels.
DISPATCH_KEYS = {"cuda": "CUDA"}


def _has_kernels(backend: str, names: list[str]) -> bool:
    key = DISPATCH_KEYS.get(backend)
    return all(_exists(n) and (key is None or torch._C._dispatch_has_kernel_for_dispatch_key(n, key)) for n in names)


@dataclass
class OpTable:
    """The registry of one fused op: its rows, fake kernels and autograd formula.

    ``fake_forward``/``fake_backward``: the fake (meta) kernels, shared by every row (one schema per
    op name pattern). ``setup_context`` and ``make_backward(backward_op, forward_name)``: the autograd
    formula, where ``make_backward`` returns the ``backward(ctx, *grads)`` of
    ``torch.library.register_autograd`` calling that row's backward op. Both None for an op without
    gradient.
    """

    name: str
    fake_forward: Callable
    fake_backward: Callable | None = None
    setup_context: Callable | None = None
    make_backward: Callable | None = None
    rows: dict[str, Kernels] = field(default_factory=dict)
    _forward_ops: dict[str, torch._ops.OpOverload] = field(default_factory=dict)

    def add(self, backend: str, kernels: Kernels) -> None:
        """Declare the row of `backend` (its ops need not exist yet: see :func:`register_built`)."""
        if backend not in FUSED_BACKENDS:
            raise ValueError(f"{self.name}: {backend!r} is not a fused backend ({', '.join(FUSED_BACKENDS)})")
        if kernels.native_autograd:
            if self.make_backward is not None:
                raise ValueError(
                    f"{self.name}: a native-autograd {backend!r} row in a table with a Python autograd formula"
                )
        elif (kernels.backward is None) != (self.make_backward is None):
            raise ValueError(f"{self.name}: the {backend!r} row and the table disagree on having a backward op")
        self.rows[backend] = kernels

    @property
    def supported(self) -> tuple[str, ...]:
        """Backends that can run this op where built: its rows and the reference."""
        return (*self.rows, "torch")

    def op_names(self, backend: str) -> list[str]:
        """The qualified names of `backend`'s row: the forward op, then the backward op if any."""
        row = self.rows[backend]
        return [row.forward] + ([row.backward] if row.backward else [])

    def built(self, backend: str) -> bool:
        """Whether `backend`'s row is dispatchable here (see :func:`register_built`)."""
        return backend in self._forward_ops

    def forward_op(self, backend: str) -> torch._ops.OpOverload:
        """The forward custom op of `backend`'s row (a plain dict lookup: traceable by dynamo)."""
        op = self._forward_ops.get(backend)
        if op is None:
            if backend not in self.rows:
                raise RuntimeError(f"{self.name}: no {backend!r} kernel (rows: {', '.join(self.rows) or 'none'})")
            raise RuntimeError(f"{self.name}: the {backend!r} ops ({self.rows[backend].forward}) are not built here")
        return op

    def built_op(self, backend: str) -> torch._ops.OpOverload | None:
        """The forward op of `backend`'s row where built here, else None (for ops a backend may or
        may not have, e.g. the per-sample GRAM basis; a plain dict lookup: traceable by dynamo)."""
        return self._forward_ops.get(backend)


# op name -> table of each public fused op, for backends() and the tests. Internal tables that serve
# one of them on some backends (gram.BASIS, gram.LOSS_FUSED) are registered by register_built but
# not declared: a backend with only such rows runs no public op.
TABLES: dict[str, OpTable] = {}
_REGISTERED: set[str] = set()  # forward op names with fake + autograd registered


def declare(table: OpTable) -> OpTable:
    if table.name in TABLES:
        raise ValueError(f"op table {table.name!r} declared twice")
    TABLES[table.name] = table
    return table


def _register_ops(table: OpTable, kernels: Kernels) -> None:
    forward = kernels.forward
    if forward in _REGISTERED:
        return
    torch.library.register_fake(forward)(table.fake_forward)
    if kernels.backward is not None:
        torch.library.register_fake(kernels.backward)(table.fake_backward)
    if kernels.backward is not None and not kernels.native_autograd:
        backward = table.make_backward(_op(kernels.backward), forward)
        torch.library.register_autograd(forward, backward, setup_context=table.setup_context)
    _REGISTERED.add(forward)


def register_built(*tables: OpTable) -> None:
    """Register fake kernels and autograd for every row whose ops exist in this process (with a
    kernel for the backend's dispatch key, :data:`DISPATCH_KEYS`), and make those rows dispatchable.
    Idempotent: call it again after more ops or kernels were loaded."""
    for table in tables:
        for backend, kernels in table.rows.items():
            if table.built(backend) or not _has_kernels(backend, table.op_names(backend)):
                continue
            _register_ops(table, kernels)
            table._forward_ops[backend] = _op(kernels.forward)


def make_first_order_backward(backward: Callable) -> Callable:
    """`backward(backward_op, forward_name)` -> autograd backward that refuses double backward
    (the fused backward kernels are not differentiable themselves)."""

    def make(backward_op, forward_name):
        def wrapped(ctx, *grads):
            check_first_order(forward_name)
            return backward(ctx, backward_op, *grads)

        return wrapped

    return make


# ---------------------------------------------------------------------------------------------
# checks of the fake kernels: shapes and dtypes only (no values), with torch._check so that a bad
# call fails under FakeTensorMode / torch.compile as the real kernel's TORCH_CHECK would


def _dims(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """t.shape == shape (an entry None matches any size)."""
    ok = t.dim() == len(shape) and all(want is None or got == want for got, want in zip(t.shape, shape))
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    torch._check(ok, lambda: f"{op}: {name} has shape {_dims(t)}, expected {want}")


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes: tuple) -> None:
    torch._check(t.dtype in dtypes, lambda: f"{op}: {name} has dtype {t.dtype}, expected one of {dtypes}")
