"""Property-style bad- and degenerate-input grid over every public function and every backend here.

For each function, each backend (torch; cpu and triton under the interpreter where available) and
each case — a NaN / +inf / −inf in every argument position (data tensors, a tensor temperature,
centroid weights, the lookup weight), an empty batch, B = 1, D = 1, non-contiguous, aliased (one
tensor passed for several arguments), overlapping and expanded (stride-0) inputs — the call must
either raise ValueError / TypeError, or return what the float64 reference (backend "torch" on
float64 copies of the same inputs) returns: the same shapes, non-finite entries exactly where the
reference has non-finite entries, finite entries close to the reference's. Never another exception,
never a finite value where the reference is NaN or inf. For finite results the first-order
gradients are compared with the reference's too (at degenerate GRAM points, where the volume's
derivative does not exist, only their finiteness); for non-finite results the backward must run
without an exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from conftest import FUSED

import fastbind as fb
from fastbind.reference import codebook as codebook_ref

BACKENDS = ["torch", *FUSED]
K_CODES = 5  # codebook size; codebook_lookup returns its k = 2 nearest codes
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter


@dataclasses.dataclass
class Spec:
    """shapes(b, d): one entry per tensor argument: (shape, kind), kind "data" (randn, gets the
    degenerate transforms), "positive" (temperature / weights: rand + 0.5). call(ts, backend)
    returns a tuple of outputs."""

    shapes: Callable
    call: Callable
    gram: bool = False  # GRAM family: degenerate cases have non-unique derivatives


def _data(*shapes):
    return [(s, "data") for s in shapes]


def _lookup(ts, be, metric):
    return fb.codebook_lookup(ts[0], ts[1], 2, metric, ts[2], backend=be)


SPECS = {
    "gram_volume": Spec(
        lambda b, d: _data((b, d), (b + 1, d), (b + 1, d)),
        lambda ts, be: (fb.gram_volume(*ts, backend=be),),
        gram=True,
    ),
    "gram_volume_paired": Spec(
        lambda b, d: _data((b, d), (b, d), (b, d)),
        lambda ts, be: (fb.gram_volume_paired(*ts, backend=be),),
        gram=True,
    ),
    "gram_loss": Spec(
        lambda b, d: _data((b, d), (b, d), (b, d)) + [((), "positive")],
        lambda ts, be: (
            fb.gram_loss(*ts[:3], temperature=ts[3], label_smoothing=0.1, backend=be),
            fb.gram_loss(*ts[:3], temperature=ts[3], reduction="none", backend=be),
        ),
        gram=True,
    ),
    "infonce": Spec(
        lambda b, d: _data((b, d), (b, d)) + [((), "positive")],
        lambda ts, be: (
            fb.infonce(ts[0], ts[1], ts[2], 0.1, backend=be),
            fb.infonce(ts[0], ts[1], ts[2], reduction="none", backend=be),
        ),
    ),
    "anchor_loss": Spec(
        lambda b, d: _data((b, d), (b, d), (b, d)) + [((), "positive")],
        lambda ts, be: (fb.anchor_loss(*ts[:3], temperature=ts[3], backend=be),),
    ),
    "centroid_loss": Spec(
        lambda b, d: _data((b, d), (b, d), (b, d)) + [((), "positive"), ((3,), "positive")],
        lambda ts, be: (
            fb.centroid_loss(*ts[:3], temperature=ts[3], weights=ts[4], backend=be),
            fb.centroid_loss(*ts[:3], temperature=ts[3], leave_one_out=True, normalize_anchor=True, backend=be),
        ),
    ),
    "centroid_similarity": Spec(
        lambda b, d: _data((b, d), (b, d), (b, d)),
        lambda ts, be: (fb.centroid_similarity(*ts, backend=be),),
    ),
    "codebook_lookup_l2": Spec(
        lambda b, d: _data((b, d), (K_CODES, d)) + [((d,), "positive")],
        lambda ts, be: _lookup(ts, be, "l2"),
    ),
    "codebook_lookup_cosine": Spec(
        lambda b, d: _data((b, d), (K_CODES, d)) + [((d,), "positive")],
        lambda ts, be: _lookup(ts, be, "cosine"),
    ),
    "codebook_lookup_dot": Spec(
        lambda b, d: _data((b, d), (K_CODES, d)) + [((d,), "positive")],
        lambda ts, be: _lookup(ts, be, "dot"),
    ),
    "quantize": Spec(
        lambda b, d: _data((b, d), (K_CODES, d)) + [((d,), "positive")],
        lambda ts, be: fb.quantize(ts[0], ts[1], "l2", ts[2], backend=be),
    ),
    "toc_scores": Spec(
        lambda b, d: _data((K_CODES, d)),
        lambda ts, be: (fb.toc_scores(ts[0], 0.7, 0.1, backend=be),),
    ),
    "toc_select": Spec(
        lambda b, d: _data((K_CODES, d)),
        lambda ts, be: (fb.toc_select(ts[0], min(2, ts[0].shape[1]), backend=be),),
    ),
}


def _public(name: str) -> str:
    """The public function a grid entry calls (codebook_lookup_l2 -> codebook_lookup)."""
    return name.rsplit("_", 1)[0] if name.startswith("codebook_lookup_") else name


BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}
DEGENERATE = ["empty", "B=1", "D=1", "non-contiguous", "aliased", "overlapping", "expanded"]


# ---------------------------------------------------------------------------------------------
# inputs: a list of float32 leaves (the "bases") and a function building the arguments from them, so
# that aliased / overlapping / expanded arguments share their leaf in float32 and in float64 alike
def _case(spec: Spec, case: str):
    b, d = {"empty": (0, 4), "B=1": (1, 4), "D=1": (4, 1)}.get(case, (4, 4))
    if case == "aliased":
        b = K_CODES  # x and the codebook get one shape, so that they can be one tensor
    shapes = spec.shapes(b, d)
    bases, build = [], []  # build[i](bases) -> argument i
    first_of_shape: dict[tuple, tuple[int, int]] = {}  # shape -> (argument, base) of its first argument
    for i, (shape, kind) in enumerate(shapes):
        new = len(bases)  # index of the base this argument adds, if it adds one
        if kind == "positive":
            bases.append(torch.rand(shape) + 0.5)
            build.append(lambda bs, j=new: bs[j])
            continue
        if case in ("aliased", "overlapping") and shape in first_of_shape:
            arg, j = first_of_shape[shape]
            if case == "aliased":  # the very same tensor object
                build.append(lambda bs, a=arg: build[a](bs))
            else:  # a view of the same storage shifted by one row per argument
                build.append(lambda bs, j=j, s=i - arg, n=shape[0]: bs[j][s : s + n])
            continue
        first_of_shape[shape] = (i, new)
        if case == "overlapping":
            bases.append(torch.randn(shape[0] + len(shapes), *shape[1:]))
            build.append(lambda bs, j=new, n=shape[0]: bs[j][:n])
        elif case == "non-contiguous":
            bases.append(torch.randn(shape[0], 2 * shape[1]))
            build.append(lambda bs, j=new: bs[j][:, ::2])
        elif case == "expanded":
            bases.append(torch.randn(1, *shape[1:]))
            build.append(lambda bs, j=new, n=shape[0]: bs[j].expand(n, *bs[j].shape[1:]))
        else:
            bases.append(torch.randn(shape))
            build.append(lambda bs, j=new: bs[j])
    return bases, lambda bs: [f(bs) for f in build]


def _run(spec: Spec, bases, make, backend: str, dtype: torch.dtype, device=None):
    """(outputs, leaves) or the ValueError / TypeError raised; any other exception fails the test.
    The leaves go to `device` (the backend's), the outputs come back to CPU (differentiably)."""
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in bases]
    try:
        return tuple(out.cpu() for out in spec.call(make(leaves), backend)), leaves
    except (ValueError, TypeError) as exc:
        return exc, leaves


