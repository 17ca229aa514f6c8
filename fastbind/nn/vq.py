"""VectorQuantizer: an EMA codebook over the fused lookup, with CMG's shared multimodal codebook.

``quantized, indices, loss = vq(x)`` follows vector-quantize-pytorch's convention. With
``modalities = M > 1`` the layer is CMG's shared codebook (DESIGN §2.4, PEERS "CMG / TOC"): pass a
list/tuple of M tensors of *paired* tokens (equal leading shapes; token t of every modality
belongs to the same sample and segment) and get lists of M quantized tensors and M index tensors
back, plus one scalar loss.

Training step (``self.training`` and not frozen), all statistics in float32, under ``no_grad``:

1. first batch only: codebook initialisation from the batch's tokens (all modalities pooled):
   ``"kmeans++"`` seeding or ``"random"`` distinct samples (``"none"``: keep the codebook, e.g.
   set by :meth:`initialize`);
2. lookup of every modality with the *current* codebook (fused :func:`fastbind.codebook_lookup`,
   optionally with the kept-dimension weight of :meth:`set_dim_weight` / :meth:`apply_toc`);
3. EMA, sequentially for m = 1..M exactly as CMG codes its MM-EMA, with A^m the one-hot
   assignments of modality m [N, K] and n = Σ_k N_k:

       N ← γ·N + (1−γ)·colsum(A^m)
       N ← (N + ε) / (n + K·ε) · n                                   (Laplace smoothing, stored)
       o ← γ·o + (1−γ)·(w_self·A^mᵀ z^m + Σ_{m'≠m} w_cross·A^mᵀ z^{m'})
       E ← o / N

   For M = 1 this is the usual EMA codebook (w_self = 1). The batch statistics colsum(A^m) and
   the scattered sums are all-reduced (summed) over the default process group when
   ``torch.distributed`` is initialised, so every rank applies the update of the global batch;
4. dead codes: a code no modality has used for ``dead_code_steps`` steps is replaced by a randomly
   chosen code used in this step plus small noise, and its EMA sum *and* count are reset with it
   (count 1, sum = the new code), so the next EMA step keeps it (CMG resets only the code, and the
   next EMA step undoes the reset). Under torch.distributed rank 0's replacement is broadcast.

Loss (the codebook is a buffer, so it carries no codebook term), MSE over elements:

* M = 1: ``commitment · MSE(z, sg(q))``;
* M > 1 (CMG): Σ_m [2·commitment·MSE(z^m, sg(q^m)) + Σ_{m'≠m} c·commitment·MSE(z^m, sg(q^{m'}))]
  with c = 1/(M−1) (1 for two modalities, ½ for three);
* plus ``matching_weight`` × CMG's cross-modal code matching loss (:func:`code_matching_loss`),
  when ``matching_weight > 0`` and M > 1.

With a dimension weight (TOC mask) the lookup and the commitment distances use the weighted
squared distance (divided by D).

``state_dict`` holds the codebook, EMA sums/counts, per-code last-use steps and, as extra state,
the step counter, flags and the state of the layer's own random generator (initialisation and
dead-code noise), so a reloaded layer continues training bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from fastbind.ops.codebook import codebook_lookup
from fastbind.reference.codebook import straight_through, toc_mask

INITS = ("kmeans++", "random", "none")
# Noise added to a replacement code, relative to the RMS of the code it copies: far below the
# typical code spacing, enough that the copy and its source split under the next assignments.
_REPLACE_NOISE = 1e-2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the default process group in place (no-op without torch.distributed)."""
    if _distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _broadcast_(*tensors: torch.Tensor) -> None:
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


def code_matching_loss(
    xs: Sequence[torch.Tensor], codebook: torch.Tensor, temperature: float = 1.0, eps: float = 1e-12
) -> torch.Tensor:
    """CMG's cross-modal code matching loss with a proper log-sum-exp.

    xs: M ≥ 2 tensors [B, T..., D] of paired tokens (T... segments, possibly none). Per token the
    soft assignment is p = softmax_k(−sqrt(max(d_k, eps))) with d the squared distances to the K
    codes; P^m [B, K] is p averaged over the segments (log P^m is computed as a log-mean-exp of the
    log-softmaxes). For each pair (a, b): S_ij = Σ_k P^a_ik log P^b_jk + Σ_k P^b_jk log P^a_ik
    [B, B], and the pair's loss is ½·(mean_i CE(S_i:/τ, i) + mean_j CE(S_:j/τ, j)) with exact
    log-sum-exp; the result is the sum over pairs. Differentiable w.r.t. xs (materialises
    [B·T, K] soft assignments: keep it for CMG-sized batches).
    """
    logp = []
    for x in xs:
        b = x.shape[0]
        z = x.reshape(b, -1, x.shape[-1]).float()
        d = (
            z.square().sum(-1, keepdim=True) - 2 * z @ codebook.float().T + codebook.float().square().sum(-1)
        ).clamp_min(eps)
        log_soft = torch.log_softmax(-d.sqrt(), dim=-1)  # [B, T, K]
        logp.append(torch.logsumexp(log_soft, dim=1) - math.log(log_soft.shape[1]))  # log P [B, K]
    total = xs[0].new_zeros((), dtype=torch.float32)
    for a in range(len(xs)):
        for b in range(a + 1, len(xs)):
            pa, pb = logp[a].exp(), logp[b].exp()
            sim = (pa @ logp[b].T + (pb @ logp[a].T).T) / temperature  # S_ij
            target = torch.arange(sim.shape[0], device=sim.device)
            row = torch.nn.functional.cross_entropy(sim, target)
            col = torch.nn.functional.cross_entropy(sim.T, target)
            total = total + 0.5 * (row + col)
    return total


