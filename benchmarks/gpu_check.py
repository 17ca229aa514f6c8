"""One-shot GPU check (`make gpu-check`): everything worth knowing from one short loan of a GPU.

Written for one H200 in a fixed image (python 3.12, torch 2.11 + CUDA 13, triton 3.6, nvcc,
compute-sanitizer, ncu, cuobjdump) with no network, within a time budget (default 420 s, well
inside the 8 minutes a loan allows). Every step writes its files under the output folder as soon
as it finishes, and a step that fails or runs out of time never stops the next one:

1. ``environment``: versions, tools, device properties -> ``environment.json``;
2. ``wheels``: pytest (+ pytest-xdist, setuptools, ninja) installed offline from ``--wheels DIR``
   (``make gpu-wheels``) into a private folder, only where they are missing;
3. ``build_ext``: ``fastbind._C`` with the CUDA kernels of csrc/cuda (it carries the CPU kernels
   too): the one ``make cuda-build`` left in ``build/cuda/lib`` when it was carried along and loads
   with every CUDA op registered, else built here in the background *into a scratch folder*
   (``FASTBIND_BUILD_CUDA=1``, sm_90a) while the triton benchmarks run, else (no nvcc or no CUDA
   torch) the CPU-only build; put next to the sources for the later steps, the original put back at
   the end;
4. ``benchmarks``: CUDA-event timings and peak ``torch.cuda.max_memory_allocated`` of GRAM (k=3,
   D=512, B=8192 and the largest B that fits, searched up to a cap), CentroBind (M=3, D=512) and the
   codebook lookup (N=1M, K=16384, D=256) on the ``triton`` and ``cuda`` backends, each against the
   GEMM floor of the same shapes (plain ``torch.mm``), the GRAM release's algorithm, the naive
   stacked-logits InfoNCE and ``torch.cdist``+``argmin``, in bf16 and fp32, as ratios, and cuda
   against triton -> ``bench.csv``, ``bench.md`` (a CUDA build finished during the check gets its
   own pass, ``benchmarks_cuda``);
5. ``kernels`` under ``compute-sanitizer`` memcheck and racecheck: every Triton and CUDA kernel once,
   forward and backward, on small awkward shapes, fp32/bf16 (and fp16 on cuda) -> ``sanitizer-*.log``,
   ``kernels-*.json``;
6. ``tests``: the whole test suite on CUDA (tests/conftest.py picks the device; its fused backends
   include cuda once the CUDA build is in place), under a time cap -> ``tests.log``, ``tests.xml``;
7. ``sass``: ``cuobjdump -sass`` of every cubin this run compiled (Triton's cache, a fresh folder)
   and of the CUDA build of fastbind._C: HGMMA / HMMA counts, local-memory (spill) loads and stores,
   registers -> ``sass-*.csv``, and the SASS text under ``sass/``.

``summary.json`` and ``summary.md`` (rewritten after each step) say what ran, how long it took and
why anything was skipped. ``--dry-run`` runs the same script on the CPU at tiny sizes (Triton's
interpreter; the steps that need a GPU print why they are skipped; the cpu backend stands in for
cuda in the benchmarks' second pass and the kernel payload); ``tests/test_gpu_check.py`` runs
it in ``make test`` so the script cannot rot.

Usage: ``python3 -m benchmarks.gpu_check [--out DIR] [--wheels DIR] [--budget S] [--dry-run]``
(``--out`` defaults to ``$OUT``, else ``gpu-check-out``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import glob
import gzip
import importlib.machinery
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("nvidia-smi", "nvcc", "compute-sanitizer", "ncu", "cuobjdump", "nvdisasm", "g++", "ninja")
# Packages the check needs that a bare CUDA image may lack -> the module that proves each present.
# `make gpu-wheels` downloads them (and their dependencies) for python 3.12 into gpu-wheels/.
WHEEL_MODULES = {
    "pytest": "pytest",
    "pytest-xdist": "xdist",
    "setuptools": "setuptools",
    "ninja": "ninja",
    "numpy": "numpy",
}

# Sizes. GPU: the cases. Dry run: tiny, so the interpreter finishes in seconds.
GPU_SIZES = {
    "gram": dict(k=3, D=512, B=8192),
    "gram_search": [16384, 32768, 65536, 131072, 262144],  # largest-B search, capped here
    "centroid": dict(M=3, D=512, B=[16384, 32768]),
    "lookup": dict(N=1 << 20, K=16384, D=256),
    "dtypes": ("bf16", "fp32"),
    "reps": 5,
    "search_stop_s": 10.0,  # stop the B search once one fwd+bwd takes longer than this
}
DRY_SIZES = {
    "gram": dict(k=3, D=16, B=24),
    "gram_search": [32],
    "centroid": dict(M=3, D=16, B=[16]),
    "lookup": dict(N=100, K=40, D=16),
    "dtypes": ("bf16", "fp32"),
    "reps": 1,
    "search_stop_s": 60.0,
}
TAU, SMOOTHING = 0.07, 0.1
LOOKUP_CHUNK = 65536  # rows per block of the chunked cdist baseline and of the lookup GEMM floor


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _which(tool: str) -> str | None:
    """A CUDA tool on PATH or in the usual toolkit folders (images often leave them off PATH)."""
    found = shutil.which(tool)
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin", "/usr/local/cuda-*/bin", "/opt/nvidia/*/bin"):
        for folder in sorted(glob.glob(pattern), reverse=True):
            path = os.path.join(folder, tool)
            if os.access(path, os.X_OK):
                return path
    return None


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and whatever it started (pytest workers)
    except ProcessLookupError:  # it ended in the meantime
        pass


def _run(cmd, timeout: float, env=None, log_path: str | None = None, cwd: str = ROOT) -> dict:
    """Run `cmd` in its own process group; on timeout kill the whole group. Output goes to
    `log_path` (or is returned). Returns {"rc", "seconds", "timed_out", "output"}."""
    t0 = time.monotonic()
    out = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            text, _ = proc.communicate(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            text, _ = proc.communicate()
            timed_out = True
    finally:
        if log_path:
            out.close()
    if log_path:
        with open(log_path, errors="replace") as f:
            text = f.read()
    return {"rc": proc.returncode, "seconds": time.monotonic() - t0, "timed_out": timed_out, "output": text or ""}


def _first_line(cmd, timeout: float = 20) -> str:
    try:
        res = _run(cmd, timeout)
    except OSError as exc:
        return f"not runnable ({exc})"
    lines = [line.strip() for line in res["output"].splitlines() if line.strip()]
    # first and last lines: g++ names its version first, nvcc last, most tools in their only line
    return " | ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else f"exit code {res['rc']}"


class Check:
    """The run: output folder, budget, summary of the steps."""

    def __init__(self, out: str, budget: float, dry_run: bool, wheels: str | None):
        self.out, self.budget, self.dry_run, self.wheels = out, budget, dry_run, wheels
        self.t0 = time.monotonic()
        self.work = tempfile.mkdtemp(prefix="fastbind-gpu-check-")
        self.summary = {"mode": "dry-run" if dry_run else "gpu", "budget_s": budget, "steps": {}}
        self.package_dir = os.path.join(ROOT, "fastbind")  # where `import fastbind._C` looks
        self.displaced: dict[str, str | None] = {}  # libraries installed there -> the one they replaced
        self.cuda_ext: str | None = None  # the CUDA build of fastbind._C once installed
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, self.env.get("PYTHONPATH")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"  # the CPU suite: Triton kernels through the interpreter
        else:
            self.env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
            # A fresh Triton cache: every cubin in it was compiled (and, but for the AOT test, run)
            # by this check, which is what the SASS step reports. Shared by all steps (compile once).
            self.env["TRITON_CACHE_DIR"] = os.path.join(self.work, "triton-cache")
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def record(self, step: str, status: str, seconds: float, **info) -> None:
        self.summary["steps"][step] = {"status": status, "seconds": round(seconds, 1), **info}
        self.summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        reason = info.get("reason") or info.get("error") or ""
        print(f"[gpu-check] {step}: {status} ({seconds:.1f} s){' - ' + reason if reason else ''}", flush=True)
        with open(self.path("summary.json"), "w") as f:
            json.dump(self.summary, f, indent=1)
        with open(self.path("summary.md"), "w") as f:
            f.write(summary_markdown(self.summary))

    def skip(self, step: str, reason: str) -> None:
        self.record(step, "skipped", 0.0, reason=reason)

    def python_step(self, step: str, args: list[str], cap: float, log: str) -> dict:
        """Run ``python -m benchmarks.gpu_check --step ...`` in a child (a crash or hang there cannot
        take the rest of the check with it)."""
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", self.out, *args]
        return _run(cmd, cap, env=self.env, log_path=self.path(log))


# --------------------------------------------------------------------------------------------
# 1. environment
# --------------------------------------------------------------------------------------------
def environment(check: Check) -> None:
    t0 = time.monotonic()
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not installed ({exc})"
    info["tools"] = {}
    for tool in TOOLS:
        path = _which(tool)
        if path is None:
            info["tools"][tool] = "not found"
        elif tool == "nvidia-smi":
            query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
            info["tools"][tool] = _first_line([path, query, "--format=csv,noheader"])
        else:
            info["tools"][tool] = f"{path}: {_first_line([path, '--version'])}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_gib": round(props.total_memory / 2**30, 2),
            "multi_processor_count": props.multi_processor_count,
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
    else:
        info["device"] = "no CUDA GPU visible to torch"
    # fastbind's own view (a child: the main process keeps no fastbind / CUDA state)
    res = _run([sys.executable, "-m", "fastbind.cli", "info"], 120, env=check.env)
    info["fastbind_info"] = res["output"].strip().splitlines()
    with open(check.path("environment.json"), "w") as f:
        json.dump(info, f, indent=1)
    status = "ok" if res["rc"] == 0 else "failed"
    check.record("environment", status, time.monotonic() - t0, device=str(info["device"]))


# --------------------------------------------------------------------------------------------
# 2. wheels
# --------------------------------------------------------------------------------------------
def _importable(check: Check, module: str) -> bool:
    return _run([sys.executable, "-c", f"import {module}"], 60, env=check.env)["rc"] == 0


def wheels(check: Check) -> None:
    t0 = time.monotonic()
    missing = [pkg for pkg, module in WHEEL_MODULES.items() if not _importable(check, module)]
    if not missing:
        check.record("wheels", "ok", time.monotonic() - t0, reason="all present, nothing installed")
        return
    if not check.wheels or not os.path.isdir(check.wheels):
        check.record(
            "wheels",
            "skipped",
            time.monotonic() - t0,
            reason=f"missing {missing}; no wheels folder (make gpu-wheels)",
        )
        return
    site = os.path.join(check.work, "site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", check.wheels, "--target", site]
    res = _run([*cmd, *missing], 180, log_path=check.path("wheels.log"))
    check.env["PYTHONPATH"] += os.pathsep + site
    check.env["PATH"] = os.path.join(site, "bin") + os.pathsep + check.env.get("PATH", "")
    status = "ok" if res["rc"] == 0 else "failed"
    check.record("wheels", status, res["seconds"], installed=missing, rc=res["rc"])


# --------------------------------------------------------------------------------------------
# 3. fastbind._C: the CUDA build (it carries the CPU kernels too), else the CPU-only one
# --------------------------------------------------------------------------------------------
# `make cuda-build` (beforehand, on a machine with the package index) leaves the CUDA build of
# fastbind._C here; carried along with the working tree, it saves the check the build.
CUDA_PREBUILT = os.path.join(ROOT, "build", "cuda", "lib", "fastbind")
CUDA_ARCH = "9.0a"  # the H200 alone (sm_90a): half the device code of make cuda-build's "8.0;9.0a"
# Loads a library in a child as fastbind._C (as an installed build is loaded; argv: the library, the
# repository root) and prints its build info and the ops of the op tables' cuda rows that have no
# kernel for the CUDA dispatch key. The op list is cuda_link_check's (the tables), the one list the
# link check of `make cuda-build` checks too.
_PROBE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from benchmarks import cuda_link_check as check
check.load_as_fastbind_c(Path(sys.argv[1]))
import torch
print("build_info:", torch.ops.fastbind.build_info())
print("missing:", " ".join(name.removeprefix("fastbind::") for name in check.missing_cuda_kernels()))
"""
_BACKENDS = "import fastbind, fastbind._backend as b; print(fastbind.backends(), b.availability()['cuda'])"


