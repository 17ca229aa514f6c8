"""Fused anchored-InfoNCE backends (cpu: C++ op; triton: Triton kernels under TRITON_INTERPRET=1)
against the float64 reference: forward and every gradient (inputs and temperature), awkward
shapes, every centroid_loss flag combination, rectangular/offset pairs, the multi-process share
decomposition, opcheck, torch.compile, degenerate inputs, argument errors, nn modules."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED, interpreted

import fastbind as fb
from fastbind.ops import infonce as ops
from fastbind.reference import infonce as ref

if "triton" in FUSED:
    import fastbind.triton.infonce  # noqa: F401  (registers the fastbind::*_triton ops)

# (loss atol, loss rtol, grad atol relative to the largest reference gradient). float32 accumulates in
# float32; for 16-bit inputs the reference sees the same rounded inputs, the remaining error is the
# 16-bit rounding of the centroid (an operand) and of the returned gradients.
TOL = {
    torch.float32: (2e-5, 2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2, 3e-2),
}
FWD_OPS = {"cpu": "fastbind::infonce_fwd", "triton": "fastbind::infonce_fwd_triton"}
BWD_OPS = {"cpu": "fastbind::infonce_bwd", "triton": "fastbind::infonce_bwd_triton"}


def _op(name):
    ns, op = name.split("::")
    return getattr(getattr(torch.ops, ns), op).default


def inputs(m, b, d, dtype, scale=1.0, device="cpu"):
    """m fresh [b, d] tensors with non-unit norms, rounded to dtype, plus their float64 copies.
    Drawn on the CPU (the same values on every device), then moved to `device`."""
    low = [(scale * torch.randn(b, d) * (0.5 + torch.rand(b, 1))).to(device=device, dtype=dtype) for _ in range(m)]
    return [t.requires_grad_() for t in low], [t.detach().double().requires_grad_() for t in low]


def _taus(value, device):
    """A learnable temperature for the fused call (float32) and its float64 twin for the reference."""
    dtypes = (torch.float32, torch.float64)
    return tuple(torch.tensor(value, dtype=t, device=device, requires_grad=True) for t in dtypes)


def check_against_reference(fused_fn, ref_fn, low, high, dtype, tau=None):
    atol, rtol, gtol = TOL[dtype]
    out = fused_fn(*low, tau[0]) if tau else fused_fn(*low)
    expected = ref_fn(*high, tau[1]) if tau else ref_fn(*high)
    torch.testing.assert_close(out.double(), expected, atol=atol * max(1.0, expected.abs().max().item()), rtol=rtol)
    upstream = torch.randn_like(expected)
    wrt_low, wrt_high = list(low) + ([tau[0]] if tau else []), list(high) + ([tau[1]] if tau else [])
    grads = torch.autograd.grad((out.double() * upstream).sum(), wrt_low, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), wrt_high, allow_unused=True)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        if e is None:
            assert g is None or g.abs().max() == 0, f"input {i}: gradient where the reference has none"
            continue
        assert g is not None, f"input {i}: missing gradient"
        assert g.dtype == wrt_low[i].dtype
        scale = max(e.abs().max().item(), 1e-3)
        # dL/dτ = -(1/τ)·Σ dL/dl·l sums B² terms that cancel: a looser relative bound for the scalar
        tol = max(gtol, 2e-4) if tau and i == len(low) else gtol
        torch.testing.assert_close(g.double(), e, atol=tol * scale, rtol=0, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("direction", ["both", "a2d", "d2a"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_against_reference(backend, direction, reduction, device):
    low, high = inputs(2, 37, 24, torch.float32, scale=0.3, device=device)
    tau = _taus(0.2, device)
    check_against_reference(
        lambda x, y, t: fb.infonce(x, y, t, 0.1, direction, reduction, backend=backend),
        lambda x, y, t: ref.infonce(x, y, t, 0.1, direction, reduction),
        low,
        high,
        torch.float32,
        tau,
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,d", [(1, 8), (5, 3), (19, 40)])
def test_infonce_shapes_dtypes(backend, dtype, b, d, device):
    low, high = inputs(2, b, d, dtype, scale=0.3, device=device)
    check_against_reference(
        lambda x, y: fb.infonce(x, y, 0.1, backend=backend), lambda x, y: ref.infonce(x, y, 0.1), low, high, dtype
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_anchor_loss_against_reference(backend, m, device):
    low, high = inputs(m, 21, 18, torch.float32, device=device)
    tau = _taus(0.1, device)
    check_against_reference(
        lambda *z: fb.anchor_loss(*z[:-1], temperature=z[-1], label_smoothing=0.05, backend=backend),
        lambda *z: ref.anchor_loss(*z[:-1], temperature=z[-1], label_smoothing=0.05),
        low,
        high,
        torch.float32,
        tau,
    )


FLAGS = list(itertools.product([False, True], repeat=4))  # weights, normalize, detach, leave-one-out


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("weighted,normalize,detach,loo", FLAGS)
def test_centroid_loss_every_flag_combination(backend, weighted, normalize, detach, loo, device):
    low, high = inputs(3, 13, 10, torch.float32, device=device)
    flags = dict(
        weights=[0.5, 0.3, 0.2] if weighted else None,
        normalize_anchor=normalize,
        detach_anchor=detach,
        leave_one_out=loo,
        label_smoothing=0.1,
    )
    tau = _taus(0.3, device)
    check_against_reference(
        lambda *z: fb.centroid_loss(*z[:-1], temperature=z[-1], backend=backend, **flags),
        lambda *z: ref.centroid_loss(*z[:-1], temperature=z[-1], **flags),
        low,
        high,
        torch.float32,
        tau,
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_centroid_loss_modalities_and_dtypes(backend, m, dtype, device):
    b = 23 if interpreted(backend) else 70  # interpreter shapes stay small
    low, high = inputs(m, b, 33, dtype, scale=0.4, device=device)
    check_against_reference(
        lambda *z: fb.centroid_loss(*z, temperature=0.07, normalize_anchor=True, backend=backend),
        lambda *z: ref.centroid_loss(*z, temperature=0.07, normalize_anchor=True),
        low,
        high,
        dtype,
    )


def test_cpu_op_multi_tile():
    """B larger than the C++ tiles (256 rows x 1024 columns, 256-column chunks): merges across tiles.
    (The Triton tiles are 16 wide, so the other tests already cross many of them.)"""
    backend = "cpu"
    low, high = inputs(3, 1100, 12, torch.float32, scale=0.5)
    check_against_reference(
        lambda *z: fb.centroid_loss(*z, temperature=0.05, label_smoothing=0.1, backend=backend),
        lambda *z: ref.centroid_loss(*z, temperature=0.05, label_smoothing=0.1),
        low,
        high,
        torch.float32,
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("b1,b2,offset,shared", [(20, 45, 5, True), (45, 20, -7, False), (9, 30, 30, True)])
def test_fused_op_rectangular_offset(backend, b1, b2, offset, shared, device):
    """The custom op itself: B1 != B2, diagonal offset (some rows/columns without a positive), random
    upstream gradients of the row and column losses, shared or per-pair keys."""
    p = 3
    q = torch.randn(p, b1, 16, dtype=torch.float64).to(device)
    k = torch.randn(1 if shared else p, b2, 16, dtype=torch.float64).to(device)
    fwd, bwd = _op(FWD_OPS[backend]), _op(BWD_OPS[backend])
    temp = torch.tensor(0.4, device=device)
    row, col, row_lse, col_lse = fwd(q.float(), k.float(), temp, 0.1, offset)
    qh, kh = q.clone().requires_grad_(), k.clone().requires_grad_()
    pairs = [ref.infonce_rows_cols(qh[i], kh[0 if shared else i], 0.4, 0.1, offset) for i in range(p)]
    exp_row, exp_col = torch.stack([r for r, _ in pairs]), torch.stack([c for _, c in pairs])
    torch.testing.assert_close(row.double(), exp_row, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(col.double(), exp_col, atol=1e-4, rtol=1e-5)
    g_row, g_col = (torch.randn(p, b, dtype=torch.float64).to(device) for b in (b1, b2))
    exp_gq, exp_gk = torch.autograd.grad((exp_row * g_row).sum() + (exp_col * g_col).sum(), (qh, kh))
    gq, gk = bwd(g_row.float(), g_col.float(), q.float(), k.float(), temp, row_lse, col_lse, 0.1, offset)
    assert gq.shape == q.shape and gk.shape == k.shape
    torch.testing.assert_close(gq.double(), exp_gq, atol=1e-4 * exp_gq.abs().max().item(), rtol=0)
    torch.testing.assert_close(gk.double(), exp_gk, atol=1e-4 * exp_gk.abs().max().item(), rtol=0)


class FakeGroup:
    """Simulates `gather_with_grad` for several ranks in one process: rank r's call returns the
    concatenation of every rank's tensor (its own block being the tensor it passed) and its offset."""

    def __init__(self, blocks_per_call):
        self.blocks_per_call = blocks_per_call  # per gather call: list over ranks of [b_r, ...] tensors
        self.rank = 0
        self.calls = 0

    def gather(self, x, group):
        blocks = list(self.blocks_per_call[self.calls % len(self.blocks_per_call)])
        self.calls += 1
        assert blocks[self.rank].shape == x.shape
        blocks[self.rank] = x
        offset = sum(b.shape[0] for b in blocks[: self.rank])
        return torch.cat(blocks), offset


