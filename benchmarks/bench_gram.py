"""GRAM benchmark (issue 3, point 6): gram_loss forward, backward and forward+backward, speed and
peak memory, over B = 256 ... 32768, k = 3 and 4, D = 256 and 512.

Providers:
* ``fastbind-cpu`` (C++ kernels), ``fastbind-triton`` (only with a GPU, on CUDA tensors);
* ``reference``: fastbind's torch backend (explicit k x k determinants, B x B logits);
* ``gram-official-style``: an independent re-implementation, here, of the GRAM release's algorithm
  (stack the [B, B, k, k] Gram tensor, ``torch.det``, ``sqrt(abs)``, two label-smoothed
  cross-entropies, ``(CE(-vol/τ) + CE(-volᵀ/τ))/2``);
* ``gemm-floor``: the same GEMMs as plain ``torch.mm`` B x D by D x B products — (k-1) for the
  forward, 3(k-1) for the backward (recompute + two gradient products), 4(k-1) for both. Above
  B = 8192 the products are done in 2048-row blocks (same flops, a 2048 x B output buffer
  instead of B x B).
* ``gemm-floor-brgemm``: the same GEMMs on fastbind's own tile GEMM (``fastbind::tile_mm``: oneDNN's
  brgemm microkernel, the fastest float32 GEMM of an AVX-512 EPYC, where MKL's sgemm runs at about
  half the core's rate); ``dtype=bfloat16`` cases run both floors in bfloat16.

All inputs float32, L2-normalised (as GRAM's embeddings), label_smoothing 0.1, τ = 0.07.
Ratios (``time_vs_<baseline>``, ``mem_vs_<baseline>``) come from the same run.
Run: ``python -m benchmarks.bench_gram [--quick]`` or ``fastbind bench gram``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from benchmarks._harness import RESULTS, Case, SkipCase, gemm_floor, plot, run_cases

NAME = "gram"
PROVIDERS = ("fastbind-cpu", "fastbind-triton", "reference", "gram-official-style", "gemm-floor", "gemm-floor-brgemm")
MODES = ("fwd", "bwd", "fwd+bwd")
RATIOS = [
    ("fastbind", "reference"),
    ("fastbind", "gram-official-style"),
    ("fastbind", "gemm-floor"),
    ("fastbind", "gemm-floor-brgemm"),
]
TAU, SMOOTHING = 0.07, 0.1
# The release's algorithm materialises ~12 k^2 B^2 bytes (Gram tensor, LU, its backward): 3.6 GB
# at k = 3, B = 4096 on this machine. Skip it (and the reference, which also builds per-pair
# k x k matrices) where that estimate exceeds this budget.
MATERIALISED_BUDGET = 6 * 2**30
FLOOR_BLOCK_ROWS = 2048


def _gemm_count(mode: str, k: int) -> int:
    return {"fwd": 1, "bwd": 3, "fwd+bwd": 4}[mode] * (k - 1)


def _release_volume(anchor, *modalities):
    """GRAM release's algorithm: the [B1, B2, k, k] Gram tensor stacked from its entries (anchor x
    modality by GEMM, modality x modality per sample, broadcast), then det and sqrt(abs)."""
    b1, b2 = anchor.shape[0], modalities[0].shape[0]
    k = len(modalities) + 1
    entries = [[None] * k for _ in range(k)]
    entries[0][0] = (anchor * anchor).sum(-1)[:, None].expand(b1, b2)
    for p, m in enumerate(modalities, start=1):
        entries[0][p] = entries[p][0] = anchor @ m.t()
        for q, n in enumerate(modalities, start=1):
            entries[p][q] = (m * n).sum(-1)[None, :].expand(b1, b2)
    gram = torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)  # [B1, B2, k, k]
    return torch.sqrt(torch.abs(torch.det(gram.float())))


def _release_loss(anchor, *modalities):
    vol = _release_volume(anchor, *modalities)
    target = torch.arange(vol.shape[0], device=vol.device)
    return (
        F.cross_entropy(-vol / TAU, target, label_smoothing=SMOOTHING)
        + F.cross_entropy(-vol.t() / TAU, target, label_smoothing=SMOOTHING)
    ) / 2


def _floor(provider: str, tensors, mode: str, k: int):
    """The GEMMs of the fused op as plain torch.mm, or as fastbind's tile GEMM (see _harness.gemm_floor)."""
    kind = "brgemm" if provider == "gemm-floor-brgemm" else "torch"
    return gemm_floor(tensors[0], tensors[1], _gemm_count(mode, k), FLOOR_BLOCK_ROWS, kind)


def build(
    provider: str, mode: str, device: str = "cpu", B: int = 1024, k: int = 3, D: int = 256, dtype: str = "float32"
):
    if provider == "fastbind-triton" and not torch.cuda.is_available():
        raise SkipCase("fastbind-triton needs a CUDA GPU")
    if provider in ("fastbind-cpu", "gemm-floor-brgemm") and device != "cpu":
        raise SkipCase(f"{provider} runs on CPU tensors")
    materialised = 12 * k * k * B * B
    if provider in ("gram-official-style", "reference") and materialised > MATERIALISED_BUDGET:
        raise SkipCase(f"needs ~{materialised / 2**30:.0f} GB for the [B, B, k, k] Gram tensor and det")
    import fastbind as fb

    g = torch.Generator().manual_seed(0)
    tensors = [F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device, getattr(torch, dtype)) for _ in range(k)]
    if provider.startswith("gemm-floor"):
        return _floor(provider, tensors, mode, k)
    if provider == "gram-official-style":
        loss_fn = _release_loss
    else:
        backend = {"fastbind-cpu": "cpu", "fastbind-triton": "triton", "reference": "torch"}[provider]

        def loss_fn(*ts):
            return fb.gram_loss(*ts, temperature=TAU, label_smoothing=SMOOTHING, backend=backend)

    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                loss_fn(*tensors)

        return fwd
    leaves = [t.requires_grad_(True) for t in tensors]
    if mode == "bwd":

        def prepare():
            for t in leaves:
                t.grad = None
            return loss_fn(*leaves)

        return prepare, lambda loss: loss.backward()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        loss_fn(*leaves).backward()

    return fwd_bwd


def cases(quick: bool = False):
    providers = [p for p in PROVIDERS if p != "fastbind-triton" or torch.cuda.is_available()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quick:
        for B in (512,):  # one size: each case is a fresh subprocess (a few seconds to start)
            for provider in providers:
                yield Case(NAME, provider, "fwd+bwd", dict(B=B, k=3, D=256), device=device, repeat=3)
        return
    for k in (3, 4):
        for D in (256, 512):
            for B in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
                for mode in MODES:
                    for provider in providers:
                        repeat = 5 if B <= 4096 else 2
                        yield Case(NAME, provider, mode, dict(B=B, k=k, D=D), device=device, repeat=repeat)


def main(quick: bool = False, echo=print, only=None):
    """Run the cases (optionally only those matching `only(case)`), write CSV + PNG."""
    selected = [c for c in cases(quick) if only is None or only(c)]
    rows = run_cases(selected, RATIOS, NAME, echo=echo, timeout=1800)
    png = os.path.join(RESULTS, f"{NAME}.png")
    plot(rows, png, x="B", title="gram_loss (float32)", group_by=("k", "D"))
    echo(f"wrote {os.path.relpath(png)}")
    return rows


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