def probe_extension(check: Check, path: str) -> dict:
    """Whether the built fastbind._C at `path` holds every CUDA kernel and can be imported by this
    python: loaded in a child (a broken library cannot take the check with it)."""
    found = {"library": os.path.relpath(path, ROOT), "cuda": False}
    name = os.path.basename(path)
    if name[len("_C") :] not in importlib.machinery.EXTENSION_SUFFIXES:
        return found | {"reason": f"not importable by python {platform.python_version()} (built for another one)"}
    res = _run([sys.executable, "-c", _PROBE, path, ROOT], 120, env=check.env)
    fields = dict(
        line.split(": ", 1) for line in res["output"].splitlines() if line.startswith(("build_info: ", "missing: "))
    )
    if res["rc"] != 0 or "build_info" not in fields:
        last = (res["output"].strip().splitlines() or [f"exit code {res['rc']}"])[-1]
        return found | {"reason": f"does not load: {last}"[:300]}
    info, missing = fields["build_info"].strip(), fields.get("missing", "").split()
    found["build_info"], found["missing"] = info, missing
    if "cuda" not in info.split():  # the test fastbind._backend makes
        return found | {"reason": "built without CUDA"}
    if missing:
        return found | {"reason": f"no CUDA kernel for {missing}"}
    return found | {"cuda": True}


