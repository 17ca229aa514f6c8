"""Compile every Triton kernel of fastbind for sm_90 and sm_80 without a GPU and report resources.

For each `AotSpec` returned by `aot_specs()` of `fastbind/triton/{gram,infonce,codebook}.py` (the
same tables the launches read: block sizes, num_warps, num_stages), the kernel is compiled with
`triton.compile(..., target=GPUTarget("cuda", cc, 32))`; its PTX is run through the `ptxas -v` that
Triton itself uses for the arch (the system nvcc's ptxas rejects Triton 3.9's PTX) for registers and
spill bytes; shared memory comes from the compile metadata (an oversized config compiles and would
only fail at launch, so we check it here); wgmma is looked up in the PTX; 32-bit products of sizes,
strides or row indices (which overflow once a tensor passes 2^31 elements) are looked up in the TTIR.

Every supported Triton version is checked: the installed (pinned) one and the oldest supported one,
which is installed once beside it with ``pip install --target <cache>/triton-<version> --no-deps``
and imported first from that folder in a subprocess. Results are cached under the same folder by
the hash of the kernel sources and this script.

Usage: ``python -m benchmarks.triton_resources [--json PATH] [--family F] [--triton VERSION|installed]``.
Must run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled for a GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

# Keep the current default explicitly (and the compile quiet): FP fusion on, as on the GPU path.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("gram", "infonce", "codebook")
TARGETS = (90, 80)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (H100/H200)
# The oldest supported Triton (pyproject.toml: triton >= 3.6); "installed" is the pinned one.
OLDEST_TRITON = "3.6.0"
VERSIONS = (OLDEST_TRITON, "installed")


def cache_dir() -> str:
    base = os.environ.get("FASTBIND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastbind"
    )
    os.makedirs(base, exist_ok=True)
    return base


def _ptxas(cc: int) -> str:
    # The ptxas Triton itself uses for this arch (3.9: its bundled CUDA 12.9 ptxas for sm_80, the
    # newer "ptxas-blackwell" for sm_90+, whose PTX version the older one rejects).
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


# --------------------------------------------------------------------------------------------
# 32-bit index products in the TTIR
# --------------------------------------------------------------------------------------------
_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_FOR = re.compile(r"scf\.for\s+(%[\w.#]+)\s*=\s*(%[\w.#]+)\s+to\s+(%[\w.#]+)")
_OPERAND = re.compile(r"%[\w.#]+")
_ARG = re.compile(r"(%[\w.#]+):\s*i(?:32|64)\b")


def i32_index_products(ttir: str) -> list[str]:
    """32-bit multiplies in the TTIR that can pass 2^31: a size, stride or row index (an integer
    kernel argument, a loop index over one, a program id, or anything computed from them) times
    another such value or a constant > 1. In-tile offsets (a `tl.arange` times a size, bounded by
    the block size times the size) are allowed. Returns the offending lines."""
    taint = {}  # SSA name -> "S" (size / row index), "P" (program id), "T" (in-tile), "C" (constant)
    consts = {}
    rank = {"C": 0, "T": 1, "P": 2, "S": 3}
    header = next((line for line in ttir.splitlines() if "tt.func" in line), "")
    for name in _ARG.findall(header):
        taint[name] = "S"
    bad = []
    for line in ttir.splitlines():
        loop = _FOR.search(line)
        if loop:
            taint[loop.group(1)] = "S"
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        operands = [o for o in _OPERAND.findall(rest.split(" : ")[0].split(" loc(")[0])]
        if op == "arith.constant":
            value = re.search(r"(?:dense<)?(-?\d+)\s*>?\s*:", rest)
            taint[name] = "C"
            consts[name] = int(value.group(1)) if value else None
            continue
        if op == "tt.make_range":
            taint[name] = "T"
            continue
        if op == "tt.get_program_id":
            taint[name] = "P"
            continue
        kinds = [taint.get(o, "C") for o in operands]
        result = max(kinds, key=rank.get) if kinds else "C"
        if op == "arith.muli" and len(operands) == 2 and re.search(r":\s*(?:tensor<[\dx]*)?i32\b", rest):
            a, b = kinds
            const = [consts.get(o) for o in operands]
            pair = {a, b}
            grows = (
                pair == {"S"}
                or pair == {"S", "P"}
                or pair == {"P"}
                or (
                    "S" in pair
                    and "C" in pair
                    and all(c is None or abs(c) > 1 for c, k in zip(const, kinds) if k == "C")
                )
            )
            if grows:
                bad.append(line.strip().split(" loc(")[0])
        taint[name] = result
    return bad


# --------------------------------------------------------------------------------------------
# compile one spec
# --------------------------------------------------------------------------------------------
def compile_spec(spec, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = kernel.asm["ptx"]
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [_ptxas(cc), f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "kernel": spec.name,
        "arch": f"sm_{cc}",
        "triton": triton.__version__,
        "dtype": spec.dtype,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "registers": regs,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "shared_bytes": int(kernel.metadata.shared),
        "wgmma": "wgmma" in ptx,
        "expect_wgmma": bool(spec.expect_wgmma) and cc == 90,
        "i32_products": i32_index_products(kernel.asm["ttir"]),
    }


def collect(families=FAMILIES) -> list[dict]:
    """Compile every spec of `families` with the Triton importable here (this process)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    rows = []
    for family in families:
        module = importlib.import_module(f"fastbind.triton.{family}")
        for spec in module.aot_specs():
            for cc in TARGETS:
                rows.append(compile_spec(spec, cc))
    return rows


