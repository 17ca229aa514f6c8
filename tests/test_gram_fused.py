"""The cpu backend's GRAM loss as one C++ autograd op (fastbind::gram_loss_fused_fwd,
csrc/cpu/gram_autograd.cpp) and the native-autograd rows of the registry: the op against the float64
reference (forward and every gradient, temperature included, directions, sums and per-row losses,
rectangular blocks with a diagonal offset, 16-bit inputs), its fake kernel and opcheck, its errors,
and that a gram_loss call on the cpu backend is that one op with no Python autograd node."""

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.ops import _registry
from fastbind.ops import gram as gram_ops
from fastbind.reference import gram as ref

pytestmark = pytest.mark.skipif("cpu" not in fb.backends(), reason="the C++ extension is not built")

F64 = torch.float64


def _op():
    return torch.ops.fastbind.gram_loss_fused_fwd.default


def _inputs(b1, b2, d, k, seed, dtype=torch.float32):
    """Anchor [b1, d] and k-1 modalities [b2, d], L2-normalised (GRAM's embeddings), as leaves."""
    g = torch.Generator().manual_seed(seed)
    xs = [F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1) for b in [b1] + [b2] * (k - 1)]
    return [x.to(dtype).requires_grad_() for x in xs]


def _close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def _reference(anchor, mods, tau, eps, offset, rows, cols, weight, reduce):
    """The op's definition in float64 torch: per-row CE of rows (positive i + offset) and/or
    columns (positive j - offset), weight · their sum per row, summed when `reduce`."""
    logits = -ref.gram_volume(anchor, *mods) / tau  # [B1, B2]
    parts = []
    if rows:
        target = torch.arange(anchor.shape[0]) + offset
        parts.append(F.cross_entropy(logits, target, label_smoothing=eps, reduction="none"))
    if cols:
        target = torch.arange(mods[0].shape[0]) - offset
        parts.append(F.cross_entropy(logits.t(), target, label_smoothing=eps, reduction="none"))
    per_row = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return weight * (per_row.sum() if reduce else per_row)


# (b1, b2, d, k, offset, rows, cols): awkward sizes, every k, rectangular blocks with offsets
CASES = [
    (1, 1, 3, 2, 0, True, True),
    (13, 13, 37, 3, 0, True, True),
    (29, 29, 16, 8, 0, True, True),
    (5, 11, 9, 4, 3, True, False),  # local rows against more columns, positives at i + 3
    (11, 5, 9, 5, -2, False, True),  # more rows against local columns, positives at j + 2
    (7, 7, 300, 3, 0, False, True),
]


@pytest.mark.parametrize("b1, b2, d, k, offset, rows, cols", CASES)
@pytest.mark.parametrize("reduce", [True, False])
def test_matches_float64_reference(b1, b2, d, k, offset, rows, cols, reduce):
    xs = _inputs(b1, b2, d, k, seed=b1 * 31 + k)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    tau32 = torch.tensor(0.1, requires_grad=True)
    tau64 = tau32.detach().double().requires_grad_()
    weight, eps = 0.37, 0.1
    got = _op()(xs[0], xs[1:], tau32, eps, offset, rows, cols, weight, reduce)
    want = _reference(x64[0], x64[1:], tau64, eps, offset, rows, cols, weight, reduce)
    assert got.dtype == torch.float32
    _close(got, want, 2e-4, "loss")
    upstream = torch.rand(want.shape, dtype=F64)
    g_got = torch.autograd.grad((got * upstream.float()).sum(), [*xs, tau32])
    g_want = torch.autograd.grad((want * upstream).sum(), [*x64, tau64])
    names = ["anchor"] + [f"modality {i}" for i in range(1, k)] + ["temperature"]
    for name, x, y in zip(names, g_got, g_want):
        _close(x, y, 1e-3, f"grad of {name}")