def install_extension(check: Check, path: str) -> str:
    """Put a built fastbind._C next to the sources, where `import fastbind` finds it. One that is
    there is kept aside and put back by restore_extension when the check ends (a CUDA build would
    not import into a CPU torch). Renamed into place: a process that maps the old file keeps it."""
    dest = os.path.join(check.package_dir, os.path.basename(path))
    if dest not in check.displaced:
        backup = None
        if os.path.exists(dest):
            backup = os.path.join(check.work, f"displaced-{len(check.displaced)}.so")
            shutil.copy2(dest, backup)
        check.displaced[dest] = backup
    _replace(path, dest)
    return dest


def _replace(src: str, dest: str) -> None:
    tmp = dest + ".gpu-check-tmp"
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def restore_extension(check: Check) -> None:
    """Leave the sources' fastbind._C as the check found it."""
    for dest, backup in check.displaced.items():
        if backup is not None:
            _replace(backup, dest)
        elif os.path.exists(dest):
            os.remove(dest)
    check.displaced.clear()


def _installed(check: Check, t0: float, kind: str, source: str, dest: str, **info) -> None:
    if kind == "cuda":
        check.cuda_ext = dest
    res = _run([sys.executable, "-c", _BACKENDS], 120, env=check.env)  # what fastbind sees now
    backends = (res["output"].strip().splitlines() or ["?"])[-1]
    check.record("build_ext", "ok", time.monotonic() - t0, kind=kind, source=source, backends=backends, **info)


def build_kind(check: Check) -> tuple[str | None, str]:
    """What can be built here: "cuda" (CUDA torch, nvcc, g++, ninja), "cpu", or None; and why not cuda."""
    import torch

    if not _which("g++") or not (_which("ninja") or _importable(check, "ninja")):
        return None, "no g++ or ninja"
    if torch.version.cuda is None:
        return "cpu", "torch is not a CUDA build"
    if _which("nvcc") is None:
        return "cpu", "nvcc not found"
    return "cuda", ""


