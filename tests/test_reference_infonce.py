"""The reference anchored-InfoNCE family (fastbind.reference.infonce) against independent
computations: an open_clip-style ClipLoss, explicit centroids, the identities of DESIGN §2.3, and
gradcheck in float64."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastbind.reference import infonce as ref

f64 = dict(dtype=torch.float64)


def clip_loss(x, y, logit_scale, label_smoothing=0.0):
    """Independent re-implementation of open_clip's ClipLoss for one process (no gather)."""
    logits_per_image = logit_scale * x @ y.T
    logits_per_text = logit_scale * y @ x.T
    labels = torch.arange(x.shape[0])
    return (
        F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2


def unit(*shape):
    return F.normalize(torch.randn(*shape, **f64), dim=-1)


@pytest.mark.parametrize("tau", [0.07, 0.01, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_infonce_equals_clip_loss(tau, eps):
    x, y = unit(33, 20), unit(33, 20)
    torch.testing.assert_close(ref.infonce(x, y, tau, eps), clip_loss(x, y, 1 / tau, eps))


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_directions_and_reductions_against_cross_entropy(eps):
    x, y = torch.randn(17, 9, **f64), torch.randn(17, 9, **f64)  # non-unit norms
    logits = x @ y.T / 0.3
    labels = torch.arange(17)
    a2d = F.cross_entropy(logits, labels, label_smoothing=eps, reduction="none")
    d2a = F.cross_entropy(logits.T, labels, label_smoothing=eps, reduction="none")
    expected = {"a2d": a2d, "d2a": d2a, "both": (a2d + d2a) / 2}
    for direction, per_row in expected.items():
        torch.testing.assert_close(ref.infonce(x, y, 0.3, eps, direction, "none"), per_row)
        torch.testing.assert_close(ref.infonce(x, y, 0.3, eps, direction, "sum"), per_row.sum())
        torch.testing.assert_close(ref.infonce(x, y, 0.3, eps, direction, "mean"), per_row.mean())


def test_rows_cols_with_diagonal_offset():
    x, y = torch.randn(5, 7, **f64), torch.randn(12, 7, **f64)
    logits = x @ y.T / 0.5
    row, col = ref.infonce_rows_cols(x, y, 0.5, 0.1, diag_offset=4)
    # row i's positive is column i + 4; smoothing over the 12 columns
    expected_row = F.cross_entropy(logits, torch.arange(5) + 4, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(row, expected_row)
    # columns 4..8 have positives (rows 0..4); the others keep only the smoothing term
    lse = torch.logsumexp(logits, 0)
    expected_col = lse - 0.1 / 5 * logits.sum(0)
    expected_col[4:9] -= 0.9 * logits[torch.arange(5), torch.arange(5) + 4]
    torch.testing.assert_close(col, expected_col)


def test_anchor_loss_is_sum_of_clip_losses():
    anchor, a, b, c = (unit(21, 16) for _ in range(4))
    expected = sum(clip_loss(m, anchor, 1 / 0.05) for m in (a, b, c))
    torch.testing.assert_close(ref.anchor_loss(anchor, a, b, c, temperature=0.05), expected)


def test_centroid_is_weighted_sum_and_leave_one_out():
    zs = [torch.randn(6, 5, **f64) for _ in range(4)]
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], **f64)
    anchors = ref.centroid(zs, w)
    assert len(anchors) == 4 and all(a is anchors[0] for a in anchors)  # one shared anchor
    c = anchors[0]
    torch.testing.assert_close(c, sum(wi * z for wi, z in zip(w, zs)))
    loo = ref.centroid(zs, w, leave_one_out=True)
    for m in range(4):
        rest = [n for n in range(4) if n != m]
        expected = sum(w[n] * zs[n] for n in rest) / w[rest].sum()
        torch.testing.assert_close(loo[m], expected)
    normed = ref.centroid(zs, w, normalize_anchor=True)[0]
    torch.testing.assert_close(normed, F.normalize(c, dim=-1))


def test_mean_anchor_logits_are_mean_of_pairwise_logits():
    zs = [torch.randn(9, 7, **f64) for _ in range(3)]
    c = ref.centroid(zs)[0]
    for z in zs:
        torch.testing.assert_close(z @ c.T, sum(z @ n.T for n in zs) / 3)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_centroid_loss_at_most_mean_pairwise_infonce(m):
    zs = [unit(15, 8) for _ in range(m)]
    loss = ref.centroid_loss(*zs, temperature=0.1)
    pairwise = sum(ref.infonce(a, b, 0.1) for a in zs for b in zs) / m  # Σ_m mean_n InfoNCE(z_m, z_n)
    assert loss <= pairwise + 1e-12
    # and it is the sum over modalities of InfoNCE against the explicit centroid
    c = sum(zs) / m
    torch.testing.assert_close(loss, sum(clip_loss(z, c, 10.0) for z in zs))


def test_centroid_loss_permutation_invariant():
    zs = [unit(11, 6) for _ in range(4)]
    w = torch.tensor([0.4, 0.1, 0.3, 0.2], **f64)
    for flags in [{}, {"leave_one_out": True, "normalize_anchor": True}]:
        base = ref.centroid_loss(*zs, temperature=0.2, weights=w, **flags)
        for perm in [(3, 1, 0, 2), (1, 2, 3, 0)]:
            permuted = ref.centroid_loss(*[zs[i] for i in perm], temperature=0.2, weights=w[list(perm)], **flags)
            torch.testing.assert_close(permuted, base)


def test_detach_anchor_drops_exactly_the_anchor_path():
    zs = [unit(10, 6).requires_grad_() for _ in range(3)]
    detached = torch.autograd.grad(ref.centroid_loss(*zs, temperature=0.1, detach_anchor=True), zs)
    # independent: the anchor is a constant computed from copies
    c = (sum(z.detach() for z in zs) / 3).clone()
    expected = torch.autograd.grad(sum(clip_loss(z, c, 10.0) for z in zs), zs)
    full = torch.autograd.grad(ref.centroid_loss(*zs, temperature=0.1), zs)
    through_anchor = torch.autograd.grad(sum(clip_loss(z.detach(), sum(zs) / 3, 10.0) for z in zs), zs)
    for d, e, f, a in zip(detached, expected, full, through_anchor):
        torch.testing.assert_close(d, e)
        torch.testing.assert_close(f - d, a)  # full gradient = own path + anchor path
        assert (f - d).abs().max() > 1e-6


def test_centroid_similarity_explicit():
    zs = [torch.randn(7, 4, **f64) for _ in range(3)]
    for normalize in (False, True):
        c = sum(zs) / 3
        c = F.normalize(c, dim=-1) if normalize else c
        s = ref.centroid_similarity(*zs, normalize_anchor=normalize)
        assert s.shape == (3, 7, 7)
        for m, i, j in itertools.product(range(3), range(7), range(7)):
            torch.testing.assert_close(s[m, i, j], zs[m][i] @ c[j])


def test_degenerate_inputs_finite():
    z = unit(8, 5).requires_grad_()
    loss = ref.centroid_loss(z, z, z, temperature=0.01, normalize_anchor=True)  # coincident modalities
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    one = unit(1, 5)
    assert torch.isfinite(ref.infonce(one, one, 0.01)) and ref.infonce(one, one, 0.01).abs() < 1e-12


def test_gradcheck_infonce_with_temperature():
    x, y = torch.randn(6, 4, **f64, requires_grad=True), torch.randn(6, 4, **f64, requires_grad=True)
    tau = torch.tensor(0.5, **f64, requires_grad=True)
    for direction, reduction in [("both", "mean"), ("a2d", "sum"), ("d2a", "none")]:
        assert torch.autograd.gradcheck(
            lambda a, b, t, d=direction, r=reduction: ref.infonce(a, b, t, 0.1, d, r), (x, y, tau)
        )


def test_gradcheck_anchor_and_centroid_losses():
    zs = [torch.randn(5, 3, **f64, requires_grad=True) for _ in range(3)]
    tau = torch.tensor(0.7, **f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, t: ref.anchor_loss(a, b, c, temperature=t), (*zs, tau))
    w = torch.tensor([0.5, 0.2, 0.3], **f64)
    # (detach_anchor is not a gradient of the loss value by design: test_detach_anchor_* covers it)
    for flags in [{}, {"normalize_anchor": True, "leave_one_out": True, "weights": w}]:
        assert torch.autograd.gradcheck(
            lambda a, b, c, t, f=flags: ref.centroid_loss(a, b, c, temperature=t, label_smoothing=0.1, **f), (*zs, tau)
        )
    assert torch.autograd.gradcheck(lambda a, b, c: ref.centroid_similarity(a, b, c, normalize_anchor=True), zs)
