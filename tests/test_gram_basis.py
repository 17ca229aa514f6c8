"""The per-sample part of GRAM on the cpu backend: the C++ op pair fastbind::gram_basis_fwd/_bwd
(csrc/cpu/span_basis.cpp) against the torch span_basis in float64 (forward and backward, awkward
shapes, dependent and zero modalities, NaN, 16-bit inputs), opcheck, and its use by the losses."""

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.ops import gram as gram_ops

pytestmark = pytest.mark.skipif("cpu" not in fb.backends(), reason="the C++ extension is not built")

F64 = torch.float64


def _fwd(modalities):
    return torch.ops.fastbind.gram_basis_fwd(modalities)


def _modalities(n, b, d, seed, dtype=torch.float32):
    """n float64 modalities [b, d] with unequal row norms (0.5 .. 1.5), as leaves of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    ms = [
        torch.randn(b, d, generator=g, dtype=F64) * (0.5 + torch.rand(b, 1, generator=g, dtype=F64)) for _ in range(n)
    ]
    return [m.to(dtype).requires_grad_() for m in ms]


def _upstream(n, b, d, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, b, d, generator=g, dtype=F64), torch.randn(b, generator=g, dtype=F64)


def _op_and_reference(ms32, grad_basis, grad_volume):
    """(basis, volume, grads) of the C++ op on ms32 and of the float64 torch span_basis on the same values."""
    ms64 = [m.detach().to(F64).requires_grad_() for m in ms32]
    basis, volume, _, _ = _fwd(ms32)
    ((basis * grad_basis).sum() + (volume * grad_volume).sum()).backward()
    ref_basis, ref_volume = gram_ops.span_basis(ms64)
    ((ref_basis * grad_basis).sum() + (ref_volume * grad_volume).sum()).backward()
    return (basis, volume, [m.grad for m in ms32]), (ref_basis, ref_volume, [m.grad for m in ms64])


def _close(got, want, rel, what):
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err, scale = (got - want).abs().max(), want.abs().max()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


# n = k - 1 = 1..7 modalities, with d >= n (independent modalities: the basis is well defined;
# d < n is test_dependent_modalities' case)
SHAPES = [(n, b, d) for n in range(1, 8) for b in (1, 3, 37) for d in (1, 5, 67, 256) if d >= n]


@pytest.mark.parametrize("n, b, d", SHAPES)
def test_forward_backward_match_float64_torch(n, b, d):
    ms = _modalities(n, b, d, seed=100 * n + d)
    grad_basis, grad_volume = _upstream(n, b, d, seed=n)
    (basis, volume, grads), (ref_basis, ref_volume, ref_grads) = _op_and_reference(ms, grad_basis, grad_volume)
    assert basis.dtype == volume.dtype == torch.float32 and basis.shape == (n, b, d) and volume.shape == (b,)
    # float32 round-off amplified by the conditioning of random d x n matrices with d close to n
    rel = 1e-4 if d >= 4 * n else 2e-3
    _close(basis, ref_basis, rel, "basis")
    _close(volume / ref_volume, torch.ones_like(ref_volume), rel, "volume / reference")
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.dtype == torch.float32
        _close(got, want, rel, f"grad of modality {i}")


def test_reference_span_basis_gradcheck():
    """The torch version the op reproduces is itself differentiated right (float64)."""
    ms = [m.detach().to(F64).requires_grad_() for m in _modalities(3, 4, 6, seed=5)]
    assert torch.autograd.gradcheck(lambda *xs: gram_ops.span_basis(list(xs)), tuple(ms))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_only_volume_or_only_basis_used(n):
    """Either output alone (the other gradient is absent in the backward)."""
    ms = _modalities(n, 9, 11, seed=n)
    ms64 = [m.detach().to(F64).requires_grad_() for m in ms]
    _fwd(ms)[1].sum().backward()
    gram_ops.span_basis(ms64)[1].sum().backward()
    for got, want in zip(ms, ms64):
        _close(got.grad, want.grad, 1e-4, "volume-only gradient")
        got.grad = want.grad = None
    (_fwd(ms)[0] ** 3).sum().backward()
    (gram_ops.span_basis(ms64)[0] ** 3).sum().backward()
    for got, want in zip(ms, ms64):
        _close(got.grad, want.grad, 1e-4, "basis-only gradient")


@pytest.mark.parametrize("n", [2, 3, 7])
def test_dependent_modalities(n):
    """Duplicate, parallel and zero modalities: volume 0 (up to round-off), finite gradients; samples
    with a zero modality reproduce the float64 torch version exactly in meaning (basis vector 0)."""
    b, d = 6, 16
    ms = [m.detach() for m in _modalities(n, b, d, seed=7)]
    ms[n - 1][0] = ms[0][0]  # duplicate
    ms[n - 1][1] = -2.5 * ms[0][1]  # parallel
    ms[1][2] = 0.0  # zero modality in the middle
    ms[0][3] = 0.0  # zero first modality
    ms = [m.requires_grad_() for m in ms]
    grad_basis, grad_volume = _upstream(n, b, d, seed=3)
    (basis, volume, grads), (ref_basis, ref_volume, ref_grads) = _op_and_reference(ms, grad_basis, grad_volume)
    scale = torch.stack([m.detach().norm(dim=-1) for m in ms]).prod(0)  # Hadamard bound on the volume
    assert (volume[:4].abs() <= 1e-5 * scale[:4]).all(), volume[:4]
    assert torch.equal(basis[1, 2], torch.zeros(d)) and torch.equal(basis[0, 3], torch.zeros(d))
    assert all(g.isfinite().all() for g in grads)
    # samples 2 (zero middle modality), 3 (zero first one) and 4, 5 (independent): as the reference
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        _close(got[2:], want[2:], 1e-4, f"grad of modality {i}, samples 2..5")
    _close(basis[:, 2:], ref_basis[:, 2:], 1e-4, "basis, samples 2..5")
    _close(volume[2:], ref_volume[2:], 1e-4, "volume, samples 2..5")


@pytest.mark.parametrize("n, d", [(2, 1), (3, 1), (7, 5)])
def test_more_modalities_than_dimensions(n, d):
    """d < n: every sample's modalities are dependent: volume 0 up to round-off, finite gradients."""
    ms = _modalities(n, 37, d, seed=n + d)
    basis, volume, _, _ = _fwd(ms)
    scale = torch.stack([m.detach().norm(dim=-1) for m in ms]).prod(0)
    assert (volume.abs() <= 1e-5 * scale).all() and basis.isfinite().all()
    grad_basis, grad_volume = _upstream(n, 37, d, seed=2)
    ((basis * grad_basis).sum() + (volume * grad_volume).sum()).backward()
    assert all(m.grad.isfinite().all() for m in ms)


