"""Regression tests of issue 12 (ops side): NaN in gives NaN out in the GRAM epilogues, a clear error
for second-order gradients and torch.func on the fused backends, an O(N·K) float64 reference lookup,
no NaN from the torch backend for tiny finite inputs, centroid_loss options under
torch.compile(fullgraph=True), and temperature / weights checks that read tensor values."""

import pytest
import torch
from conftest import FUSED
from torch.utils._python_dispatch import TorchDispatchMode

import fastbind as fb
from fastbind.reference import codebook as codebook_ref
from fastbind.reference import gram as gram_ref

BACKENDS = ["torch", *FUSED]
NAN = float("nan")

# The five losses / volumes whose fused backward is a custom op: (call on 3 tensors [B, D], number used).
FUSED_AUTOGRAD = {
    "gram_volume": lambda a, b, c, **kw: fb.gram_volume(a, b, c, **kw).sum(),
    "gram_loss": lambda a, b, c, **kw: fb.gram_loss(a, b, c, **kw),
    "infonce": lambda a, b, c, **kw: fb.infonce(a, b, **kw),
    "anchor_loss": lambda a, b, c, **kw: fb.anchor_loss(a, b, c, **kw),
    "centroid_loss": lambda a, b, c, **kw: fb.centroid_loss(a, b, c, **kw),
}


def _three(b=6, d=8, device=None):
    return [torch.randn(b, d, device=device) for _ in range(3)]


# --------------------------------------------------------------------------------------------------
# 1. NaN/inf in an anchor row: NaN volume and NaN loss (was a zero volume and a finite loss on the
#    cpu and triton backends: max(x, 0) written as x > 0 ? x : 0 maps NaN to 0)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_non_finite_anchor_row_gives_nan_volume_and_loss(backend, bad, device):
    anchor, m1, m2 = _three(device=device)
    anchor[1, 3] = bad
    vol = fb.gram_volume(anchor, m1, m2, backend=backend)
    expected = gram_ref.gram_volume(anchor.double(), m1.double(), m2.double())
    assert not vol[1].isfinite().any(), f"{backend}: anchor row with {bad} gave volumes {vol[1].tolist()}"
    assert not expected[1].isfinite().any()
    keep = [0, 2, 3, 4, 5]
    torch.testing.assert_close(vol[keep].double(), expected[keep], atol=1e-5, rtol=1e-4)
    for direction in ("both", "a2d", "d2a"):
        loss = fb.gram_loss(anchor, m1, m2, direction=direction, backend=backend)
        assert not loss.isfinite(), f"{backend} {direction}: finite loss {loss} from a {bad} anchor row"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_data_modality_gives_nan_column(backend, device):
    anchor, m1, m2 = _three(device=device)
    m2[4, 0] = NAN
    vol = fb.gram_volume(anchor, m1, m2, backend=backend)
    assert vol[:, 4].isnan().all() and vol[:, [0, 1, 2, 3, 5]].isfinite().all()
    assert fb.gram_volume_paired(anchor, m1, m2, backend=backend)[4].isnan()


# --------------------------------------------------------------------------------------------------
# 2. Second-order gradients: a clear error on the fused backends (the cpu backend returned zeros);
#    the torch backend differentiates twice.
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", FUSED_AUTOGRAD)
def test_double_backward_raises_on_fused_backends(backend, name, device):
    a, b, c = (t.requires_grad_() for t in _three(device=device))
    out = FUSED_AUTOGRAD[name](a, b, c, backend=backend)
    with pytest.raises(RuntimeError, match="second-order gradients .* backend='torch'"):
        torch.autograd.grad(out, [a, b, c], create_graph=True)
    # first-order gradients still work on a fresh graph
    out = FUSED_AUTOGRAD[name](a, b, c, backend=backend)
    grads = torch.autograd.grad(out, [a, b], allow_unused=True)
    assert all(g is None or g.isfinite().all() for g in grads)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", FUSED_AUTOGRAD)
def test_torch_func_grad_raises_clear_error_on_fused_backends(backend, name, device):
    a, b, c = _three(device=device)
    with pytest.raises(RuntimeError, match=rf"{name}: backend '{backend}' cannot run this call: torch.func"):
        torch.func.grad(lambda x: FUSED_AUTOGRAD[name](x, b, c, backend=backend))(a)


