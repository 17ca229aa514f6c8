"""The tile GEMM of the C++ CPU kernels (csrc/include/fastbind/tiled.h, issue 14) and the thread-count
determinism of the fused InfoNCE (issue 12 point 6).

* Every GEMM path — oneDNN's brgemm microkernel (float32, and bfloat16 operands in the VNNI layout)
  and the at::mm_out fallback; the default choice (brgemm for float32 on non-Intel CPUs, at::mm_out
  on Intel's; bf16 brgemm wherever AVX-512 is), FASTBIND_CPU_GEMM=mm and =brgemm, each in a
  subprocess since the path is chosen once per process — computes a·bᵀ and every fused op against
  the float64 reference, on awkward shapes (odd D, D = 1, widths that are not multiples of the
  microkernel's 256 columns).
* bfloat16 inputs stay bfloat16 in the logit GEMMs: their products are exact in float32, so the
  lookup keeps the fp32 lookup's indices (ties to the lowest index) and the losses stay within the
  float32 tolerances of the rounded inputs.
* InfoNCE forward and gradients are the same bit for bit with 1, 2 and 3 threads.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import FUSED

import fastbind as fb
from fastbind.reference import codebook as ref_codebook

pytestmark = pytest.mark.skipif("cpu" not in FUSED, reason="C++ extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_mm_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    for m, n, d in [(1, 1, 1), (3, 5, 7), (300, 1100, 64), (257, 513, 130), (40, 2, 2)]:
        a = torch.randn(m, d, generator=g).to(dtype)
        b = torch.randn(n, d, generator=g).to(dtype)
        wide = torch.full((m, n + 3), 7.0)  # a row stride other than n; the last 3 columns untouched
        out = wide[:, :n]
        torch.ops.fastbind.tile_mm(a, b, out)
        assert (wide[:, n:] == 7.0).all()
        want = a.double() @ b.double().T
        # products of bf16 values are exact in float32: both dtypes are float32-accurate sums
        assert (out.double() - want).abs().max().item() <= 1e-5 * (d**0.5) * 4, (m, n, d)


def test_gemm_path_is_chosen_once_and_reported():
    path = torch.ops.fastbind.tile_gemm_path()
    assert path in ("brgemm", "mm")
    assert f"{path} tile GEMM" in torch.ops.fastbind.build_info()
    flags = _cpu_flags()
    if os.environ.get("FASTBIND_CPU_GEMM", "auto") == "auto" and torch.backends.mkldnn.is_available():
        # float32: MKL is at the core's peak on Intel CPUs only; bf16 brgemm wherever AVX-512 is
        intel = "GenuineIntel" in _cpu_field("vendor_id")
        assert path == ("mm" if intel or "avx2" not in flags else "brgemm")
        has_bf16_kernel = all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
        assert ("bf16 brgemm" in torch.ops.fastbind.build_info()) == has_bf16_kernel


def _cpu_field(name):
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "")
    except OSError:
        return ""


def _cpu_flags():
    return _cpu_field("flags").split()


def _run_python(code, **env):
    full_env = dict(os.environ, OMP_NUM_THREADS="2", **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=os.path.join(ROOT, "tests"), env=full_env, capture_output=True, text=True
    )


@pytest.mark.parametrize("setting", ["mm", "brgemm"])
def test_forced_path_computes_every_op(setting):
    """FASTBIND_CPU_GEMM=mm (at::mm_out for everything, bf16 upcast) and =brgemm (the microkernel for
    float32 too): every family's forward and backward are right on both."""
    if setting == "brgemm" and not (torch.backends.mkldnn.is_available() and "avx2" in _cpu_flags()):
        with pytest.raises(AssertionError, match="no brgemm"):
            assert _run_python("import fastbind", FASTBIND_CPU_GEMM=setting).returncode == 0, "no brgemm"
        return
    code = "import test_cpu_gemm as t; t.check_all_families(); import torch; print(torch.ops.fastbind.build_info())"
    if setting == "brgemm":  # issue 12.6 on the brgemm path: 1 thread too
        code = (
            "import test_cpu_gemm as t; t.check_thread_count_determinism((1, 2, 3)); "
            + code[len("import test_cpu_gemm as t; ") :]
        )
    res = _run_python(code, FASTBIND_CPU_GEMM=setting)
    assert res.returncode == 0, res.stderr[-3000:]
    info = res.stdout.strip().splitlines()[-1]
    assert f"{setting} tile GEMM" in info and (setting == "brgemm" or "bf16" not in info)


def test_bad_gemm_path_setting_raises():
    res = _run_python("import fastbind, torch; torch.ops.fastbind.tile_gemm_path()", FASTBIND_CPU_GEMM="mkl")
    assert res.returncode != 0 and "FASTBIND_CPU_GEMM must be 'auto', 'mm' or 'brgemm'" in res.stderr


def test_default_path_computes_every_op():
    check_all_families()