@pytest.mark.parametrize("backend", ["torch", *FUSED])
@pytest.mark.parametrize("loss", ["infonce", "centroid_loo", "anchor"])
def test_gather_follows_ddp_convention(backend, loss, monkeypatch, device):
    """Each rank's loss (rows against gathered columns + columns against gathered rows, with a
    diagonal offset) follows DDP's convention for unequal b_r: the mean over ranks is the
    single-process loss and the accumulated gradients are W times the single-process ones (DDP's
    averaging of parameter gradients divides by W)."""
    import fastbind.distributed as dist_mod

    sizes = [5, 8]
    m = 2 if loss == "infonce" else 3
    full = [torch.randn(sum(sizes), 12, dtype=torch.float64).to(device) for _ in range(m)]
    locals_ = [[z[sum(sizes[:r]) : sum(sizes[: r + 1])].clone().requires_grad_() for z in full] for r in range(2)]

    def call(zs, gather):
        dtype_zs = [z.float() for z in zs] if backend != "torch" else zs
        if loss == "infonce":
            return fb.infonce(*dtype_zs, 0.2, 0.1, backend=backend, gather=gather)
        if loss == "anchor":
            return fb.anchor_loss(*dtype_zs, temperature=0.2, backend=backend, gather=gather)
        return fb.centroid_loss(*dtype_zs, temperature=0.2, leave_one_out=True, backend=backend, gather=gather)

    # gathered tensors per call, as the op stacks them: queries [b, P, D], then keys [b, PK, D]
    def stacked(zs):
        zs = [z.float() for z in zs] if backend != "torch" else zs
        if loss == "infonce":
            q, k = [zs[0]], [zs[1]]
        elif loss == "anchor":
            q, k = zs[1:], zs[:1]
        else:
            q, k = zs, ref.centroid(zs, leave_one_out=True)
        return torch.stack(q).transpose(0, 1).contiguous(), torch.stack(k).transpose(0, 1).contiguous()

    # the other ranks' blocks are live too: gather_with_grad's backward sums every rank's gradient
    # of the global tensor into the owner's rows, which is what autograd does through these blocks
    per_rank = [stacked(zs) for zs in locals_]
    fake = FakeGroup([[pr[0] for pr in per_rank], [pr[1] for pr in per_rank]])
    monkeypatch.setattr(ops, "_gather", fake.gather)
    world = len(sizes)
    monkeypatch.setattr(dist_mod, "ddp_scale", lambda group=None: world)
    total = 0.0
    for r in range(2):
        fake.rank, fake.calls = r, 0
        rank_loss = call(locals_[r], gather=True)
        rank_loss.backward(retain_graph=True)
        total = total + rank_loss.detach().double()
    leaves = [z.clone().requires_grad_() for z in full]
    single = call(leaves, gather=False)
    single.backward()
    tol = 1e-9 if backend == "torch" else 2e-5
    torch.testing.assert_close(total / world, single.detach().double(), atol=tol, rtol=tol)
    for i in range(m):
        got = torch.cat([locals_[r][i].grad for r in range(2)])
        want = world * leaves[i].grad
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_centroid_similarity(backend, device):
    for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)]:
        zs = [torch.randn(11, 9).to(device=device, dtype=dtype) for _ in range(3)]
        out = fb.centroid_similarity(*zs, normalize_anchor=True, backend=backend)
        expected = ref.centroid_similarity(*[z.double() for z in zs], normalize_anchor=True)
        assert out.shape == (3, 11, 11) and out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("backend", FUSED)
