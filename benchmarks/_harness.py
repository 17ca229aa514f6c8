"""Shared benchmark harness: every case runs in its own subprocess, timed and memory-measured.

A benchmark module (``benchmarks/bench_<family>.py``) defines

* ``build(provider, mode, **params)`` returning either a zero-argument callable ``fn`` (timed as a
  whole) or a pair ``(prepare, fn)``: ``state = prepare()`` runs untimed before each timed ``fn(state)``
  (used to time a backward alone). Inputs are allocated inside ``build``, so they count as the
  baseline, not as the op's memory. Raise :class:`SkipCase` for a case that cannot run (e.g. it
  would need hundreds of GB).
* ``cases(quick: bool)`` yielding :class:`Case` objects, and ``RATIOS``: (provider, baseline) pairs.

Why a subprocess per case: peak *resident* memory is the only honest CPU memory figure (torch
tracks no CPU allocator peak), and a fresh process whose peak counter is reset after warm-up
measures exactly the op. Timing runs first, with glibc's malloc as users have it; then, for the
memory run, the mmap threshold is fixed at 64 KiB (``mallopt``) and cached memory is trimmed, so
that large buffers are returned to the OS on free and the peak is not hidden by malloc's cache.
(Timing under that setting would charge every large allocation its page faults: 36% on the GRAM
loss at B = 2048.) On CUDA the peak is ``torch.cuda.max_memory_allocated``.

Timing: ``repeat`` runs after one warm-up (``repeat=0``: the warm-up is the timing); median and the
20th/80th percentiles are reported (Liger-Kernel's quantiles). Ratios against baselines are always
taken from the same run.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from fastbind._sysinfo import machine_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where CSVs and plots go. `fastbind bench --quick` (make demo) points this at results/quick/, which
# git ignores, so a demo run never overwrites the committed full-run results.
RESULTS = os.environ.get("FASTBIND_BENCH_RESULTS") or os.path.join(ROOT, "benchmarks", "results")


class SkipCase(Exception):
    """Raised by a builder for a case that must not run (reason in the message)."""


@dataclass
class Case:
    bench: str  # family, e.g. "gram"
    provider: str  # e.g. "fastbind-cpu", "reference", "gemm-floor"
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    params: dict = field(default_factory=dict)
    device: str = "cpu"
    repeat: int = 5  # timed runs after the warm-up; 0: the warm-up run is the timing (huge cases)


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _release_freed_memory() -> None:
    """glibc: mmap every block >= 64 KiB from now on (freed at once) and give cached memory back."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the peak may include allocator caching
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 65536)
    libc.malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _run_in_child(case: Case) -> dict:
    import torch

    module = importlib.import_module(f"benchmarks.bench_{case.bench}")
    try:
        built = module.build(case.provider, case.mode, device=case.device, **case.params)
    except SkipCase as exc:
        return {"skipped": str(exc)}
    prepare, fn = built if isinstance(built, tuple) else (lambda: None, lambda _state: built())
    cuda = case.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(state) -> float:
        sync()
        t0 = time.perf_counter()
        fn(state)
        sync()
        return time.perf_counter() - t0

    warm_up = timed(prepare())  # also compiles / autotunes
    # Timing first, with the allocator as users run it (glibc reuses freed blocks).
    times = [timed(prepare()) for _ in range(case.repeat)] or [warm_up]  # repeat=0: huge cases

    # Then one run for memory, with every large block mmapped and returned on free, so that the
    # peak resident set is the op's real high-water mark and not hidden by malloc's cache.
    gc.collect()
    if not cuda:
        _release_freed_memory()
    state = prepare()
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_kb("VmRSS") * 1024
    fn(state)
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kb("VmHWM") * 1024 - base
    del state

    times.sort()

    def quantile(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return {
        "median_ms": 1e3 * statistics.median(times),
        "p20_ms": 1e3 * quantile(0.2),
        "p80_ms": 1e3 * quantile(0.8),
        "peak_mb": max(peak, 0) / 2**20,
    }


def run_case(case: Case, timeout: float = 900.0) -> dict:
    """Run one case in a fresh subprocess; returns its measurements (or {'skipped'/'error': ...})."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks._harness", json.dumps(asdict(case))],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {out.returncode}"}
    return json.loads(lines[-1])


def gemm_floor(a, b, count: int, block_rows: int = 2048, kind: str = "torch"):
    """`count` products a·bᵀ (a, b [B, D]) into a reused output: the GEMM floor of a fused op that
    does the same GEMMs. Above 8192 rows the products run in `block_rows`-row blocks (same flops, a
    block_rows × B output instead of B × B).

    kind "torch": plain torch.mm in the inputs' dtype (MKL sgemm for float32 here, oneDNN for
    bfloat16). kind "brgemm": fastbind's own tile GEMM, ``fastbind::tile_mm`` (oneDNN's brgemm
    microkernel where the CPU has it; bfloat16 operands in its bf16 kernel; float32 output), i.e. the
    best GEMM of the machine for float32, which MKL's sgemm is not on AVX-512 EPYCs (issue 14)."""
    import torch

    n = a.shape[0]
    rows = n if n <= 8192 else block_rows
    if kind == "brgemm":
        import fastbind  # noqa: F401  (loads the extension)

        out = torch.empty(rows, n, device=a.device, dtype=torch.float32)

        def product(r0, out_rows):
            torch.ops.fastbind.tile_mm(a[r0 : r0 + rows], b, out_rows)

    else:
        out = torch.empty(rows, n, device=a.device, dtype=a.dtype)

        def product(r0, out_rows):
            torch.mm(a[r0 : r0 + rows], b.t(), out=out_rows)

    def fn():
        for _ in range(count):
            for r0 in range(0, n, rows):
                product(r0, out[: min(rows, n - r0)])

    return fn