def _assert_like_reference(name, outs, ref_outs):
    assert len(outs) == len(ref_outs), name
    for n, (got, want) in enumerate(zip(outs, ref_outs)):
        where = f"{name} output {n}"
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        if not want.is_floating_point():
            continue  # indices: checked through the distances in _assert_indices
        finite = want.isfinite()
        assert torch.equal(got.isfinite(), finite), (
            f"{where}: finite pattern differs from the reference\n got {got.detach()}\nwant {want.detach()}"
        )
        scale = max(1.0, want.detach()[finite].abs().max().item()) if finite.any() else 1.0
        # GRAM volumes at (near-)coincident points carry float32 round-off of ~sqrt(eps)·scale
        atol = (3e-3 if "gram" in name else 2e-4) * scale
        torch.testing.assert_close(
            got.detach().double()[finite],
            want.detach()[finite],
            atol=atol,
            rtol=1e-3,
            msg=lambda m, w=where: f"{w}: {m}",
        )


def _assert_indices(name, outs, ref_outs, args64):
    """An index is right when its reference distance equals the reference's best (robust to near
    ties between float32 and float64); every index is in range."""
    if not name.startswith(("codebook_lookup", "quantize", "toc_select")):
        return
    if name == "toc_select":
        assert torch.equal(outs[0], ref_outs[0]), f"{name}: {outs[0]} vs {ref_outs[0]}"
        return
    index = outs[1] if name.startswith("codebook") else outs[1][..., None]
    ref_dist = ref_outs[0] if name.startswith("codebook") else ref_outs[2][..., None]
    assert ((index >= 0) & (index < K_CODES)).all(), f"{name}: index out of range {index}"
    x, codebook, weight = (a.detach() for a in args64)
    metric = name.rsplit("_", 1)[-1] if name.startswith("codebook") else "l2"
    full = codebook_ref.pairwise_distance(x.reshape(-1, x.shape[-1]), codebook, metric, weight)
    chosen = full.gather(1, index.reshape(full.shape[0], -1)).reshape(ref_dist.shape)
    finite = ref_dist.isfinite()
    torch.testing.assert_close(chosen[finite], ref_dist.detach()[finite], atol=1e-4, rtol=1e-4)


