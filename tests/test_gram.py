"""Fused GRAM backends (cpu: C++, triton: under TRITON_INTERPRET=1) against the float64 reference,
the GRAM release's semantics (an independent re-implementation of its algorithm), degenerate
inputs, opcheck of every custom op and one torch.compile run.

Tolerances (relative to the largest magnitude of the reference value / gradient):
* float32: 2e-4 (volumes from k-1 float32 GEMMs and a float32 sqrt; losses and gradients from
  float32 log-sum-exp over <= 1100 columns).
* bfloat16 / float16 inputs: compared with the float64 reference on the *rounded* inputs, so only
  the kernel's own precision counts. cpu upcasts to float32 (float32 tolerance); triton keeps the
  GEMM operands (anchor and the float32-computed basis) in 16 bits: 3e-2 (bf16), 4e-3 (fp16).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED, device_for, interpreted

import fastbind as fb
from fastbind.ops import _registry
from fastbind.ops import gram as gram_ops
from fastbind.reference import gram as ref

F64 = torch.float64
REL_TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _rel_tol(backend, dtype):
    return REL_TOL[torch.float32] if backend == "cpu" else REL_TOL[dtype]


def _close(got, want, rel, what="", atol=1e-6):
    """max |got - want| <= rel * max |want| + atol (atol: float32 round-off of O(1) values)."""
    got, want = got.detach().to(F64), want.detach().to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err <= rel * scale + atol, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g} + {atol:g}"


def _inputs(b1, b2, d, k, dtype=torch.float32, seed=0, normalize=False, device="cpu"):
    """Drawn on the CPU from `seed` (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)

    def rnd(b):
        x = torch.randn(b, d, generator=g, dtype=F64) * (0.5 + torch.rand(b, 1, generator=g, dtype=F64))
        x = F.normalize(x, dim=-1) if normalize else x / d**0.5
        return x.to(device=device, dtype=dtype)

    return rnd(b1), [rnd(b2) for _ in range(k - 1)]


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


# shapes not multiples of any tile (cpu: 512 x 1024 in csrc/cpu/gram.cpp; triton: at most 64 x 32,
# CONFIGS in fastbind/triton/gram.py), and smaller than a tile
VOLUME_SHAPES = [(1, 1, 9), (5, 9, 17), (70, 37, 33)]  # D >= k: the volumes are not round-off
# two cpu column tiles and many GPU tiles in both directions (not run under the interpreter: too
# slow); test_rectangular_loss_across_tiles crosses the cpu row tile
LARGE = (130, 1100, 20)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("k", range(2, 9))
def test_volume_forward_backward(backend, k, device):
    shapes = VOLUME_SHAPES + ([LARGE] if not interpreted(backend) and k in (3, 8) else [])
    for b1, b2, d in shapes:
        anchor, mods = _inputs(b1, b2, d, k, seed=k * 100 + b1, device=device)
        a64, m64 = _leaf(anchor, F64), [_leaf(m, F64) for m in mods]
        want = ref.gram_volume(a64, *m64)
        a32, m32 = _leaf(anchor), [_leaf(m) for m in mods]
        got = fb.gram_volume(a32, *m32, backend=backend)
        _close(got, want, 2e-4, f"volume k={k} {b1}x{b2}x{d}")
        w = torch.randn(b1, b2, dtype=F64, device=device)
        g_want = torch.autograd.grad((want * w).sum(), [a64, *m64])
        g_got = torch.autograd.grad((got * w.float()).sum(), [a32, *m32])
        for i, (x, y) in enumerate(zip(g_got, g_want)):
            _close(x, y, 5e-4, f"volume grad {i} k={k} {b1}x{b2}x{d}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_volume_paired(backend, k, device):
    _, mods = _inputs(1, 23, 19, k + 1, seed=k, device=device)
    m64 = [_leaf(m, F64) for m in mods]
    m32 = [_leaf(m) for m in mods]
    want = ref.gram_volume_paired(*m64)
    got = fb.gram_volume_paired(*m32, backend=backend)
    _close(got, want, 2e-4, "paired volume")
    g_want = torch.autograd.grad(want.sum(), m64)
    g_got = torch.autograd.grad(got.sum(), m32)
    for x, y in zip(g_got, g_want):
        _close(x, y, 5e-4, "paired volume grad")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [3, 5])
