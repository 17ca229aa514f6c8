"""Codebook benchmark (issue 5, point 7): nearest-code lookup and the VQ layer, speed and peak memory.

Mode ``lookup`` (top-k nearest codes, float32, squared L2), N = 4096 ... 262144 rows,
K = 512 ... 16384 codes, D = 64 and 256, k = 1 and 8. Providers:

* ``fastbind-cpu``: :func:`fastbind.codebook_lookup` on the C++ backend (GEMM tiles + running top-k,
  never an N×K tensor); ``fastbind-triton``: the Triton backend on CUDA tensors (only with a GPU);
* ``torch``: ``torch.cdist`` + ``argmin`` (k = 1) / ``topk`` (k > 1): materialises N×K fp32;
* ``faiss``: ``faiss-cpu`` ``IndexFlatL2.search`` (BLAS tiles + selection; at the GEMM floor here).

Mode ``vq`` (one training-mode forward of a VQ layer with EMA update, k = 1): ``fastbind-cpu``
(:class:`fastbind.nn.VectorQuantizer`) against ``vqpytorch`` (vector-quantize-pytorch's
``VectorQuantize``, which builds two N×K fp32 tensors).

faiss and vector-quantize-pytorch are benchmark-only dependencies (``requirements-bench.txt``); a
missing one gives ``skipped`` rows. Ratios (``time_vs_<baseline>``, ``mem_vs_<baseline>``) come from
the same run. The grid is pruned for a 2-core machine: lookups with N·K·D > 2^37 (the issue's
target case N = 65536, K = 8192, D = 256 is the largest kept) and torch rows whose N×K matrix
exceeds 4 GiB are skipped with the reason.
Run: ``python -m benchmarks.bench_codebook [--quick]`` or ``fastbind bench codebook``.
"""

from __future__ import annotations

import os
import sys

import torch

from benchmarks._harness import RESULTS, Case, SkipCase, plot, run_cases

NAME = "codebook"
RATIOS = [("fastbind", "torch"), ("fastbind", "faiss"), ("fastbind", "vqpytorch")]
LOOKUP_PROVIDERS = ("fastbind-cpu", "fastbind-triton", "torch", "faiss")
VQ_PROVIDERS = ("fastbind-cpu", "fastbind-triton", "vqpytorch")
# 2^37 multiply-adds = the target case (65536 × 8192 × 256): about 1.5–3 s per call on 2 cores.
WORK_BUDGET = 2**37
DENSE_BUDGET = 4 * 2**30  # bytes of the N×K fp32 matrix torch.cdist builds


