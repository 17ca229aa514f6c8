"""codebook_lookup / quantize / toc_* on every backend against the float64 reference and brute force.

The fused backends (C++ "cpu", and "triton" under TRITON_INTERPRET=1 on CPU tensors) pick codes by a
GEMM expansion in fp32, so a near-tie may come out in another order than the float64 oracle; the
tests therefore check (1) the returned distances against the sorted float64 distances, (2) that each
returned distance is the true distance of the returned code, and (3) equal indices wherever the
float64 gap to the next code is above the dtype's tolerance. Exact ties use integer-valued data,
whose products are exact in any order, and must give exactly the lowest indices.
"""

import pytest
import torch
from conftest import FUSED, device_for, interpreted

import fastbind as fb
from fastbind.reference import codebook as ref

METRICS = ("l2", "cosine", "dot")
BACKENDS = ["torch", *FUSED]
# (atol, rtol) of the distances; low-precision inputs are compared on their rounded values.
TOL = {torch.float32: (2e-4, 2e-5), torch.float16: (2e-4, 2e-5), torch.bfloat16: (2e-4, 2e-5)}


def oracle(x, e, k, metric, w):
    """float64 brute force on the same (rounded) values: (sorted dist [N, k], full [N, K])."""
    x64, e64 = x.reshape(-1, x.shape[-1]).double(), e.double()
    w64 = torch.ones(x.shape[-1], dtype=torch.float64, device=x.device) if w is None else w.double()
    if metric == "l2":  # the expansion in float64 (errors ~1e-13): no N×K×D tensor for the big shapes
        full = (x64 * x64 * w64).sum(1, keepdim=True) + (e64 * e64 * w64).sum(1) - 2 * (x64 * w64) @ e64.T
    else:
        full = ref.pairwise_distance(x64, e64, metric, w64)
    return torch.sort(full, dim=1).values[:, :k], full


def check_lookup(dist, index, x, e, k, metric, w, atol, rtol):
    n = x.reshape(-1, x.shape[-1]).shape[0]
    assert dist.shape == (*x.shape[:-1], k) and index.shape == dist.shape
    assert index.dtype == torch.int64 and dist.dtype == torch.float32
    dist, index = dist.reshape(n, k).double(), index.reshape(n, k)
    best, full = oracle(x, e, k, metric, w)
    torch.testing.assert_close(dist, best, atol=atol, rtol=rtol)
    torch.testing.assert_close(full.gather(1, index), dist, atol=atol, rtol=rtol)
    assert torch.all(index >= 0) and torch.all(index < e.shape[0])
    assert all(len(set(row)) == k for row in index.tolist()), "a code returned twice"
    sorted_full, order = torch.sort(full, dim=1, stable=True)
    gap = torch.diff(sorted_full[:, : k + 1] if k < e.shape[0] else sorted_full, dim=1)
    margin = atol + rtol * sorted_full[:, :k].abs()
    clear = torch.ones(n, k, dtype=torch.bool, device=index.device)
    # slot s is unambiguous when the codes at s-1|s and s|s+1 are separated by more than the tolerance
    clear[:, : gap.shape[1]] &= gap[:, :k] > 4 * margin[:, : gap.shape[1]]
    clear[:, 1:] &= gap[:, : k - 1] > 4 * margin[:, 1:]
    assert torch.equal(index[clear], order[:, :k][clear])


def shapes(backend):
    # (leading shape, K, D): N < any tile, odd sizes, several column tiles of the CPU kernel
    base = [((1,), 3, 5), ((37,), 61, 19), ((3, 7), 40, 33)]
    if device_for(backend).type == "cuda" or backend == "cpu":
        # several row blocks and column blocks (cpu: 256 x 256; GPU: 64 x 64), partial last ones
        base.append(((700,), 2500, 70))
    return base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("weighted", [False, True])
