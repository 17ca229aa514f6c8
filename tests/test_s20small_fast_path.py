"""GRAM small-batch fixed cost, stop 20 (issue 14): the fast path of the public cpu GRAM loss and the
C++ pieces under it.

* ``fastbind.ops.gram._cpu_loss_fast``: a valid call without gather on the cpu backend skips the full
  argument checks. It must make exactly the full path's op call (bitwise equal losses and gradients,
  temperature included, k = 2..8, every direction and reduction, float / int / tensor temperatures,
  non-contiguous inputs), and decline every call the checks would refuse (the full path then raises
  the same error), and every call it does not cover.
* the cached 0-d temperature (``_checks.cpu_temperature``): usable for backward when first made under
  inference mode; a bounded number of values kept.
* the fused loss's anchor gradient (one C++ loop for float32 and bfloat16 anchors) against the float64
  reference; gram_volume passes the modalities to the cpu kernels on every call (they use them for
  bfloat16 anchors only).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind import _backend
from fastbind.ops import _checks
from fastbind.ops import gram as gram_ops

pytestmark = pytest.mark.skipif("cpu" not in fb.backends(), reason="the C++ extension is not built")

F64 = torch.float64
DIRECTIONS = ("both", "a2d", "d2a")
REDUCTIONS = ("mean", "sum", "none")


def _inputs(b, d, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1).to(dtype) for _ in range(k)]


def _fast(xs, temperature=0.07, label_smoothing=0.0, direction="both", reduction="mean", backend="cpu"):
    return gram_ops._cpu_loss_fast(xs[0], tuple(xs[1:]), temperature, label_smoothing, direction, reduction, backend)


def _loss_and_grads(xs, tau, **kw):
    """gram_loss on fresh leaves of xs (and of tau when it is a tensor): (loss, grads of inputs [, tau])."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    t = tau.detach().clone().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    loss = fb.gram_loss(*leaves, temperature=t, backend="cpu", **kw)
    wrt = leaves + ([t] if isinstance(t, torch.Tensor) else [])
    up = torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape)  # a per-row upstream of any sign
    return loss.detach(), torch.autograd.grad((loss * up).sum(), wrt)


def _full_path(monkeypatch):
    monkeypatch.setattr(gram_ops, "_cpu_loss_fast", lambda *args: None)


@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fast_path_is_the_full_paths_call(k, direction, monkeypatch):
    """Bitwise the loss and every gradient of the full path, for each reduction and temperature form;
    and the fast path is taken for all of them."""
    xs = _inputs(5, 9, k, seed=10 * k + len(direction))
    xs[1] = xs[1].t().contiguous().t()  # non-contiguous: still the fast path (the op takes any strides)
    temperatures = (0.07, 1, torch.tensor(0.05), torch.nn.Parameter(torch.tensor(0.11)))
    got = {}
    for reduction in REDUCTIONS:
        for i, tau in enumerate(temperatures):
            assert _fast(xs, tau, 0.1, direction, reduction) is not None, (reduction, tau)
            got[reduction, i] = _loss_and_grads(xs, tau, label_smoothing=0.1, direction=direction, reduction=reduction)
    _full_path(monkeypatch)
    for reduction in REDUCTIONS:
        for i, tau in enumerate(temperatures):
            want = _loss_and_grads(xs, tau, label_smoothing=0.1, direction=direction, reduction=reduction)
            loss, grads = got[reduction, i]
            assert torch.equal(loss, want[0]), (reduction, tau)
            assert len(grads) == len(want[1]), (reduction, tau)
            assert all(torch.equal(a, b) for a, b in zip(grads, want[1])), (reduction, tau)


def _close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