def test_volume_half_precision(backend, dtype, k, device):
    """16-bit inputs (the tensor-core GEMMs on a GPU): volume and input gradients against the float64
    reference on the rounded inputs; volumes relative to the largest, as the loss tests."""
    b1, b2, d = (70, 37, 33) if interpreted(backend) else (200, 300, 72)
    anchor, mods = _inputs(b1, b2, d, k, dtype=dtype, seed=7 * k, normalize=True, device=device)
    a64, m64 = _leaf(anchor, F64), [_leaf(m, F64) for m in mods]
    want = ref.gram_volume(a64, *m64)
    a16, m16 = _leaf(anchor), [_leaf(m) for m in mods]
    got = fb.gram_volume(a16, *m16, backend=backend)
    assert got.dtype == dtype
    rel = _rel_tol(backend, dtype)
    # the volume is returned in 16 bits: add that rounding (1 ulp) to the tolerance
    _close(got, want, rel + torch.finfo(dtype).eps, f"{dtype} volume k={k}")
    w = torch.randn(b1, b2, dtype=F64, device=device)
    g_want = torch.autograd.grad((want * w).sum(), [a64, *m64])
    g_got = torch.autograd.grad((got.double() * w).sum(), [a16, *m16])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        assert x.dtype == dtype
        _close(x, y, max(5 * rel, 2 * torch.finfo(dtype).eps), f"{dtype} volume grad {i} k={k}")