class VectorQuantizer(nn.Module):
    """EMA vector quantiser (see the module docstring for the exact update and loss).

    Args:
        num_codes: K. dim: D.
        decay: EMA decay γ. eps: Laplace smoothing ε. commitment: β.
        metric: lookup metric (``"l2"``, ``"cosine"``, ``"dot"``); the EMA always averages raw vectors.
        dead_code_steps: replace a code unused for this many training steps (0 disables).
        modalities: M; M > 1 takes lists of M paired token tensors (CMG's shared codebook).
        init: ``"kmeans++"``, ``"random"`` (from the first training batch) or ``"none"``.
        w_self, w_cross: MM-EMA weights (default ½ and ½/(M−1): CMG's ½/½ and ½/¼/¼).
        cross_commitment: c of the cross-modal commitment terms (default 1/(M−1)).
        matching_weight, matching_temperature: weight and τ of :func:`code_matching_loss` (M > 1).
        backend: backend of the lookup (None: automatic).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment: float = 0.25,
        metric: str = "l2",
        dead_code_steps: int = 300,
        modalities: int = 1,
        init: str = "kmeans++",
        w_self: float | None = None,
        w_cross: float | None = None,
        cross_commitment: float | None = None,
        matching_weight: float = 0.0,
        matching_temperature: float = 1.0,
        backend: str | None = None,
    ):
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise ValueError(f"VectorQuantizer: need num_codes >= 2 and dim >= 1, got {num_codes}, {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1), got {decay}")
        if modalities < 1:
            raise ValueError(f"VectorQuantizer: modalities must be >= 1, got {modalities}")
        if init not in INITS:
            raise ValueError(f"VectorQuantizer: init must be one of {INITS}, got {init!r}")
        if metric not in ("l2", "cosine", "dot"):
            raise ValueError(f"VectorQuantizer: metric must be 'l2', 'cosine' or 'dot', got {metric!r}")
        self.num_codes, self.dim, self.modalities = num_codes, dim, modalities
        self.decay, self.eps, self.commitment, self.metric = decay, eps, commitment, metric
        self.dead_code_steps, self.init, self.backend = dead_code_steps, init, backend
        cross = max(modalities - 1, 1)
        self.w_self = (0.5 if modalities > 1 else 1.0) if w_self is None else w_self
        self.w_cross = 0.5 / cross if w_cross is None else w_cross
        self.cross_commitment = 1.0 / cross if cross_commitment is None else cross_commitment
        self.matching_weight, self.matching_temperature = matching_weight, matching_temperature

        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.int64))
        self.register_buffer("dim_weight", torch.ones(dim))
        self.step = 0
        self.replaced = 0  # dead codes replaced so far
        self.initialized = init == "none"
        self.frozen = False
        self.weighted = False
        self._rng = torch.Generator()
        self._rng.manual_seed(int(torch.randint(0, 2**62, ())))  # follows torch.manual_seed
        self.perplexity: list[torch.Tensor] = []
        self.code_usage: list[torch.Tensor] = []

    # ------------------------------------------------------------------ state
    def get_extra_state(self):
        return {
            "step": self.step,
            "replaced": self.replaced,
            "initialized": self.initialized,
            "frozen": self.frozen,
            "weighted": self.weighted,
            "rng_state": self._rng.get_state(),
        }

    def set_extra_state(self, state):
        self.step = int(state["step"])
        self.replaced = int(state["replaced"])
        self.initialized = bool(state["initialized"])
        self.frozen = bool(state["frozen"])
        self.weighted = bool(state["weighted"])
        self._rng.set_state(state["rng_state"])

    def freeze(self) -> VectorQuantizer:
        """Stop every codebook update (init, EMA, dead codes), also in training mode: inference."""
        self.frozen = True
        return self

    def unfreeze(self) -> VectorQuantizer:
        self.frozen = False
        return self

    @torch.no_grad()
    def initialize(self, codebook: torch.Tensor) -> None:
        """Set the codebook [K, D]; EMA count 1 and sum = code for every code; no further init."""
        if codebook.shape != self.codebook.shape:
            raise ValueError(
                f"VectorQuantizer.initialize: codebook has shape {list(codebook.shape)}, "
                f"expected {list(self.codebook.shape)}"
            )
        self.codebook.copy_(codebook)
        self.ema_count.fill_(1.0)
        self.ema_sum.copy_(self.codebook)
        self.last_used.fill_(self.step)
        self.initialized = True

    @torch.no_grad()
    def set_dim_weight(self, weight: torch.Tensor | None) -> None:
        """Non-negative per-dimension weight [D] of the lookup (None: unweighted)."""
        if weight is None:
            self.dim_weight.fill_(1.0)
            self.weighted = False
            return
        if weight.shape != (self.dim,) or bool((weight < 0).any()):
            raise ValueError(
                f"VectorQuantizer.set_dim_weight: need a non-negative [{self.dim}] weight, got {list(weight.shape)}"
            )
        self.dim_weight.copy_(weight)
        self.weighted = True

    def apply_toc(self, keep: int, alpha: float = 0.7, beta: float = 0.0) -> torch.Tensor:
        """Keep the `keep` best TOC dimensions of the current codebook (0/1 lookup weight); returns the mask."""
        mask = toc_mask(self.codebook, keep, alpha, beta)
        self.set_dim_weight(mask)
        return mask

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        multi = self.modalities > 1
        xs = self._check_inputs(x)
        flat = [t.reshape(-1, self.dim) for t in xs]
        update = self.training and not self.frozen
        if update and not self.initialized:
            self._init_codebook(torch.cat([f.detach().float() for f in flat]))
        weight = self.dim_weight if self.weighted else None
        codebook = self.codebook
        outs, indices, codes = [], [], []
        for f in flat:
            _, index = codebook_lookup(f.detach(), codebook, 1, self.metric, weight, backend=self.backend)
            index = index[:, 0]
            code = codebook[index]
            outs.append(straight_through(f, code.to(f.dtype)))
            indices.append(index)
            codes.append(code)
        loss = self._loss(flat, codes, weight)
        if multi and self.matching_weight > 0:
            # a copy: the EMA below updates the buffer in place, the matching loss saves it for backward
            frozen_codes = codebook.detach().clone()
            loss = loss + self.matching_weight * code_matching_loss(xs, frozen_codes, self.matching_temperature)
        counts = self._update(flat, indices) if update else self._counts(indices)
        self._record_statistics(counts)
        quantized = [q.reshape(t.shape) for q, t in zip(outs, xs)]
        index_out = [i.reshape(t.shape[:-1]) for i, t in zip(indices, xs)]
        if multi:
            return quantized, index_out, loss
        return quantized[0], index_out[0], loss

    def _check_inputs(self, x) -> list[torch.Tensor]:
        if self.modalities > 1:
            if not isinstance(x, (list, tuple)) or len(x) != self.modalities:
                raise TypeError(
                    f"VectorQuantizer: expected a list of {self.modalities} tensors (one per modality), "
                    f"got {type(x).__name__}"
                )
            xs = list(x)
        else:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"VectorQuantizer: expected a tensor [..., {self.dim}], got {type(x).__name__}")
            xs = [x]
        for m, t in enumerate(xs):
            if t.dim() < 1 or t.shape[-1] != self.dim or t.numel() == 0:
                raise ValueError(
                    f"VectorQuantizer: input {m} has shape {list(t.shape)}, expected non-empty [..., {self.dim}]"
                )
            if t.shape != xs[0].shape:
                raise ValueError(
                    f"VectorQuantizer: modality {m} has shape {list(t.shape)}, "
                    f"expected {list(xs[0].shape)} (paired tokens)"
                )
        return xs

    def _loss(self, flat, codes, weight) -> torch.Tensor:
        def mse(z, code):
            sq = (z.float() - code.detach().float()).square()
            if weight is not None:
                sq = sq * weight
            return sq.mean()

        if len(flat) == 1:
            return self.commitment * mse(flat[0], codes[0])
        loss = flat[0].new_zeros((), dtype=torch.float32)
        for m, z in enumerate(flat):
            loss = loss + 2 * self.commitment * mse(z, codes[m])
            for n in range(len(flat)):
                if n != m:
                    loss = loss + self.cross_commitment * self.commitment * mse(z, codes[n])
        return loss

    def _counts(self, indices) -> list[torch.Tensor]:
        return [torch.bincount(i, minlength=self.num_codes).float() for i in indices]

    @torch.no_grad()
    def _update(self, flat, indices) -> list[torch.Tensor]:
        """MM-EMA step (module docstring), dead-code replacement; returns the global batch counts."""
        z = [f.detach().float() for f in flat]
        counts = self._counts(indices)
        sums = []
        for m, index in enumerate(indices):
            mixed = torch.zeros_like(self.ema_sum)
            for n, zn in enumerate(z):
                w = self.w_self if n == m else self.w_cross
                mixed.index_add_(0, index, zn, alpha=w)
            sums.append(mixed)
        _all_reduce_(*counts, *sums)
        gamma, k = self.decay, self.num_codes
        for count, mixed in zip(counts, sums):
            self.ema_count.mul_(gamma).add_(count, alpha=1 - gamma)
            n = self.ema_count.sum()
            self.ema_count.copy_((self.ema_count + self.eps) / (n + k * self.eps) * n)
            self.ema_sum.mul_(gamma).add_(mixed, alpha=1 - gamma)
            self.codebook.copy_(self.ema_sum / self.ema_count[:, None])
        self.step += 1
        used = torch.stack(counts).sum(0) > 0
        self.last_used[used] = self.step
        if self.dead_code_steps > 0:
            self._replace_dead(used)
        return counts

    @torch.no_grad()
    def _replace_dead(self, used: torch.Tensor) -> None:
        dead = torch.nonzero(self.step - self.last_used >= self.dead_code_steps).flatten()
        active = torch.nonzero(used).flatten()
        if dead.numel() == 0 or active.numel() == 0:
            return
        pick = torch.randint(0, active.numel(), (dead.numel(),), generator=self._rng).to(active.device)
        source = self.codebook[active[pick]]
        scale = source.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-6) * _REPLACE_NOISE
        noise = torch.randn(source.shape, generator=self._rng).to(source.device) * scale
        new_codes = (source + noise).contiguous()
        _broadcast_(new_codes)
        self.codebook[dead] = new_codes
        self.ema_sum[dead] = new_codes
        self.ema_count[dead] = 1.0
        self.last_used[dead] = self.step
        self.replaced += int(dead.numel())

    @torch.no_grad()
    def _init_codebook(self, data: torch.Tensor) -> None:
        """k-means++ seeding or random distinct samples from the first batch [N, D]."""
        n = data.shape[0]
        cpu = data.cpu()
        if self.init == "random" or n < self.num_codes:
            # fewer tokens than codes: every token once, the rest drawn with replacement (noise splits them)
            if n >= self.num_codes:
                chosen = torch.randperm(n, generator=self._rng)[: self.num_codes]
            else:
                extra = torch.randint(0, n, (self.num_codes - n,), generator=self._rng)
                chosen = torch.cat([torch.randperm(n, generator=self._rng), extra])
            centers = cpu[chosen].clone()
            if n < self.num_codes:
                centers[n:] += torch.randn(centers[n:].shape, generator=self._rng) * _REPLACE_NOISE * centers.std()
        else:
            centers = torch.empty(self.num_codes, self.dim)
            first = int(torch.randint(0, n, (1,), generator=self._rng))
            centers[0] = cpu[first]
            best = (cpu - centers[0]).square().sum(-1)
            for c in range(1, self.num_codes):
                total = best.sum()
                if total > 0:
                    nxt = int(torch.multinomial(best / total, 1, generator=self._rng))
                else:  # all tokens coincide with a center already
                    nxt = int(torch.randint(0, n, (1,), generator=self._rng))
                centers[c] = cpu[nxt]
                best = torch.minimum(best, (cpu - centers[c]).square().sum(-1))
        centers = centers.to(self.codebook.device)
        _broadcast_(centers)
        self.initialize(centers)

    def _record_statistics(self, counts) -> None:
        self.perplexity, self.code_usage = [], []
        for count in counts:
            p = count / count.sum().clamp_min(1)
            self.perplexity.append(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
            self.code_usage.append((count > 0).float().mean())

    def statistics(self) -> dict:
        """Perplexity and used-code fraction of the last batch (per modality), codes currently unused
        for `dead_code_steps` steps, codes replaced so far, step counter."""
        stale = self.step - self.last_used
        return {
            "perplexity": [float(p) for p in self.perplexity],
            "code_usage": [float(u) for u in self.code_usage],
            "dead_codes": int((stale >= max(self.dead_code_steps, 1)).sum()),
            "replaced_codes": self.replaced,
            "step": self.step,
        }

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, modalities={self.modalities}, decay={self.decay}, "
            f"metric={self.metric!r}, commitment={self.commitment}, dead_code_steps={self.dead_code_steps}"
        )
