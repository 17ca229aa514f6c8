"""Compile every Triton kernel of fastbind for sm_90 and sm_80 without a GPU and report resources.

For each `AotSpec` returned by `aot_specs()` of `fastbind/triton/{gram,infonce,codebook}.py`, the
kernel is compiled with `triton.compile(..., target=GPUTarget("cuda", cc, 32))`; its PTX is run
through the `ptxas -v` that Triton itself uses for the arch (the system nvcc's ptxas rejects Triton 3.9's PTX) for
registers and spill bytes; shared memory comes from the compile metadata (an oversized config
compiles and would only fail at launch, so we check it here); wgmma is looked up in the PTX.

Usage: ``python -m benchmarks.triton_resources [--json PATH] [--markdown]``. Must run with
TRITON_INTERPRET unset: interpreted kernels cannot be compiled for a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# Keep the current default explicitly (and the compile quiet): FP fusion on, as on the GPU path.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

FAMILIES = ("gram", "infonce", "codebook")
TARGETS = (90, 80)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (H100/H200)


def _ptxas(cc: int) -> str:
    # The ptxas Triton itself uses for this arch (its bundled CUDA 12.9 ptxas for sm_80, the newer
    # "ptxas-blackwell" for sm_90+, whose PTX version the older one rejects).
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


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
        "dtype": spec.dtype,
        "num_warps": spec.num_warps,
        "registers": regs,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "shared_bytes": int(kernel.metadata.shared),
        "wgmma": "wgmma" in ptx,
        "expect_wgmma": bool(spec.expect_wgmma) and cc == 90,
    }


def collect(families=FAMILIES) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run with TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    rows = []
    for family in families:
        module = importlib.import_module(f"fastbind.triton.{family}")
        for spec in module.aot_specs():
            for cc in TARGETS:
                rows.append(compile_spec(spec, cc))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | arch | dtype | warps | registers | spill st/ld (B) | shared (KB) | wgmma |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['num_warps']} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes'] / 1024:.1f} | "
            f"{'yes' if r['wgmma'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="restrict to a family")
    args = parser.parse_args(argv)
    rows = collect(tuple(args.family) if args.family else FAMILIES)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