def cuda_home() -> str:
    """The CUDA toolkit to build with: CUDA_HOME if set, else the toolkit of the nvcc found, else the
    usual folders; the first with nvcc and the runtime headers (torch's own CUDA-prefix guess can
    pick the wrong one)."""
    nvcc = _which("nvcc")
    found = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    folders = [os.environ.get("CUDA_HOME"), found, "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))[::-1]]
    for home in filter(None, folders):
        if os.access(os.path.join(home, "bin", "nvcc"), os.X_OK) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return next(filter(None, folders))


def build_command(check: Check, kind: str) -> tuple[list[str], dict, str]:
    """setup.py build_ext of `kind` into a scratch folder: (command, environment, library folder)."""
    env = dict(check.env, MAX_JOBS=str(os.cpu_count() or 4), FASTBIND_BUILD_CUDA="1" if kind == "cuda" else "0")
    if kind == "cuda":
        home = cuda_home()
        env.update(CUDA_HOME=home, TORCH_CUDA_ARCH_LIST=CUDA_ARCH)
        env["PATH"] = os.path.join(home, "bin") + os.pathsep + env.get("PATH", "")
    lib = os.path.join(check.work, f"ext-{kind}-lib")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", lib]
    return [*cmd, "--build-temp", os.path.join(check.work, f"ext-{kind}-tmp")], env, lib


def start_build(check: Check):
    """fastbind._C for the check: a carried CUDA build (make cuda-build) that loads is installed at
    once; else a build starts in the background into a scratch folder (while the GPU benchmarks of
    the triton backend run), with the CUDA kernels where torch is a CUDA build and nvcc exists, else
    the CPU kernels only (optional: the triton backend runs without fastbind._C). Returns the
    running build, or None."""
    t0 = time.monotonic()
    carried = sorted(glob.glob(os.path.join(CUDA_PREBUILT, "_C*.so")))
    in_place = sorted(glob.glob(os.path.join(check.package_dir, "_C*.so")))
    probes = []
    for path in carried + in_place:
        found = probe_extension(check, path)
        probes.append(found)
        if found["cuda"] and not check.dry_run:  # the dry run's CPU tensors have no use for it
            dest = path if path in in_place else install_extension(check, path)
            source = "in place" if path in in_place else "carried (make cuda-build)"
            _installed(check, t0, "cuda", source, dest, build_info=found["build_info"])
            return None
    kind, why = build_kind(check)
    cpu_here = any(found.get("build_info") for found in probes[len(carried) :])  # an in-place one loads
    reason = None
    if check.dry_run:
        reason = "dry run: no CUDA build of fastbind._C here (make build has built the CPU one)"
    elif kind is None:
        reason = f"no CUDA build carried, {why}: the triton backend runs without fastbind._C"
    elif kind == "cpu" and cpu_here:
        reason = f"no CUDA build carried, none buildable ({why}); the CPU fastbind._C is in place"
    if reason:
        check.record("build_ext", "skipped", time.monotonic() - t0, reason=reason, probes=probes)
        return None
    cmd, env, lib = build_command(check, kind)
    log = open(check.path("build_ext.log"), "w")  # noqa: SIM115 (closed in finish_build)
    # niced: the benchmarks running meanwhile need a prompt host thread to launch their kernels
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    proc = subprocess.Popen(nice + cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, lib, t0, kind


def finish_build(check: Check, build, cap: float) -> None:
    if build is None:
        return
    proc, log, lib, t0, kind = build
    try:
        proc.wait(timeout=max(cap, 1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        log.close()
        check.record("build_ext", "timeout", time.monotonic() - t0, kind=kind, reason=f"not done within {cap:.0f} s")
        return
    log.close()
    built = glob.glob(os.path.join(lib, "fastbind", "_C*.so"))
    if proc.returncode != 0 or not built:  # the CPU-only build is optional; the CUDA one is checked
        status = "failed" if kind == "cuda" else "not built"
        check.record("build_ext", status, time.monotonic() - t0, kind=kind, reason="see build_ext.log")
        return
    info = {}
    if kind == "cuda":
        found = probe_extension(check, built[0])
        if not found["cuda"]:
            check.record("build_ext", "failed", time.monotonic() - t0, kind=kind, **found)
            return
        info["build_info"] = found["build_info"]
    _installed(
        check, t0, kind, f"built here in {time.monotonic() - t0:.0f} s", install_extension(check, built[0]), **info
    )


# --------------------------------------------------------------------------------------------
# 4. benchmarks (child process: --step bench)
# --------------------------------------------------------------------------------------------
class Timer:
    """CUDA events on a GPU (the time the GPU spent between two points of the stream, without the
    host's launch jitter), perf_counter with a synchronize-free CPU run otherwise."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def times_ms(self, fn, reps: int) -> list[float]:
        torch = self.torch
        if self.cuda:
            events = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events.append((start, end))
            torch.cuda.synchronize()  # elapsed_time needs both events completed
            return [start.elapsed_time(end) for start, end in events]
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
        return out

    def peak_mb(self, fn, reset) -> float | None:
        """Runs `fn` once; its peak allocation above what was allocated before it (inputs, leftover
        buffers), None on CPU (torch tracks no CPU allocator peak; the dry run does not need one)."""
        if not self.cuda:
            fn()
            return None
        torch = self.torch
        reset()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(timer: Timer, fn, reset, reps: int) -> dict:
    """Warm-up (compiles), then `reps` timed runs (3 when one run takes over 0.2 s, 1 over 2 s: the
    large cases would eat the budget); the first of them also measures the peak memory."""
    reset()
    t0 = time.perf_counter()
    fn()
    if timer.cuda:
        timer.torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    first: list[float] = []
    peak = timer.peak_mb(lambda: first.extend(timer.times_ms(fn, 1)), reset)
    more = 0 if first[0] > 2000 else (2 if first[0] > 200 else reps - 1)
    times = first + timer.times_ms(fn, more) if more > 0 else first
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p20_ms": times[int(0.2 * (len(times) - 1))],
        "p80_ms": times[int(0.8 * (len(times) - 1) + 0.5)],
        "runs": len(times),
        "warmup_s": warm_s,
        "peak_mb": peak,
    }


def _randn(*shape, generator, device, dtype):
    """Drawn on `device` itself: at B = 262144 or N = 2^20 a CPU draw and copy would cost seconds."""
    import torch

    return torch.randn(*shape, generator=generator, device=device).to(dtype)


def _unit_rows(B: int, D: int, n: int, dtype, device, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device).manual_seed(seed)
    return [
        F.normalize(_randn(B, D, generator=g, device=device, dtype=torch.float32), dim=-1).to(dtype) for _ in range(n)
    ]


def _fwd_bwd(loss_fn, leaves):
    def reset():
        for t in leaves:
            t.grad = None

    def fn():
        reset()
        loss_fn(*leaves).backward()

    return fn, reset


def _fused_backend(provider: str) -> str | None:
    """ "fastbind-<backend>" -> the backend the provider runs; None for a baseline."""
    return provider.removeprefix("fastbind-") if provider.startswith("fastbind-") else None


def _loss_case(bench, baseline, fused, n: int, provider: str, B: int, D: int, dtype, device):
    """fwd+bwd of a loss family on n unit [B, D] inputs: the fused op on one backend
    (``fused(backend, *inputs)``), the GEMM floor of the family's benchmark suite (`bench._floor`:
    the same products as plain torch.mm), or the `baseline` loss."""
    tensors = _unit_rows(B, D, n, dtype, device)
    if provider == "gemm-floor":
        return bench._floor("gemm-floor", tensors, "fwd+bwd", n), lambda: None
    leaves = [t.requires_grad_(True) for t in tensors]
    backend = _fused_backend(provider)
    return _fwd_bwd(baseline if backend is None else lambda *ts: fused(backend, *ts), leaves)


def _gram_case(provider: str, B: int, k: int, D: int, dtype, device):
    import fastbind as fb
    from benchmarks import bench_gram

    def fused(backend, *ts):
        return fb.gram_loss(*ts, temperature=TAU, label_smoothing=SMOOTHING, backend=backend)

    return _loss_case(bench_gram, bench_gram._release_loss, fused, k, provider, B, D, dtype, device)


def _centroid_case(provider: str, B: int, M: int, D: int, dtype, device):
    import fastbind as fb
    from benchmarks import bench_infonce

    def fused(backend, *ts):
        return fb.centroid_loss(*ts, temperature=TAU, backend=backend)

    return _loss_case(bench_infonce, bench_infonce.naive_centroid_loss, fused, M, provider, B, D, dtype, device)


def _lookup_case(provider: str, N: int, K: int, D: int, dtype, device):
    import torch

    import fastbind as fb

    g = torch.Generator(device).manual_seed(0)
    x = _randn(N, D, generator=g, device=device, dtype=dtype)
    codebook = _randn(K, D, generator=g, device=device, dtype=dtype)
    chunk = min(N, LOOKUP_CHUNK)
    if provider == "gemm-floor":  # the one x·Eᵀ product the fused lookup does, in row blocks
        out = torch.empty(chunk, K, device=device, dtype=dtype)

        def floor():
            for r0 in range(0, N, chunk):
                torch.mm(x[r0 : r0 + chunk], codebook.t(), out=out[: min(chunk, N - r0)])

        return floor, lambda: None
    if provider.startswith("cdist"):
        try:  # cdist may not take 16-bit inputs on every build: then the baseline runs in fp32
            torch.cdist(x[:2], codebook[:2])
            xs, cs = x, codebook
        except RuntimeError:
            xs, cs = x.float(), codebook.float()
        if provider == "cdist+argmin":  # what users write: the whole N×K matrix

            def dense():
                with torch.no_grad():
                    torch.cdist(xs, cs).argmin(1)

            return dense, lambda: None

        def chunked():
            with torch.no_grad():
                for r0 in range(0, N, chunk):
                    torch.cdist(xs[r0 : r0 + chunk], cs).argmin(1)

        return chunked, lambda: None

    def fused():
        with torch.no_grad():
            fb.codebook_lookup(x, codebook, 1, backend=_fused_backend(provider))

    return fused, lambda: None


def bench_step(out: str, dry_run: bool, fused: list[str], baselines: bool = True) -> None:
    """Child process: every benchmark row appended to bench.jsonl as soon as it is measured. `fused`:
    the fastbind backends to time on every headline case; `baselines`: also the floors and peers
    (the first pass starts bench.jsonl; a later pass of a newly built backend appends to it)."""
    import torch

    device = torch.device("cpu" if dry_run else "cuda")
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    timer = Timer(device)
    path = os.path.join(out, "bench.jsonl")
    if baselines or not os.path.exists(path):
        open(path, "w").close()
    mine = [f"fastbind-{b}" for b in fused]

    def providers(*others: str) -> list[str]:
        return mine + (list(others) if baselines else [])

    def run(family: str, case: str, provider: str, dtype_name: str, builder, **params) -> dict:
        row = {"family": family, "case": case, "provider": provider, "dtype": dtype_name, **params}
        try:
            fn, reset = builder(provider, dtype=_dtype(dtype_name), device=device, **params)
            row.update(measure(timer, fn, reset, sizes["reps"]))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:  # report and go on: one broken provider must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        finally:
            fn = reset = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    # Most informative first (a run that hits the cap keeps what it measured): the fused ops (each
    # backend right after the other, same GPU state) and their floors, then the B search, then the
    # slow materialising baselines.
    g = sizes["gram"]
    gram_case = f"k={g['k']} D={g['D']} B={g['B']}"
    for dt in sizes["dtypes"]:
        for provider in providers("gemm-floor"):
            run("gram", gram_case, provider, dt, _gram_case, **g)
    c = sizes["centroid"]
    for B in c["B"]:
        for dt in sizes["dtypes"] if B == c["B"][0] else ("bf16",):
            params = dict(M=c["M"], D=c["D"], B=B)
            for provider in providers("gemm-floor", "naive-stacked-logits"):
                run("centroid", f"M={c['M']} D={c['D']} B={B}", provider, dt, _centroid_case, **params)
    lk = sizes["lookup"]
    for dt in sizes["dtypes"]:
        case = f"N={lk['N']} K={lk['K']} D={lk['D']} k=1"
        for provider in providers("gemm-floor", "cdist+argmin", "cdist+argmin-chunked"):
            run("lookup", case, provider, dt, _lookup_case, **lk)
    # largest B that fits (bf16), with its floor: fwd+bwd time and peak memory against B; a backend
    # leaves the search at its first error (out of memory: the previous B was its largest) or slow run
    searching = list(mine)
    for B in sizes["gram_search"]:
        case, params = f"k={g['k']} D={g['D']} B={B}", dict(g, B=B)
        for provider in list(searching):
            row = run("gram", case, provider, "bf16", _gram_case, **params)
            if "error" in row or row["median_ms"] > 1e3 * sizes["search_stop_s"]:
                searching.remove(provider)
        if not searching:
            break
        if baselines:
            run("gram", case, "gemm-floor", "bf16", _gram_case, **params)
    if baselines:  # the GRAM release's algorithm: [B, B, k, k] tensors and batched det
        for dt in sizes["dtypes"]:
            run("gram", gram_case, "gram-release-algorithm", dt, _gram_case, **g)


# fastbind row -> the baselines of its family (same case and dtype)
BASELINES = {
    "gram": ("gemm-floor", "gram-release-algorithm"),
    "centroid": ("gemm-floor", "naive-stacked-logits"),
    "lookup": ("gemm-floor", "cdist+argmin", "cdist+argmin-chunked"),
}


# a fused backend other than triton is also compared with triton on the same case (issue 11: the cuda
# backend within 1.2x of the triton backend's time on every headline case)
VS_TRITON = "fastbind-triton"
CUDA_VS_TRITON_TARGET = 1.2


def add_ratios(rows: list[dict]) -> None:
    """time_vs_<baseline> = fastbind / baseline (below 1: fastbind faster); mem_vs_<baseline> likewise
    where the baseline allocated at least 1 MB."""
    index = {(r["family"], r["case"], r["dtype"], r["provider"]): r for r in rows}
    for row in rows:
        if not row["provider"].startswith("fastbind") or "median_ms" not in row:
            continue
        others = (VS_TRITON,) if row["provider"] != VS_TRITON else ()
        for base in BASELINES[row["family"]] + others:
            other = index.get((row["family"], row["case"], row["dtype"], base))
            if not other or "median_ms" not in other:
                continue
            row[f"time_vs_{base}"] = row["median_ms"] / other["median_ms"]
            if row.get("peak_mb") is not None and (other.get("peak_mb") or 0) >= 1:
                row[f"mem_vs_{base}"] = row["peak_mb"] / other["peak_mb"]


def versus_triton(rows: list[dict], provider: str) -> dict:
    """`provider`'s time over triton's on each case both ran ("family case dtype" -> ratio), and
    the cases over the cuda target."""
    key = f"time_vs_{VS_TRITON}"
    ratios = {
        f"{r['family']} {r['case']} {r['dtype']}": round(r[key], 3)
        for r in rows
        if r["provider"] == provider and key in r
    }
    return {"vs_triton": ratios, "over_target": sorted(c for c, v in ratios.items() if v > CUDA_VS_TRITON_TARGET)}


def bench_tables(rows: list[dict]) -> str:
    lines = ["| family | case | dtype | provider | median ms | p20-p80 ms | peak MB | ratios |", "|---" * 8 + "|"]
    for r in rows:
        ratios = ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k.startswith(("time_vs", "mem_vs")))
        if "median_ms" in r:
            peak = "n/a (CPU)" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f}"
            cells = [f"{r['median_ms']:.3f}", f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", peak, ratios]
        else:
            cells = [r.get("error", "?"), "", "", ""]
        lines.append("| " + " | ".join([r["family"], r["case"], r["dtype"], r["provider"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def fused_backends(check: Check) -> list[str]:
    """The fastbind backends the first benchmark pass times: triton, and cuda once its build is in
    place. The dry run has no cuda: the cpu backend stands in for it in a second pass (the path of
    a CUDA build finished during the check), so that pass and the cross-backend ratios run too."""
    return ["triton", "cuda"] if check.cuda_ext else ["triton"]


def benchmarks(check: Check, cap: float, fused: list[str], baselines: bool = True) -> None:
    step = "benchmarks" if baselines else f"benchmarks_{'_'.join(fused)}"
    args = ["--step", "bench", "--fused", ",".join(fused)] + (["--dry-run"] if check.dry_run else [])
    res = check.python_step(step, args + ([] if baselines else ["--no-baselines"]), cap, f"{step}.log")
    rows = []
    jsonl = check.path("bench.jsonl")
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    add_ratios(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(check.path("bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(check.path("bench.md"), "w") as f:
        f.write(bench_tables(rows))
    mine = [
        r
        for r in rows
        if r["provider"] in {f"fastbind-{b}" for b in fused}
        or (baselines and not r["provider"].startswith("fastbind-"))
    ]
    errors = [r for r in mine if "error" in r]
    status = "timeout" if res["timed_out"] else ("ok" if res["rc"] == 0 else "failed")
    check.summary["bench_rows"] = rows
    info = {}
    for backend in fused:
        if f"fastbind-{backend}" != VS_TRITON:
            info[backend] = versus_triton(rows, f"fastbind-{backend}")
    check.record(step, status, res["seconds"], rows=len(mine), row_errors=len(errors), rc=res["rc"], **info)


# --------------------------------------------------------------------------------------------
# 5. kernels under compute-sanitizer (child process: --step kernels)
# --------------------------------------------------------------------------------------------
def payload_backends(dry_run: bool, cuda_first: bool = False) -> tuple[list[str], dict[str, str]]:
    """The fused backends the sanitizer payload drives, in order, and why any of triton / cuda is
    left out. The dry run has no cuda: the cpu backend stands in for it (the same C++ op schemas
    under another dispatch key), so the second backend's pass through the payload runs on the CPU
    too."""
    from fastbind._backend import availability

    status = availability()
    wanted = ("triton", "cpu") if dry_run else ("triton", "cuda")
    wanted = wanted[::-1] if cuda_first else wanted
    skipped = {b: status[b][1] for b in wanted if not status[b][0]}
    if dry_run:
        skipped["cuda"] = "dry run: no CUDA GPU (the cpu backend stands in for it)"
    return [b for b in wanted if b not in skipped], skipped


def kernels_step(out: str, dry_run: bool, cuda_first: bool = False, name: str = "kernels.json") -> int:
    """Every Triton and CUDA kernel once, forward and backward, on small awkward shapes (no dimension
    a multiple of a tile; fewer rows than one tile), against the torch backend in float64. Writes
    `name` (kernels.json): the backends, why any was left out, and the largest relative error of
    each call."""
    import torch
    import torch.nn.functional as F

    import fastbind as fb

    device = torch.device("cpu" if dry_run else "cuda")
    backends, skipped = payload_backends(dry_run, cuda_first)
    results = []

    def save():  # after every call: a run cut by its time cap keeps what it checked
        with open(os.path.join(out, name), "w") as f:
            json.dump({"backends": backends, "skipped": skipped, "calls": results}, f, indent=1)

    def compare(backend, name, dtype_name, fn, inputs):
        try:
            _compare(backend, name, dtype_name, fn, inputs)
        except Exception as exc:  # record and go on (after a CUDA fault every later call fails too)
            error = f"{type(exc).__name__}: {exc}"[:300]
            results.append({"backend": backend, "call": name, "dtype": dtype_name, "error": error})
            traceback.print_exc()
        save()

    def _compare(backend, name, dtype_name, fn, inputs):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        ref_leaves = [t.detach().double().requires_grad_(t.is_floating_point()) for t in inputs]
        got, want = fn(leaves, backend), fn(ref_leaves, "torch")
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        entry = {"backend": backend, "call": name, "dtype": dtype_name, "forward_rel_err": err}
        if got.requires_grad:
            w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
            grads = torch.autograd.grad((got.double() * w).sum(), [t for t in leaves if t.requires_grad])
            want_grads = torch.autograd.grad((want * w).sum(), [t for t in ref_leaves if t.requires_grad])
            entry["grad_rel_err"] = max(
                ((g.double() - h).abs().max() / h.abs().max().clamp_min(1e-30)).item()
                for g, h in zip(grads, want_grads)
            )
        if device.type == "cuda":
            torch.cuda.synchronize()  # a kernel fault surfaces here, attributed to this call
        results.append(entry)
        print(json.dumps(entry), flush=True)

    # the dry run checks this code on the CPU: one case of each kind keeps it to seconds
    ks, directions = ((3,), ("both",)) if dry_run else ((2, 3, 8), ("both", "a2d", "d2a"))
    lookups = ((1, "l2"), (5, "cosine")) if dry_run else ((1, "l2"), (1, "cosine"), (5, "l2"), (32, "dot"))

    # One backend after the other (a CUDA fault poisons the context: the calls before it keep their
    # results), each on the same inputs.
    for backend in backends:
        g = torch.Generator().manual_seed(0)

        def rows(b, d, dtype, g=g):
            return F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device=device, dtype=dtype)

        # triton's fp16 takes its bf16 code path (same casts and tile); csrc/cuda instantiates each
        # kernel for fp16 too
        for dt in ("fp32", "bf16", "fp16") if backend == "cuda" else ("fp32", "bf16"):
            dtype = _dtype(dt)
            for k in ks:
                anchor, mods = rows(5, 33, dtype), [rows(37, 33, dtype) for _ in range(k - 1)]
                volume = lambda ts, be: fb.gram_volume(*ts, backend=be)  # noqa: E731
                compare(backend, f"gram_volume k={k}", dt, volume, [anchor, *mods])
            anchor, mods = rows(37, 33, dtype), [rows(37, 33, dtype) for _ in range(2)]
            for direction in directions:
                compare(
                    backend,
                    f"gram_loss {direction}",
                    dt,
                    lambda ts, be, d=direction: fb.gram_loss(*ts, label_smoothing=0.1, direction=d, backend=be),
                    [anchor, *mods],
                )
            x, y = rows(19, 40, dtype), rows(19, 40, dtype)
            compare(backend, "infonce", dt, lambda ts, be: fb.infonce(*ts, 0.1, 0.1, backend=be), [x, y])
            zs = [rows(23, 33, dtype) for _ in range(3)]
            centroid = lambda ts, be: fb.centroid_loss(*ts, normalize_anchor=True, backend=be)  # noqa: E731
            compare(backend, "centroid_loss", dt, centroid, zs)
            compare(backend, "anchor_loss", dt, lambda ts, be: fb.anchor_loss(*ts, backend=be), zs)
            xq, codes = (
                torch.randn(3, 7, 33, generator=g).to(device, dtype),
                torch.randn(61, 33, generator=g).to(device, dtype),
            )
            for k, metric in lookups:  # k = 1 has its own path
                compare(
                    backend,
                    f"codebook_lookup k={k} {metric}",
                    dt,
                    lambda ts, be, k=k, m=metric: fb.codebook_lookup(*ts, k, m, backend=be)[0],
                    [xq, codes],
                )
    save()
    return sum("error" in r for r in results)


def payload_summary(out: str, name: str = "kernels.json") -> dict:
    """Per backend: calls, failed calls, the largest error (from the payload run's `name`)."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        found = json.load(f)
    per = {}
    for backend in found["backends"]:
        calls = [c for c in found["calls"] if c["backend"] == backend]
        errs = [max(c["forward_rel_err"], c.get("grad_rel_err", 0.0)) for c in calls if "error" not in c]
        per[backend] = {
            "calls": len(calls),
            "errors": sum("error" in c for c in calls),
            "max_rel_err": float(f"{max(errs):.3g}") if errs else None,
        }
    return {"payload": per, "payload_skipped": found["skipped"]}


def parse_sanitizer(text: str) -> dict:
    """Error count and the kernels named in the reports of a compute-sanitizer log."""
    summary = re.findall(r"ERROR SUMMARY:\s+(\d+)\s+error", text)
    hazards = re.findall(r"RACECHECK SUMMARY:\s+(\d+)\s+hazard", text)
    # fastbind's Triton kernels are all named *_kernel; the report lines name the faulting function
    kernels = sorted(set(re.findall(r"\b(_?[A-Za-z][A-Za-z0-9_]*_kernel)\b", text)))
    return {
        "errors": int(summary[-1]) if summary else None,
        "hazards": int(hazards[-1]) if hazards else 0,
        "kernels_reported": kernels,
    }


def sanitizer(check: Check, tool: str, cap: float) -> None:
    step = f"sanitizer_{tool}"
    sanitizer_bin = _which("compute-sanitizer")
    args = ["--step", "kernels"] + (["--dry-run"] if check.dry_run else [])
    # Each tool runs both backends, under its own time cap: racecheck starts with cuda, whose kernels
    # manage shared memory themselves (Triton's compiler places its barriers), memcheck with triton,
    # so a cut run still leaves each backend a full pass under one of the tools.
    args += ["--cuda-first"] if tool == "racecheck" else []
    if check.dry_run or sanitizer_bin is None:
        reason = "dry run (no CUDA GPU)" if check.dry_run else "compute-sanitizer not found"
        if tool == "memcheck":  # still run the payload, so the kernel-driving code is exercised
            res = check.python_step(step, args, cap, "kernels.log")
            status = "ok" if res["rc"] == 0 else ("timeout" if res["timed_out"] else "failed")
            check.record(
                "kernels_without_sanitizer", status, res["seconds"], rc=res["rc"], **payload_summary(check.out)
            )
        check.skip(step, f"{reason}: the kernels ran without compute-sanitizer")
        return
    log = check.path(f"sanitizer-{tool}.log")
    env = dict(check.env)
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access
    # past a tensor's end (inside torch's pool it would land in valid memory and go unnoticed).
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    cmd = [sanitizer_bin, "--tool", tool, "--print-limit", "50", "--log-file", log]
    payload = f"kernels-{tool}.json"
    cmd += [sys.executable, "-m", "benchmarks.gpu_check", "--out", check.out, *args, "--payload", payload]
    res = _run(cmd, cap, env=env, log_path=check.path(f"sanitizer-{tool}.stdout"))
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    found = parse_sanitizer(text)
    clean = found["errors"] == 0 and found["hazards"] == 0 and res["rc"] == 0
    status = "timeout" if res["timed_out"] else ("ok" if clean else "failed")
    check.record(step, status, res["seconds"], rc=res["rc"], **found, **payload_summary(check.out, payload))


# --------------------------------------------------------------------------------------------
# 6. tests
# --------------------------------------------------------------------------------------------
def parse_pytest(text: str) -> dict:
    """Outcome counts of a (possibly killed) ``pytest -v`` log; the final summary line wins."""
    final = re.findall(r"=+ (.*\bin [\d.]+s.*?) =+", text)
    counts: dict[str, int] = {}
    if final:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", final[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
        return {"complete": True, **counts}
    body = text.split("short test summary info")[0]
    for word in re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", body):
        key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}.get(word, word.lower())
        counts[key] = counts.get(key, 0) + 1
    return {"complete": False, **counts}


def parse_pytest_backends(text: str) -> dict:
    """The fused backends the suite ran (tests/conftest.py's report header) and, for each, the
    outcomes of the tests parametrised with it (``-v`` lines, with or without pytest-xdist)."""
    header = re.search(r"fused backends \[([^\]]*)\]", text)
    fused = re.findall(r"'(\w+)'", header.group(1)) if header else []
    by_backend: dict[str, dict[str, int]] = {b: {} for b in fused}
    for line in text.split("short test summary info")[0].splitlines():
        word = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED)\b", line)
        test_id = re.search(r"\S+::\S+\[([^\s\]]*)\]", line)
        if not (word and test_id):
            continue
        params = test_id.group(1).split("-")
        for b in fused:
            if b in params:
                counts = by_backend[b]
                counts[word.group(1).lower()] = counts.get(word.group(1).lower(), 0) + 1
    return {"fused_backends": fused, "by_backend": by_backend}


# Test files that exercise no GPU code path (our SIMT emulator, nvcc and Triton compiles that need no
# GPU, the CPU kernels' internals, packaging, this script's dry run, the device audit): on the GPU
# they run after the rest of the suite, so that a cut by the time cap falls on them. make test runs
# them everywhere.
CPU_ONLY_TESTS = (
    "test_cuda_emulated.py",
    "test_cuda_compile.py",
    "test_triton_compile.py",
    "test_cpu_gemm.py",
    "test_cpu_headers.py",
    "test_packaging.py",
    "test_typing.py",
    "test_gpu_check.py",
    "test_device_axis.py",
)


def tests(check: Check, cap: float) -> None:
    """The whole suite in two runs within `cap`: the files that run GPU code, then CPU_ONLY_TESTS."""
    end = time.monotonic() + cap
    if check.dry_run:
        # make test already runs the whole suite; the dry run checks this step's plumbing on a few
        # quick tests that need neither a GPU nor the C++ extension (and do not start a dry run)
        parts = [
            ("tests", ["tests/test_gpu_check.py", "-k", "parse and not sass"]),
            ("tests_cpu_only", ["tests/test_gpu_check.py", "-k", "parse_sass"]),
        ]
    else:
        parts = [
            ("tests", [*(f"--ignore=tests/{name}" for name in CPU_ONLY_TESTS), "tests"]),
            ("tests_cpu_only", [f"tests/{name}" for name in CPU_ONLY_TESTS]),
        ]
    for step, selection in parts:
        left = end - time.monotonic()
        if left < 10:
            check.skip(step, f"no time left of the tests' {cap:.0f} s")
        else:
            _pytest(check, step, selection, left)


def _pytest(check: Check, step: str, selection: list[str], cap: float) -> None:
    log = "tests" if step == "tests" else step.replace("_", "-")
    cmd = [sys.executable, "-m", "pytest", "-v", "-ra", "-p", "no:cacheprovider", "--durations=25"]
    cmd += ["--junitxml", check.path(f"{log}.xml")]
    if not check.dry_run and _importable(check, "xdist"):  # compile the many kernel variants in parallel
        cmd += ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))]
    res = _run([*cmd, *selection], cap, env=check.env, log_path=check.path(f"{log}.log"))
    counts = parse_pytest(res["output"])
    ok = res["rc"] == 0 and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("error")
    status = "timeout" if res["timed_out"] else ("ok" if ok else "failed")
    found = parse_pytest_backends(res["output"])
    if step == "tests" and check.cuda_ext and "cuda" not in found["fused_backends"]:  # built, yet untested
        found["cuda_not_tested"] = "fastbind._C with CUDA is in place but the suite's fused backends lack cuda"
        status = "failed" if status == "ok" else status
    check.record(step, status, res["seconds"], rc=res["rc"], cap_s=round(cap), **counts, **found)