def test_degenerate_inputs_finite(backend, device):
    z = F.normalize(torch.randn(9, 16), dim=-1).to(device).requires_grad_()
    for loss in (
        fb.centroid_loss(z, z, z, temperature=0.01, normalize_anchor=True, backend=backend),  # coincident
        fb.infonce(z[:1], z[:1], 0.01, backend=backend),  # B = 1
        fb.anchor_loss(z, z.flip(0), temperature=0.01, backend=backend),  # large 1/τ, far-off positives
    ):
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # large 1/τ against the reference: positives of logit 100 beside negatives near -100
    low, high = inputs(3, 12, 16, torch.float32, device=device)
    low = [F.normalize(t.detach(), dim=-1).requires_grad_() for t in low]
    high = [t.detach().double().requires_grad_() for t in low]
    check_against_reference(
        lambda *zs: fb.centroid_loss(*zs, temperature=0.01, backend=backend),
        lambda *zs: ref.centroid_loss(*zs, temperature=0.01),
        low,
        high,
        torch.float32,
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("backend", FUSED)
def test_non_finite_inputs_give_non_finite_loss(backend, device):
    x, y = torch.randn(6, 4).to(device), torch.randn(6, 4).to(device)
    x[2, 1] = float("nan")
    assert not torch.isfinite(fb.infonce(x, y, backend=backend))


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend, device):
    base = [torch.randn(8, 30).to(device) for _ in range(3)]
    views = [b[:, ::2] for b in base]  # [8, 15], stride 2
    assert not views[0].is_contiguous()
    out = fb.centroid_loss(*views, backend=backend)
    torch.testing.assert_close(out.double(), ref.centroid_loss(*[v.double() for v in views]), atol=1e-4, rtol=1e-5)
    x = torch.randn(15, 8).to(device).T  # [8, 15] transposed
    torch.testing.assert_close(
        fb.infonce(x, views[1], backend=backend).double(),
        ref.infonce(x.double(), views[1].double()),
        atol=1e-4,
        rtol=1e-5,
    )


