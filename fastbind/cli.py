"""The `fastbind` command line: `fastbind info | bench | train`."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

BENCHES = {"gram": "bench_gram", "centroid": "bench_infonce", "codebook": "bench_codebook"}
# `fastbind bench targets`: the issues' target cases only, in one run (not part of `all`)
EXTRA_BENCHES = {"targets": "targets"}


def _info(_args) -> int:
    import torch

    from fastbind import __version__
    from fastbind._backend import BACKENDS, availability, backends, get_backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = "CUDA: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    from fastbind._sysinfo import cpu_model

    cpu = cpu_model()
    print(f"fastbind {__version__}")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__} (cuda {torch.version.cuda or 'none'})")
    print(f"triton   {triton_version}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print(f"device   {device}; CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if "cpu" in backends():
        print(f"_C       {torch.ops.fastbind.build_info()}")
    print(f"default  {get_backend() or 'auto'}")
    print("backends (fastest first): " + ", ".join(backends()))
    status = availability()
    for name in BACKENDS:
        ok, reason = status[name]
        print(f"  {name:<7} {'available' if ok else 'missing: ' + reason}")
    return 0


def _import_benchmarks():
    """The benchmark suites live next to the package in a source checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "benchmarks")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module("benchmarks")
    except ImportError as exc:
        raise SystemExit(f"fastbind bench: the benchmarks/ folder of a source checkout is needed ({exc})") from exc


def _bench(args) -> int:
    if args.quick:  # must be set before the benchmark modules import the harness
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        os.environ.setdefault("FASTBIND_BENCH_RESULTS", os.path.join(root, "benchmarks", "results", "quick"))
    _import_benchmarks()
    names = list(BENCHES) if args.family == "all" else [args.family]
    for name in names:
        print(f"\n=== fastbind bench {name}{' (quick)' if args.quick else ''} ===", flush=True)
        module = importlib.import_module(f"benchmarks.{(BENCHES | EXTRA_BENCHES)[name]}")
        module.main(quick=args.quick, echo=lambda line: print(line, flush=True))
    return 0


def _train(argv) -> int:
    from fastbind.train.cli import main as train_main

    return train_main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the training layer owns its own argument parser
        return _train(argv[1:])
    parser = argparse.ArgumentParser(prog="fastbind", description="fused kernels for multimodal binding")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, available backends and why others are missing")
    bench = sub.add_parser("bench", help="benchmark the fused ops against the reference implementations")
    bench.add_argument("family", choices=[*BENCHES, *EXTRA_BENCHES, "all"])
    bench.add_argument("--quick", action="store_true", help="a few small cases (for make demo)")
    sub.add_parser("train", help="synthetic multimodal training (see `fastbind train --help`)")
    args = parser.parse_args(argv)
    return {"info": _info, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
