"""Reference (plain PyTorch) codebook lookup, quantisation and TOC dimension selection (DESIGN §2.4).

These functions are the ``torch`` backend and the oracle of the tests: they work in any floating
dtype (float64 for tests), are differentiable by autograd where stated, and materialise the full
N×K distance matrix (the fused kernels never do) but nothing larger: memory O(N·K + K·D + N·D).

Metrics, for a row x [D] and a code e [D], with a non-negative per-dimension weight w (1 if None):

* ``"l2"``:     Σ_d w_d (x_d − e_d)²        (squared weighted Euclidean distance)
* ``"cosine"``: 1 − Σ_d w_d x̂_d ê_d with x̂ = x/‖x‖_w, ê = e/‖e‖_w, ‖v‖_w = sqrt(Σ_d w_d v_d²): the
  cosine distance in the weighted space (with a 0/1 TOC mask, the cosine of the kept dimensions)
* ``"dot"``:    −Σ_d w_d x_d e_d

Smaller is closer for every metric; the k returned codes are sorted by increasing distance and ties
go to the lowest code index (as ``torch.argmin``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint

from fastbind._constants import METRICS
from fastbind._constants import NORM_EPS as _NORM_EPS


def weighted_norm(v: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """‖v‖_w over the last dim (keepdim), clamped below by a tiny epsilon."""
    sq = v * v if weight is None else v * v * weight
    # Clamp before the sqrt: a zero vector then has a finite (zero) gradient, not inf·0 = NaN.
    return sq.sum(-1, keepdim=True).clamp_min(_NORM_EPS * _NORM_EPS).sqrt()


def paired_distance(
    x: torch.Tensor, codes: torch.Tensor, metric: str = "l2", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Distance of each row of x [..., D] to the code at the same position of codes [..., D]
    (broadcasting) -> [...]: the metric formulas above, computed directly."""
    if metric == "l2":
        sq = (x - codes).square()
        return (sq if weight is None else sq * weight).sum(-1)
    if metric == "cosine":
        x = x / weighted_norm(x, weight)
        codes = codes / weighted_norm(codes, weight)
    prod = x * codes if weight is None else x * codes * weight
    return (1.0 - prod.sum(-1)) if metric == "cosine" else -prod.sum(-1)