def _loss_case(backend, k, b, d, direction, reduction, eps, dtype=torch.float32, seed=0, tau=0.1):
    device = device_for(backend)
    anchor, mods = _inputs(b, b, d, k, dtype=dtype, seed=seed, normalize=True, device=device)
    a64, m64 = _leaf(anchor, F64), [_leaf(m, F64) for m in mods]
    t64 = torch.tensor(tau, dtype=F64, device=device, requires_grad=True)
    want = ref.gram_loss(a64, *m64, temperature=t64, label_smoothing=eps, direction=direction, reduction=reduction)
    a, ms = _leaf(anchor), [_leaf(m) for m in mods]
    t = torch.tensor(tau, device=device, requires_grad=True)
    got = fb.gram_loss(
        a, *ms, temperature=t, label_smoothing=eps, direction=direction, reduction=reduction, backend=backend
    )
    w = torch.rand(want.shape, dtype=F64, device=device) + 0.5
    g_want = torch.autograd.grad((want * w).sum(), [a64, *m64, t64])
    g_got = torch.autograd.grad((got.double() * w).sum(), [a, *ms, t])
    rel = _rel_tol(backend, dtype)
    tag = f"{backend} k={k} b={b} {direction} {reduction} eps={eps} {dtype}"
    _close(got, want, rel, f"loss {tag}")
    names = ["anchor"] + [f"modality {i}" for i in range(1, k)] + ["temperature"]
    # gradients of 16-bit inputs are returned in 16 bits: add that rounding (2 ulp) to the tolerance
    grad_rel = max(5 * rel, 2 * torch.finfo(dtype).eps)
    for name, x, y in zip(names, g_got, g_want):
        _close(x, y, grad_rel, f"d/d{name} {tag}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("direction", ["both", "a2d", "d2a"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_directions_reductions(backend, direction, reduction):
    _loss_case(backend, 3, 37, 24, direction, reduction, 0.1, seed=1)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("k", range(2, 9))
def test_loss_every_k(backend, k):
    _loss_case(backend, k, 29 if interpreted(backend) else 45, 16, "both", "mean", 0.0, seed=k)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("b", [1, 2, 67])
def test_loss_small_and_odd_batches(backend, b):
    _loss_case(backend, 3, b, 9, "both", "mean", 0.1, seed=b, tau=0.05)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("direction", ["rows", "cols"])
def test_rectangular_loss_across_tiles(backend, direction, device):
    """Local rows against many global columns (and the transpose) with a diagonal offset, forward
    and gradients of every operand, on more rows/columns than one cpu tile (512 x 1024) holds."""
    loss_forward = gram_ops.LOSS.forward_op(backend)
    b, big, off, k, eps, tau = 7, (70 if interpreted(backend) else 1100), 3, 3, 0.1, 0.2
    if big > 1024:
        off = 1030  # the positives of the local rows lie in the second cpu column tile
    anchor_g, mods_g = _inputs(big, big, 6, k, seed=31, normalize=True, device=device)
    local = slice(off, off + b)
    a64 = _leaf(anchor_g[local] if direction == "rows" else anchor_g, F64)
    m64 = [_leaf(m if direction == "rows" else m[local], F64) for m in mods_g]
    t64 = torch.tensor(tau, dtype=F64, device=device, requires_grad=True)
    logits = -ref.gram_volume(a64, *m64) / t64
    target = torch.arange(b, device=device) + off
    if direction == "cols":
        logits = logits.t()
    want = F.cross_entropy(logits, target, label_smoothing=eps, reduction="none")
    a32, m32 = _leaf(a64, torch.float32), [_leaf(m, torch.float32) for m in m64]
    t32 = torch.tensor(tau, device=device, requires_grad=True)
    basis, span_vol = gram_ops.span_basis(m32)
    a_sq = (a32 * a32).sum(-1)
    if direction == "rows":
        got = loss_forward(a32, basis, span_vol, a_sq, t32, eps, off, True, False)[0]
    else:
        got = loss_forward(a32, basis, span_vol, a_sq, t32, eps, -off, False, True)[1]
    _close(got, want, 2e-4, f"{direction} loss")
    w = torch.rand(b, dtype=F64, device=device)
    g_want = torch.autograd.grad((want * w).sum(), [a64, *m64, t64])
    g_got = torch.autograd.grad((got.double() * w).sum(), [a32, *m32, t32])
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        _close(x, y, 1e-3, f"{direction} gradient {i}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_half_precision(backend, dtype):
    _loss_case(backend, 3, 33, 32, "both", "mean", 0.1, dtype=dtype, seed=5)


def _release_volume_computation3(language, video, audio):
    """Independent re-implementation of the GRAM release's volume: the [B1, B2, 3, 3] Gram
    tensor stacked explicitly, torch.det, sqrt(abs(.))."""
    b1, b2 = language.shape[0], video.shape[0]
    lang = language[:, None, :].expand(b1, b2, -1)
    vid = video[None].expand(b1, b2, -1)
    aud = audio[None].expand(b1, b2, -1)
    vecs = [lang, vid, aud]
    gram = torch.stack([torch.stack([(x * y).sum(-1) for y in vecs], -1) for x in vecs], -2)
    return torch.sqrt(torch.abs(torch.det(gram)))


def _release_loss(vol, tau, eps=0.1):
    target = torch.arange(vol.shape[0], device=vol.device)
    return (
        F.cross_entropy(-vol / tau, target, label_smoothing=eps)
        + F.cross_entropy(-vol.t() / tau, target, label_smoothing=eps)
    ) / 2


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_equals_gram_release(backend, device):
    t, v, a = (F.normalize(torch.randn(24, 32, dtype=F64), dim=-1).to(device) for _ in range(3))
    vol_release = _release_volume_computation3(t, v, a)
    vol = fb.gram_volume(*(x.float() for x in (t, v, a)), backend=backend)
    _close(vol, vol_release, 2e-4, "volume vs release")
    tau = torch.tensor(0.07, dtype=F64, device=device, requires_grad=True)
    loss_release = _release_loss(vol_release, tau)
    (g_release,) = torch.autograd.grad(loss_release, [tau])
    tau32 = torch.tensor(0.07, device=device, requires_grad=True)
    loss = fb.gram_loss(*(x.float() for x in (t, v, a)), temperature=tau32, label_smoothing=0.1, backend=backend)
    (g,) = torch.autograd.grad(loss, [tau32])
    _close(loss, loss_release, 2e-5, "loss vs release")
    _close(g, g_release, 2e-4, "temperature gradient vs release")


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_degenerate_inputs_finite(backend, device):
    b, d = 6, 8
    anchor, (m1, m2) = _inputs(b, b, d, 3, seed=9, normalize=True, device=device)
    zeros = torch.zeros(b, d, device=device)
    cases = {
        "coincident modalities": (anchor, m1, m1.clone()),
        "collinear non-anchor modalities": (anchor, m1, -2 * m1),
        "anchor coincides with a modality": (m1.clone(), m1, m2),
        "all equal": (m1.clone(), m1.clone(), m1.clone()),
        "zero vectors": (zeros, zeros.clone(), m2),
        "zero anchor": (zeros, m1, m2),
        "B = 1": (anchor[:1], m1[:1], m2[:1]),
        "B = 1 coincident": (m1[:1].clone(), m1[:1].clone(), m1[:1].clone()),
    }
    for name, ts in cases.items():
        leaves = [_leaf(x) for x in ts]
        tau = torch.tensor(0.07, device=device, requires_grad=True)
        loss = fb.gram_loss(*leaves, temperature=tau, label_smoothing=0.1, backend=backend)
        grads = torch.autograd.grad(loss, [*leaves, tau])
        assert loss.isfinite(), f"{backend} {name}: loss {loss}"
        for i, g in enumerate(grads):
            assert g.isfinite().all(), f"{backend} {name}: gradient {i} not finite"
        vol_leaves = [_leaf(x) for x in ts]
        vol = fb.gram_volume(*vol_leaves, backend=backend)
        assert vol.isfinite().all() and (vol >= 0).all(), f"{backend} {name}: volume"
        grads = torch.autograd.grad(vol.sum(), vol_leaves)
        assert all(g.isfinite().all() for g in grads), f"{backend} {name}: volume gradient"
    # Forward values at a degenerate point are exact: coincident modalities span no volume.
    vol = fb.gram_volume(anchor, m1, m1.clone(), backend=backend)
    assert vol.abs().max() < 1e-3


@pytest.mark.parametrize("backend", FUSED)
def test_gram_loss_module(backend, device):
    anchor, mods = _inputs(12, 12, 16, 3, seed=11, normalize=True, device=device)
    module = fb.nn.GramLoss(label_smoothing=0.1).to(device)
    module.backend = backend
    loss = module(anchor, *mods)
    loss.backward()
    assert isinstance(module.temperature, torch.nn.Parameter) and module.temperature.item() == pytest.approx(0.07)
    want = ref.gram_loss(anchor.double(), *(m.double() for m in mods), temperature=0.07, label_smoothing=0.1)
    _close(loss, want, 2e-4, "GramLoss")
    assert module.temperature.grad is not None and module.temperature.grad.isfinite()
    fixed = fb.nn.GramLoss(learnable_temperature=False)
    assert not any(True for _ in fixed.parameters())


def _op_args(backend, b1=9, b2=11, d=7, k=3, dtype=torch.float32):
    anchor, mods = _inputs(b1, b2, d, k, seed=3, device=device_for(backend))
    basis, span_vol = gram_ops.span_basis(mods)
    a_sq = (anchor * anchor).sum(-1)
    return anchor.to(dtype), basis.to(dtype), span_vol, a_sq


def _custom_ops(backend):
    """(volume fwd, loss fwd, volume bwd, loss bwd) custom ops of the backend's registry rows."""
    rows = (gram_ops.VOLUME.rows[backend], gram_ops.LOSS.rows[backend])
    return tuple(_registry._op(name) for name in [r.forward for r in rows] + [r.backward for r in rows])


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, device):
    volume, loss_forward, volume_backward, loss_backward = _custom_ops(backend)
    anchor, basis, span_vol, a_sq = _op_args(backend)
    grad_args = [x.clone().requires_grad_(True) for x in (anchor, basis, span_vol, a_sq)]
    tau = torch.tensor(0.2, device=device)
    torch.library.opcheck(volume, tuple(grad_args))
    torch.library.opcheck(volume_backward, (torch.randn(9, 11, device=device), anchor, basis, span_vol, a_sq))
    # square for both directions; rectangular with an offset for one direction each
    sq = _op_args(backend, b1=10, b2=10)
    torch.library.opcheck(
        loss_forward,
        (*[x.clone().requires_grad_(True) for x in sq], tau.clone().requires_grad_(True), 0.1, 0, True, True),
    )
    torch.library.opcheck(loss_forward, (anchor, basis, span_vol, a_sq, tau, 0.0, 2, True, False))
    rect = _op_args(backend, b1=11, b2=9)
    torch.library.opcheck(loss_forward, (*rect, tau, 0.1, -1, False, True))
    row_loss, col_loss, row_lse, col_lse = loss_forward(*sq, tau, 0.1, 0, True, True)
    upstream = torch.rand(2, 10, device=device)
    torch.library.opcheck(loss_backward, (*upstream, *sq, tau, row_lse, col_lse, 0.1, 0, True, True))


@pytest.mark.parametrize("backend", FUSED)
def test_rectangular_offsets_match_reference(backend, device):
    """The multi-process building block: local rows vs global columns with a diagonal offset."""
    loss_forward = gram_ops.LOSS.forward_op(backend)
    b, big, off, k, eps, tau = 5, 13, 4, 3, 0.1, 0.3
    anchor_g, mods_g = _inputs(big, big, 10, k, seed=21, normalize=True, device=device)
    logits = -ref.gram_volume(anchor_g.double(), *(m.double() for m in mods_g)) / tau  # [B, B]
    target = torch.arange(b, device=device) + off
    want_rows = F.cross_entropy(logits[off : off + b], target, label_smoothing=eps, reduction="none")
    want_cols = F.cross_entropy(logits[:, off : off + b].t(), target, label_smoothing=eps, reduction="none")
    basis_g, vol_g = gram_ops.span_basis(mods_g)
    a_sq = (anchor_g * anchor_g).sum(-1)
    local = slice(off, off + b)
    t = torch.tensor(tau, device=device)
    rows = loss_forward(anchor_g[local], basis_g, vol_g, a_sq[local], t, eps, off, True, False)[0]
    cols = loss_forward(anchor_g, basis_g[:, local], vol_g[local], a_sq, t, eps, -off, False, True)[1]
    _close(rows, want_rows, 2e-4, "rows with offset")
    _close(cols, want_cols, 2e-4, "cols with offset")


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend, device):
    anchor, mods = _inputs(20, 20, 12, 3, seed=2, normalize=True, device=device)
    tau = torch.tensor(0.1, device=device, requires_grad=True)

    def step(a, m1, m2, t):
        return fb.gram_loss(a, m1, m2, temperature=t, label_smoothing=0.1, backend=backend)

    torch._dynamo.reset()  # the backend is a trace-time constant: no graph cached for another one
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [_leaf(x) for x in (anchor, *mods)]
    loss = compiled(*leaves, tau)
    loss.backward()
    want = step(*[x.detach() for x in leaves], tau.detach())
    _close(loss, want, 1e-6, "compiled loss")
    assert all(x.grad is not None and x.grad.isfinite().all() for x in leaves)
    assert tau.grad is not None