def check_all_families():
    """Forward and gradients of every fused family on the cpu backend against the float64 reference,
    float32 and bfloat16, shapes crossing the tile and microkernel boundaries (run in-process for the
    default path and in a subprocess for the fallback)."""
    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 3e-2)):
        for b, d in ((260, 34), (37, 7)):
            xs = [torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(dtype) for _ in range(3)]
            for fn, kw in (
                (fb.gram_loss, dict(temperature=0.1, label_smoothing=0.1)),
                (fb.centroid_loss, dict(temperature=0.1, label_smoothing=0.1)),
                (fb.anchor_loss, dict(temperature=0.1)),
            ):
                _check_loss(fn, xs, kw, tol, dtype)
            x64 = [x.double().requires_grad_() for x in xs]
            xl = [x.clone().requires_grad_() for x in xs]
            vol = fb.gram_volume(*xl, backend="cpu")
            want = fb.gram_volume(*x64, backend="torch")
            assert _rel_err(vol, want) < tol, ("gram_volume", dtype, b, d)
            w = torch.randn(want.shape, generator=g, dtype=torch.float64)
            grads = torch.autograd.grad((vol.double() * w).sum(), xl)
            grads64 = torch.autograd.grad((want * w).sum(), x64)
            for got, exp in zip(grads, grads64):
                assert _rel_err(got, exp) < tol, ("gram_volume grad", dtype, b, d)
    for dtype in (torch.float32, torch.bfloat16):
        for n, k_codes, d in ((700, 300, 16), (50, 1030, 7)):
            x = torch.randn(n, d, generator=g).to(dtype)
            e = torch.randn(k_codes, d, generator=g).to(dtype)
            for metric in ("l2", "dot", "cosine"):
                dist, index = fb.codebook_lookup(x, e, 3, metric, backend="cpu")
                full = ref_codebook.pairwise_distance(x.double(), e.double(), metric)
                want = full.topk(3, dim=1, largest=False).values
                assert (dist.double() - want).abs().max().item() < 1e-4 * full.abs().max().item(), metric
                # the returned codes are at their true distances (near-ties may swap)
                assert torch.allclose(full.gather(1, index), dist.double(), rtol=1e-5, atol=1e-5)


def _check_loss(fn, xs, kw, tol, dtype):
    x64 = [x.double().requires_grad_() for x in xs]
    xl = [x.clone().requires_grad_() for x in xs]
    loss = fn(*xl, backend="cpu", **kw)
    want = fn(*x64, backend="torch", **kw)
    assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item())), (fn.__name__, dtype)
    grads = torch.autograd.grad(loss, xl)
    grads64 = torch.autograd.grad(want, x64)
    for got, exp in zip(grads, grads64):
        assert _rel_err(got, exp) < tol, (fn.__name__, "grad", dtype)


def test_bf16_lookup_keeps_fp32_indices_and_lowest_index_ties():
    """bf16 x and codebook run the bf16 GEMM for l2 and dot: the products of bf16 values are exact,
    so the indices equal the fp32 lookup's on the upcast values, duplicates resolve to the lowest index."""
    g = torch.Generator().manual_seed(2)
    base = torch.randint(-3, 4, (300, 32), generator=g).float()
    e = torch.cat([base, base[:50]]).bfloat16()  # codes j and 300 + j identical
    x = torch.randint(-3, 4, (600, 32), generator=g).bfloat16()
    for metric in ("l2", "dot"):
        d16, i16 = fb.codebook_lookup(x, e, 4, metric, backend="cpu")
        d32, i32 = fb.codebook_lookup(x.float(), e.float(), 4, metric, backend="cpu")
        assert torch.equal(i16, i32) and torch.equal(d16, d32), metric
        full = ref_codebook.pairwise_distance(x.double(), e.double(), metric)
        assert torch.equal(i16, torch.sort(full, dim=1, stable=True).indices[:, :4]), metric
    xr = torch.randn(2000, 64, generator=g).bfloat16()
    er = torch.randn(700, 64, generator=g).bfloat16()
    _, i16 = fb.codebook_lookup(xr, er, 1, backend="cpu")
    full = ref_codebook.pairwise_distance(xr.double(), er.double(), "l2")
    best = full.min(1).values
    # a different index only on a near-tie of the exact distances
    picked = full.gather(1, i16)[:, 0]
    assert ((picked - best) <= 1e-5 * best.abs().clamp_min(1)).all()


def check_thread_count_determinism(counts):
    """InfoNCE losses and gradients (shared and per-pair keys) are equal bit for bit for every thread
    count in `counts`; returns the largest difference to the first count's results otherwise seen."""
    g = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    try:
        # 1100 rows: 3 slabs; 200 rows (a small batch, in 64-row units): 2 slabs
        for batch in (1100, 200):
            xs = [torch.nn.functional.normalize(torch.randn(batch, 48, generator=g), dim=-1) for _ in range(3)]
            for fn in (fb.centroid_loss, fb.anchor_loss):
                results = []
                for n in counts:
                    torch.set_num_threads(n)
                    xl = [x.clone().requires_grad_() for x in xs]
                    loss = fn(*xl, temperature=0.07, label_smoothing=0.1, backend="cpu")
                    results.append((loss.detach(), *torch.autograd.grad(loss, xl)))
                for other in results[1:]:
                    for a, b in zip(results[0], other):
                        assert torch.equal(a, b), (fn.__name__, batch, counts)
    finally:
        torch.set_num_threads(threads)


def test_infonce_bit_identical_for_any_thread_count():
    """Issue 12.6: the row partition of the InfoNCE kernels no longer follows the thread count, so the
    losses and every gradient are the same bit for bit with 2 and 3 threads (and with 1 on the brgemm
    path; MKL's sgemm outside a parallel region, the single-thread at::mm_out path, rounds otherwise,
    see csrc/cpu/infonce.cpp). The old partition gave ~3e-9 differences."""
    check_thread_count_determinism((2, 3))
    if torch.ops.fastbind.tile_gemm_path() == "brgemm":
        check_thread_count_determinism((1, 2, 3))