@pytest.mark.parametrize("name", FUSED_AUTOGRAD)
def test_torch_backend_second_order_gradients(name):
    """The reference is plain autograd: torch.func.grad equals autograd, and the Hessian-vector
    product from create_graph=True matches torch.func's (in float64)."""
    a, b, c = (t.double() for t in _three(5, 4))
    b = torch.nn.functional.normalize(b, dim=-1)

    def f(x):
        return FUSED_AUTOGRAD[name](x, b, c, backend="torch")

    x = a.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    v = torch.randn_like(a)
    (hvp,) = torch.autograd.grad((g * v).sum(), x)
    torch.testing.assert_close(torch.func.grad(f)(a), g.detach())
    torch.testing.assert_close(torch.func.jvp(torch.func.grad(f), (a,), (v,))[1], hvp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_and_quantize_differentiate_twice_on_every_backend(backend, device):
    """dist / sqdist are torch ops around the (non-differentiable) index: Hessian-vector products
    equal the float64 reference's."""
    x, e = torch.randn(7, 5), torch.randn(9, 5)
    v = torch.randn(7, 5)
    hvps = []
    for be, dtype, dev in ((backend, torch.float32, device), ("torch", torch.float64, "cpu")):
        xx = x.to(dev, dtype).requires_grad_()
        ee = e.to(dev, dtype)
        dist, _ = fb.codebook_lookup(xx, ee, 2, "cosine", backend=be)
        _, _, sqdist = fb.quantize(xx, ee, backend=be)
        (g,) = torch.autograd.grad(dist.square().sum() + sqdist.square().sum(), xx, create_graph=True)
        (hvp,) = torch.autograd.grad((g * v.to(dev, dtype)).sum(), xx)
        hvps.append(hvp.cpu())
    torch.testing.assert_close(hvps[0].double(), hvps[1], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# 4. The float64 reference lookup is O(N·K) (was O(N·K·D): (x[:, None] - e[None])² ).
class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("weighted", [False, True])
def test_float64_lookup_memory_is_n_times_k(weighted):
    n, k, d = 40, 300, 16
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    e = torch.randn(k, d, dtype=torch.float64)
    e[200] = e[7]  # exact duplicate codes in different blocks: the tie goes to the lower index
    x.data[3] = e[7]
    e.requires_grad_()
    w = (torch.rand(d, dtype=torch.float64) + 0.5).requires_grad_() if weighted else None
    with _LargestTensor() as mode:
        dist, index = fb.codebook_lookup(x, e, 3, "l2", w)
        grads = torch.autograd.grad(dist.sum(), [x, e] + ([w] if weighted else []))
    assert mode.most <= n * k, f"largest tensor {mode.most} elements > N·K = {n * k}"
    # the same values, indices and gradients as the direct broadcast formula
    x2, e2 = x.detach().requires_grad_(), e.detach().requires_grad_()
    w2 = None if w is None else w.detach().requires_grad_()
    sq = (x2[:, None, :] - e2[None]).square()
    full = (sq if w2 is None else sq * w2).sum(-1)
    order = torch.sort(full.detach(), dim=1, stable=True).indices[:, :3]
    assert torch.equal(index, order) and index[3, 0] == 7
    best = full.gather(1, order)
    torch.testing.assert_close(dist, best, rtol=0, atol=1e-12)
    want = torch.autograd.grad(best.sum(), [x2, e2] + ([w2] if weighted else []))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_reference_pairwise_distance_blocks_match_direct_formula():
    x, e = torch.randn(9, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)  # 16 blocks
    w = torch.rand(3, dtype=torch.float64)
    direct = ((x[:, None] - e[None]).square() * w).sum(-1)
    assert torch.equal(codebook_ref.pairwise_distance(x, e, "l2", w), direct)


# --------------------------------------------------------------------------------------------------
# 5. The torch backend on tiny finite float32 inputs: the underflowed 0, not NaN from det of
#    denormal Gram matrices.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_tiny_inputs_give_underflowed_volumes_not_nan(backend, k, device):
    ts = [torch.randn(5, 8, device=device) * 1e-20 for _ in range(k)]
    vol = fb.gram_volume(*ts, backend=backend)
    paired = fb.gram_volume_paired(*ts, backend=backend)
    loss = fb.gram_loss(*ts, backend=backend)
    assert vol.isfinite().all() and paired.isfinite().all() and loss.isfinite()
    # float64 volumes are ~1e-20k: below float32's smallest denormal (1.4e-45) for k >= 3
    assert vol.abs().max() <= 1e-38 and paired.abs().max() <= 1e-38
    # every volume ~0, so every logit ~0 and the loss is log(B)
    torch.testing.assert_close(loss.cpu(), torch.tensor(5.0).log(), atol=1e-6, rtol=0)


def test_reference_volume_is_scale_covariant():
    """vol(s·x) = s^k vol(x): the reference's per-matrix scaling keeps small and large inputs exact."""
    ts = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]
    base = gram_ref.gram_volume(*ts)
    for s in (1e-30, 1e-5, 1e20):
        torch.testing.assert_close(gram_ref.gram_volume(*(t * s for t in ts)), base * s**3, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------------------------
# 9. centroid_loss(leave_one_out=True / weights=) under torch.compile(fullgraph=True)
@pytest.mark.parametrize(
    "options",
    [
        dict(leave_one_out=True),
        dict(weights=torch.tensor([0.5, 0.3, 0.2])),
        dict(weights=[0.5, 0.3, 0.2], leave_one_out=True),
        dict(weights=torch.tensor([0.2, 0.2, 0.6]), leave_one_out=True, normalize_anchor=True),
    ],
)
def test_centroid_loss_options_compile_fullgraph(options):
    backend = "cpu" if "cpu" in FUSED else "torch"
    zs = [torch.randn(8, 6, requires_grad=True) for _ in range(3)]

    def step(a, b, c):
        return fb.centroid_loss(a, b, c, backend=backend, **options)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*zs)
    expected = step(*zs)
    torch.testing.assert_close(out, expected)
    for g, e in zip(torch.autograd.grad(out, zs), torch.autograd.grad(expected, zs)):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------------
# 10. Temperature and weights checks (tensor and float forms alike)
LOSSES = {
    "gram_loss": lambda ts, **kw: fb.gram_loss(*ts, **kw),
    "infonce": lambda ts, **kw: fb.infonce(ts[0], ts[1], **kw),
    "anchor_loss": lambda ts, **kw: fb.anchor_loss(*ts, **kw),
    "centroid_loss": lambda ts, **kw: fb.centroid_loss(*ts, **kw),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("value", [0.0, -0.5, NAN, -float("inf"), float("inf")])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_positive_or_nan_temperature_rejected_in_both_forms(name, value, as_tensor):
    temperature = torch.tensor(value, requires_grad=True) if as_tensor else value
    with pytest.raises(ValueError, match=rf"{name}: temperature must be finite and > 0, got {value}"):
        LOSSES[name](_three(), temperature=temperature)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("temperature", [1e-45, torch.tensor(1e-45), 1e-60, torch.tensor(2e-39)])
def test_temperature_whose_reciprocal_overflows_float32_is_rejected(name, temperature):
    with pytest.raises(ValueError, match=rf"{name}: temperature .* below 2.94e-39"):
        LOSSES[name](_three(), temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smallest_accepted_temperature_gives_finite_loss(backend, device):
    x, y, _ = (torch.nn.functional.normalize(t, dim=-1) for t in _three(device=device))
    loss = fb.infonce(x, y, temperature=1e-30, backend=backend)
    assert loss.isfinite()


def test_centroid_weights_on_another_device_named():
    zs = _three()
    with pytest.raises(ValueError, match=r"centroid_loss: weights is on meta but the inputs are on cpu"):
        fb.centroid_loss(*zs, weights=torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match=r"centroid_loss: weights must be finite and non-negative"):
        fb.centroid_loss(*zs, weights=torch.tensor([1.0, NAN, 1.0]))
    with pytest.raises(ValueError, match=r"leave_one_out needs a positive weight outside every modality"):
        fb.centroid_loss(*zs, weights=torch.tensor([0.0, 0.0, 1.0]), leave_one_out=True)