def _l2_block(x: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return paired_distance(x[:, None, :], codes[None, :, :], "l2", weight)


def pairwise_distance(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Full distance matrix [N, K] between x [N, D] and codebook [K, D] (computed directly, no
    expansion trick, so it is exact up to the dtype's rounding).

    Memory O(N·K): "l2" forms the differences x_i − e_j for blocks of max(1, K // D) codes at a
    time (a block's [N, K/D, D] differences are no larger than the [N, K] result), and when
    differentiated each block is recomputed in the backward (torch.utils.checkpoint) instead of
    keeping the differences, so no N×K×D tensor exists in the forward or the backward.
    """
    if metric == "l2":
        num_codes, dim = codebook.shape
        step = max(1, num_codes // max(dim, 1))
        inputs = (x, codebook) if weight is None else (x, codebook, weight)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            blocks = [
                torch.utils.checkpoint.checkpoint(_l2_block, x, codebook[c0 : c0 + step], weight, use_reentrant=False)
                for c0 in range(0, num_codes, step)
            ]
            return torch.cat(blocks, dim=1)
        # Without autograd: the same operations into one reused work buffer and the preallocated
        # result (a fresh [N, K/D, D] temporary per block fragments the C heap: 2.5 GB peak RSS
        # instead of 0.5 GB at N = 1000, K = 4096, D = 64 in float64).
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in inputs])
        out = torch.empty(x.shape[0], num_codes, dtype=dtype, device=x.device)
        work = torch.empty(x.shape[0], step, dim, dtype=dtype, device=x.device)
        for c0 in range(0, num_codes, step):
            codes = codebook[c0 : c0 + step]
            diff = torch.sub(x[:, None, :], codes[None], out=work[:, : codes.shape[0]]).square_()
            if weight is not None:
                diff.mul_(weight)
            torch.sum(diff, -1, out=out[:, c0 : c0 + codes.shape[0]])
        return out
    if metric == "cosine":
        x = x / weighted_norm(x, weight)
        codebook = codebook / weighted_norm(codebook, weight)
        if weight is not None:
            x = x * weight
        return 1.0 - x @ codebook.T
    if metric == "dot":
        if weight is not None:
            x = x * weight
        return -(x @ codebook.T)
    raise ValueError(f"pairwise_distance: metric must be one of {METRICS}, got {metric!r}")


def codebook_lookup(
    x: torch.Tensor,
    codebook: torch.Tensor,
    k: int = 1,
    metric: str = "l2",
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest codes of every row of x.

    x [..., D], codebook [K, D], weight [D] or None -> (dist [..., k] in x's dtype, index [..., k] int64).
    ``dist`` is differentiable w.r.t. x, codebook and weight; ties go to the lowest index. Memory
    O(N·K) forward and backward (N = rows of x; see :func:`pairwise_distance`).
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    # l2: the full matrix without autograd, then the k winners' distances recomputed on the tape by
    # the same operations (the same values; the backward is O(N·k·D) instead of recomputing every
    # block). cosine / dot: the full matrix is a GEMM whose backward is O(N·K) anyway.
    with torch.no_grad() if metric == "l2" else contextlib.nullcontext():
        dist = pairwise_distance(flat, codebook, metric, weight)
    # A stable ascending sort keeps equal distances in index order: ties to the lowest index.
    order = torch.sort(dist.detach(), dim=1, stable=True).indices[:, :k]
    if metric == "l2":
        best = paired_distance(flat[:, None, :], codebook[order], "l2", weight)
    else:
        best = dist.gather(1, order)
    return best.reshape(*lead, k), order.reshape(*lead, k)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """x + (q − x).detach(): the value of q, the gradient of the identity w.r.t. x."""
    return x + (quantized - x).detach()


def quantize(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest-code quantisation with a straight-through gradient.

    Returns (quantized [..., D], index [...] int64, sqdist [...]):
    * ``quantized`` has the value codebook[index] and passes its gradient unchanged to x;
    * ``sqdist`` = Σ_d w_d (x_d − e_d)² for the chosen code (whatever the metric chose it), the
      commitment term: differentiable w.r.t. x and (through the gathered code) the codebook, so
      ``sqdist.mean()`` is the commitment loss and ``‖sg(x) − e‖²`` a codebook loss can be built
      from it by detaching x.
    """
    _, index = codebook_lookup(x.detach(), codebook.detach(), 1, metric, None if weight is None else weight.detach())
    index = index[..., 0]
    code = codebook[index]
    return straight_through(x, code), index, paired_distance(x, code, "l2", weight)


def toc_scores(codebook: torch.Tensor, alpha: float = 0.7, beta: float = 0.0) -> torch.Tensor:
    """TOC score of every dimension of a codebook E [K, D] -> [D].

    sim_d = ((Σ_i E_id)² − Σ_i E_id²) / (K(K−1))  (mean product of distinct code pairs in dim d),
    score_d = −α·sim_d + β·Var_d with the unbiased variance over the K codes (divisor K − 1), as
    CMG's TOC (``torch.var``'s default) computes it. Needs K ≥ 2.
    """
    num_codes = codebook.shape[0]
    col_sum = codebook.sum(0)
    sim = (col_sum * col_sum - (codebook * codebook).sum(0)) / (num_codes * (num_codes - 1))
    score = -alpha * sim
    if beta != 0.0:
        score = score + beta * codebook.var(0, correction=1)
    return score


def toc_select(codebook: torch.Tensor, keep: int, alpha: float = 0.7, beta: float = 0.0) -> torch.Tensor:
    """Indices [keep] (int64) of the `keep` highest-scoring TOC dimensions, best first; equal scores
    keep the lower dimension first."""
    scores = toc_scores(codebook, alpha, beta)
    return torch.sort(scores.detach(), descending=True, stable=True).indices[:keep]


def toc_mask(codebook: torch.Tensor, keep: int, alpha: float = 0.7, beta: float = 0.0) -> torch.Tensor:
    """0/1 weight [D] (codebook's dtype) selecting the `keep` TOC dimensions, for the lookup's ``weight``."""
    mask = torch.zeros(codebook.shape[1], dtype=codebook.dtype, device=codebook.device)
    mask[toc_select(codebook, keep, alpha, beta)] = 1
    return mask
