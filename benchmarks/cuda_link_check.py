"""The link check of ``make cuda-build`` (issue 11): a ``fastbind._C`` built with the CUDA kernels
(``FASTBIND_BUILD_CUDA=1``) loads into the CUDA build of torch on a machine without a GPU, and every
op of every ``cuda`` row of the op tables (fastbind/ops/_registry.py: forward and backward) has a
kernel for the CUDA dispatch key, so each ``cuda`` row is built.

The op list comes from the tables, not from a list kept here: a row added to a table is checked
from then on. The extension under test is loaded as ``fastbind._C`` before fastbind is imported,
so the package registers its rows against it exactly as an installed CUDA build would.

Usage: ``python -m benchmarks.cuda_link_check [EXTENSION.so]`` (default: the one file
``build/cuda/lib/fastbind/_C*.so`` that ``make cuda-build`` writes). Exit status 1 when an op has no
CUDA kernel or a ``cuda`` row is not built.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GLOB = "build/cuda/lib/fastbind/_C*.so"


def cuda_op_names() -> list[str]:
    """Qualified names of the ops of every table's ``cuda`` row, forward then backward, table order."""
    from fastbind.ops import _registry

    return [name for table in _registry.TABLES.values() if "cuda" in table.rows for name in table.op_names("cuda")]


def missing_cuda_kernels() -> list[str]:
    """The ops of :func:`cuda_op_names` without a kernel for the CUDA dispatch key in this process."""
    return [n for n in cuda_op_names() if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]


def unbuilt_cuda_rows() -> list[str]:
    """The tables whose ``cuda`` row the registry did not make dispatchable."""
    from fastbind.ops import _registry

    return [t.name for t in _registry.TABLES.values() if "cuda" in t.rows and not t.built("cuda")]


def load_as_fastbind_c(path: Path) -> None:
    """Import the extension file at `path` as the module ``fastbind._C`` (before fastbind itself)."""
    if "fastbind" in sys.modules:
        raise RuntimeError("load the extension before importing fastbind: its ops modules register the rows once")
    spec = importlib.util.spec_from_file_location("fastbind._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the TORCH_LIBRARY / TORCH_LIBRARY_IMPL initialisers
    sys.modules["fastbind._C"] = module


def _find_extension() -> Path:
    found = sorted(ROOT.glob(DEFAULT_GLOB))
    if len(found) != 1:
        raise SystemExit(f"expected one extension {DEFAULT_GLOB} (run `make cuda-build`), found {found}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extension", nargs="?", type=Path, help=f"the built extension (default {DEFAULT_GLOB})")
    args = parser.parse_args(argv)
    path = args.extension or _find_extension()
    load_as_fastbind_c(path)
    import fastbind
    from fastbind import _backend

    size = path.stat().st_size
    print(f"extension: {path} ({size / 2**20:.1f} MiB)")
    print(f"fastbind._C: {torch.ops.fastbind.build_info()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
    names, missing = cuda_op_names(), missing_cuda_kernels()
    for name in names:
        print(f"  {name:<32} CUDA kernel: {'MISSING' if name in missing else 'registered'}")
    unbuilt = unbuilt_cuda_rows()
    ok, reason = _backend.availability()["cuda"]
    print(f"cuda backend: {'available' if ok else 'unavailable: ' + reason}; backends here: {fastbind.backends()}")
    if missing or unbuilt or not names:
        print(f"FAILED: no CUDA kernel for {missing}; cuda rows not built: {unbuilt}", file=sys.stderr)
        return 1
    print(f"OK: {len(names)} CUDA ops registered, every cuda row built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