# --------------------------------------------------------------------------------------------
# 7. SASS of the kernels that ran
# --------------------------------------------------------------------------------------------
def parse_sass(sass: str) -> dict:
    """Instruction counts of one kernel's SASS (``cuobjdump -sass``): tensor-core MMAs (HGMMA on
    sm_90 wgmma, HMMA on mma.sync), local-memory traffic (STL/LDL: register spills), FFMA."""

    def count(op: str) -> int:
        return len(re.findall(rf"\b{op}(?:\.[A-Z0-9_.x]+)?\b", sass))

    return {op: count(op) for op in ("HGMMA", "HMMA", "STL", "LDL", "FFMA")} | {
        "instructions": len(re.findall(r"/\*[0-9a-f]{4}\*/", sass))
    }


def parse_res_usage(text: str) -> dict:
    """REG / STACK / SHARED / LOCAL of the (single) function in ``cuobjdump -res-usage`` output."""
    out = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            out[key.lower()] = int(m.group(1))
    return out


def sass(check: Check, label: str, since: set[str] | None = None, keep_text: bool = False) -> set[str]:
    """Analyse the cubins in Triton's cache (only those not in `since`); returns the cache entries seen."""
    step = f"sass_{label}"
    cache = check.env.get("TRITON_CACHE_DIR")
    if check.dry_run or not cache:
        check.skip(step, "dry run: interpreted kernels produce no cubins")
        return set()
    cuobjdump = _which("cuobjdump")
    if cuobjdump is None:
        check.skip(step, "cuobjdump not found")
        return set()
    t0 = time.monotonic()
    cubins = sorted(glob.glob(os.path.join(cache, "*", "*.cubin")))
    seen = {os.path.dirname(p) for p in cubins}
    rows = []
    if keep_text:
        os.makedirs(check.path("sass"), exist_ok=True)
    for path in cubins:
        entry = os.path.dirname(path)
        if since is not None and entry in since:
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        meta = {}
        meta_path = os.path.splitext(path)[0] + ".json"
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
        text = _run([cuobjdump, "-sass", path], 60)["output"]
        row = {"kernel": name, "entry": os.path.basename(entry)[:12], "label": label}
        target = meta.get("target")
        row["arch"] = target.get("arch", "") if isinstance(target, dict) else str(target or "")
        row |= {key: meta.get(key, "") for key in ("num_warps", "num_stages", "shared")}
        row |= parse_sass(text) | parse_res_usage(_run([cuobjdump, "-res-usage", path], 60)["output"])
        rows.append(row)
        if keep_text:
            with open(check.path(f"sass/{name}-{row['entry']}.sass"), "w") as f:
                f.write(text)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(check.path(f"sass-{label}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys or ["kernel"])
        writer.writeheader()
        writer.writerows(rows)
    spilling = sorted({r["kernel"] for r in rows if r.get("STL") or r.get("LDL") or r.get("local")})
    check.record(step, "ok", time.monotonic() - t0, cubins=len(rows), spilling=spilling)
    return seen


def split_functions(text: str) -> dict[tuple[str, str], str]:
    """``cuobjdump -sass`` or ``-res-usage`` output of a library with many cubins, split per
    (architecture, mangled function name) -> that function's lines."""
    arch, name, out = "", None, {}
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, name = m.group(1), None
            continue
        m = re.match(r"\s*Function\s*:?\s*(\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            out[(arch, name)] = ""
        elif name is not None:
            out[(arch, name)] += line + "\n"
    return out


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> C++ names through c++filt (the mangled name itself where it is missing)."""
    tool = _which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def kernel_name(signature: str) -> tuple[str, str]:
    """``void ns::topk_kernel<float, float>(...)`` -> ("topk_kernel", "float, float")."""
    head = re.sub(r"^void\s+", "", signature.split("(")[0])
    base, _, args = head.partition("<")
    return base.split("::")[-1], args.rstrip(">").strip()


def sass_extension(check: Check) -> None:
    """SASS of the CUDA build of fastbind._C: per kernel and architecture the tensor-core MMAs,
    local-memory traffic, registers and stack -> sass-cuda.csv, the whole SASS under sass/."""
    step = "sass_cuda_ext"
    if check.cuda_ext is None:
        why = "dry run: no CUDA build of fastbind._C here" if check.dry_run else "no CUDA build of fastbind._C"
        check.skip(step, why)
        return
    cuobjdump = _which("cuobjdump")
    if cuobjdump is None:
        check.skip(step, "cuobjdump not found")
        return
    t0 = time.monotonic()
    text = _run([cuobjdump, "-sass", check.cuda_ext], 120)["output"]
    usage = split_functions(_run([cuobjdump, "-res-usage", check.cuda_ext], 60)["output"])
    functions = split_functions(text)
    names = demangle(sorted({name for _, name in functions}))
    rows = []
    for (arch, mangled), body in sorted(functions.items()):
        kernel, template = kernel_name(names[mangled])
        row = {"kernel": kernel, "template": template, "arch": arch, **parse_sass(body)}
        rows.append(row | parse_res_usage(usage.get((arch, mangled), "")) | {"mangled": mangled})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(check.path("sass-cuda.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys or ["kernel"])
        writer.writeheader()
        writer.writerows(rows)
    os.makedirs(check.path("sass"), exist_ok=True)
    with gzip.open(check.path("sass/cuda-ext.sass.gz"), "wt") as f:
        f.write(text)
    local = sorted(
        {f"{r['kernel']}<{r['template']}> {r['arch']}" for r in rows if r.get("STL") or r.get("LDL") or r.get("stack")}
    )
    mma = {r["arch"]: 0 for r in rows}
    for r in rows:
        mma[r["arch"]] += r["HMMA"] + r["HGMMA"]
    status = "ok" if rows else "failed"
    check.record(step, status, time.monotonic() - t0, functions=len(rows), mma_per_arch=mma, local_memory=local)


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def summary_markdown(summary: dict) -> str:
    lines = [f"# fastbind gpu-check ({summary['mode']})", "", "| step | status | s | details |", "|---|---|---|---|"]
    for step, info in summary["steps"].items():
        details = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("status", "seconds"))
        lines.append(f"| {step} | {info['status']} | {info['seconds']} | {details} |")
    if summary.get("bench_rows"):
        lines += ["", "## Benchmarks", "", bench_tables(summary["bench_rows"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu-check-out"))
    parser.add_argument("--wheels", default=os.path.join(ROOT, "gpu-wheels"), help="offline wheels folder")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    # child processes
    parser.add_argument("--step", choices=("bench", "kernels"), help=argparse.SUPPRESS)
    parser.add_argument("--fused", default="triton", help=argparse.SUPPRESS)
    parser.add_argument("--no-baselines", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cuda-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--payload", default="kernels.json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        if args.dry_run:
            os.environ["TRITON_INTERPRET"] = "1"
        if args.step == "bench":
            return 1 if bench_step(args.out, args.dry_run, args.fused.split(","), not args.no_baselines) else 0
        return 1 if kernels_step(args.out, args.dry_run, args.cuda_first, args.payload) else 0

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch; use --dry-run to check the script on the CPU")
        return 2
    check = Check(os.path.abspath(args.out), args.budget, args.dry_run, args.wheels)
    print(f"[gpu-check] {check.summary['mode']}, output in {check.out}, budget {args.budget:.0f} s", flush=True)
    try:
        run_steps(check)
    finally:
        restore_extension(check)
        shutil.rmtree(check.work, ignore_errors=True)
    return 1 if check.summary["steps"]["done"]["status"] != "ok" else 0


def run_steps(check: Check) -> None:
    """The steps in order, each capped within what is left of the budget; the tests get what the
    others leave. The later steps reuse Triton's cache, so the sanitizer runs compile (almost) nothing."""
    environment(check)
    wheels(check)
    build = start_build(check)  # a carried CUDA build is in place now; else it compiles on the CPU meanwhile
    first = fused_backends(check)
    benchmarks(check, cap=min(140.0, 0.35 * check.left()), fused=first)
    after_bench = sass(check, "benchmarks", keep_text=True)
    cuda_build = build is not None and build[4] == "cuda"
    finish_build(
        check, build, cap=max(5.0, min(90.0, check.left() - 180) if cuda_build else min(40.0, check.left() - 200))
    )
    # the backend built during the check: its own pass, ratios against the triton rows of the first
    late = ["cuda"] if check.cuda_ext and "cuda" not in first else (["cpu"] if check.dry_run else [])
    if late:
        benchmarks(check, cap=max(10.0, min(45.0, 0.12 * check.left())), fused=late, baselines=False)
    sass_extension(check)
    tests(check, cap=max(30.0, check.left() - 110))
    sanitizer(check, "memcheck", cap=max(20.0, min(55.0, check.left() - 60)))
    sanitizer(check, "racecheck", cap=max(20.0, check.left() - 12))
    sass(check, "tests_and_sanitizer", since=after_bench)
    failed = [s for s, info in check.summary["steps"].items() if info["status"] in ("failed", "timeout")]
    check.record("done", "failed" if failed else "ok", 0.0, failed_steps=failed)


if __name__ == "__main__":
    sys.exit(main())