def test_nan_propagates_per_sample():
    ms = [m.detach() for m in _modalities(3, 5, 8, seed=11)]
    ms[1][2, 3] = float("nan")
    ms = [m.requires_grad_() for m in ms]
    basis, volume, _, _ = _fwd(ms)
    assert volume[2].isnan() and basis[1:, 2].isnan().all()
    keep = [0, 1, 3, 4]
    assert volume[keep].isfinite().all() and basis[:, keep].isfinite().all()
    (basis.sum() + volume.sum()).backward()
    assert all(m.grad[2].isnan().any() for m in ms)
    assert all(m.grad[keep].isfinite().all() for m in ms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_upcast(dtype):
    """16-bit modalities: float32 maths on the rounded values (as span_basis of m.float()), the
    gradients come back in the input dtype."""
    ms = _modalities(3, 7, 13, seed=2, dtype=dtype)
    up = [m.detach().float().requires_grad_() for m in ms]
    basis, volume, _, _ = _fwd(ms)
    want_basis, want_volume, _, _ = _fwd(up)
    assert torch.equal(basis, want_basis) and torch.equal(volume, want_volume)
    (basis.sum() + volume.sum()).backward()
    (want_basis.sum() + want_volume.sum()).backward()
    for m, u in zip(ms, up):
        assert m.grad.dtype == dtype
        assert torch.equal(m.grad, u.grad.to(dtype))


def test_errors():
    with pytest.raises(RuntimeError, match=r"gram_basis_fwd: expected 1\.\.8 modalities, got 9"):
        _fwd([torch.randn(3, 4)] * 9)
    with pytest.raises(RuntimeError, match="gram_basis_fwd: modality 1 has shape"):
        _fwd([torch.randn(3, 4), torch.randn(3, 5)])
    with pytest.raises(RuntimeError, match="gram_basis_fwd: modalities must be float32, bfloat16 or float16"):
        _fwd([torch.randn(3, 4, dtype=F64)])
    with pytest.raises(RuntimeError, match=r"gram_basis_fwd: modality 0 must be \[B, D\]"):
        _fwd([torch.randn(3)])


def test_double_backward_raises():
    ms = _modalities(2, 4, 5, seed=1)
    volume = _fwd(ms)[1]
    with pytest.raises(RuntimeError, match="second-order gradients .* backend='torch'"):
        torch.autograd.grad(volume.sum(), ms, create_graph=True)


def test_opcheck():
    ms = _modalities(3, 5, 7, seed=4)
    torch.library.opcheck(torch.ops.fastbind.gram_basis_fwd.default, (ms,))
    torch.library.opcheck(torch.ops.fastbind.gram_basis_fwd.default, ([m.detach() for m in ms[:1]],))
    basis, volume, norms, coefs = (t.detach() for t in _fwd(ms))
    bwd = torch.ops.fastbind.gram_basis_bwd.default
    torch.library.opcheck(bwd, (torch.randn_like(basis), torch.randn_like(volume), basis, norms, coefs))
    torch.library.opcheck(bwd, (None, torch.randn_like(volume), basis, norms, coefs))


def test_losses_use_the_op(monkeypatch):
    """gram_volume and gram_volume_paired on the cpu backend call the C++ op (the BASIS table's
    native-autograd row), once a call; gram_loss runs it inside its own C++ op (test_gram_fused.py)."""
    calls = []
    op = gram_ops.BASIS.built_op("cpu")
    monkeypatch.setitem(gram_ops.BASIS._forward_ops, "cpu", lambda ms: calls.append(len(ms)) or op(ms))
    a, m1, m2 = (t.detach() for t in _modalities(3, 6, 9, seed=3))
    torch.testing.assert_close(
        fb.gram_loss(a, m1, m2, backend="cpu"),
        fb.gram_loss(a.double(), m1.double(), m2.double(), backend="torch").float(),
    )
    fb.gram_volume(a, m1, m2, backend="cpu")
    fb.gram_volume_paired(a, m1, m2, backend="cpu")
    assert calls == [2, 3]
    basis, volume, _, _ = op([m.requires_grad_() for m in (m1, m2)])
    assert "GramBasis" in volume.grad_fn.name()  # its autograd is C++, not a Python wrapper


def test_torch_compile_gram_loss():
    a, m1, m2 = (F.normalize(t.detach(), dim=-1) for t in _modalities(3, 10, 12, seed=6))

    def step(a, m1, m2):
        return fb.gram_loss(a, m1, m2, temperature=0.1, label_smoothing=0.1, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (a, m1, m2)]
    eager = [x.clone().requires_grad_() for x in (a, m1, m2)]
    compiled(*leaves).backward()
    step(*eager).backward()
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