def test_auto_backend_and_float64_reference():
    zs = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    assert fb.centroid_loss(*zs).dtype == torch.float64  # float64 -> torch (reference)
    torch.testing.assert_close(fb.centroid_loss(*zs), ref.centroid_loss(*zs))


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, device):
    q, k, k_per_pair = (torch.randn(*shape).to(device) for shape in ((3, 10, 7), (1, 12, 7), (3, 12, 7)))
    temp = torch.tensor(0.3, device=device)
    fwd, bwd = _op(FWD_OPS[backend]), _op(BWD_OPS[backend])
    torch.library.opcheck(fwd, (q.clone().requires_grad_(), k.clone().requires_grad_(), temp, 0.1, 1))
    torch.library.opcheck(fwd, (q, k_per_pair, temp.clone().requires_grad_(), 0.0, 0))
    _, _, row_lse, col_lse = fwd(q, k, temp, 0.1, 1)
    upstream = (torch.randn(3, 10).to(device), torch.randn(3, 12).to(device))
    torch.library.opcheck(bwd, (*upstream, q, k, temp, row_lse, col_lse, 0.1, 1))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend, device):
    zs = [torch.randn(20, 12).to(device).requires_grad_() for _ in range(3)]
    tau = torch.tensor(0.1, device=device, requires_grad=True)

    def step(a, b, c, t):
        return fb.centroid_loss(a, b, c, temperature=t, normalize_anchor=True, backend=backend)

    torch._dynamo.reset()  # the backend is a trace-time constant: no graph cached for another one
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*zs, tau)
    grads = torch.autograd.grad(out, [*zs, tau])
    expected = step(*zs, tau)
    expected_grads = torch.autograd.grad(expected, [*zs, tau])
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_nn_modules():
    zs = [torch.randn(10, 6, requires_grad=True) for _ in range(3)]
    module = fb.nn.CentroBindLoss(temperature=0.1, learnable_temperature=True, leave_one_out=True)
    loss = module(*zs)
    torch.testing.assert_close(loss, fb.centroid_loss(*zs, temperature=0.1, leave_one_out=True))
    loss.backward()
    expected_t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    ref.centroid_loss(*[z.detach().double() for z in zs], temperature=expected_t, leave_one_out=True).backward()
    torch.testing.assert_close(module.temperature.grad.double(), expected_t.grad, atol=1e-4, rtol=1e-4)
    clip = fb.nn.InfoNCELoss(temperature=0.05, direction="a2d", reduction="none")
    torch.testing.assert_close(clip(zs[0], zs[1]), fb.infonce(zs[0], zs[1], 0.05, direction="a2d", reduction="none"))
    assert "temperature" in dict(clip.named_buffers())
    with pytest.raises(TypeError, match="unknown flags"):
        fb.nn.CentroBindLoss(reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        fb.nn.InfoNCELoss(temperature=0.0)


def test_argument_errors():
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"centroid_loss: got M = 1 modalities"):
        fb.centroid_loss(a)
    with pytest.raises(ValueError, match=r"centroid_loss: modality 1 has shape \[7, 4\], expected \[8, 4\]"):
        fb.centroid_loss(a, torch.randn(7, 4))
    with pytest.raises(ValueError, match=r"modality 2 has shape \[8, 5\], expected \[8, 4\]"):
        fb.centroid_loss(a, b, torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"infonce: y has shape \[8, 4, 1\], expected \[B, D\]"):
        fb.infonce(a, b[..., None])
    with pytest.raises(TypeError, match=r"infonce: x has dtype torch.int64"):
        fb.infonce(a.long(), b)
    with pytest.raises(TypeError, match=r"y has dtype torch.float16 but x has torch.float32"):
        fb.infonce(a, b.half())
    with pytest.raises(ValueError, match=r"anchor is empty"):
        fb.anchor_loss(torch.randn(0, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match=r"anchor_loss: got the anchor only"):
        fb.anchor_loss(a)
    with pytest.raises(ValueError, match=r"weights has shape \[2\], expected \[3\]"):
        fb.centroid_loss(a, b, b, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"weights must be finite and non-negative"):
        fb.centroid_loss(a, b, weights=[1.5, -0.5])
    with pytest.raises(ValueError, match=r"weights sum to 0"):
        fb.centroid_loss(a, b, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"leave_one_out needs a positive weight"):
        fb.centroid_loss(a, b, weights=[1.0, 0.0], leave_one_out=True)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        fb.infonce(a, b, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature has shape \[1\]"):
        fb.infonce(a, b, temperature=torch.ones(1))
    with pytest.raises(ValueError, match=r"direction must be one of"):
        fb.infonce(a, b, direction="rows")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        fb.infonce(a, b, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        fb.centroid_loss(a, b, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"centroid_similarity: got M = 1"):
        fb.centroid_similarity(a)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call"):
        fb.centroid_loss(a, b, backend="cuda")
