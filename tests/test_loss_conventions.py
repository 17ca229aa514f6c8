"""Loss conventions of issue 13: precision of nearly saturated losses, ``logit_scale=``.

* Precision: at a mean loss of ~1e-4 the float32 losses of every backend agree with float64 to a
  relative 1e-4 per row. Forming ``lse − positive`` in float32 (the old kernels, and
  ``F.cross_entropy``) loses ~1 ulp of 1/τ there, i.e. 1e-2 to 1 relative.
* ``logit_scale=`` (open_clip's 1/τ) as the keyword alternative to ``temperature=`` in the InfoNCE
  family: same values, gradient into a learnable log-scale, exactly one of the two.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED

import fastbind as fb

BACKENDS = ["torch", *FUSED]


def _saturated_inputs(b: int = 48, d: int = 64, modalities: int = 2):
    """Paired unit rows whose positives dominate: per-row losses ~1e-5 to 1e-3 at the τ below."""
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    return [x] + [F.normalize(x + 0.1 * torch.randn(b, d, generator=g), dim=-1) for _ in range(modalities - 1)]


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / want.abs()).max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["a2d", "d2a"])
def test_infonce_saturated_precision(backend, direction, device):
    x, y = _saturated_inputs()
    kw = dict(temperature=0.045, direction=direction, reduction="none")
    want = fb.infonce(x.double(), y.double(), backend="torch", **kw)
    assert 3e-5 < want.mean().item() < 3e-4  # the regime of the issue
    got = fb.infonce(x.to(device), y.to(device), backend=backend, **kw)
    assert got.dtype == torch.float32
    assert _max_rel(got.cpu(), want) < 1e-4
    # label smoothing and a multi-process diagonal offset go through the same finalisation
    kw_ls = {**kw, "direction": "both", "label_smoothing": 1e-6}
    got_ls = fb.infonce(x.to(device), y.to(device), backend=backend, **kw_ls)
    want_ls = fb.infonce(x.double(), y.double(), backend="torch", **kw_ls)
    assert _max_rel(got_ls.cpu(), want_ls) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchored_losses_saturated_precision(backend, device):
    zs = _saturated_inputs(modalities=3)
    for fn in (fb.anchor_loss, fb.centroid_loss):
        want = fn(*[z.double() for z in zs], temperature=0.04, backend="torch")
        assert want.item() < 1e-3
        got = fn(*[z.to(device) for z in zs], temperature=0.04, backend=backend)
        assert _max_rel(got.cpu(), want) < 1e-4, fn.__name__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["a2d", "d2a"])
def test_gram_saturated_precision(backend, direction, device):
    zs = _saturated_inputs(modalities=3)
    kw = dict(temperature=0.025, direction=direction, reduction="none")
    want = fb.gram_loss(*[z.double() for z in zs], backend="torch", **kw)
    assert 1e-5 < want.mean().item() < 1e-3
    got = fb.gram_loss(*[z.to(device) for z in zs], backend=backend, **kw)
    assert _max_rel(got.cpu(), want) < 1e-4


def test_cross_entropy_is_the_imprecise_baseline():
    """The regime above is one where float32 F.cross_entropy (lse − positive) is >= 100x worse, so
    the precision tests measure the fix and not an easy case."""
    x, y = _saturated_inputs()
    want = fb.infonce(x.double(), y.double(), 0.045, direction="a2d", reduction="none", backend="torch")
    ce = F.cross_entropy(x @ y.T / 0.045, torch.arange(x.shape[0]), reduction="none")
    assert _max_rel(ce, want) > 1e-2


# ------------------------------------------------------------------------------------------ logit_scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_equals_temperature_and_trains_log_scale(backend, device):
    dtype = torch.float64 if backend == "torch" else torch.float32
    zs = [torch.randn(9, 6, dtype=dtype, device=device) for _ in range(3)]
    calls = {
        "infonce": lambda **t: fb.infonce(zs[0], zs[1], backend=backend, **t),
        "anchor_loss": lambda **t: fb.anchor_loss(*zs, backend=backend, **t),
        "centroid_loss": lambda **t: fb.centroid_loss(*zs, backend=backend, **t),
    }
    for name, call in calls.items():
        tau = torch.tensor(0.3, dtype=dtype, device=device, requires_grad=True)
        by_tau = call(temperature=tau)
        (d_tau,) = torch.autograd.grad(by_tau, tau)
        log_scale = torch.tensor(math.log(1 / 0.3), dtype=dtype, device=device, requires_grad=True)  # open_clip's
        by_scale = call(logit_scale=log_scale.exp())
        (d_log,) = torch.autograd.grad(by_scale, log_scale)
        torch.testing.assert_close(by_scale, by_tau, rtol=1e-6, atol=1e-7, msg=name)
        # τ = exp(-log_scale): dL/dlog_scale = -τ·dL/dτ
        torch.testing.assert_close(d_log, -0.3 * d_tau, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(call(logit_scale=1 / 0.3), by_tau.detach(), rtol=1e-6, atol=1e-7, msg=name)
    # neither: the default temperature 0.07
    torch.testing.assert_close(calls["infonce"](), calls["infonce"](temperature=0.07))


def test_logit_scale_errors():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="exactly one"):
        fb.infonce(x, y, 0.1, logit_scale=10.0)
    with pytest.raises(ValueError, match="exactly one"):
        fb.anchor_loss(x, y, temperature=0.1, logit_scale=torch.tensor(10.0))
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        fb.centroid_loss(x, y, logit_scale=0.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):  # the tensor form is checked the same way
        with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
            fb.infonce(x, y, logit_scale=torch.tensor(bad, requires_grad=True))
    with pytest.raises(ValueError, match="logit_scale has shape"):
        fb.infonce(x, y, logit_scale=torch.ones(2))
    with pytest.raises(TypeError, match="logit_scale"):
        fb.infonce(x, y, logit_scale="10")
    with pytest.raises(TypeError):  # keyword only: a positional third argument stays the temperature
        fb.infonce(x, y, 0.1, 0.0, "both", "mean", 10.0)


def test_modules_take_logit_scale():
    x, y, z = (torch.randn(7, 5, dtype=torch.float64) for _ in range(3))
    want = fb.infonce(x, y, temperature=0.25)
    torch.testing.assert_close(fb.nn.InfoNCELoss(logit_scale=4.0)(x, y), want)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(4.0), dtype=torch.float64))
    got = fb.nn.InfoNCELoss()(x, y, logit_scale=log_scale.exp())  # open_clip's ClipLoss call
    torch.testing.assert_close(got, want)
    got.backward()
    assert log_scale.grad is not None and log_scale.grad.abs() > 0
    torch.testing.assert_close(
        fb.nn.CentroBindLoss(logit_scale=4.0, leave_one_out=True)(x, y, z),
        fb.centroid_loss(x, y, z, temperature=0.25, leave_one_out=True),
    )
    with pytest.raises(ValueError, match="pass one"):
        fb.nn.InfoNCELoss(temperature=0.1, logit_scale=10.0)
    with pytest.raises(ValueError, match="learns its own temperature"):
        fb.nn.CentroBindLoss(learnable_temperature=True)(x, y, logit_scale=torch.tensor(4.0))
