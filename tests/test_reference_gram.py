"""The GRAM reference (fastbind/reference/gram.py, the "torch" backend) against independent
computations: per-pair k x k Gram matrices built by loops with torch.linalg.det, the Schur
complement formula of DESIGN §2.1, explicit F.cross_entropy losses, and gradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.reference import gram as ref

F64 = torch.float64


def _inputs(b1, b2, d, k, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(b):  # non-unit norms
        x = torch.randn(b, d, generator=g, dtype=F64) * (0.5 + torch.rand(b, 1, generator=g, dtype=F64))
        return x.requires_grad_(requires_grad)

    return rnd(b1), [rnd(b2) for _ in range(k - 1)]


def _explicit_volume(anchor, mods):
    """vol_ij from the explicit D x k matrix [a_i, m^1_j, ...] per pair (loops)."""
    out = torch.empty(anchor.shape[0], mods[0].shape[0], dtype=anchor.dtype)
    for i in range(anchor.shape[0]):
        for j in range(mods[0].shape[0]):
            v = torch.stack([anchor[i]] + [m[j] for m in mods], dim=1)  # [D, k]
            out[i, j] = torch.linalg.det(v.t() @ v).clamp(min=0).sqrt()
    return out


def _schur_volume(anchor, mods):
    """vol_ij = sqrt(det M_j * (|a_i|^2 - s_ij^T M_j^-1 s_ij)) (DESIGN §2.1)."""
    v = torch.stack(mods, dim=1)  # [B2, k-1, D]
    m = v @ v.transpose(1, 2)  # [B2, k-1, k-1]
    s = torch.einsum("id,jpd->ijp", anchor, v)  # [B1, B2, k-1]
    quad = torch.einsum("ijp,jpq,ijq->ij", s, torch.linalg.inv(m), s)
    dist_sq = (anchor * anchor).sum(-1)[:, None] - quad
    return (torch.linalg.det(m)[None, :] * dist_sq).clamp(min=0).sqrt()


@pytest.mark.parametrize("k", range(2, 9))
def test_volume_matches_explicit_determinants(k):
    d = k + 3
    anchor, mods = _inputs(5, 7, d, k, seed=k)
    want = _explicit_volume(anchor, mods)
    torch.testing.assert_close(ref.gram_volume(anchor, *mods), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_schur_volume(anchor, mods), want, rtol=1e-8, atol=1e-10)
    assert (want > 0).all()


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_volume_paired_is_the_diagonal(k):
    anchor, mods = _inputs(6, 6, 10, k, seed=10 + k)
    full = ref.gram_volume(anchor, *mods)
    torch.testing.assert_close(ref.gram_volume_paired(anchor, *mods), full.diagonal(), rtol=1e-10, atol=1e-12)
    # Symmetric in its arguments (the volume of a set of vectors).
    torch.testing.assert_close(
        ref.gram_volume_paired(*reversed([anchor, *mods])), full.diagonal(), rtol=1e-10, atol=1e-12
    )


def test_volume_known_values():
    # Orthogonal vectors: the volume is the product of the norms; parallel vectors: zero.
    e = torch.eye(4, dtype=F64)
    a, m1, m2 = 2 * e[0:1], 3 * e[1:2], 0.5 * e[2:3]
    assert ref.gram_volume(a, m1, m2).item() == pytest.approx(3.0)
    assert ref.gram_volume(a, 2 * a).item() == 0.0


def _explicit_loss(logits, eps, direction, reduction):
    n = logits.shape[0]
    t = torch.arange(n)
    lse_r, lse_c = logits.logsumexp(1), logits.logsumexp(0)
    diag = logits.diagonal()
    row = lse_r - (1 - eps) * diag - eps / n * logits.sum(1)
    col = lse_c - (1 - eps) * diag - eps / n * logits.sum(0)
    # cross-check the hand-written label-smoothed CE with torch's
    torch.testing.assert_close(row, F.cross_entropy(logits, t, label_smoothing=eps, reduction="none"))
    torch.testing.assert_close(col, F.cross_entropy(logits.t(), t, label_smoothing=eps, reduction="none"))
    per = {"a2d": row, "d2a": col, "both": (row + col) / 2}[direction]
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


@pytest.mark.parametrize("direction", ["both", "a2d", "d2a"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_matches_explicit_cross_entropy(direction, reduction, eps):
    anchor, mods = _inputs(9, 9, 6, 3, seed=3)
    tau = 0.37
    logits = -_explicit_volume(anchor, mods) / tau
    want = _explicit_loss(logits, eps, direction, reduction)
    got = ref.gram_loss(anchor, *mods, temperature=tau, label_smoothing=eps, direction=direction, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The public function on the torch backend is the reference.
    pub = fb.gram_loss(
        anchor, *mods, temperature=tau, label_smoothing=eps, direction=direction, reduction=reduction, backend="torch"
    )
    torch.testing.assert_close(pub, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("direction", ["both", "a2d", "d2a"])
def test_gradcheck_loss_with_temperature(k, direction):
    anchor, mods = _inputs(4, 4, 5, k, seed=20 + k, requires_grad=True)
    tau = torch.tensor(0.6, dtype=F64, requires_grad=True)

    def fn(a, t, *ms):
        return ref.gram_loss(a, *ms, temperature=t, label_smoothing=0.1, direction=direction)

    assert torch.autograd.gradcheck(fn, (anchor, tau, *mods))


@pytest.mark.parametrize("k", [2, 4])
def test_gradcheck_volume(k):
    anchor, mods = _inputs(3, 4, 6, k, seed=30 + k, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, *ms: ref.gram_volume(a, *ms), (anchor, *mods))
    assert torch.autograd.gradcheck(lambda *ms: ref.gram_volume_paired(*ms), (anchor[:3], *[m[:3] for m in mods]))


def test_gradcheck_loss_reduction_none():
    anchor, mods = _inputs(4, 4, 5, 3, seed=40, requires_grad=True)
    tau = torch.tensor(0.5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, t, *ms: ref.gram_loss(a, *ms, temperature=t, reduction="none"), (anchor, tau, *mods)
    )


def test_degenerate_inputs_give_finite_gradients():
    anchor, mods = _inputs(5, 5, 6, 3, seed=50, requires_grad=True)
    cases = {
        "coincident": (anchor, mods[0], mods[0]),
        "collinear": (anchor, mods[0], 2 * mods[0]),
        "anchor equals modality": (mods[0], mods[0], mods[1]),
        "zeros": (torch.zeros_like(anchor, requires_grad=True),) * 3,
    }
    for name, ts in cases.items():
        tau = torch.tensor(0.1, dtype=F64, requires_grad=True)
        loss = ref.gram_loss(*ts, temperature=tau, label_smoothing=0.1)
        grads = torch.autograd.grad(loss, [t for t in ts if t.requires_grad] + [tau], allow_unused=True)
        assert loss.isfinite(), name
        assert all(g is None or g.isfinite().all() for g in grads), name