@pytest.mark.parametrize("direction", ["both", "a2d", "d2a"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_loss_is_the_fused_op(direction, reduction, monkeypatch):
    """gram_loss on the cpu backend: one call of the fused op, a C++ autograd node on top of the
    inputs (no Python autograd node, no small torch ops), values and gradients as the reference."""
    calls = []
    op = gram_ops.LOSS_FUSED.built_op("cpu")
    monkeypatch.setitem(gram_ops.LOSS_FUSED._forward_ops, "cpu", lambda *a: calls.append(a[5:]) or op(*a))
    xs = _inputs(10, 10, 24, 3, seed=5)
    tau = torch.tensor(0.07, requires_grad=True)
    kw = dict(temperature=tau, label_smoothing=0.1, direction=direction, reduction=reduction)
    got = fb.gram_loss(*xs, backend="cpu", **kw)
    assert len(calls) == 1
    # the graph from the loss to the leaves: the op's C++ node, then AccumulateGrad of the data
    # leaves and the temperature's float32 conversion (ToCopyBackward0 is skipped by .to(float32))
    node = got.grad_fn
    assert "GramLossFused" in node.name(), node.name()
    below = {n.name() for n, _ in node.next_functions if n is not None}
    assert below <= {"torch::autograd::AccumulateGrad"}, below
    x64 = [x.detach().double().requires_grad_() for x in xs]
    t64 = tau.detach().double().requires_grad_()
    want = fb.gram_loss(*x64, backend="torch", **{**kw, "temperature": t64})
    _close(got, want, 2e-4, "loss")
    g_got = torch.autograd.grad(got.sum(), [*xs, tau])
    g_want = torch.autograd.grad(want.sum(), [*x64, t64])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _close(x, y, 1e-3, f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_and_float64_temperature(dtype):
    """16-bit inputs: gradients in the input dtype, values as the float64 reference on the rounded
    inputs; a float64 temperature tensor gets a float64 gradient."""
    xs = _inputs(9, 9, 20, 3, seed=3, dtype=dtype)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    tau = torch.tensor(0.2, dtype=F64, requires_grad=True)
    t64 = tau.detach().clone().requires_grad_()
    got = _op()(xs[0], xs[1:], tau, 0.1, 0, True, True, 0.5 / 9, True)
    want = _reference(x64[0], x64[1:], t64, 0.1, 0, True, True, 0.5 / 9, True)
    _close(got, want, 2e-3, "loss")
    got.backward()
    want.backward()
    for x, y in zip(xs, x64):
        assert x.grad.dtype == dtype
        _close(x.grad, y.grad, 2e-2, "input gradient")
    assert tau.grad.dtype == F64
    _close(tau.grad, t64.grad, 1e-3, "temperature gradient")


def test_only_some_inputs_need_grad():
    """Detached modalities skip the basis backward; the anchor's and temperature's gradients stay."""
    a, m1, m2 = _inputs(6, 6, 8, 3, seed=1)
    m1, m2 = m1.detach(), m2.detach()
    a64 = a.detach().double().requires_grad_()
    got = _op()(a, [m1, m2], torch.tensor(0.1), 0.0, 0, True, True, 1.0, True)
    want = _reference(a64, [m1.double(), m2.double()], 0.1, 0.0, 0, True, True, 1.0, True)
    got.backward()
    want.backward()
    _close(a.grad, a64.grad, 1e-3, "anchor gradient")


def test_inference_mode_runs_the_plain_composition():
    """Below autograd (inference mode) the op runs the same composition: the same value."""
    xs = [x.detach() for x in _inputs(7, 7, 10, 4, seed=2)]
    tau = torch.tensor(0.1)
    want = _op()(xs[0], xs[1:], tau, 0.1, 0, True, True, 1.0, False)
    with torch.inference_mode():
        got = _op()(xs[0], xs[1:], tau, 0.1, 0, True, True, 1.0, False)
    assert torch.equal(got, want)


def test_nan_propagates():
    xs = [x.detach() for x in _inputs(5, 5, 8, 3, seed=4)]
    xs[2][1, 0] = float("nan")
    xs = [x.requires_grad_() for x in xs]
    per_row = _op()(xs[0], xs[1:], torch.tensor(0.1), 0.0, 0, True, True, 1.0, False)
    assert per_row.isnan().all()  # every row sees column 1 in its log-sum-exp; column 1's own CE is NaN
    per_row.sum().backward()
    assert all(x.grad.isnan().any() for x in xs)


def test_double_backward_raises():
    xs = _inputs(4, 4, 5, 3, seed=1)
    loss = _op()(xs[0], xs[1:], torch.tensor(0.1), 0.0, 0, True, True, 1.0, True)
    with pytest.raises(RuntimeError, match="second-order gradients .* backend='torch'"):
        torch.autograd.grad(loss, xs, create_graph=True)


def _bad_calls():
    a, m = torch.randn(5, 7), torch.randn(6, 7)
    tau = torch.tensor(0.1)
    return [
        ((a, [m, m], tau, 0.0, 0, False, False, 1.0, True), "neither rows nor columns"),
        ((a, [m, m], tau, 0.0, 0, True, True, 1.0, False), r"need B1 == B2, got 5 and 6"),
        ((a, [m, m], tau, 0.0, 2, True, False, 1.0, True), "rows need"),
        ((a, [m, torch.randn(6, 8)], tau, 0.0, 0, True, False, 1.0, True), "modality 1"),
        ((a, [m], torch.ones(1), 0.0, 0, True, False, 1.0, True), "temperature"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_errors_real_and_fake(case):
    """The real op and its fake kernel (what torch.compile traces with) refuse the same calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, message = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=message):
        _op()(*args)
    with FakeTensorMode() as mode:
        fake = [
            mode.from_tensor(x)
            if isinstance(x, torch.Tensor)
            else [mode.from_tensor(y) for y in x]
            if isinstance(x, list)
            else x
            for x in args
        ]
        with pytest.raises(RuntimeError, match=message), torch.inference_mode():
            _op()(*fake)  # below autograd: the op's own fake kernel
        with pytest.raises(RuntimeError, match=message):
            _op()(*fake)  # through the C++ autograd: the fake kernels of the ops it calls


def test_opcheck():
    xs = _inputs(6, 6, 9, 3, seed=6)
    tau = torch.tensor(0.2, requires_grad=True)
    torch.library.opcheck(_op(), (xs[0], xs[1:], tau, 0.1, 0, True, True, 0.25, True))
    torch.library.opcheck(_op(), (xs[0], xs[1:], tau, 0.0, 0, True, True, 0.5, False))
    rect = _inputs(4, 9, 9, 4, seed=7)
    torch.library.opcheck(_op(), (rect[0], rect[1:], tau.detach(), 0.1, 2, True, False, 1.0, False))


def test_torch_compile_with_learnable_temperature():
    xs = [x.detach() for x in _inputs(12, 12, 16, 3, seed=8)]

    def step(a, m1, m2, t):
        return fb.gram_loss(a, m1, m2, temperature=t, label_smoothing=0.1, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in xs] + [torch.tensor(0.1, requires_grad=True)]
    eager = [x.clone().requires_grad_() for x in xs] + [torch.tensor(0.1, requires_grad=True)]
    compiled(*leaves).backward()
    step(*eager).backward()
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- native-autograd rows


def test_native_rows_are_built_and_dispatch_by_table():
    assert gram_ops.BASIS.rows["cpu"].native_autograd and gram_ops.LOSS_FUSED.rows["cpu"].native_autograd
    assert gram_ops.BASIS.built_op("cpu") is torch.ops.fastbind.gram_basis_fwd.default
    assert gram_ops.LOSS_FUSED.built_op("cpu") is _op()
    assert gram_ops.LOSS_FUSED.built_op("triton") is None and gram_ops.BASIS.built_op("cuda") is None
    # internal tables: backends() counts the public ops' tables only
    assert "gram_basis" not in _registry.TABLES and "gram_loss_fused" not in _registry.TABLES


def test_native_row_rules():
    native = _registry.Kernels("fastbind::gram_basis_fwd", "fastbind::gram_basis_bwd", native_autograd=True)
    with pytest.raises(ValueError, match="native-autograd 'cpu' row in a table with a Python autograd formula"):
        _registry.OpTable("t", gram_ops._loss_fake, make_backward=gram_ops.LOSS.make_backward).add("cpu", native)
    _registry.OpTable("t", gram_ops._basis_fake).add("cpu", native)  # no formula needed