@pytest.mark.parametrize(
    "dtype, b, d, k, rel",
    [
        (torch.float32, 64, 256, 3, 1e-3),
        (torch.float32, 7, 70, 5, 1e-3),
        (torch.bfloat16, 64, 256, 3, 3e-2),  # bf16: the GEMM operands of the gradients are bf16
        (torch.bfloat16, 9, 66, 4, 3e-2),
        (torch.float16, 13, 40, 2, 1e-2),
    ],
)
def test_fast_path_against_float64_reference(dtype, b, d, k, rel):
    """Loss and gradients (temperature included) of the fast path against the float64 torch backend,
    on the inputs' rounded values: the anchor gradient's C++ loop (float32, or the bf16 anchor read
    as it is) included."""
    xs = _inputs(b, d, k, seed=b + k, dtype=dtype)
    assert _fast(xs, 0.07, 0.1) is not None
    tau = torch.tensor(0.07, requires_grad=True)
    leaves = [x.clone().requires_grad_() for x in xs]
    loss = fb.gram_loss(*leaves, temperature=tau, label_smoothing=0.1, backend="cpu")
    grads = torch.autograd.grad(loss, [*leaves, tau])
    x64 = [x.detach().to(F64).requires_grad_() for x in xs]
    t64 = tau.detach().to(F64).requires_grad_()
    want = fb.gram_loss(*x64, temperature=t64, label_smoothing=0.1, backend="torch")
    want_grads = torch.autograd.grad(want, [*x64, t64])
    _close(loss, want, 2e-4 if dtype == torch.float32 else rel, "loss")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == (dtype if i < k else torch.float32)
        _close(g, w, rel if i < k else 2e-2, f"gradient {i} (last: temperature)")


def test_nan_in_nan_out_through_the_fast_path():
    xs = _inputs(6, 8, 3, seed=4)
    xs[2][1, 5] = math.nan
    assert _fast(xs) is not None
    leaves = [x.requires_grad_() for x in xs]
    loss = fb.gram_loss(*leaves, backend="cpu", reduction="none")
    assert loss.isnan().all()
    loss.sum().backward()
    assert all(x.grad.isnan().any() for x in leaves)


def _invalid_calls():
    """(name, args, kwargs) of gram_loss calls that the checks refuse."""
    x = _inputs(4, 6, 3, seed=1)
    a, m1, m2 = x
    yield "bool temperature", x, dict(temperature=True)
    for t in (0.0, -0.1, math.nan, math.inf, 1e-40):
        yield f"temperature {t}", x, dict(temperature=t)
    yield "nan tensor temperature", x, dict(temperature=torch.tensor(math.nan))
    yield "1-d tensor temperature", x, dict(temperature=torch.tensor([0.07]))
    yield "integer tensor temperature", x, dict(temperature=torch.tensor(1))
    yield "string temperature", x, dict(temperature="0.07")
    yield "bool label_smoothing", x, dict(label_smoothing=False)
    for ls in (-0.1, 1.5, math.nan):
        yield f"label_smoothing {ls}", x, dict(label_smoothing=ls)
    yield "unknown direction", x, dict(direction="rows")
    yield "unhashable direction", x, dict(direction=["both"])
    yield "unknown reduction", x, dict(reduction="avg")
    yield "k = 1", [a], {}
    yield "k = 9", _inputs(4, 6, 9, seed=2), {}
    yield "batch mismatch", [a, m1[:3], m2[:3]], {}
    yield "modality batch mismatch", [a, m1, m2[:3]], {}
    yield "feature mismatch", [a, m1[:, :5], m2[:, :5]], {}
    yield "dtype mismatch", [a, m1.double(), m2], {}
    yield "integer inputs", [t.long() for t in x], {}
    yield "1-d anchor", [a[0], m1, m2], {}
    yield "empty batch", [t[:0] for t in x], {}
    yield "not a tensor", [a.tolist(), m1, m2], {}
    yield "unknown backend", x, dict(backend="gpu")
    yield "float64 on the cpu backend", [t.double() for t in x], {}


