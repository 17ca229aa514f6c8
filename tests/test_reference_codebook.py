"""The reference codebook ops (fastbind.reference.codebook) against explicit float64 loops."""

import itertools

import pytest
import torch

from fastbind.reference import codebook as ref

METRICS = ("l2", "cosine", "dot")


def brute_distance(x, e, metric, w=None):
    """Distance matrix [N, K] by explicit per-pair loops over the definitions of DESIGN §2.4."""
    n, k = x.shape[0], e.shape[0]
    w = torch.ones(x.shape[1], dtype=x.dtype) if w is None else w
    out = torch.empty(n, k, dtype=x.dtype)
    for i, j in itertools.product(range(n), range(k)):
        xi, ej = x[i], e[j]
        if metric == "l2":
            out[i, j] = sum(w[d] * (xi[d] - ej[d]) ** 2 for d in range(x.shape[1]))
        elif metric == "dot":
            out[i, j] = -sum(w[d] * xi[d] * ej[d] for d in range(x.shape[1]))
        else:
            nx = torch.sqrt((w * xi * xi).sum())
            ne = torch.sqrt((w * ej * ej).sum())
            out[i, j] = 1 - (w * xi * ej).sum() / (nx * ne)
    return out


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("weighted", [False, True])
def test_pairwise_distance_matches_loops(metric, weighted):
    x, e = torch.randn(5, 7, dtype=torch.float64) * 2, torch.randn(6, 7, dtype=torch.float64)
    w = torch.rand(7, dtype=torch.float64) if weighted else None
    torch.testing.assert_close(ref.pairwise_distance(x, e, metric, w), brute_distance(x, e, metric, w))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 4])
def test_lookup_sorted_topk_and_leading_shape(metric, k):
    x, e = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    dist, index = ref.codebook_lookup(x, e, k, metric)
    assert dist.shape == (2, 3, k) and index.shape == (2, 3, k) and index.dtype == torch.int64
    full = brute_distance(x.reshape(6, 5), e, metric)
    expected = torch.sort(full, dim=1).values[:, :k]
    torch.testing.assert_close(dist.reshape(6, k), expected)
    torch.testing.assert_close(full.gather(1, index.reshape(6, k)), dist.reshape(6, k))


def test_ties_go_to_lowest_index():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    _, index = ref.codebook_lookup(x, e, k=4)
    # row 0 is equidistant from codes 0..3; rows 1/2 from the duplicate pairs (0, 2) and (1, 3)
    assert index.tolist() == [[0, 1, 2, 3], [0, 2, 1, 3], [1, 3, 0, 2]]
    assert torch.equal(ref.codebook_lookup(x, e, k=1)[1][:, 0], ref.pairwise_distance(x, e).argmin(1))


@pytest.mark.parametrize("metric", METRICS)
def test_lookup_dist_gradcheck(metric):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: ref.codebook_lookup(a, b, 2, metric, c)[0], (x, e, w))


def test_quantize_straight_through_and_commitment_gradient():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64)
    q, index, sqdist = ref.quantize(x, e, weight=w)
    expected_index = brute_distance(x.detach(), e.detach(), "l2", w).argmin(1)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(q, e[index])
    g = torch.randn_like(q)
    (gx,) = torch.autograd.grad((q * g).sum(), x, retain_graph=True)
    torch.testing.assert_close(gx, g)  # straight-through: identity Jacobian w.r.t. x
    assert torch.autograd.grad((q * g).sum(), e, allow_unused=True)[0] is None
    gx, ge = torch.autograd.grad(sqdist.sum(), (x, e))
    diff = (x - e[index]).detach()
    torch.testing.assert_close(gx, 2 * w * diff)
    torch.testing.assert_close(ge, torch.zeros_like(e).index_add_(0, index, -2 * w * diff))
    torch.testing.assert_close(sqdist, (w * diff * diff).sum(1))


@pytest.mark.parametrize("alpha,beta", [(0.7, 0.0), (0.7, 0.3), (1.0, 2.0)])
def test_toc_scores_formula(alpha, beta):
    e = torch.randn(7, 5, dtype=torch.float64) + torch.linspace(-1, 1, 5, dtype=torch.float64)
    k = e.shape[0]
    sim = torch.tensor(
        [sum(e[i, d] * e[j, d] for i in range(k) for j in range(k) if i != j) / (k * (k - 1)) for d in range(5)],
        dtype=torch.float64,
    )
    mean = e.mean(0)
    var = ((e - mean) ** 2).sum(0) / (k - 1)  # unbiased, as CMG's torch.var
    torch.testing.assert_close(ref.toc_scores(e, alpha, beta), -alpha * sim + beta * var)
    order = sorted(range(5), key=lambda d: -float(-alpha * sim[d] + beta * var[d]))
    assert ref.toc_select(e, 3, alpha, beta).tolist() == order[:3]
    mask = ref.toc_mask(e, 3, alpha, beta)
    assert mask.sum() == 3 and mask[order[:3]].tolist() == [1.0, 1.0, 1.0]
