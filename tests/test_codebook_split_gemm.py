"""The split-bf16 path of the cpu codebook lookup (issue 14, csrc/cpu/codebook.cpp).

On AMX CPUs the float32 lookup scores every code through bf16 GEMMs — x·b ≈ x_hi·b_hi + x_hi·b_lo +
x_lo·b_hi (``split``), or x_hi·b_hi alone (``hi``, a test-hook variant) — keeps every code within
twice the GEMM's error bound of the row's k-th best approximate score, and re-ranks those candidates
by their exact distances; rows whose candidates overflow the buffer, or whose values are not finite,
take the plain float32 path. The result must be the exact top k: the float64 reference's indices
(ties to the lowest index) and the exact distances (rows that overflow: the plain path's result).
``fastbind::codebook_lookup_fwd_path`` runs one path on request, with the candidate buffer size as
an argument.

Near-ties closer than the GEMM's error (groups of codes a hair apart) make these tests fail if the
window is dropped to zero or the exact re-rank is removed (checked by editing the kernel).
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import FUSED

from fastbind.reference import codebook as ref

pytestmark = pytest.mark.skipif("cpu" not in FUSED, reason="C++ extension not built")

PATHS = ("split", "hi")


def _lookup(x, e, k=1, metric="l2", w=None, path="split", candidates=0):
    # "hi": its 2^-7 window holds dozens of codes; a buffer that no row overflows, else the rows take
    # the plain path, which is not exact on near-ties (test_candidate_overflow_falls_back...)
    if path == "hi" and candidates == 0:
        candidates = 4096
    return torch.ops.fastbind.codebook_lookup_fwd_path(x, e, k, metric, w, path, candidates)


def _split_available():
    if "cpu" not in FUSED:
        return False
    try:
        _lookup(torch.zeros(1, 2), torch.zeros(1, 2))
    except RuntimeError as err:
        assert "needs the bf16 microkernel" in str(err)
        return False
    return True


needs_split = pytest.mark.skipif(not _split_available(), reason="no bf16 microkernel on this CPU or libtorch")


def _check_exact(x, e, k, metric, w, dist, index):
    """index = the float64 reference's (ties to the lowest index), dist = its distances in fp32."""
    want_d, want_i = ref.codebook_lookup(
        x.double(), e.double(), k=k, metric=metric, weight=None if w is None else w.double()
    )
    bad = (index != want_i).any(1).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} rows differ, first {bad[:5].tolist()}"
    torch.testing.assert_close(dist.double(), want_d, atol=1e-5, rtol=1e-6)


def _near_tie_pairs(g, groups, d, gap=1e-4, offset=0.0, size=2):
    """Codes in groups of `size` a hair apart (relative distance `gap`, far below the bf16 rounding
    and the window), interleaved so that the lower index is sometimes the farther code."""
    base = torch.randn(groups, 1, d, generator=g) + offset
    twins = base + gap * torch.randn(groups, size - 1, d, generator=g)
    return torch.cat([base, twins], 1).reshape(groups * size, d)


@needs_split
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
@pytest.mark.parametrize("weighted", [False, True])
def test_random_data_matches_float64(metric, weighted):
    g = torch.Generator().manual_seed(0)
    # N, K not multiples of the 256 × 256 tiles; odd D (padded to even), D = 1 (but for cosine, where
    # every code is then an exact tie at distance 0 or 2); k = 1, 3, 32
    d_min = 2 if metric == "cosine" else 1
    for n, num_codes, d, k in ((300, 530, 7, 3), (257, 513, 130, 1), (5, 40, d_min, 1), (70, 300, 64, 32)):
        x = torch.randn(n, d, generator=g)
        e = torch.randn(num_codes, d, generator=g)
        w = torch.rand(d, generator=g) + 0.5 if weighted else None
        dist, index = _lookup(x, e, k, metric, w)
        _check_exact(x, e, k, metric, w, dist, index)
        # where the plain path agrees on the indices, the distances are the same numbers
        pd, pi = _lookup(x, e, k, metric, w, "plain")
        same = (pi == index).all(1)
        assert same.float().mean() > 0.9 and torch.equal(pd[same], dist[same])


@needs_split
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 4])
def test_near_ties_below_the_gemm_error(path, k):
    """x next to one code of a group of k + 1 codes 1e-4 apart: the bf16 scores cannot order the
    group, the window must keep all of it and the exact re-rank must pick the k nearest."""
    g = torch.Generator().manual_seed(1)
    for metric in ("l2", "dot", "cosine"):
        e = _near_tie_pairs(g, 200, 48, size=k + 1)
        x = e[torch.randint(0, e.shape[0], (400,), generator=g)] + 1e-3 * torch.randn(400, 48, generator=g)
        dist, index = _lookup(x, e, k, metric, None, path)
        _check_exact(x, e, k, metric, None, dist, index)


@needs_split
@pytest.mark.parametrize("path", PATHS)
def test_trained_codebook_like_data(path):
    """Rows a tiny noise away from a code (distances << |x||c|), and a codebook clustered around a
    large common offset: l2 centres both sides on the codes' mean, else ‖x‖·‖b‖ ~ 10^8 would flood
    every row's window (the plain path, whose fp32 GEMM is then wrong far beyond the near-ties)."""
    g = torch.Generator().manual_seed(2)
    e = torch.randn(2000, 64, generator=g)
    x = e[torch.randint(0, 2000, (500,), generator=g)] + 1e-4 * torch.randn(500, 64, generator=g)
    for k in (1, 5):
        _check_exact(x, e, k, "l2", None, *_lookup(x, e, k, "l2", None, path))
    for k in (1, 2):
        e = _near_tie_pairs(g, 300, 32, gap=1e-3, offset=1000.0, size=k + 1)
        x = e[torch.randint(0, e.shape[0], (300,), generator=g)] + 1e-2 * torch.randn(300, 32, generator=g)
        w = torch.rand(32, generator=g) + 0.5
        _check_exact(x, e, k, "l2", None, *_lookup(x, e, k, "l2", None, path))
        _check_exact(x, e, k, "l2", w, *_lookup(x, e, k, "l2", w, path))