def _grads(outs, leaves):
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if not floats:
        return None
    gen = torch.Generator().manual_seed(1)
    # the same upstream weights in float32 and float64 (drawn in float64)
    total = sum((o * torch.rand(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum() for o in floats)
    return torch.autograd.grad(total, leaves, allow_unused=True)


def _check(name: str, backend: str, device, bases, make, compare_grads: bool):
    """compare_grads=None: the backward must only run (inputs with NaN / inf)."""
    spec = SPECS[name]
    got, leaves = _run(spec, bases, make, backend, torch.float32, device)
    ref, leaves64 = _run(spec, bases, make, "torch", torch.float64)
    if isinstance(got, Exception) or isinstance(ref, Exception):
        # a clear error on one side only would mean the backends disagree about what is valid
        assert type(got) is type(ref), f"{name} {backend}: {got!r} but the reference gave {ref!r}"
        assert str(got).startswith(f"{_public(name)}: "), (
            f"{name} {backend}: the error does not name the function: {got}"
        )
        return
    _assert_like_reference(f"{name} {backend}", got, ref)
    _assert_indices(name, got, ref, make(leaves64))
    grads = _grads(got, leaves)  # must not raise, whatever the values
    all_finite = all(o.isfinite().all() for o in ref if o.is_floating_point())
    if grads is None or not all_finite or compare_grads is None:
        return
    ref_grads = _grads(ref, leaves64)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if g is None or r is None:
            assert (g is None or not g.any()) and (r is None or not r.any()), f"{name} {backend}: grad {i}"
            continue
        assert g.isfinite().all(), f"{name} {backend}: non-finite gradient {i} for finite inputs"
        if compare_grads:
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(
                g.double().cpu(), r, atol=1e-3 * scale, rtol=1e-3, msg=lambda m, i=i: f"{name} {backend} grad {i}: {m}"
            )


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SPECS)
def test_non_finite_value_in_every_argument_position(name, backend, device):
    spec = SPECS[name]
    for position in range(len(spec.shapes(4, 4))):
        for value in BAD_VALUES.values():
            bases, make = _case(spec, "plain")
            bases[position].view(-1)[min(5, bases[position].numel() - 1)] = value
            _check(name, backend, device, bases, make, compare_grads=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SPECS)
def test_degenerate_inputs(name, backend, device):
    spec = SPECS[name]
    for case in DEGENERATE:
        bases, make = _case(spec, case)
        # GRAM volumes of dependent vectors (D = 1, aliased or shifted rows) have no unique derivative
        singular = spec.gram and case in ("D=1", "aliased", "overlapping")
        _check(name, backend, device, bases, make, compare_grads=not singular)


def test_grid_has_every_public_function():
    """The grid above covers the whole public API (a new function must be added to it)."""
    covered = {_public(n) for n in SPECS}
    public = {n for n in fb.__all__ if callable(getattr(fb, n)) and n not in ("backends", "get_backend", "set_backend")}
    assert public == covered
