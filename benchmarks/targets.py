"""The speed and memory targets of the kernel issues, measured in one run on this machine.

``python -m benchmarks.targets`` (or ``fastbind bench targets``) runs, for the cpu backend in
float32, exactly the cases the targets name, with their baselines, and writes
``benchmarks/results/targets.csv`` plus a table:

* GRAM (k = 3, fwd+bwd): D = 256, B = 4096 against the GEMM floors (MKL ``torch.mm`` and the
  brgemm tile GEMM) and the release's algorithm; the same in bfloat16 against the bfloat16 floors;
  D = 512, B = 2048 and D = 256, B = 64 (fixed cost per call) against the floors; D = 256,
  B = 32768 peak-RSS increase.
* CentroBind (M = 3, D = 512, fwd+bwd): B = 4096 against `naive` and the floors; B = 256 against
  the torch backend (`reference`); B = 32768 peak-RSS increase.
* Codebook lookup (N = 65536, K = 8192, D = 256, k = 1) against faiss-cpu and torch.cdist + argmin.

The huge cases run twice (repeat=0): the warm-up run is their single timing, then the memory run.
"""

from __future__ import annotations

import sys

from benchmarks import bench_codebook, bench_gram, bench_infonce
from benchmarks._harness import Case, run_cases


def cases():
    gram = bench_gram.NAME
    floors = ("gemm-floor", "gemm-floor-brgemm")
    for provider in ("fastbind-cpu", *floors, "gram-official-style"):
        yield Case(gram, provider, "fwd+bwd", dict(B=4096, k=3, D=256), repeat=3)
    for provider in ("fastbind-cpu", *floors):  # issue 14: bf16 inputs against the bf16 floors
        yield Case(gram, provider, "fwd+bwd", dict(B=4096, k=3, D=256, dtype="bfloat16"), repeat=3)
    for provider in ("fastbind-cpu", *floors):
        yield Case(gram, provider, "fwd+bwd", dict(B=2048, k=3, D=512), repeat=5)
    for provider in ("fastbind-cpu", *floors):  # issue 14: the fixed cost of a small batch
        yield Case(gram, provider, "fwd+bwd", dict(B=64, k=3, D=256), repeat=200)
    yield Case(gram, "fastbind-cpu", "fwd+bwd", dict(B=32768, k=3, D=256), repeat=0)
    infonce = bench_infonce.NAME
    for provider in ("fastbind-cpu", *floors, "naive"):
        yield Case(infonce, provider, "fwd+bwd", dict(B=4096, M=3, D=512), repeat=3)
    for provider in ("fastbind-cpu", "reference", *floors):  # issue 14: small batch vs the torch backend
        yield Case(infonce, provider, "fwd+bwd", dict(B=256, M=3, D=512), repeat=50)
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
