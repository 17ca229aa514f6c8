"""Small batches through the public cpu GRAM loss (issue 14: the fixed cost per call at B = 64).

The paths cut for small batches: the upstream gradient written by the C++ backward itself (a 0-d
gradient of a reduced loss, a strided or weighted per-row one, a disabled direction), the in-place
chain into the anchor gradient, the argument checks of gram_loss, the backend resolution for one
backend, and the direction / reduction weights defined once in fastbind/ops/_loss.py. Each against
the float64 reference, forward and every gradient (temperature included), at awkward small sizes.
"""

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind import _backend
from fastbind.ops import _loss
from fastbind.ops import gram as gram_ops

pytestmark = pytest.mark.skipif("cpu" not in fb.backends(), reason="the C++ extension is not built")

F64 = torch.float64
DIRECTIONS = ("both", "a2d", "d2a")
REDUCTIONS = ("mean", "sum", "none")


def _inputs(b, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1).float().requires_grad_() for _ in range(k)]


def _close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def _both(xs, upstream=None, **kw):
    """(loss, gradients of inputs and temperature) on the cpu backend and the float64 torch backend,
    backpropagating Σ upstream·loss (upstream float64, cast for the cpu side)."""
    tau = torch.tensor(0.07, requires_grad=True)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    t64 = tau.detach().double().requires_grad_()
    got = fb.gram_loss(*xs, temperature=tau, backend="cpu", **kw)
    want = fb.gram_loss(*x64, temperature=t64, backend="torch", **kw)
    up = torch.ones_like(want) if upstream is None else upstream(want)
    g_got = torch.autograd.grad((got * up.float()).sum(), [*xs, tau])
    g_want = torch.autograd.grad((want * up).sum(), [*x64, t64])
    return got, want, g_got, g_want


@pytest.mark.parametrize("b", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_small_batches_match_float64_reference(b, direction, reduction):
    k, d = (3, 256) if b in (17, 64) else (2 + b % 3, 7)
    xs = _inputs(b, d, k, seed=b)
    got, want, g_got, g_want = _both(xs, label_smoothing=0.1, direction=direction, reduction=reduction)
    assert got.dtype == torch.float32
    _close(got, want, 2e-4, "loss")
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _close(x, y, 1e-3, f"gradient {i} (last: temperature)")
    if b > 1:  # (one sample: every CE is 0 and so is every gradient)
        assert g_got[-1].abs() > 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_per_row_upstream_forms(direction):
    """Per-row losses under a weighted upstream, and under the stride-0 upstream of .sum()."""
    xs = _inputs(17, 24, 3, seed=7)
    weights = lambda want: torch.linspace(-1.0, 2.0, want.shape[0], dtype=F64)  # noqa: E731
    got, want, g_got, g_want = _both(xs, upstream=weights, label_smoothing=0.05, direction=direction, reduction="none")
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _close(x, y, 1e-3, f"weighted upstream, gradient {i}")
    tau = torch.tensor(0.07, requires_grad=True)
    loss = fb.gram_loss(*xs, temperature=tau, backend="cpu", direction=direction, reduction="none")
    strided = torch.autograd.grad(loss.sum(), [*xs, tau])  # the upstream is a 0-stride expand
    summed = torch.autograd.grad(
        fb.gram_loss(*xs, temperature=tau, backend="cpu", direction=direction, reduction="sum"), [*xs, tau]
    )
    for i, (x, y) in enumerate(zip(strided, summed)):
        _close(x, y, 1e-5, f".sum() of per-row vs reduction='sum', gradient {i}")


def test_scaled_reduced_upstream():
    """A reduced loss times a constant: the 0-d upstream is read by the C++ backward, times the weight."""
    xs = _inputs(3, 5, 4, seed=3)
    got, want, g_got, g_want = _both(xs, upstream=lambda w: torch.full_like(w, -2.5), label_smoothing=0.1)
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _close(x, y, 1e-3, f"gradient {i}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_in_nan_out(reduction):
    xs = [x.detach() for x in _inputs(17, 16, 3, seed=11)]
    xs[1][4, 3] = float("nan")
    xs = [x.requires_grad_() for x in xs]
    loss = fb.gram_loss(*xs, backend="cpu", reduction=reduction)
    assert loss.isnan().all()  # every row sees column 4 in its log-sum-exp
    loss.sum().backward()
    assert all(x.grad.isnan().any() for x in xs)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch, scale", [(17, 1), (6, 3)])
def test_loss_weight_is_the_per_row_reduce_definition(direction, reduction, batch, scale):
    """The fused op's weight (loss_weight) times Σ of the enabled directions equals reduce(per_row(...))
    of the other backends, bitwise: one definition of the weighting."""
    g = torch.Generator().manual_seed(batch)
    row, col = torch.rand(batch, generator=g), torch.rand(batch, generator=g)
    rows, cols = _loss.directions(direction)
    want = _loss.reduce(_loss.per_row(row if rows else None, col if cols else None, direction), reduction, batch, scale)
    enabled = row + col if rows and cols else (row if rows else col)
    w = _loss.loss_weight(direction, reduction, batch, scale)
    got = enabled.sum() * w if reduction != "none" else enabled * w
    assert torch.equal(got, want), (got, want)


def test_gram_loss_passes_loss_weight(monkeypatch):
    """gram_loss hands the fused op loss_weight(...) and `reduce` for every direction and reduction."""
    seen = []
    op = gram_ops.LOSS_FUSED.built_op("cpu")
    monkeypatch.setitem(gram_ops.LOSS_FUSED._forward_ops, "cpu", lambda *a: seen.append(a[5:]) or op(*a))
    xs = [x.detach() for x in _inputs(6, 8, 3, seed=2)]
    for direction in DIRECTIONS:
        for reduction in REDUCTIONS:
            fb.gram_loss(*xs, backend="cpu", direction=direction, reduction=reduction)
            rows, cols = _loss.directions(direction)
            want = (rows, cols, _loss.loss_weight(direction, reduction, 6), reduction != "none")
            assert seen.pop() == want, (direction, reduction)


def test_resolve_asks_only_the_named_backend(monkeypatch):
    """backend='cpu' does not run the cuda / triton availability checks (a per-call cost), and the
    per-backend status is the one availability() reports."""
    assert _backend.availability() == {name: _backend._status(name) for name in ("torch", "cpu", "cuda", "triton")}

    def refuse():
        raise AssertionError("resolve(backend='cpu') asked for the CUDA build status")

    monkeypatch.setattr(_backend, "_cuda_build_status", refuse)
    x = torch.randn(4, 8)
    assert _backend.resolve("gram_loss", "cpu", x.device, x.dtype, supported=gram_ops.LOSS.supported) == "cpu"
