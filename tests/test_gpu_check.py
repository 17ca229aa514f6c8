"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: its --dry-run end to end on the CPU, the
parsers of the GPU-only tool outputs on recorded-format samples, the triton backend without the C++
extension (as on a GPU image where fastbind._C is not built), and the device axis of the suite."""

import csv
import glob
import gzip
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, FUSED, GPU, device_for, interpreted

from benchmarks import cuda_link_check, gpu_check

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
    for step in ("environment", "benchmarks", "benchmarks_cpu", "tests", "tests_cpu_only", "kernels_without_sanitizer"):
        assert steps[step]["status"] == "ok", (step, steps[step])
    # the GPU-only steps are skipped, each with its reason, never silently
    for step in ("sanitizer_memcheck", "sanitizer_racecheck", "sass_benchmarks", "build_ext", "sass_cuda_ext"):
        assert steps[step]["status"] == "skipped" and steps[step]["reason"], (step, steps[step])
    assert steps["done"]["status"] == "ok"
    assert steps["tests"]["passed"] > 0 and not steps["tests"].get("failed")
    assert "triton" in steps["tests"]["fused_backends"]  # read from the suite's report header
    # where a CUDA build could come from (carried, in place) was probed, each with its verdict
    in_place = [p for p in steps["build_ext"]["probes"] if p["library"].startswith("fastbind")]
    assert all(p["cuda"] or p["reason"] for p in steps["build_ext"]["probes"])
    assert bool(in_place) == bool(glob.glob(os.path.join(ROOT, "fastbind", "_C*.so")))
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and set(env["tools"]) == set(gpu_check.TOOLS)
    assert any(line.startswith("backends") for line in env["fastbind_info"])
    assert "passed" in (out / "tests.log").read_text() and (out / "tests.xml").exists()
    assert (out / "tests-cpu-only.xml").exists() and steps["tests_cpu_only"]["passed"] > 0


def test_dry_run_benchmarks_every_provider_with_ratios(dry_run):
    out, _ = dry_run
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    seen = {(r["family"], r["provider"], r["dtype"]) for r in rows}
    for family, baselines in gpu_check.BASELINES.items():
        for dtype in ("bf16", "fp32"):
            # fastbind-cpu: the second pass of a backend built during the check (cuda on a GPU)
            for provider in ("fastbind-triton", "fastbind-cpu", *baselines):
                assert (family, provider, dtype) in seen, (family, provider, dtype)
    # the largest-B search ran past the fixed case, for both backends
    for provider in ("fastbind-triton", "fastbind-cpu"):
        gram_bs = {r["B"] for r in rows if r["family"] == "gram" and r["provider"] == provider}
        assert len(gram_bs) == 1 + len(gpu_check.DRY_SIZES["gram_search"]), provider
    csv_text = (out / "bench.csv").read_text()
    for baselines in gpu_check.BASELINES.values():
        for base in baselines:
            assert f"time_vs_{base}" in csv_text
    # the later backend against triton on every case both ran
    later = json.loads((out / "summary.json").read_text())["steps"]["benchmarks_cpu"]
    assert later["rows"] == sum(r["provider"] == "fastbind-cpu" for r in rows)
    assert len(later["cpu"]["vs_triton"]) == later["rows"] and all(v > 0 for v in later["cpu"]["vs_triton"].values())
    with open(out / "bench.csv") as f:
        assert all(
            float(r["time_vs_fastbind-triton"]) > 0 for r in csv.DictReader(f) if r["provider"] == "fastbind-cpu"
        )
    assert all(r["median_ms"] > 0 and r["peak_mb"] is None for r in rows)  # CPU: no allocator peak
    assert "time_vs_gemm-floor" in (out / "summary.md").read_text()


def test_dry_run_kernel_payload_matches_reference(dry_run):
    out, _ = dry_run
    payload = json.loads((out / "kernels.json").read_text())
    # cuda is left out with its reason; the cpu backend stands in as the second backend
    assert payload["backends"] == ["triton", "cpu"] and payload["skipped"]["cuda"], payload["skipped"]
    calls = payload["calls"]
    for backend in payload["backends"]:
        names = {c["call"].split()[0] for c in calls if c["backend"] == backend}
        assert names == {"gram_volume", "gram_loss", "infonce", "centroid_loss", "anchor_loss", "codebook_lookup"}
    step = json.loads((out / "summary.json").read_text())["steps"]["kernels_without_sanitizer"]
    assert step["payload"]["cpu"]["calls"] == len(calls) // 2 and step["payload"]["cpu"]["errors"] == 0
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
        {"family": "gram", "case": "c", "dtype": "bf16", "provider": "fastbind-cuda", "median_ms": 4.5, "peak_mb": 3.0},
    ]
    gpu_check.add_ratios(rows)
    cuda = rows.pop()  # the cuda row also against the triton row of its case
    assert cuda["time_vs_fastbind-triton"] == pytest.approx(1.5) and cuda["mem_vs_fastbind-triton"] == pytest.approx(
        1.5
    )
    assert cuda["time_vs_gemm-floor"] == pytest.approx(2.25)
    assert gpu_check.versus_triton([cuda], "fastbind-cuda") == {
        "vs_triton": {"gram c bf16": 1.5},
        "over_target": ["gram c bf16"],
    }
    assert "time_vs_fastbind-triton" not in rows[0]
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
    assert "--dry-run" not in log and "caching off: 1" in log and "--payload kernels-memcheck.json" in log
    assert "--cuda-first" not in log  # memcheck starts with triton, racecheck with cuda
    gpu_check.sanitizer(check, "racecheck", cap=60)
    assert "--cuda-first --payload kernels-racecheck.json" in (tmp_path / "out" / "sanitizer-racecheck.log").read_text()
    step = steps["sanitizer_memcheck"]
    assert step["status"] == "failed" and step["errors"] == 1
    assert step["kernels_reported"] == ["_gram_loss_bwd_kernel"]
    shutil.rmtree(check.work)


# `cuobjdump -sass` / `-res-usage` of a library with two architectures, in the tools' format (cut
# from their output for a two-kernel .so built with nvcc 13.0 for sm_80 and sm_90a)
def _elf(arch: str) -> str:
    return f"\nFatbin elf code:\n================\narch = {arch}\ncode version = [1,8]\nhost = linux\n" + (
        "compile_size = 64bit\n\n"
    )


def _sass_function(name: str, arch: str, *instructions: str) -> str:
    flag = f"EF_CUDA_SM{arch[3:5]}"
    lines = [f"\t\tFunction : {name}", f'\t.headerflags\t@"{flag} EF_CUDA_VIRTUAL_SM({flag})"']
    for i, ins in enumerate(instructions):
        lines.append(f"        /*{16 * i:04x}*/                   {ins} ;".ljust(86) + "/* 0x0000000000000000 */")
        lines.append(" " * 86 + "/* 0x000fe40000000f00 */")
    return "\n".join(lines) + "\n\t\t..........\n\n\n"


LIB_SASS_SAMPLE = (
    _elf("sm_80")
    + "\tcode for sm_80\n\t.target\tsm_80\n\n"
    + _sass_function(
        "_ZN2fb12other_kernelEPd", "sm_80", "MOV R1, c[0x0][0x28]", "STL.128 [R1+0x10], R4", "LDL.64 R2, [R0]", "EXIT"
    )
    + _sass_function(
        "_ZN2fb10add_kernelIfEEvPT_i",
        "sm_80",
        "HFMA2.MMA R2, -RZ, RZ, 0, 2.38e-07",
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",
        "EXIT",
    )
    + _elf("sm_90a")
    + "\tcode for sm_90\n\t.target\tsm_90\n\n"
    + _sass_function(
        "_ZN2fb10add_kernelIfEEvPT_i", "sm_90a", "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT", "EXIT"
    )
)
_USAGE = "  REG:{} STACK:{} SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
LIB_RES_USAGE_SAMPLE = (
    _elf("sm_80")
    + "Resource usage:\n Common:\n  GLOBAL:0\n"
    + " Function _ZN2fb12other_kernelEPd:\n"
    + _USAGE.format(32, 320)
    + " Function _ZN2fb10add_kernelIfEEvPT_i:\n"
    + _USAGE.format(8, 0)
    + _elf("sm_90a")
    + "Resource usage:\n Common:\n  GLOBAL:0\n"
    + " Function _ZN2fb10add_kernelIfEEvPT_i:\n"
    + _USAGE.format(10, 0)
)


def test_sass_of_the_cuda_extension_with_a_stand_in_cuobjdump(tmp_path, monkeypatch):
    """The SASS step over the CUDA build of fastbind._C: per (kernel, architecture) rows from one
    library holding many cubins, names demangled, resources joined, the SASS text kept."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "sass.txt").write_text(LIB_SASS_SAMPLE)
    (tmp_path / "res.txt").write_text(LIB_RES_USAGE_SAMPLE)
    _stand_in(
        bin_dir / "cuobjdump", f'case "$1" in -sass) cat {tmp_path}/sass.txt;; *) cat {tmp_path}/res.txt;; esac\n'
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    check = gpu_check.Check(str(tmp_path / "out"), 60.0, dry_run=False, wheels=None)
    gpu_check.sass_extension(check)
    assert check.summary["steps"]["sass_cuda_ext"]["status"] == "skipped"  # nothing in place yet
    check.cuda_ext = str(tmp_path / "_C.so")
    gpu_check.sass_extension(check)
    with open(tmp_path / "out" / "sass-cuda.csv") as f:
        rows = {(r["kernel"], r["arch"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("other_kernel", "sm_80"), ("add_kernel", "sm_80"), ("add_kernel", "sm_90a")}
    other, add80, add90 = rows["other_kernel", "sm_80"], rows["add_kernel", "sm_80"], rows["add_kernel", "sm_90a"]
    if shutil.which("c++filt"):
        assert add80["template"] == "float"
    assert (other["STL"], other["LDL"], other["stack"], other["reg"], other["instructions"]) == (
        "1",
        "1",
        "320",
        "32",
        "4",
    )
    assert (add80["HMMA"], add80["HGMMA"], add80["reg"], add90["HGMMA"], add90["reg"]) == ("1", "0", "8", "1", "10")
    step = check.summary["steps"]["sass_cuda_ext"]
    assert step["status"] == "ok" and step["functions"] == 3 and step["mma_per_arch"] == {"sm_80": 1, "sm_90a": 1}
    assert [s.split("<")[0] for s in step["local_memory"]] == ["other_kernel"]
    with gzip.open(tmp_path / "out" / "sass" / "cuda-ext.sass.gz", "rt") as f:
        assert f.read() == LIB_SASS_SAMPLE
    shutil.rmtree(check.work)


def test_kernel_name_of_a_demangled_signature():
    sig = "void fastbind::cuda::topk_kernel<__nv_bfloat16, float>(__nv_bfloat16 const*, long, int)"
    assert gpu_check.kernel_name(sig) == ("topk_kernel", "__nv_bfloat16, float")
    assert gpu_check.kernel_name("_Z3fooPf") == ("_Z3fooPf", "")


def test_probe_extension_reads_build_info_and_rejects_what_cannot_serve(tmp_path):
    """The probe of a built fastbind._C: the in-place CPU build loads but lacks CUDA; a library for
    another python, or a file that is no library, are rejected with the reason."""
    check = gpu_check.Check(str(tmp_path / "out"), 60.0, dry_run=True, wheels=None)
    built = glob.glob(os.path.join(ROOT, "fastbind", "_C*.so"))
    if built:  # make test builds it; the triton-only setup has none
        found = gpu_check.probe_extension(check, built[0])
        assert not found["cuda"] and found["reason"] == "built without CUDA", found
        assert found["build_info"].startswith("cpu(") and found["library"].startswith("fastbind")
        # the op list is the link check's (every op of the tables' cuda rows), all missing here
        assert found["missing"] == [name.removeprefix("fastbind::") for name in cuda_link_check.cuda_op_names()]
    other = tmp_path / "_C.cpython-39-x86_64-linux-gnu.so"
    other.write_bytes(b"\0")
    assert "another one" in gpu_check.probe_extension(check, str(other))["reason"]
    junk = tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    junk.write_bytes(b"not a library")
    found = gpu_check.probe_extension(check, str(junk))
    assert not found["cuda"] and found["reason"].startswith("does not load"), found
    shutil.rmtree(check.work)


def _fake_library(folder, text="lib"):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_carried_cuda_build_is_installed_and_put_back(tmp_path, monkeypatch):
    """A carried `make cuda-build` library that loads with CUDA goes next to the sources (here a
    scratch package folder) before the benchmarks, which then time cuda beside triton; the CPU build
    it displaced is put back when the check ends."""
    carried = _fake_library(tmp_path / "build" / "cuda" / "lib" / "fastbind", "cuda build")
    in_place = _fake_library(tmp_path / "pkg", "cpu build")
    monkeypatch.setattr(gpu_check, "CUDA_PREBUILT", os.path.dirname(carried))

    def probe(check, path):
        with open(path) as f:
            cuda = f.read() == "cuda build"
        return {"library": path, "cuda": cuda, "build_info": "cpu(...)" + (" cuda" if cuda else "")}

    monkeypatch.setattr(gpu_check, "probe_extension", probe)
    check = gpu_check.Check(str(tmp_path / "out"), 60.0, dry_run=False, wheels=None)
    check.package_dir = str(tmp_path / "pkg")
    assert gpu_check.fused_backends(check) == ["triton"]
    assert gpu_check.start_build(check) is None
    step = check.summary["steps"]["build_ext"]
    assert step["status"] == "ok" and step["kind"] == "cuda" and step["source"].startswith("carried"), step
    assert check.cuda_ext == in_place and open(in_place).read() == "cuda build"
    assert gpu_check.fused_backends(check) == ["triton", "cuda"]
    gpu_check.restore_extension(check)
    assert open(in_place).read() == "cpu build"
    shutil.rmtree(check.work)


def test_cuda_build_in_the_background(tmp_path, monkeypatch):
    """No usable carried build: the CUDA build runs in the background (its command: CUDA on, sm_90a,
    the toolkit of the nvcc found, all cores) and is installed when done; a build that lacks a CUDA
    op fails the step; nothing is left next to the sources afterwards."""
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    _stand_in(bin_dir / "nvcc", "echo nvcc\n")
    (tmp_path / "cuda" / "include").mkdir()
    (tmp_path / "cuda" / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(gpu_check, "CUDA_PREBUILT", str(tmp_path / "none"))
    check = gpu_check.Check(str(tmp_path / "out"), 60.0, dry_run=False, wheels=None)
    check.package_dir = str(tmp_path / "pkg")
    os.makedirs(check.package_dir)
    cmd, env, lib = gpu_check.build_command(check, "cuda")
    assert (env["FASTBIND_BUILD_CUDA"], env["TORCH_CUDA_ARCH_LIST"], env["MAX_JOBS"]) == (
        "1",
        "9.0a",
        str(os.cpu_count()),
    )
    assert env["CUDA_HOME"] == str(tmp_path / "cuda") and cmd[1:4] == ["setup.py", "-q", "build_ext"] and lib in cmd
    assert gpu_check.build_command(check, "cpu")[1]["FASTBIND_BUILD_CUDA"] == "0"

    def fake_build(check, kind):  # what setup.py leaves: the library under <lib>/fastbind/
        lib = os.path.join(check.work, f"ext-{kind}-lib")
        target = os.path.join(lib, "fastbind", f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}")
        folder = os.path.dirname(target)
        script = f"import os, time; time.sleep(0.5); os.makedirs({folder!r}); open({target!r}, 'w').write('x')"
        return [sys.executable, "-c", script], dict(os.environ), lib

    monkeypatch.setattr(gpu_check, "build_kind", lambda check: ("cuda", ""))
    monkeypatch.setattr(gpu_check, "build_command", fake_build)
    for missing in ([], ["infonce_bwd"]):
        reason = {"reason": f"no CUDA kernel for {missing}"} if missing else {}
        found = {"cuda": not missing, "build_info": "cpu(...) cuda", **reason}
        monkeypatch.setattr(gpu_check, "probe_extension", lambda check, path, found=found: dict(found, library=path))
        shutil.rmtree(os.path.join(check.work, "ext-cuda-lib"), ignore_errors=True)
        build = gpu_check.start_build(check)
        assert build is not None and build[4] == "cuda"
        gpu_check.finish_build(check, build, cap=60)
        step = check.summary["steps"]["build_ext"]
        if missing:
            assert step["status"] == "failed" and "infonce_bwd" in step["reason"], step
        else:
            assert step["status"] == "ok" and step["source"].startswith("built here"), step
            assert check.cuda_ext and os.path.exists(check.cuda_ext)
            check.cuda_ext = None
            gpu_check.restore_extension(check)
        assert os.listdir(check.package_dir) == []
    shutil.rmtree(check.work)


def test_parse_pytest_backends():
    log = (
        "fastbind test device: cuda (NVIDIA H200): CUDA tensors, compiled Triton kernels; "
        "fused backends ['cpu', 'triton', 'cuda']\n"
        "tests/test_gram.py::test_volume[cuda-5-9-17] PASSED                       [  1%]\n"
        "[gw1] [  2%] FAILED tests/test_gram.py::test_loss[cuda-both] \n"
        "[gw0] [  3%] PASSED tests/test_gram.py::test_loss[triton-both] \n"
        "[gw0] [  4%] PASSED tests/test_gram.py::test_plain \n"
        "=== short test summary info ===\nFAILED tests/test_gram.py::test_loss[cuda-both] - boom\n"
    )
    found = gpu_check.parse_pytest_backends(log)
    assert found["fused_backends"] == ["cpu", "triton", "cuda"]
    assert found["by_backend"] == {"cpu": {}, "triton": {"passed": 1}, "cuda": {"passed": 1, "failed": 1}}


def test_op_tests_take_the_cuda_backend(tmp_path):
    """Once fastbind lists the cuda backend (CUDA build in place, a GPU), the op tests are
    parametrised with it: tests/conftest.py's FUSED comes from fastbind.backends(). Simulated here
    by a plugin that adds cuda to that list before conftest reads it; collection only."""
    (tmp_path / "fake_cuda_backend.py").write_text(
        "import fastbind\n_real = fastbind.backends\nfastbind.backends = lambda: ['cuda', *_real()]\n"
    )
    files = ["tests/test_gram.py", "tests/test_infonce.py", "tests/test_codebook.py"]
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "fake_cuda_backend", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*cmd, *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(TRITON_INTERPRET="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in files:
        ids = [line for line in proc.stdout.splitlines() if line.startswith(name)]
        assert any("[cuda" in i or "-cuda" in i for i in ids), (name, ids[:5])


def test_cpu_only_test_files_exist():
    """The files the GPU run puts last are this suite's (a renamed file would silently move up)."""
    for name in gpu_check.CPU_ONLY_TESTS:
        assert os.path.exists(os.path.join(ROOT, "tests", name)), name


def test_payload_order():
    """The payload's backends in order (the dry run: cpu standing in for cuda, cuda's reason kept)."""
    assert gpu_check.payload_backends(True)[0] == ["triton", "cpu"]
    backends, skipped = gpu_check.payload_backends(True, cuda_first=True)
    assert backends == ["cpu", "triton"] and "dry run" in skipped["cuda"]
