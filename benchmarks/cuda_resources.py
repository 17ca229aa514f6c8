"""Compile every launchable CUDA kernel of csrc/cuda/ for sm_80 and sm_90a with nvcc (no GPU needed)
and report registers, spills, stack frame, shared memory and tensor-core instructions.

Each kernel header ``csrc/cuda/<name>.cuh`` lists the instantiations its launcher can launch in a
macro ``FASTBIND_CUDA_KERNELS_<family>(X)`` with entries ``X(name, tensor_cores, (kernel),
smem_bytes)``: the kernel (a template instantiation), whether it is a 16-bit GEMM kernel (its SASS
must then show HMMA, or HGMMA on sm_90a) and its largest dynamic shared memory. Each entry is
compiled alone (one translation unit that takes the kernel's address, so its fatbin holds that one
entry) with ``nvcc -fatbin -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a
-Xptxas -v``; ptxas reports registers, spill bytes and the stack frame, ``cuobjdump -sass`` (the
one in the triton wheel, or CUDA_HOME's) the instructions. The shared memory column is the entry's
expression evaluated by the host compiler (the kernels use dynamic shared memory only).
Kernel headers are torch-free, so this needs nvcc and nothing else. Results are cached under
``~/.cache/fastbind/cuda-compile`` by a hash of the kernel headers, the entry and the nvcc version.

Usage: ``python -m benchmarks.cuda_resources [--json PATH] [--jobs N]`` (prints a Markdown table).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
INCLUDES = [ROOT / "csrc" / "include", CUDA_DIR]
ARCHS = ("sm_80", "sm_90a")
SMEM_LIMIT = 163 * 1024  # dynamic shared memory per block an sm_80 kernel may opt in to (sm_90: 227 KiB)
NVCC_FLAGS = ["-std=c++20", "-O3", "-Xptxas", "-v", "-fatbin"] + [
    f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS
]
# torch's CUDA-prefix auto-detection picks the wrong toolkit here: the compile check names it.
DEFAULT_CUDA_HOME = "/usr/local/cuda-13.0"


@dataclass(frozen=True)
class Entry:
    family: str
    header: str
    name: str
    tensor_cores: bool
    kernel: str
    smem: str


def cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or DEFAULT_CUDA_HOME


def nvcc_path() -> str | None:
    for cand in (os.path.join(cuda_home(), "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def cuobjdump_path() -> str | None:
    spec = importlib.util.find_spec("triton")
    cands = [os.path.join(cuda_home(), "bin", "cuobjdump")]
    if spec and spec.origin:
        cands.insert(0, os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in cands if os.path.exists(c)), None)


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch in "(<[" and 1 or 0
        depth -= ch in ")>]" and 1 or 0
        cur += ch
    return parts + [cur.strip()]


def entries() -> list[Entry]:
    """Every X(...) of every FASTBIND_CUDA_KERNELS_<family>(X) macro in csrc/cuda/*.cuh."""
    found = []
    for header in sorted(CUDA_DIR.glob("*.cuh")):
        text = header.read_text().replace("\\\n", " ")
        for m in re.finditer(r"#define\s+FASTBIND_CUDA_KERNELS_(\w+)\(X\)([^\n]*)", text):
            body, pos = m.group(2), 0
            while (start := body.find("X(", pos)) >= 0:
                depth, i = 0, start + 1
                while True:  # the matching parenthesis of X(
                    depth += body[i] == "("
                    depth -= body[i] == ")"
                    if depth == 0:
                        break
                    i += 1
                name, tc, kernel, smem = _split_top_level(body[start + 2 : i])
                found.append(Entry(m.group(1), header.name, name, tc.strip() == "1", kernel, smem))
                pos = i + 1
    return found


def _source_digest() -> str:
    h = hashlib.sha256()
    for base in INCLUDES:
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix in (".cuh", ".h") and "emulator" not in path.parts:
                h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return h.hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("FASTBIND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastbind"
    )
    path = Path(base) / "cuda-compile"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v output -> {arch: {entries, registers, stack, spill_stores, spill_loads}}."""
    out: dict[str, dict] = {}
    arch = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
            arch = m.group(2)
            info = out.setdefault(arch, {"entries": 0, "registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0})
            info["entries"] += 1
        elif arch and (
            m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        ):
            out[arch]["stack"] = max(out[arch]["stack"], int(m.group(1)))
            out[arch]["spill_stores"] += int(m.group(2))
            out[arch]["spill_loads"] += int(m.group(3))
        elif arch and (m := re.search(r"Used (\d+) registers", line)):
            out[arch]["registers"] = max(out[arch]["registers"], int(m.group(1)))
    return out


def _count_mma(sass: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    arch = None
    for line in sass.splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
            out.setdefault(arch, {"hmma": 0, "hgmma": 0})
        elif arch:
            out[arch]["hgmma"] += len(re.findall(r"\bHGMMA\b", line))
            out[arch]["hmma"] += len(re.findall(r"\bHMMA\b", line))
    return out


def _write_atomic(path: Path, data) -> None:
    # Several worktrees / sessions share the cache: readers never see a half-written file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def compile_entry(entry: Entry) -> dict:
    """nvcc + cuobjdump for one entry (cached): {arch: {registers, stack, spills, hmma, hgmma, entries}}."""
    nvcc, cuobjdump = nvcc_path(), cuobjdump_path()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"nvcc or cuobjdump missing (CUDA_HOME={cuda_home()}): the compile check needs both")
    tu = f'#include "{entry.header}"\nvoid* fastbind_compile_check = reinterpret_cast<void*>(&{entry.kernel});\n'
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((_source_digest() + tu + version + " ".join(NVCC_FLAGS)).encode()).hexdigest()[:24]
    cached = _cache_dir() / f"{entry.name}-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory(prefix="fastbind-nvcc-") as tmp:
        src, fatbin = os.path.join(tmp, "entry.cu"), os.path.join(tmp, "entry.fatbin")
        Path(src).write_text(tu)
        cmd = [nvcc, *NVCC_FLAGS, *[f"-I{p}" for p in INCLUDES], src, "-o", fatbin]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_HOME": cuda_home()})
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {entry.name}:\n{proc.stderr[-4000:]}")
        result = _parse_ptxas(proc.stdout + proc.stderr)
        sass = subprocess.run([cuobjdump, "-sass", fatbin], capture_output=True, text=True, check=True).stdout
    for arch, counts in _count_mma(sass).items():
        result.setdefault(arch, {}).update(counts)
    _write_atomic(cached, result)
    return result


def smem_bytes(all_entries: list[Entry]) -> dict[str, int]:
    """Each entry's shared-memory expression, evaluated by a host build of the headers."""
    lines = ["#include <cstdio>"] + [f'#include "{h}"' for h in sorted({e.header for e in all_entries})]
    lines.append("int main() {")
    lines += [f'  std::printf("{e.name} %zu\\n", size_t({e.smem}));' for e in all_entries]
    lines.append("}")
    src = "\n".join(lines) + "\n"
    key = hashlib.sha256((_source_digest() + src).encode()).hexdigest()[:24]
    cached = _cache_dir() / f"smem-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory(prefix="fastbind-smem-") as tmp:
        Path(tmp, "smem.cpp").write_text(src)
        exe = os.path.join(tmp, "smem")
        flags = ["-std=c++20", "-DFASTBIND_SIMT_EMULATOR", *[f"-I{p}" for p in INCLUDES], "-pthread"]
        subprocess.run(["g++", *flags, os.path.join(tmp, "smem.cpp"), "-o", exe], check=True)
        out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    result = {name: int(v) for name, v in (line.split() for line in out.splitlines())}
    _write_atomic(cached, result)
    return result


def collect(jobs: int = 2) -> list[dict]:
    all_entries = entries()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        compiled = list(pool.map(compile_entry, all_entries))
    smem = smem_bytes(all_entries)
    return [{**asdict(e), "smem_bytes": smem[e.name], "archs": c} for e, c in zip(all_entries, compiled)]


def table(rows: list[dict]) -> str:
    head = "| kernel | tensor cores | dyn. smem (B) | " + " | ".join(
        f"{a} regs | {a} spill (B) | {a} stack (B) | {a} MMA" for a in ARCHS
    )
    lines = [head + " |", "|" + "---|" * (3 + 4 * len(ARCHS))]
    for r in rows:
        cells = [r["name"], "yes" if r["tensor_cores"] else "no (fp32 FMA)", str(r["smem_bytes"])]
        for a in ARCHS:
            info = r["archs"].get(a, {})
            mma = info.get("hgmma", 0) and f"{info['hgmma']} HGMMA" or f"{info.get('hmma', 0)} HMMA"
            cells += [
                str(info.get("registers", "?")),
                str(info.get("spill_stores", 0) + info.get("spill_loads", 0)),
                str(info.get("stack", "?")),
                mma,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    rows = collect(args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