# --------------------------------------------------------------------------------------------
# every supported Triton version, each in its own subprocess
# --------------------------------------------------------------------------------------------
def ensure_triton(version: str) -> str:
    """Folder holding triton==`version` (installed there once, without dependencies)."""
    target = os.path.join(cache_dir(), f"triton-{version}")
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install even when several test sessions start at once
        if not os.path.isdir(os.path.join(target, "triton")):
            tmp = target + ".partial"
            subprocess.run(["rm", "-rf", tmp], check=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp, f"triton=={version}"],
                check=True,
            )
            os.replace(tmp, target)
    return target


def _sources_hash(version: str, family: str) -> str:
    # what determines the rows of a family: its module and the shared helpers (the kernels and
    # aot_specs), the compile and IR checks, the versions
    h = hashlib.sha256(f"{version} {family} {sys.version_info[:2]} {TARGETS}".encode())
    for fn in (compile_spec, collect, i32_index_products):
        h.update(inspect.getsource(fn).encode())
    # (the codebook specs enumerate k = 1 .. MAX_K of fastbind/ops/codebook.py)
    extra = ("ops/codebook.py",) if family == "codebook" else ()
    for name in ("triton/_common.py", "triton/_saturated.py", f"triton/{family}.py", *extra):
        with open(os.path.join(ROOT, "fastbind", name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:20]


def run_version(version: str, families=FAMILIES, use_cache: bool = True) -> list[dict]:
    """Rows of `families` compiled by triton `version` ("installed": the one in this environment)."""
    return [row for family in families for row in _run_family(version, family, use_cache)]


def _run_family(version: str, family: str, use_cache: bool) -> list[dict]:
    """Rows of one family, cached on their own: a change to one family recompiles only that one."""
    import triton

    label = triton.__version__ if version == "installed" else version
    cached = os.path.join(cache_dir(), "aot", f"{label}-{family}-{_sources_hash(label, family)}.json")
    if use_cache and os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = [ROOT] if version == "installed" else [ensure_triton(version), ROOT]
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "benchmarks.triton_resources", "--json", out, "--quiet", "--family", family]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile with triton {label} failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            rows = json.load(f)
    if rows and rows[0]["triton"] != label:
        raise RuntimeError(f"expected triton {label}, the subprocess imported {rows[0]['triton']}")
    with open(cached, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def collect_versions(versions=VERSIONS, families=FAMILIES, use_cache: bool = True) -> list[dict]:
    """Rows of every version and family, one subprocess each; at most two compile at once (the
    test machine has 2 cores)."""
    jobs = [(version, family) for version in versions for family in families]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(lambda job: _run_family(*job, use_cache), jobs))
    return [row for part in parts for row in part]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | triton | arch | warps | stages | registers | spill st/ld (B) | shared (KB) | wgmma |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['triton']} | {r['arch']} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes'] / 1024:.1f} | "
            f"{'yes' if r['wgmma'] else 'no'} |"
        )
    return "\n".join(lines)


def markdown_by_version(rows: list[dict]) -> str:
    """One line per kernel and arch, the registers and spills of each Triton version side by side."""
    versions = sorted({r["triton"] for r in rows}, key=lambda v: tuple(int(x) for x in v.split(".")))
    by_key = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r["arch"]), {})[r["triton"]] = r
    head = " | ".join(f"regs / spill st/ld (B) {v}" for v in versions)
    lines = [
        f"| kernel | arch | warps | stages | {head} | shared (KB) | wgmma |",
        "|---|---|---|---|" + "---|" * len(versions) + "---|---|",
    ]
    for (kernel, arch), per in by_key.items():
        first = next(iter(per.values()))
        cells = " | ".join(
            f"{per[v]['registers']} / {per[v]['spill_stores']}/{per[v]['spill_loads']}" if v in per else "-"
            for v in versions
        )
        shared = "/".join(sorted({f"{p['shared_bytes'] / 1024:.1f}" for p in per.values()}))
        wgmma = "/".join(sorted({"yes" if p["wgmma"] else "no" for p in per.values()}))
        lines.append(
            f"| {kernel} | {arch} | {first['num_warps']} | {first['num_stages']} | {cells} | {shared} | {wgmma} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="restrict to a family")
    parser.add_argument(
        "--triton",
        action="append",
        help=f"compile with this triton version (installed beside the pinned one) or 'installed'; "
        f"repeatable; default: this process's triton only (--triton {OLDEST_TRITON} --triton installed: both)",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompile even if cached rows exist")
    parser.add_argument("--quiet", action="store_true", help="no markdown table on stdout")
    args = parser.parse_args(argv)
    families = tuple(args.family) if args.family else FAMILIES
    if args.triton:
        rows = collect_versions(tuple(args.triton), families, use_cache=not args.no_cache)
    else:
        rows = collect(families)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not args.quiet:
        print(markdown_by_version(rows) if args.triton else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