def test_lookup_matches_brute_force(backend, metric, weighted, device):
    for lead, num_codes, dim in shapes(backend):
        x = (torch.randn(*lead, dim) * 1.5).to(device)
        e = torch.randn(num_codes, dim).to(device)
        w = (torch.rand(dim) * 2).to(device) if weighted else None
        for k in sorted({1, min(5, num_codes), min(32, num_codes)}):
            if interpreted(backend) and k == 32 and lead != (1,):
                continue  # interpreter time; k = 32 is covered on the smallest shape
            dist, index = fb.codebook_lookup(x, e, k, metric, w, backend=backend)
            check_lookup(dist, index, x, e, k, metric, w, 2e-4, 2e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lookup_low_precision_inputs(backend, dtype, device):
    x = torch.randn(2, 29, 24).to(device=device, dtype=dtype)
    e = torch.randn(50, 24).to(device=device, dtype=dtype)
    for metric in METRICS:
        dist, index = fb.codebook_lookup(x, e, 4, metric, backend=backend)
        check_lookup(dist, index, x, e, 4, metric, None, *TOL[dtype])
    # an fp32 codebook with bf16/fp16 activations is allowed
    dist, index = fb.codebook_lookup(x, e.float(), 2, backend=backend)
    check_lookup(dist, index, x, e.float(), 2, "l2", None, *TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_lowest_index(backend, device):
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (9, 6), generator=g).float()
    e = torch.cat([base, base, base[:4]]).to(device)  # codes j, j + 9 (and j + 18) are identical
    x = torch.randint(-3, 4, (41, 6), generator=g).float().to(device)
    expected = torch.sort(ref.pairwise_distance(x.double(), e.double()), dim=1, stable=True).indices
    for k in (1, 7):
        dist, index = fb.codebook_lookup(x, e, k, backend=backend)
        assert torch.equal(index, expected[:, :k])
        # duplicated codes appear in index order among equal distances
    x_mid = (e[0] + e[1]) / 2  # exactly halfway between codes 0 and 1 (integer data: exact)
    _, index = fb.codebook_lookup(x_mid[None], e, 1, backend=backend)
    expected_mid = ref.pairwise_distance(x_mid[None].double(), e.double()).argmin(1)
    assert index[0, 0] == expected_mid[0]


def test_cpu_chunked_path_non_contiguous_and_half():
    if "cpu" not in FUSED:
        pytest.skip("C++ extension not built")
    # non-fp32 or non-contiguous x is converted 8192 rows at a time: cross a chunk boundary
    x = torch.randn(8300, 16)
    e = torch.randn(23, 16)
    strided = torch.randn(8300, 32)[:, ::2]
    strided.copy_(x)
    for inp in (strided, x.half()):
        dist, index = fb.codebook_lookup(inp, e, 3, backend="cpu")
        check_lookup(dist, index, inp, e, 3, "l2", None, 2e-4, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend, device):
    x = torch.randn(5, 8)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    x, e = x.to(device), torch.randn(6, 8).to(device)
    dist, index = fb.codebook_lookup(x, e, 2, backend=backend)
    assert torch.isfinite(dist[[0, 1, 3]]).all()
    assert torch.isnan(dist[2]).all() or not torch.isfinite(dist[2]).any()
    assert not torch.isfinite(dist[4]).any()
    assert ((index >= 0) & (index < 6)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_code_ranks_last_and_leaves_other_codes_alone(backend, device):
    x = torch.randn(21, 7).to(device)
    e = torch.randn(300, 7).to(device)  # > one CPU column block: the NaN code shares a tile with real codes
    e[5, 2] = float("nan")
    dist, index = fb.codebook_lookup(x, e, 4, backend=backend)
    assert not (index == 5).any()
    full = ref.pairwise_distance(x.double(), e.double())
    expected = torch.sort(full, dim=1, stable=True)  # NaN sorts last
    assert torch.equal(index, expected.indices[:, :4])
    torch.testing.assert_close(dist.double(), expected.values[:, :4], atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_lookup_dist_gradients(backend, metric, device):
    x = torch.randn(3, 11, 9).to(device).requires_grad_()
    e = torch.randn(17, 9).to(device).requires_grad_()
    w = (torch.rand(9) + 0.2).to(device).requires_grad_()
    dist, index = fb.codebook_lookup(x, e, 3, metric, w, backend=backend)
    g = torch.randn_like(dist)
    grads = torch.autograd.grad((dist * g).sum(), (x, e, w))
    x64, e64, w64 = (t.detach().double().requires_grad_() for t in (x, e, w))
    full = ref.pairwise_distance(x64.reshape(-1, 9), e64, metric, w64)
    ref_dist = full.gather(1, index.reshape(-1, 3)).reshape(dist.shape)
    ref_grads = torch.autograd.grad((ref_dist * g.double()).sum(), (x64, e64, w64))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_lookup_dist_gradients_low_precision(backend, dtype, metric, device):
    """16-bit x and codebook: dist and its gradients against float64 on the rounded values; the
    gradients come back in the input dtype (their rounding: 2 ulp of the largest)."""
    x = torch.randn(2, 13, 24).to(device=device, dtype=dtype).requires_grad_()
    e = torch.randn(40, 24).to(device=device, dtype=dtype).requires_grad_()
    dist, index = fb.codebook_lookup(x, e, 2, metric, backend=backend)
    g = torch.randn(dist.shape, dtype=torch.float64).to(device)
    grads = torch.autograd.grad((dist.double() * g).sum(), (x, e))
    x64, e64 = (t.detach().double().requires_grad_() for t in (x, e))
    full = ref.pairwise_distance(x64.reshape(-1, 24), e64, metric)
    ref_dist = full.gather(1, index.reshape(-1, 2)).reshape(dist.shape)
    torch.testing.assert_close(dist.double(), ref_dist, atol=2e-4, rtol=2e-5)
    ref_grads = torch.autograd.grad((ref_dist * g).sum(), (x64, e64))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=2 * torch.finfo(dtype).eps * scale, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize(backend, device):
    x = (torch.randn(4, 13, 10) * 2).to(device).requires_grad_()
    e = torch.randn(21, 10).to(device).requires_grad_()
    w = torch.rand(10).to(device)
    q, index, sqdist = fb.quantize(x, e, weight=w, backend=backend)
    assert q.shape == x.shape and index.shape == (4, 13) and sqdist.shape == (4, 13)
    _, expected = fb.codebook_lookup(x.detach(), e.detach(), 1, weight=w, backend="torch")
    assert torch.equal(index, expected[..., 0])
    torch.testing.assert_close(q, e[index])
    g = torch.randn_like(q)
    gx = torch.autograd.grad((q * g).sum(), x, retain_graph=True)[0]
    torch.testing.assert_close(gx, g)  # straight-through
    gx, ge = torch.autograd.grad(sqdist.sum(), (x, e))
    diff = (x - e[index]).detach()
    torch.testing.assert_close(gx, 2 * w * diff)
    torch.testing.assert_close(
        ge, torch.zeros_like(e).index_add_(0, index.reshape(-1), (-2 * w * diff).reshape(-1, 10))
    )
    torch.testing.assert_close(sqdist, (w * diff * diff).sum(-1))


def test_quantize_with_cosine_picks_cosine_nearest():
    x = torch.randn(20, 6)
    e = torch.randn(9, 6) * torch.linspace(0.1, 5, 9)[:, None]  # norms differ: l2 and cosine disagree
    _, index, sqdist = fb.quantize(x, e, metric="cosine")
    expected = ref.pairwise_distance(x.double(), e.double(), "cosine").argmin(1)
    assert torch.equal(index, expected)
    torch.testing.assert_close(sqdist, ((x - e[index]) ** 2).sum(-1))


def test_float64_runs_reference_in_float64():
    x, e = torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    dist, index = fb.codebook_lookup(x, e, 2)
    assert dist.dtype == torch.float64
    best, _ = oracle(x, e, 2, "l2", None)
    torch.testing.assert_close(dist, best, atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="codebook_lookup: backend 'cpu'"):
        fb.codebook_lookup(x, e, backend="cpu")


@pytest.mark.parametrize("alpha,beta", [(0.7, 0.0), (0.5, 0.3)])
def test_toc_public_matches_formula(alpha, beta):
    e = torch.randn(12, 7) + torch.arange(7.0)
    e64 = e.double()
    kk = e.shape[0]
    sim = (e64.sum(0) ** 2 - (e64**2).sum(0)) / (kk * (kk - 1))
    scores = -alpha * sim + beta * e64.var(0, unbiased=True)  # CMG: torch.var, unbiased
    torch.testing.assert_close(fb.toc_scores(e, alpha, beta).double(), scores, atol=1e-5, rtol=1e-5)
    assert fb.toc_select(e, 4, alpha, beta).tolist() == torch.argsort(scores, descending=True)[:4].tolist()
    assert fb.toc_scores(e64).dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_toc_mask_through_weight_ignores_dropped_dims(backend, device):
    e = torch.randn(15, 8).to(device)
    keep = fb.toc_select(e, 5)
    w = torch.zeros(8, device=device)
    w[keep] = 1
    x = torch.randn(19, 8).to(device)
    x_noisy = x.clone()
    dropped = [d for d in range(8) if d not in keep.tolist()]
    x_noisy[:, dropped] += 100 * torch.randn(19, len(dropped)).to(device)  # only the dropped dims change
    d1, i1 = fb.codebook_lookup(x, e, 3, weight=w, backend=backend)
    d2, i2 = fb.codebook_lookup(x_noisy, e, 3, weight=w, backend=backend)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2)
    _, i_sub = fb.codebook_lookup(x[:, keep], e[:, keep], 3, backend=backend)
    assert torch.equal(i1, i_sub)


def test_argument_errors():
    x, e = torch.randn(7, 6), torch.randn(11, 6)
    with pytest.raises(ValueError, match=r"codebook_lookup: codebook has shape \[11, 5\], expected \[K, 6\]"):
        fb.codebook_lookup(x, torch.randn(11, 5))
    with pytest.raises(ValueError, match=r"codebook_lookup: x has shape \[\], expected"):
        fb.codebook_lookup(torch.tensor(1.0), e)
    with pytest.raises(ValueError, match=r"k = 33 out of range"):
        fb.codebook_lookup(x, torch.randn(40, 6), k=33)
    with pytest.raises(TypeError, match=r"k must be an int"):
        fb.codebook_lookup(x, e, k=2.0)
    with pytest.raises(ValueError, match=r"weight must be non-negative"):
        fb.codebook_lookup(x, e, weight=torch.tensor([1.0, -0.5, 1, 1, 1, 1]))
    with pytest.raises(TypeError, match=r"weight has dtype torch.int64"):
        fb.codebook_lookup(x, e, weight=torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"quantize: metric"):
        fb.quantize(x, e, metric="L2")
    with pytest.raises(ValueError, match=r"toc_scores: .*K >= 2"):
        fb.toc_scores(e[:1])
    with pytest.raises(ValueError, match=r"toc_select: keep = 0"):
        fb.toc_select(e, 0)
    with pytest.raises(RuntimeError, match=r"backend 'cuda'"):
        fb.codebook_lookup(x, e, backend="cuda")


OPS = {"cpu": "codebook_lookup_fwd", "triton": "codebook_lookup_fwd_triton"}


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck_custom_ops(backend, device):
    x, e, w = (t.to(device) for t in (torch.randn(13, 10), torch.randn(21, 10), torch.rand(10)))
    op = getattr(torch.ops.fastbind, OPS[backend]).default
    for args in ((x, e, 1, "l2", None), (x, e, 4, "cosine", w), (x.bfloat16(), e, 2, "dot", None)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend, device):
    x, e = torch.randn(2, 19, 12).to(device), torch.randn(30, 12).to(device)

    def f(a, b):
        q, index, sq = fb.quantize(a, b, backend=backend)
        dist, top = fb.codebook_lookup(a, b, 3, backend=backend)
        return q, index, sq.mean(), dist, top

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, e), f(x, e)):
        torch.testing.assert_close(got, want)


def test_benchmark_builders_and_skips(monkeypatch):
    import sys

    from benchmarks import bench_codebook as bench
    from benchmarks._harness import SkipCase

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(SkipCase, match="faiss-cpu not installed"):
        bench.build("faiss", "lookup", N=64, K=16, D=8)
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)
    with pytest.raises(SkipCase, match="vector-quantize-pytorch not installed"):
        bench.build("vqpytorch", "vq", N=64, K=16, D=8)
    with pytest.raises(SkipCase, match="budget"):
        bench.build("fastbind-cpu", "lookup", N=262144, K=16384, D=256)
    with pytest.raises(SkipCase, match="GiB for the N×K matrix"):
        bench.build("torch", "lookup", N=262144, K=8192, D=64)
    providers = {"fastbind-cpu"} if "cpu" in FUSED else set()
    for provider in providers | {"torch"}:
        bench.build(provider, "lookup", N=64, K=16, D=8, k=2)()
    if "cpu" in FUSED:
        bench.build("fastbind-cpu", "vq", N=64, K=16, D=8)()
    quick = list(bench.cases(quick=True))
    assert len(quick) <= 6 and {c.mode for c in quick} == {"lookup", "vq"}