def add_ratios(rows: list[dict], ratios: list[tuple[str, str]]) -> None:
    """For each (provider, baseline): `<metric>_vs_<baseline>` = provider / baseline, same params."""

    def key(row):
        return (row["bench"], row["mode"], json.dumps(row["params"], sort_keys=True))

    by_key: dict = {}
    for row in rows:
        by_key.setdefault(key(row), {})[row["provider"]] = row
    for row in rows:
        peers = by_key[key(row)]
        for provider, baseline in ratios:
            if not row["provider"].startswith(provider) or baseline not in peers:
                continue
            base = peers[baseline]
            if "median_ms" in row and "median_ms" in base:
                row[f"time_vs_{baseline}"] = row["median_ms"] / base["median_ms"]
                if base["peak_mb"] >= 1.0:  # a baseline that allocates ~nothing (gemm-floor) has no ratio
                    row[f"mem_vs_{baseline}"] = row["peak_mb"] / base["peak_mb"]


def run_cases(cases, ratios, name: str, *, echo=print, timeout: float = 900.0) -> list[dict]:
    """Run every case, add ratios, write ``benchmarks/results/<name>.csv`` and print a table."""
    rows = []
    for case in cases:
        result = run_case(case, timeout=timeout)
        row = {"bench": case.bench, "provider": case.provider, "mode": case.mode, "params": case.params}
        row.update(result)
        rows.append(row)
        echo(_format_row(row))
    add_ratios(rows, ratios)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.csv")
    write_csv(rows, path)
    echo(f"\nwrote {os.path.relpath(path, ROOT)}")
    echo(format_table(rows))
    return rows


def _format_row(row: dict) -> str:
    params = " ".join(f"{k}={v}" for k, v in row["params"].items())
    head = f"  {row['provider']:<24} {row['mode']:<8} {params:<32}"
    if "median_ms" in row:
        return f"{head} {row['median_ms']:10.2f} ms {row['peak_mb']:9.1f} MB"
    return f"{head} {row.get('skipped') or row.get('error')}"


def format_table(rows: list[dict]) -> str:
    ratio_cols = sorted({k for row in rows for k in row if k.startswith(("time_vs_", "mem_vs_"))})
    param_keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    header = ["provider", "mode", *param_keys, "median_ms", "peak_mb", *ratio_cols]
    lines = [header]
    for row in rows:
        cells = [row["provider"], row["mode"], *[str(row["params"].get(k, "")) for k in param_keys]]
        if "median_ms" in row:
            cells += [f"{row['median_ms']:.2f}", f"{row['peak_mb']:.1f}"]
            cells += [f"{row[c]:.3f}" if c in row else "" for c in ratio_cols]
        else:
            cells += [str(row.get("skipped") or row.get("error"))[:40], ""] + [""] * len(ratio_cols)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def write_csv(rows: list[dict], path: str) -> None:
    machine = machine_name()
    param_keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    extra = sorted({k for row in rows for k in row} - {"bench", "provider", "mode", "params"})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["machine", "bench", "provider", "mode", *param_keys, *extra])
        for row in rows:
            writer.writerow(
                [machine, row["bench"], row["provider"], row["mode"]]
                + [row["params"].get(k, "") for k in param_keys]
                + [row.get(k, "") for k in extra]
            )


def plot(rows: list[dict], path: str, x: str, title: str, group_by: tuple[str, ...] = ()) -> None:
    """Log-log plot of median time against params[x], one line per (provider, mode, group_by...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    for row in rows:
        if "median_ms" not in row:
            continue
        label = " ".join([row["provider"], row["mode"]] + [f"{g}={row['params'][g]}" for g in group_by])
        series.setdefault(label, []).append((row["params"][x], row["median_ms"], row["peak_mb"]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for label, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        ax_t.plot(xs, [p[1] for p in points], marker="o", label=label)
        ax_m.plot(xs, [max(p[2], 1e-3) for p in points], marker="o", label=label)
    for ax, ylabel in ((ax_t, "median time [ms]"), (ax_m, "peak memory [MB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"{title}\n{machine_name()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    result = _run_in_child(Case(**json.loads(sys.argv[1])))
    print(json.dumps(result))
