"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: its --dry-run end to end on the CPU, the
parsers of the GPU-only tool outputs on recorded-format samples, the triton backend without the C++
extension (as on a GPU image where fastbind._C is not built), and the device axis of the suite."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, FUSED, GPU, device_for, interpreted

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--wheels", str(out / "none")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(TRITON_INTERPRET="1"),
        timeout=600,
    )
    return out, proc


def test_dry_run_every_step_runs_or_says_why(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["mode"] == "dry-run"
    for step in ("environment", "benchmarks", "tests", "kernels_without_sanitizer"):
        assert steps[step]["status"] == "ok", (step, steps[step])
    # the GPU-only steps are skipped, each with its reason, never silently
    for step in ("sanitizer_memcheck", "sanitizer_racecheck", "sass_benchmarks", "build_ext"):
        assert steps[step]["status"] == "skipped" and steps[step]["reason"], (step, steps[step])
    assert steps["done"]["status"] == "ok"
    assert steps["tests"]["passed"] > 0 and not steps["tests"].get("failed")
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and set(env["tools"]) == set(gpu_check.TOOLS)
    assert any(line.startswith("backends") for line in env["fastbind_info"])
    assert "passed" in (out / "tests.log").read_text() and (out / "tests.xml").exists()


def test_dry_run_benchmarks_every_provider_with_ratios(dry_run):
    out, _ = dry_run
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    seen = {(r["family"], r["provider"], r["dtype"]) for r in rows}
    for family, baselines in gpu_check.BASELINES.items():
        for dtype in ("bf16", "fp32"):
            for provider in ("fastbind-triton", *baselines):
                assert (family, provider, dtype) in seen, (family, provider, dtype)
    # the largest-B search ran past the fixed case
    assert len({r["B"] for r in rows if r["family"] == "gram"}) == 1 + len(gpu_check.DRY_SIZES["gram_search"])
    csv_text = (out / "bench.csv").read_text()
    for baselines in gpu_check.BASELINES.values():
        for base in baselines:
            assert f"time_vs_{base}" in csv_text
    assert all(r["median_ms"] > 0 and r["peak_mb"] is None for r in rows)  # CPU: no allocator peak
    assert "time_vs_gemm-floor" in (out / "summary.md").read_text()


def test_dry_run_kernel_payload_matches_reference(dry_run):
    out, _ = dry_run
    calls = json.loads((out / "kernels.json").read_text())
    names = {c["call"].split()[0] for c in calls}
    assert names == {"gram_volume", "gram_loss", "infonce", "centroid_loss", "anchor_loss", "codebook_lookup"}
    for c in calls:
        tol = 1e-4 if c["dtype"] == "fp32" else 3e-2  # bf16 operands: its rounding of the GEMM inputs
        assert c["forward_rel_err"] < tol and c["grad_rel_err"] < tol, c


def test_add_ratios_pairs_same_case_and_dtype():
    rows = [
        {
            "family": "gram",
            "case": "c",
            "dtype": "bf16",
            "provider": "fastbind-triton",
            "median_ms": 3.0,
            "peak_mb": 2.0,
        },
        {"family": "gram", "case": "c", "dtype": "bf16", "provider": "gemm-floor", "median_ms": 2.0, "peak_mb": 0.1},
        {
            "family": "gram",
            "case": "c",
            "dtype": "bf16",
            "provider": "gram-release-algorithm",
            "median_ms": 30.0,
            "peak_mb": 8.0,
        },
        {"family": "gram", "case": "c", "dtype": "fp32", "provider": "gemm-floor", "median_ms": 1.0, "peak_mb": 0.0},
    ]
    gpu_check.add_ratios(rows)
    assert rows[0]["time_vs_gemm-floor"] == pytest.approx(1.5)
    assert rows[0]["time_vs_gram-release-algorithm"] == pytest.approx(0.1)
    assert rows[0]["mem_vs_gram-release-algorithm"] == pytest.approx(0.25)
    assert "mem_vs_gemm-floor" not in rows[0]  # a baseline that allocates ~nothing has no memory ratio
    assert not any(k.startswith("time_vs") for r in rows[1:] for k in r)


SASS_SAMPLE = """
        code for sm_90
                Function : _gram_loss_fwd_kernel
        .headerflags    @"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
        /*0010*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;   /* 0x0 */
        /*0020*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;        /* 0x0 */
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                 /* 0x0 */
        /*0040*/                   STL.64 [R1+0x8], R2 ;                                 /* 0x0 */
        /*0050*/                   LDL R3, [R1+0x8] ;                                    /* 0x0 */
        /*0060*/                   FFMA R5, R6, R7, R5 ;                                 /* 0x0 */
        /*0070*/                   EXIT ;                                                /* 0x0 */
"""


def test_parse_sass_counts_tensor_core_and_spill_instructions():
    counts = gpu_check.parse_sass(SASS_SAMPLE)
    assert counts == {"HGMMA": 2, "HMMA": 1, "STL": 1, "LDL": 1, "FFMA": 1, "instructions": 8}
    usage = "Function _gram_loss_fwd_kernel:\n  REG:168 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:612 TEXTURE:0"
    assert gpu_check.parse_res_usage(usage) == {"reg": 168, "stack": 16, "shared": 0, "local": 8}


def test_parse_sanitizer_logs():
    clean = "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.parse_sanitizer(clean) == {"errors": 0, "hazards": 0, "kernels_reported": []}
    dirty = (
        "========= Invalid __global__ read of size 4 bytes\n"
        "=========     at _codebook_lookup_fwd_kernel+0x1a0 in codebook.py:101\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
        "========= ERROR SUMMARY: 3 errors\n"
    )
    found = gpu_check.parse_sanitizer(dirty)
    assert found["errors"] == 3 and found["hazards"] == 2
    assert found["kernels_reported"] == ["_codebook_lookup_fwd_kernel"]
    assert gpu_check.parse_sanitizer("killed before the summary")["errors"] is None


def test_parse_pytest_complete_and_killed_runs():
    done = "tests/a.py::t PASSED\nFAILED tests/a.py::u\n==== 1 failed, 41 passed, 2 skipped in 9.31s ===="
    assert gpu_check.parse_pytest(done) == {"complete": True, "failed": 1, "passed": 41, "skipped": 2}
    killed = "[gw0] [ 1%] PASSED tests/a.py::t\n[gw1] [ 2%] FAILED tests/a.py::u\n[gw0] [ 3%] PASSED tests/b.py::v\n"
    assert gpu_check.parse_pytest(killed) == {"complete": False, "passed": 2, "failed": 1}


def test_triton_backend_without_cpp_extension():
    """A GPU image may lack a compiler: fastbind must import, list the missing extension with its
    reason, and run every family on the triton backend (here: under the interpreter)."""
    code = """
import sys
sys.modules["fastbind._C"] = None  # import fastbind._C raises ImportError, as when it is not built
import torch, fastbind as fb
from fastbind._backend import availability
assert "cpu" not in fb.backends() and "triton" in fb.backends(), fb.backends()
assert "not importable" in availability()["cpu"][1]
x = [torch.randn(9, 12) for _ in range(3)]
for fn in (lambda b: fb.gram_loss(*x, backend=b), lambda b: fb.centroid_loss(*x, backend=b),
           lambda b: fb.codebook_lookup(x[0], x[1], 2, backend=b)[0]):
    torch.testing.assert_close(fn("triton"), fn("torch"), atol=1e-4, rtol=1e-4)
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(TRITON_INTERPRET="1")
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_device_axis_on_a_gpu_machine():
    """conftest on a machine where torch sees a GPU (simulated in a child): it must not switch the
    interpreter on, and the triton/torch tests must build CUDA tensors while cpu keeps CPU ones."""
    code = """
import os, sys, torch
torch.cuda.is_available = lambda: True
sys.path.insert(0, "tests")
import conftest
assert "TRITON_INTERPRET" not in os.environ, os.environ.get("TRITON_INTERPRET")
assert conftest.GPU and conftest.DEVICE == torch.device("cuda")
assert conftest.device_for("triton").type == "cuda" and conftest.device_for("torch").type == "cuda"
assert conftest.device_for("cpu").type == "cpu" and not conftest.interpreted("triton")
print("ok")
"""
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_device_axis():
    """One place decides the device: CUDA with compiled Triton when a GPU is visible (and no
    interpreter was asked for), else CPU tensors with the interpreter."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    assert GPU == (torch.cuda.is_available() and not interpret)
    assert DEVICE.type == ("cuda" if GPU else "cpu")
    if not torch.cuda.is_available():
        assert interpret  # conftest set it before fastbind was imported
    assert device_for("cpu").type == "cpu"
    assert device_for("triton") == device_for("torch") == DEVICE
    assert interpreted("triton") == (not GPU) and not interpreted("cpu")
    assert "triton" in FUSED


def _stand_in(path, script):
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_gpu_only_steps_with_stand_in_tools(tmp_path, monkeypatch):
    """The SASS and compute-sanitizer steps as they run on a GPU machine, with stand-ins for
    cuobjdump and compute-sanitizer that print those tools' formats: the commands, the Triton
    cache walk, the parsing and the files they write."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sample = tmp_path / "sample.sass"
    sample.write_text(SASS_SAMPLE)
    _stand_in(
        bin_dir / "cuobjdump",
        f'case "$1" in -sass) cat {sample};; -res-usage) echo "Function k: REG:40 STACK:0 SHARED:0 LOCAL:0";; esac\n',
    )
    _stand_in(
        bin_dir / "compute-sanitizer",
        'args="$*"\nwhile [ $# -gt 0 ]; do [ "$1" = --log-file ] && log="$2"; shift; done\n'
        'echo "args: $args" > "$log"\necho "caching off: $PYTORCH_NO_CUDA_MEMORY_CACHING" >> "$log"\n'
        'printf "========= Invalid __global__ write of size 4 bytes\\n=========     at _gram_loss_bwd_kernel+0x40\\n'
        '========= ERROR SUMMARY: 1 error\\n" >> "$log"\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    check = gpu_check.Check(str(tmp_path / "out"), 60.0, dry_run=False, wheels=None)
    assert "TRITON_INTERPRET" not in check.env

    def cubin(entry, name):
        folder = os.path.join(check.env["TRITON_CACHE_DIR"], entry)
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"{name}.cubin"), "wb").close()
        meta = {"target": {"backend": "cuda", "arch": 90, "warp_size": 32}, "num_warps": 4, "num_stages": 2}
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(meta, f)

    cubin("a1b2c3d4e5f6a7b8", "_gram_loss_fwd_kernel")
    seen = gpu_check.sass(check, "benchmarks", keep_text=True)
    cubin("ffff0000ffff0000", "_codebook_lookup_fwd_kernel")
    gpu_check.sass(check, "later", since=seen)
    with open(tmp_path / "out" / "sass-benchmarks.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["kernel"] == "_gram_loss_fwd_kernel" and row["arch"] == "90" and row["num_warps"] == "4"
    assert (row["HGMMA"], row["HMMA"], row["STL"], row["LDL"], row["reg"]) == ("2", "1", "1", "1", "40")
    assert (tmp_path / "out" / "sass" / "_gram_loss_fwd_kernel-a1b2c3d4e5f6.sass").read_text() == SASS_SAMPLE
    with open(tmp_path / "out" / "sass-later.csv") as f:
        assert [r["kernel"] for r in csv.DictReader(f)] == ["_codebook_lookup_fwd_kernel"]  # only the new one
    steps = check.summary["steps"]
    assert steps["sass_benchmarks"]["spilling"] == ["_gram_loss_fwd_kernel"]  # STL/LDL in its SASS

    gpu_check.sanitizer(check, "memcheck", cap=60)
    log = (tmp_path / "out" / "sanitizer-memcheck.log").read_text()
    assert "--tool memcheck" in log and "-m benchmarks.gpu_check" in log and "--step kernels" in log
    assert "--dry-run" not in log and "caching off: 1" in log
    step = steps["sanitizer_memcheck"]
    assert step["status"] == "failed" and step["errors"] == 1
    assert step["kernels_reported"] == ["_gram_loss_bwd_kernel"]
    shutil.rmtree(check.work)