def test_argument_errors():
    a, (m1, m2) = _inputs(6, 6, 5, 3)
    with pytest.raises(ValueError, match=r"gram_loss: .*\[7, 5\].*\[6, 5\]"):
        fb.gram_loss(a, torch.randn(7, 5), torch.randn(7, 5))
    with pytest.raises(ValueError, match=r"gram_volume: .*k = 9"):
        fb.gram_volume(a, *[m1] * 8)
    with pytest.raises(ValueError, match=r"gram_volume: modality 2 has shape \[6, 4\]"):
        fb.gram_volume(a, m1, torch.randn(6, 4))
    with pytest.raises(TypeError, match=r"gram_loss: .*dtype"):
        fb.gram_loss(a, m1, m2.double())
    with pytest.raises(ValueError, match="gram_volume_paired: .*empty"):
        fb.gram_volume_paired(a[:0], m1[:0])
    with pytest.raises(RuntimeError, match="backend 'cpu'"):
        fb.gram_volume(a.double(), m1.double(), backend="cpu")
    with pytest.raises(ValueError, match="direction"):
        fb.gram_loss(a, m1, m2, direction="a2a")


@pytest.mark.parametrize("backend", ["torch", *FUSED])
@pytest.mark.parametrize("direction", ["both", "a2d", "d2a"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gather_follows_ddp_convention(backend, direction, reduction, monkeypatch, device):
    """gather=True in one process: each simulated rank's gather concatenates every rank's (leaf)
    rows, so autograd sums all ranks' gradients into each rank's rows, as the real all-gather's
    backward does. DDP convention: the mean over the 2 ranks of the losses is the full loss, and
    the accumulated gradients are 2x the full ones (DDP's averaging divides by 2); per-row losses
    ("none") are those of the full loss, with the full gradients."""
    import fastbind.distributed as dist_mod

    sizes = [5, 8]  # unequal per-rank batches
    world = len(sizes)
    dtype = F64 if backend == "torch" else torch.float32
    anchor, mods = _inputs(sum(sizes), sum(sizes), 10, 3, dtype=dtype, seed=41, normalize=True, device=device)
    full = [_leaf(x) for x in (anchor, *mods)]
    tau_full = torch.tensor(0.2, dtype=dtype, device=device, requires_grad=True)
    kw = dict(label_smoothing=0.1, direction=direction, reduction=reduction, backend=backend)
    want = fb.gram_loss(*full, temperature=tau_full, **kw)
    w = torch.rand(want.shape, dtype=dtype, device=device) + 0.5
    (want * w).sum().backward()

    bounds = [0, sizes[0], sum(sizes)]
    local = [[_leaf(x[bounds[r] : bounds[r + 1]]) for x in (anchor, *mods)] for r in range(2)]
    tau = torch.tensor(0.2, dtype=dtype, device=device, requires_grad=True)
    monkeypatch.setattr(dist_mod, "ddp_scale", lambda group=None: world)
    total = 0.0
    for r in range(2):
        position = {id(t): i for i, t in enumerate(local[r])}

        def fake_gather(x, group=None, r=r, position=position):
            i = position[id(x)]
            return torch.cat([local[q][i] for q in range(2)]), bounds[r]

        monkeypatch.setattr(dist_mod, "gather_with_grad", fake_gather)
        loss = fb.gram_loss(*local[r], temperature=tau, gather=True, **kw)
        if reduction == "none":
            _close(loss, want[bounds[r] : bounds[r + 1]], 2e-5, f"rank {r} per-row losses")
            total = total + (loss * w[bounds[r] : bounds[r + 1]]).sum()
        else:
            total = total + loss
    factor = 1 if reduction == "none" else world
    if reduction != "none":
        _close(total / world, want, 2e-5, "mean of the ranks' losses")
        total = total * w
    total.backward()
    for i in range(3):
        got = torch.cat([local[r][i].grad for r in range(2)])
        _close(got, factor * full[i].grad, 1e-4, f"input {i} gradient")
    _close(tau.grad / factor, tau_full.grad, 1e-4, "temperature gradient")
