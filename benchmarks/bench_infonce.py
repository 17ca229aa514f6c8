"""CentroBind / anchored-InfoNCE benchmark (issue 4, point 6): ``centroid_loss`` forward and
forward+backward, speed and peak memory, M = 3 and 4 modalities, D = 512, B = 512 ... 32768.

Providers:
* ``fastbind-cpu`` (C++ fused multi-pair op), ``fastbind-triton`` (only with a GPU, CUDA tensors);
* ``reference``: fastbind's torch backend (explicit [B, B] logits per modality);
* ``naive``: the usual code, written here independently — mean centroid, stack the [M, B, B] logits,
  ``F.cross_entropy`` twice per modality (rows and the transposed logits);
* ``gemm-floor``: the same number of B x D by D x B ``torch.mm`` products as the fused op — per
  modality one for the forward, and forward + recompute + two gradient products for fwd+bwd
  (M and 4M products). Above B = 8192 the products run in 2048-row blocks (same flops, a 2048 x B
  output buffer instead of B x B).
* ``gemm-floor-brgemm``: the same GEMMs on fastbind's own tile GEMM (``fastbind::tile_mm``, oneDNN's
  brgemm microkernel); ``dtype=bfloat16`` cases run both floors in bfloat16.

All inputs float32 and L2-normalised, τ = 0.07, plain mean centroid (CentroBind's default).
Ratios (``time_vs_<baseline>``, ``mem_vs_<baseline>``) come from the same run.
Run: ``python -m benchmarks.bench_infonce [--quick]`` or ``fastbind bench centroid``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from benchmarks._harness import RESULTS, Case, SkipCase, gemm_floor, plot, run_cases

NAME = "infonce"
PROVIDERS = ("fastbind-cpu", "fastbind-triton", "reference", "naive", "gemm-floor", "gemm-floor-brgemm")
MODES = ("fwd", "fwd+bwd")
RATIOS = [
    ("fastbind", "reference"),
    ("fastbind", "naive"),
    ("fastbind", "gemm-floor"),
    ("fastbind", "gemm-floor-brgemm"),
]
TAU = 0.07
# naive / reference keep ~6 float32 [M, B, B] tensors alive in fwd+bwd (logits, stacked copy,
# log-softmax of rows and of columns, their gradients): skip them where that exceeds this budget
# (the machine has 24 GB shared by several processes).
MATERIALISED_BUDGET = 5 * 2**30
FLOOR_BLOCK_ROWS = 2048
# Cases whose GEMM floor alone exceeds this many seconds per run on a 2-core CPU are skipped there
# (B = 32768, M = 4, fwd+bwd would be ~150 s per run, 3 runs per case).
CPU_FLOP_BUDGET = 15e12


def _gemm_count(mode: str, m: int) -> int:
    return {"fwd": 1, "fwd+bwd": 4}[mode] * m


def naive_centroid_loss(*zs):
    """The usual CentroBind code: [M, B, B] logits against the mean anchor, two CEs per modality."""
    c = torch.stack(zs).mean(0)
    logits = torch.stack([z @ c.T for z in zs]) / TAU
    labels = torch.arange(c.shape[0], device=c.device)
    return sum((F.cross_entropy(s, labels) + F.cross_entropy(s.T, labels)) / 2 for s in logits)


def _floor(provider: str, tensors, mode: str, m: int):
    """The GEMMs of the fused op as plain torch.mm, or as fastbind's tile GEMM (see _harness.gemm_floor)."""
    kind = "brgemm" if provider == "gemm-floor-brgemm" else "torch"
    return gemm_floor(tensors[0], tensors[1], _gemm_count(mode, m), FLOOR_BLOCK_ROWS, kind)


def build(
    provider: str, mode: str, device: str = "cpu", B: int = 1024, M: int = 3, D: int = 512, dtype: str = "float32"
):
    if provider == "fastbind-triton" and not torch.cuda.is_available():
        raise SkipCase("fastbind-triton needs a CUDA GPU")
    if provider in ("fastbind-cpu", "gemm-floor-brgemm") and device != "cpu":
        raise SkipCase(f"{provider} runs on CPU tensors")
    materialised = 6 * 4 * M * B * B
    if provider in ("naive", "reference") and materialised > MATERIALISED_BUDGET:
        raise SkipCase(f"needs ~{materialised / 2**30:.0f} GB for the [M, B, B] logits and their softmaxes")
    flops = 2.0 * B * B * D * _gemm_count(mode, M)
    if device == "cpu" and flops > CPU_FLOP_BUDGET:
        raise SkipCase(f"{flops / 1e12:.0f} TFLOP per run: too long for a CPU benchmark")
    import fastbind as fb

    g = torch.Generator().manual_seed(0)
    tensors = [F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device, getattr(torch, dtype)) for _ in range(M)]
    if provider.startswith("gemm-floor"):
        return _floor(provider, tensors, mode, M)
    if provider == "naive":
        loss_fn = naive_centroid_loss
    else:
        backend = {"fastbind-cpu": "cpu", "fastbind-triton": "triton", "reference": "torch"}[provider]

        def loss_fn(*zs):
            return fb.centroid_loss(*zs, temperature=TAU, backend=backend)

    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                loss_fn(*tensors)

        return fwd
    leaves = [t.requires_grad_(True) for t in tensors]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        loss_fn(*leaves).backward()

    return fwd_bwd


def cases(quick: bool = False):
    providers = [p for p in PROVIDERS if p != "fastbind-triton" or torch.cuda.is_available()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quick:  # `make demo`: one small size, every provider (each case is a fresh subprocess)
        for provider in providers:
            yield Case(NAME, provider, "fwd+bwd", dict(B=512, M=3, D=512), device=device, repeat=3)
        return
    for M in (3, 4):
        for B in (512, 1024, 2048, 4096, 8192, 16384, 32768):
            for mode in MODES:
                for provider in providers:
                    repeat = 5 if B <= 4096 else (2 if B <= 8192 else 1)
                    yield Case(NAME, provider, mode, dict(B=B, M=M, D=512), device=device, repeat=repeat)


def main(quick: bool = False, echo=print, only=None):
    """Run the cases (optionally only those matching `only(case)`), write CSV + PNG."""
    selected = [c for c in cases(quick) if only is None or only(c)]
    rows = run_cases(selected, RATIOS, NAME, echo=echo, timeout=1800)
    png = os.path.join(RESULTS, f"{NAME}.png")
    plot(rows, png, x="B", title="centroid_loss (CentroBind, float32, D = 512)", group_by=("M",))
    echo(f"wrote {os.path.relpath(png)}")
    return rows


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