@needs_split
@pytest.mark.parametrize("path", PATHS)
def test_exact_duplicate_codes_tie_to_lowest_index(path):
    g = torch.Generator().manual_seed(3)
    e = torch.randn(700, 40, generator=g)
    dup = torch.randint(0, 700, (200,), generator=g)
    e = torch.cat([e, e[dup]])  # codes 700.. repeat earlier ones exactly
    rows = torch.randint(0, 900, (300,), generator=g)
    x = e[rows] + 1e-3 * torch.randn(300, 40, generator=g)
    for k in (1, 3):
        dist, index = _lookup(x, e, k, "l2", None, path)
        _check_exact(x, e, k, "l2", None, dist, index)
        # every code from 700 on has an identical one below 700: never the first choice
        assert torch.all(index[:, 0] < 700), "a duplicate won over its original"


@needs_split
@pytest.mark.parametrize("k", [1, 3])
def test_candidate_overflow_falls_back_to_the_plain_path(k):
    """A buffer of k candidates overflows on every row next to a group of k + 1 near-ties: those rows are
    recomputed on the plain path and return its result exactly (whose fp32 GEMM cannot order the
    pairs either: it differs from the exact answer on many of them, so the split did not run
    there); rows of random data keep the exact split result, and the default buffer is exact."""
    g = torch.Generator().manual_seed(4)
    e = _near_tie_pairs(g, 300, 24, size=k + 1)  # the k-th place falls inside a group
    # every row overflows, so the plain path runs on all of them: the same call as the plain path's
    x = e[:300] + 1e-3 * torch.randn(300, 24, generator=g)
    dist, index = _lookup(x, e, k, "l2", None, "split", candidates=k)
    pd, pi = _lookup(x, e, k, "l2", None, "plain")
    assert torch.equal(index, pi) and torch.equal(dist, pd)
    _, want = ref.codebook_lookup(x.double(), e.double(), k=k)
    assert (pi != want).any(1).sum() > 10, "the plain path got the near-ties right: no test"
    _check_exact(x, e, k, "l2", None, *_lookup(x, e, k))  # the default buffer holds them
    x = 3 * torch.randn(50, 24, generator=g)  # well-separated codes: exact either way
    _check_exact(x, e, k, "l2", None, *_lookup(x, e, k, "l2", None, "split", candidates=k))


@needs_split
def test_non_finite_inputs_as_the_plain_path():
    """NaN / inf rows take the plain path (NaN or inf distances, the plain path's indices); a NaN or
    inf code sends the whole call there."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 16, generator=g)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[9] = float("nan")
    x[11, 2] = 3e38  # finite, but its norm overflows the bound's range
    e = torch.randn(300, 16, generator=g)
    for k in (1, 3):
        for codes in (e, torch.cat([e[:100], torch.full((1, 16), float("nan")), e[100:]])):
            for metric in ("l2", "cosine"):
                sd, si = _lookup(x, codes, k, metric, None, "split")
                pd, pi = _lookup(x, codes, k, metric, None, "plain")
                assert torch.equal(si, pi)
                torch.testing.assert_close(sd, pd, atol=0, rtol=0, equal_nan=True)
                assert torch.isnan(sd[3]).all() and torch.isnan(sd[9]).all()
        finite = torch.tensor([i not in (3, 7, 9, 11) for i in range(40)])
        sd, si = _lookup(x, e, k)
        _check_exact(x[finite], e, k, "l2", None, sd[finite], si[finite])


@needs_split
def test_half_and_strided_rows():
    """Rows that are not float32-contiguous are converted per row block."""
    g = torch.Generator().manual_seed(6)
    e = torch.randn(600, 32, generator=g)
    x = torch.randn(300, 64, generator=g)[:, ::2]
    _check_exact(x, e, 2, "l2", None, *_lookup(x, e, 2))
    xh = x.half()
    _check_exact(xh.float(), e, 2, "l2", None, *_lookup(xh, e, 2))


def test_hook_argument_errors():
    x, e = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="path must be"):
        _lookup(x, e, path="fast")
    with pytest.raises(RuntimeError, match="path must be"):
        _lookup(x, e, path="auto")
    if _split_available():
        with pytest.raises(RuntimeError, match="candidates = 2 < k = 3"):
            _lookup(x, e, 3, candidates=2)


def test_default_path_choice():
    """The split is the default float32 lookup where the bf16 GEMM runs on AMX, with the auto GEMM
    setting; FASTBIND_CPU_GEMM=mm keeps the plain path (checked in a fresh process: chosen once)."""
    path = torch.ops.fastbind.codebook_lookup_default_path()
    with open("/proc/cpuinfo") as f:
        amx = "amx_bf16" in f.read().split()
    auto = os.environ.get("FASTBIND_CPU_GEMM", "auto") == "auto"
    assert path == ("split" if amx and auto and _split_available() else "plain")
    code = "import fastbind, torch; print(torch.ops.fastbind.codebook_lookup_default_path())"
    env = dict(os.environ, FASTBIND_CPU_GEMM="mm", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "plain", res.stderr[-2000:]