@pytest.mark.parametrize("name, args, kwargs", list(_invalid_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_path_declines_what_the_checks_refuse(name, args, kwargs, monkeypatch):
    """Every invalid call falls through to the full path (the fast path returns None) and raises the
    full path's error."""
    call = dict(temperature=0.07, label_smoothing=0.0, direction="both", reduction="mean", backend="cpu")
    call.update(kwargs)
    fast_args = [call[n] for n in ("temperature", "label_smoothing", "direction", "reduction", "backend")]
    assert gram_ops._cpu_loss_fast(args[0], tuple(args[1:]), *fast_args) is None, name
    with pytest.raises((ValueError, TypeError, RuntimeError)) as got:
        fb.gram_loss(*args, **call)
    _full_path(monkeypatch)
    with pytest.raises(got.type) as want:
        fb.gram_loss(*args, **call)
    assert str(got.value) == str(want.value), name


def test_fast_path_declines_what_it_does_not_cover(monkeypatch):
    """Valid calls outside its conditions take the full path: another backend (by name or default),
    a float64 temperature tensor (autograd converts it), torch.func wrappers."""
    xs = _inputs(4, 6, 3, seed=3)
    assert _fast(xs, backend="torch") is None
    assert _fast(xs, torch.tensor(0.07, dtype=F64)) is None
    assert _fast([x.double() for x in xs], backend=None) is None  # float64: the torch backend
    monkeypatch.setattr(_backend, "_default", "torch")
    assert _fast(xs, backend=None) is None
    monkeypatch.setattr(_backend, "_default", None)
    assert _fast(xs, backend=None) is not None
    monkeypatch.setenv("FASTBIND_BACKEND", "torch")
    assert _fast(xs, backend=None) is None
    monkeypatch.delenv("FASTBIND_BACKEND")

    seen = []

    def grad_of(a):
        seen.append(gram_ops._cpu_loss_fast(a, tuple(xs[1:]), 0.07, 0.0, "both", "mean", "cpu"))
        return fb.gram_loss(a, *xs[1:], backend="cpu")

    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(grad_of)(xs[0])
    assert seen == [None]


def test_cached_temperature(monkeypatch):
    """One tensor per float temperature, made as a normal tensor even under inference mode (the
    op saves it for backward), a bounded number kept."""
    monkeypatch.setattr(_checks, "_CPU_TEMPERATURES", {})
    xs = _inputs(5, 8, 3, seed=5)
    with torch.inference_mode():
        fb.gram_loss(*xs, temperature=0.0517, backend="cpu")
    tau = _checks.cpu_temperature(0.0517)
    assert not tau.is_inference() and tau.dtype == torch.float32 and tau.item() == pytest.approx(0.0517)
    assert _checks.cpu_temperature(0.0517) is tau
    leaves = [x.requires_grad_() for x in xs]
    fb.gram_loss(*leaves, temperature=0.0517, backend="cpu").backward()
    assert all(x.grad.isfinite().all() for x in leaves)
    for i in range(3 * _checks._CPU_TEMPERATURES_KEPT):
        _checks.cpu_temperature(0.01 + i / 1000)
    assert len(_checks._CPU_TEMPERATURES) <= _checks._CPU_TEMPERATURES_KEPT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_volume_hands_the_modalities_to_the_cpu_kernels(dtype, monkeypatch):
    """gram_volume passes the modalities on every cpu call; the kernels use them for bf16 anchors
    (the exact product form) and ignore them otherwise: the volumes of the op called without them."""
    xs = _inputs(7, 64, 4, seed=6, dtype=dtype)
    calls = []
    op = gram_ops.VOLUME.forward_op("cpu")
    monkeypatch.setitem(gram_ops.VOLUME._forward_ops, "cpu", lambda *a: calls.append(a) or op(*a))
    vol = fb.gram_volume(*xs, backend="cpu")
    assert len(calls) == 1 and len(calls[0]) == 5 and all(m is x for m, x in zip(calls[0][4], xs[1:]))
    form = torch.ops.fastbind.gram_product_form(*calls[0][:2], calls[0][4])
    without = torch.ops.fastbind.gram_product_form(*calls[0][:2])  # "split" where bf16 GEMMs run here
    assert form == ("exact" if without == "split" else "float32")
    if form == "float32":
        assert torch.equal(vol, op(*calls[0][:4]))