def _inputs(N: int, K: int, D: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    codebook = torch.randn(K, D, generator=g)
    return x.to(device), codebook.to(device)


def _check_provider(provider: str, device: str) -> None:
    if provider == "fastbind-triton" and not torch.cuda.is_available():
        raise SkipCase("fastbind-triton needs a CUDA GPU")
    if provider == "fastbind-cpu" and device != "cpu":
        raise SkipCase("fastbind-cpu runs on CPU tensors")
    if provider in ("faiss", "vqpytorch") and device != "cpu":
        raise SkipCase(f"{provider} rows are measured on CPU")


def _lookup(provider: str, x: torch.Tensor, codebook: torch.Tensor, k: int):
    import fastbind as fb

    if provider.startswith("fastbind"):
        backend = provider.split("-", 1)[1]

        def run():
            with torch.no_grad():
                fb.codebook_lookup(x, codebook, k, backend=backend)

        return run
    if provider == "torch":
        if x.shape[0] * codebook.shape[0] * 4 > DENSE_BUDGET:
            raise SkipCase(f"torch.cdist needs {x.shape[0] * codebook.shape[0] * 4 / 2**30:.0f} GiB for the N×K matrix")

        def run():
            with torch.no_grad():
                dist = torch.cdist(x, codebook)
                dist.argmin(1) if k == 1 else dist.topk(k, dim=1, largest=False)

        return run
    if provider == "faiss":
        try:
            import faiss
        except ImportError as exc:
            raise SkipCase(f"faiss-cpu not installed ({exc}); see requirements-bench.txt") from exc
        index = faiss.IndexFlatL2(codebook.shape[1])
        index.add(codebook.numpy())
        queries = x.numpy()
        return lambda: index.search(queries, k)
    raise SkipCase(f"unknown lookup provider {provider}")


def _vq_layer(provider: str, x: torch.Tensor, K: int, D: int):
    if provider.startswith("fastbind"):
        from fastbind.nn import VectorQuantizer

        layer = VectorQuantizer(K, D, init="random", backend=provider.split("-", 1)[1]).to(x.device)
    else:
        try:
            from vector_quantize_pytorch import VectorQuantize
        except ImportError as exc:
            raise SkipCase(f"vector-quantize-pytorch not installed ({exc}); see requirements-bench.txt") from exc
        layer = VectorQuantize(dim=D, codebook_size=K, decay=0.99).to(x.device)
    layer.train()
    tokens = x[None]  # [1, N, D]: vector-quantize-pytorch's (batch, sequence, dim) convention

    def run():
        with torch.no_grad():
            layer(tokens)

    return run


def build(provider: str, mode: str, device: str = "cpu", N: int = 4096, K: int = 512, D: int = 64, k: int = 1):
    _check_provider(provider, device)
    if N * K * D > WORK_BUDGET:
        raise SkipCase(f"N·K·D = 2^{(N * K * D).bit_length() - 1} is over the 2-core budget of 2^37")
    x, codebook = _inputs(N, K, D, device)
    if mode == "lookup":
        return _lookup(provider, x, codebook, k)
    if mode == "vq":
        return _vq_layer(provider, x, K, D)
    raise SkipCase(f"unknown mode {mode}")


def cases(quick: bool = False):
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    lookup = [p for p in LOOKUP_PROVIDERS if p != "fastbind-triton" or gpu]
    vq = [p for p in VQ_PROVIDERS if p != "fastbind-triton" or gpu]

    def dev(provider):
        return device if provider == "fastbind-triton" else "cpu"

    if quick:
        # 5 subprocesses (each imports torch + fastbind, ~3 s): well under 40 s on 2 cores
        for provider in lookup:
            yield Case(NAME, provider, "lookup", dict(N=8192, K=1024, D=64, k=1), device=dev(provider), repeat=3)
        for provider in vq:
            yield Case(NAME, provider, "vq", dict(N=4096, K=512, D=64, k=1), device=dev(provider), repeat=3)
        return
    for D in (64, 256):
        for k in (1, 8):
            for K in (512, 2048, 8192, 16384):
                for N in (4096, 16384, 65536, 262144):
                    repeat = 5 if N * K * D <= 2**33 else 2
                    for provider in lookup:
                        yield Case(
                            NAME, provider, "lookup", dict(N=N, K=K, D=D, k=k), device=dev(provider), repeat=repeat
                        )
    for D in (64, 256):
        for K in (512, 2048, 8192):
            for N in (4096, 16384, 65536):
                repeat = 5 if N * K * D <= 2**33 else 2
                for provider in vq:
                    yield Case(NAME, provider, "vq", dict(N=N, K=K, D=D, k=1), device=dev(provider), repeat=repeat)


def main(quick: bool = False, echo=print, only=None):
    """Run the cases (optionally only those matching `only(case)`), write CSV + PNG."""
    selected = [c for c in cases(quick) if only is None or only(c)]
    rows = run_cases(selected, RATIOS, NAME, echo=echo, timeout=1800)
    png = os.path.join(RESULTS, f"{NAME}.png")
    lookup_rows = [r for r in rows if r["mode"] == "lookup"]
    plot(lookup_rows or rows, png, x="N", title="codebook_lookup (float32, squared L2)", group_by=("K", "D", "k"))
    echo(f"wrote {os.path.relpath(png)}")
    return rows


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
