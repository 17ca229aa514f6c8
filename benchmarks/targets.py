"""The speed and memory targets of the kernel issues, measured in one run on this machine.

``python -m benchmarks.targets`` (or ``fastbind bench targets``) runs, for the cpu backend in
float32, exactly the cases the targets name, with their baselines, and writes
``benchmarks/results/targets.csv`` plus a table:

* GRAM (k = 3, fwd+bwd): D = 256, B = 4096 against the GEMM floor and the release's algorithm;
  D = 512, B = 2048 against the GEMM floor; D = 256, B = 32768 peak-RSS increase.
* CentroBind (M = 3, D = 512, fwd+bwd): B = 4096 against `naive` and the GEMM floor; B = 32768
  peak-RSS increase.
* Codebook lookup (N = 65536, K = 8192, D = 256, k = 1) against faiss-cpu and torch.cdist + argmin.

The huge cases run twice (repeat=0): the warm-up run is their single timing, then the memory run.
"""

from __future__ import annotations

import sys

from benchmarks import bench_codebook, bench_gram, bench_infonce
from benchmarks._harness import Case, run_cases


def cases():
    gram = bench_gram.NAME
    for provider in ("fastbind-cpu", "gemm-floor", "gram-official-style"):
        yield Case(gram, provider, "fwd+bwd", dict(B=4096, k=3, D=256), repeat=3)
    for provider in ("fastbind-cpu", "gemm-floor"):
        yield Case(gram, provider, "fwd+bwd", dict(B=2048, k=3, D=512), repeat=5)
    yield Case(gram, "fastbind-cpu", "fwd+bwd", dict(B=32768, k=3, D=256), repeat=0)
    infonce = bench_infonce.NAME
    for provider in ("fastbind-cpu", "gemm-floor", "naive"):
        yield Case(infonce, provider, "fwd+bwd", dict(B=4096, M=3, D=512), repeat=3)
    yield Case(infonce, "fastbind-cpu", "fwd+bwd", dict(B=32768, M=3, D=512), repeat=0)
    codebook = bench_codebook.NAME
    for provider in ("fastbind-cpu", "faiss", "torch"):
        yield Case(codebook, provider, "lookup", dict(N=65536, K=8192, D=256, k=1), repeat=3)


def main(quick: bool = False, echo=print, only=None):
    ratios = bench_gram.RATIOS + bench_infonce.RATIOS + bench_codebook.RATIOS
    selected = [c for c in cases() if only is None or only(c)]
    return run_cases(selected, ratios, "targets", echo=echo, timeout=3600)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
