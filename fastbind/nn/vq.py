"""VectorQuantizer: an EMA codebook over the fused lookup, with CMG's shared multimodal codebook.

``quantized, indices, loss = vq(x)`` follows vector-quantize-pytorch's convention. With
``modalities = M > 1`` the layer is CMG's shared codebook (DESIGN §2.4, PEERS "CMG / TOC"): pass a
list/tuple of M tensors of *paired* tokens (equal leading shapes; token t of every modality
belongs to the same sample and segment) and get lists of M quantized tensors and M index tensors
back, plus one scalar loss.

Training step (``self.training`` and not frozen), under ``no_grad``. The EMA statistics
(``ema_count``, ``ema_sum``) are kept in float32 whatever the module's dtype (float64 for a float64
module: CMG trains in float64), so ``.half()``, ``.bfloat16()``, ``.double()`` and ``.to(dtype)``
all train; the codebook buffer follows the module's dtype and is the rounded value of E below.

1. first batch only: codebook initialisation from the batch's tokens (all modalities pooled):
   ``"kmeans++"`` seeding or ``"random"`` distinct samples (``"none"``: keep the codebook). A
   codebook set explicitly first — :meth:`initialize` or ``vq.codebook = tensor`` — counts as
   initialised and is never overwritten. Initialisation sets o = E and N = 1 for every code
   (``count_init="one"``, the default: an initial code is the mean of one pseudo-token, so a code
   no token picks stays where it was put) or N = 0 (``count_init="zero"``, CMG's start: the first
   EMA update gives a different codebook, and a code unused in the first steps becomes
   o/(smoothed ≈ ε) — far out, effectively dead until replaced);
2. lookup of every modality with the *current* codebook (fused :func:`fastbind.codebook_lookup`,
   optionally with the kept-dimension weight of :meth:`set_dim_weight` / :meth:`apply_toc`);
3. EMA, sequentially for m = 1..M exactly as CMG codes its MM-EMA, with A^m the one-hot
   assignments of modality m [N, K] and n = Σ_k N_k:

       N ← γ·N + (1−γ)·colsum(A^m)
       N ← (N + ε) / (n + K·ε) · n                                   (Laplace smoothing, stored)
       o ← γ·o + (1−γ)·(w_self·A^mᵀ z^m + Σ_{m'≠m} w_cross·A^mᵀ z^{m'})
       E ← o / N

   For M = 1 this is the usual EMA codebook (w_self = 1). ``laplace="stored"`` (the default, as
   CMG) writes the smoothed counts back into N; ``laplace="copy"`` (vector-quantize-pytorch's
   convention) keeps the raw EMA in N and divides by a smoothed copy, E ← o / smooth(N). The two
   differ for codes that stay unused for long: with "stored" the ε added every step compounds, the
   count of an unused code stops decaying near ε/(1−γ) while o keeps decaying by γ, so the code
   shrinks towards 0 after about ln(ε/(1−γ))/ln γ steps (≈ 690 at γ = 0.99, ε = 1e-5); with
   "copy" the divisor is about N + ε and the code starts shrinking only once γ^t ≈ ε (≈ 1150
   steps). Dead-code replacement (below) usually replaces such codes long before.
   Token positions with a non-finite value in any modality are kept out of every statistic (counts,
   sums, initialisation; ``statistics()["nonfinite_tokens"]`` counts them, with a warning): their
   outputs are NaN (NaN in, NaN out), the codebook stays finite. The batch statistics colsum(A^m) and
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

In eval mode (or frozen) the returned loss is still the commitment (+ matching) loss of the batch
against the current codebook — useful as a validation metric; vector-quantize-pytorch returns 0 in
eval mode.

``state_dict`` holds the codebook, EMA sums/counts, per-code last-use steps and, as extra state,
the step counter, flags and the state of the layer's own random generator (initialisation and
dead-code noise), so a reloaded layer continues training bit-identically.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from fastbind.distributed import all_reduce_sum_, broadcast_
from fastbind.ops.codebook import codebook_lookup, straight_through, toc_select

INITS = ("kmeans++", "random", "none")
COUNT_INITS = ("one", "zero")
LAPLACE = ("stored", "copy")
# Noise added to a replacement code, relative to the RMS of the code it copies: far below the
# typical code spacing, enough that the copy and its source split under the next assignments.
_REPLACE_NOISE = 1e-2


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"VectorQuantizer: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"VectorQuantizer: {name} must be >= {low}, got {value}")
    return value


def _check_real(name: str, value, ok, what: str) -> float:
    """A finite Python number with ok(value) true; `what` describes the valid range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"VectorQuantizer: {name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"VectorQuantizer: {name} must be {what}, got {value}")
    return value


def _check_finite_tensor(fn: str, name: str, value, shape: tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"VectorQuantizer.{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"VectorQuantizer.{fn}: {name} has dtype {value.dtype}, expected a floating dtype")
    if tuple(value.shape) != shape:
        raise ValueError(f"VectorQuantizer.{fn}: {name} has shape {list(value.shape)}, expected {list(shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"VectorQuantizer.{fn}: {name} has non-finite (NaN or inf) entries")


def code_matching_loss(
    xs: Sequence[torch.Tensor],
    codebook: torch.Tensor,
    temperature: float = 1.0,
    eps: float = 1e-12,
    form: str = "symmetric",
) -> torch.Tensor:
    """CMG's cross-modal code matching loss with a proper log-sum-exp.

    xs: M ≥ 2 tensors [B, T..., D] of paired tokens (T... segments, possibly none). Per token the
    soft assignment is p = softmax_k(−sqrt(max(d_k, eps))) with d the squared distances to the K
    codes; P^m [B, K] is p averaged over the segments (log P^m is computed as a log-mean-exp of the
    log-softmaxes). For each pair (a, b): S_ij = Σ_k P^a_ik log P^b_jk + Σ_k P^b_jk log P^a_ik
    [B, B], and the pair's loss is ½·(mean_i CE(S_i:/τ, i) + mean_j CE(S_:j/τ, j)) with exact
    log-sum-exp; the result is the sum over pairs. Differentiable w.r.t. xs (materialises
    [B·T, K] soft assignments: keep it for CMG-sized batches).

    ``form="cmg"`` is the loss exactly as CMG's release writes it (with its stabilisers, 1e-10 in
    the log and ε in the denominator, replaced by exact log-space arithmetic): per pair
    S'_ij = Σ_k P^a_ik log P^b_jk + Σ_k P^b_ik log P^a_jk (the second term is *not* transposed) and
    the loss ½·mean_i CE(S'_i:/τ, i), the row direction only. The default ``"symmetric"`` form is a
    proper symmetric InfoNCE: its S is the matrix whose (i, j) entry pairs sample i of a with
    sample j of b in both terms, and both directions are averaged.
    """
    if form not in ("symmetric", "cmg"):
        raise ValueError(f"code_matching_loss: form must be 'symmetric' or 'cmg', got {form!r}")
    if len(xs) < 2:
        raise ValueError(f"code_matching_loss: needs >= 2 modalities, got {len(xs)}")
    for m, x in enumerate(xs):
        if x.dim() < 2:
            raise ValueError(
                f"code_matching_loss: input {m} has shape {list(x.shape)}; the loss contrasts the samples "
                "of a batch, so tokens need a batch dimension [B, ..., D]"
            )
    # float64 when anything is float64 (CMG trains in float64), float32 otherwise
    dtype = torch.float64 if torch.float64 in (codebook.dtype, *(x.dtype for x in xs)) else torch.float32
    cb = codebook.to(dtype)
    logp = []
    for x in xs:
        b = x.shape[0]
        z = x.reshape(b, -1, x.shape[-1]).to(dtype)
        d = (z.square().sum(-1, keepdim=True) - 2 * z @ cb.T + cb.square().sum(-1)).clamp_min(eps)
        log_soft = torch.log_softmax(-d.sqrt(), dim=-1)  # [B, T, K]
        logp.append(torch.logsumexp(log_soft, dim=1) - math.log(log_soft.shape[1]))  # log P [B, K]
    total = xs[0].new_zeros((), dtype=dtype)
    for a in range(len(xs)):
        for b in range(a + 1, len(xs)):
            pa, pb = logp[a].exp(), logp[b].exp()
            target = torch.arange(pa.shape[0], device=pa.device)
            if form == "cmg":
                sim = (pa @ logp[b].T + pb @ logp[a].T) / temperature  # S'_ij
                total = total + 0.5 * torch.nn.functional.cross_entropy(sim, target)
                continue
            sim = (pa @ logp[b].T + (pb @ logp[a].T).T) / temperature  # S_ij
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
        matching_form: ``"symmetric"`` (default) or ``"cmg"`` (CMG's exact form), see
            :func:`code_matching_loss`.
        count_init: ``"one"`` (default) or ``"zero"`` (CMG): the EMA count of every code at
            initialisation (the EMA sum is the code in both cases).
        laplace: ``"stored"`` (default, CMG) or ``"copy"`` (vector-quantize-pytorch): whether the
            Laplace-smoothed counts are written back into ``ema_count`` or only used for the division.
        backend: backend of the lookup (None: automatic).

    Numbers are validated here (a clear ``TypeError``/``ValueError``, never a failure deep inside a
    training step): K ≥ 2, D ≥ 1, M ≥ 1 and ``dead_code_steps`` ≥ 0 are ints; 0 ≤ γ < 1; ε > 0;
    every weight finite and ≥ 0; τ > 0.
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
        matching_form: str = "symmetric",
        count_init: str = "one",
        laplace: str = "stored",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        _check_int("num_codes", num_codes, 2)
        _check_int("dim", dim, 1)
        _check_int("modalities", modalities, 1)
        _check_int("dead_code_steps", dead_code_steps, 0)
        decay = _check_real("decay", decay, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        eps = _check_real("eps", eps, lambda v: v > 0.0, "> 0 (it keeps unused codes' counts positive)")
        nonneg = lambda v: v >= 0.0  # noqa: E731
        commitment = _check_real("commitment", commitment, nonneg, ">= 0")
        matching_weight = _check_real("matching_weight", matching_weight, nonneg, ">= 0")
        matching_temperature = _check_real("matching_temperature", matching_temperature, lambda v: v > 0.0, "> 0")
        for name, value in (("w_self", w_self), ("w_cross", w_cross), ("cross_commitment", cross_commitment)):
            if value is not None:
                _check_real(name, value, nonneg, ">= 0")
        for name, value, choices in (
            ("init", init, INITS),
            ("metric", metric, ("l2", "cosine", "dot")),
            ("matching_form", matching_form, ("symmetric", "cmg")),
            ("count_init", count_init, COUNT_INITS),
            ("laplace", laplace, LAPLACE),
        ):
            if value not in choices:
                raise ValueError(f"VectorQuantizer: {name} must be one of {choices}, got {value!r}")
        self.num_codes, self.dim, self.modalities = num_codes, dim, modalities
        self.decay, self.eps, self.commitment, self.metric = decay, eps, commitment, metric
        self.dead_code_steps, self.init, self.backend = dead_code_steps, init, backend
        self.count_init, self.laplace, self.matching_form = count_init, laplace, matching_form
        cross = max(modalities - 1, 1)
        self.w_self = (0.5 if modalities > 1 else 1.0) if w_self is None else float(w_self)
        self.w_cross = 0.5 / cross if w_cross is None else float(w_cross)
        self.cross_commitment = 1.0 / cross if cross_commitment is None else float(cross_commitment)
        self.matching_weight, self.matching_temperature = matching_weight, matching_temperature

        self.register_buffer("codebook", torch.randn(num_codes, dim))
        self.register_buffer("ema_count", torch.full((num_codes,), 1.0 if count_init == "one" else 0.0))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("last_used", torch.zeros(num_codes, dtype=torch.int64))
        self.register_buffer("dim_weight", torch.ones(dim))
        self.step = 0
        self.replaced = 0  # dead codes replaced so far
        self.nonfinite_tokens = 0  # token positions kept out of the statistics (non-finite values)
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
            "nonfinite_tokens": self.nonfinite_tokens,
            "initialized": self.initialized,
            "frozen": self.frozen,
            "weighted": self.weighted,
            "rng_state": self._rng.get_state(),
        }

    def set_extra_state(self, state):
        self.step = int(state["step"])
        self.replaced = int(state["replaced"])
        self.nonfinite_tokens = int(state.get("nonfinite_tokens", 0))
        self.initialized = bool(state["initialized"])
        self.frozen = bool(state["frozen"])
        self.weighted = bool(state["weighted"])
        self._rng.set_state(state["rng_state"])

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.double()`, `.cuda()`, …: the EMA statistics move with the module but
        stay float32 (float64 when the codebook becomes float64): low-precision running sums would
        lose the (1 − γ)-sized updates, and the batch statistics they absorb are float32."""
        stats = {name: self._buffers[name] for name in ("ema_count", "ema_sum")}
        super()._apply(fn, recurse)
        dtype = torch.float64 if self.codebook.dtype == torch.float64 else torch.float32
        for name, old in stats.items():
            self._buffers[name] = old.to(device=self._buffers[name].device, dtype=dtype)
        return self

    def __setattr__(self, name, value):
        # `vq.codebook = cb` (vector-quantize-pytorch's setter) is an explicit initialisation: the
        # lazy k-means++ of the first training step must not overwrite it. (A meta module, e.g.
        # load_state_dict(assign=True) after construction on "meta", gets the tensor itself.)
        buffers = self.__dict__.get("_buffers", {})
        if name == "codebook" and isinstance(value, torch.Tensor) and name in buffers and not buffers[name].is_meta:
            self.initialize(value)
            return
        super().__setattr__(name, value)

    def freeze(self) -> VectorQuantizer:
        """Stop every codebook update (init, EMA, dead codes), also in training mode: inference."""
        self.frozen = True
        return self

    def unfreeze(self) -> VectorQuantizer:
        self.frozen = False
        return self

    @torch.no_grad()
    def initialize(self, codebook: torch.Tensor) -> None:
        """Set the codebook [K, D] (finite); EMA sum = code and count 1 (``count_init="zero"``: 0)
        for every code; no further initialisation. ``vq.codebook = cb`` does the same."""
        _check_finite_tensor("initialize", "codebook", codebook, (self.num_codes, self.dim))
        self.codebook.copy_(codebook.detach())
        self.ema_count.fill_(1.0 if self.count_init == "one" else 0.0)
        self.ema_sum.copy_(self.codebook)
        self.last_used.fill_(self.step)
        self.initialized = True

    @torch.no_grad()
    def set_dim_weight(self, weight: torch.Tensor | None) -> None:
        """Non-negative, finite per-dimension weight [D] of the lookup with at least one positive
        entry (None: unweighted). An all-zero weight would send every token to code 0."""
        if weight is None:
            self.dim_weight.fill_(1.0)
            self.weighted = False
            return
        _check_finite_tensor("set_dim_weight", "weight", weight, (self.dim,))
        if bool((weight < 0).any()) or not bool((weight > 0).any()):
            raise ValueError(
                "VectorQuantizer.set_dim_weight: weight must be non-negative with at least one positive entry, "
                f"got min {float(weight.min()):g}, max {float(weight.max()):g}"
            )
        self.dim_weight.copy_(weight)
        self.weighted = True

    def apply_toc(self, keep: int, alpha: float = 0.7, beta: float = 0.0) -> torch.Tensor:
        """Keep the `keep` best TOC dimensions of the current codebook (0/1 lookup weight); returns the
        mask. 1 <= keep <= D (checked by :func:`fastbind.toc_select`)."""
        kept = toc_select(self.codebook, keep, alpha, beta)
        mask = torch.zeros_like(self.dim_weight)
        mask[kept] = 1
        self.set_dim_weight(mask)
        return mask

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor], torch.Tensor]:
        multi = self.modalities > 1
        xs = self._check_inputs(x)
        flat = [t.reshape(-1, self.dim) for t in xs]
        update = self.training and not self.frozen
        # Token positions with a non-finite value in any modality: kept out of every statistic (a
        # NaN scattered into the EMA sum would make its code NaN for good).
        finite = torch.stack([torch.isfinite(f.detach()).all(-1) for f in flat]).all(0)
        bad = int(finite.numel() - finite.sum())
        keep = None if bad == 0 else finite
        if bad:
            self._warn_nonfinite(bad, finite.numel(), update)
        if update and not self.initialized:
            pooled = torch.cat([f.detach() if keep is None else f.detach()[keep] for f in flat])
            self._init_codebook(pooled.to(self.ema_sum.dtype))
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
            loss = loss + self.matching_weight * code_matching_loss(
                xs, frozen_codes, self.matching_temperature, form=self.matching_form
            )
        counted = indices if keep is None else [i[keep] for i in indices]
        if update:
            counts = self._update([f if keep is None else f[keep] for f in flat], counted)
        else:
            counts = self._counts(counted)
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
            if not t.is_floating_point():
                raise TypeError(f"VectorQuantizer: input {m} has dtype {t.dtype}, expected a floating dtype")
        if self.modalities > 1 and self.matching_weight > 0 and xs[0].dim() < 2:
            raise ValueError(
                f"VectorQuantizer: matching_weight > 0 contrasts the samples of a batch, so the tokens need a "
                f"batch dimension [B, ..., {self.dim}]; got shape {list(xs[0].shape)}"
            )
        return xs

    def _warn_nonfinite(self, bad: int, total: int, update: bool) -> None:
        self.nonfinite_tokens += bad
        warnings.warn(
            f"VectorQuantizer: {bad} of {total} token positions have non-finite values; their outputs are NaN "
            f"and they are kept out of the codebook statistics{' and the update' if update else ''} "
            f"({self.nonfinite_tokens} so far, statistics()['nonfinite_tokens'])",
            RuntimeWarning,
            stacklevel=3,
        )

    def _loss(self, flat, codes, weight) -> torch.Tensor:
        # float32 (float64 for float64 tokens or codebook), whatever the tokens' dtype
        dtype = torch.float64 if torch.float64 in (flat[0].dtype, codes[0].dtype) else torch.float32

        def mse(z, code):
            sq = (z.to(dtype) - code.detach().to(dtype)).square()
            if weight is not None:
                sq = sq * weight.to(dtype)
            return sq.mean()

        if len(flat) == 1:
            return self.commitment * mse(flat[0], codes[0])
        loss = flat[0].new_zeros((), dtype=dtype)
        for m, z in enumerate(flat):
            loss = loss + 2 * self.commitment * mse(z, codes[m])
            for n in range(len(flat)):
                if n != m:
                    loss = loss + self.cross_commitment * self.commitment * mse(z, codes[n])
        return loss

    def _counts(self, indices) -> list[torch.Tensor]:
        return [torch.bincount(i, minlength=self.num_codes).to(self.ema_count.dtype) for i in indices]

    @torch.no_grad()
    def _update(self, flat, indices) -> list[torch.Tensor]:
        """MM-EMA step (module docstring), dead-code replacement; returns the global batch counts.
        flat/indices: the finite token positions only."""
        z = [f.detach().to(self.ema_sum.dtype) for f in flat]
        counts = self._counts(indices)
        sums = []
        for m, index in enumerate(indices):
            mixed = torch.zeros_like(self.ema_sum)
            for n, zn in enumerate(z):
                w = self.w_self if n == m else self.w_cross
                mixed.index_add_(0, index, zn, alpha=w)
            sums.append(mixed)
        all_reduce_sum_(*counts, *sums)
        gamma, k = self.decay, self.num_codes
        for count, mixed in zip(counts, sums):
            self.ema_count.mul_(gamma).add_(count, alpha=1 - gamma)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + k * self.eps) * n
            if self.laplace == "stored":  # CMG: the smoothed counts replace the EMA counts
                self.ema_count.copy_(smoothed)
            self.ema_sum.mul_(gamma).add_(mixed, alpha=1 - gamma)
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
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
        source = self.codebook[active[pick]].to(self.ema_sum.dtype)
        scale = source.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-6) * _REPLACE_NOISE
        noise = torch.randn(source.shape, generator=self._rng).to(source.device) * scale
        new_codes = (source + noise).contiguous()
        broadcast_(new_codes)
        self.codebook[dead] = new_codes.to(self.codebook.dtype)
        self.ema_sum[dead] = new_codes
        self.ema_count[dead] = 1.0
        self.last_used[dead] = self.step
        self.replaced += int(dead.numel())

    @torch.no_grad()
    def _init_codebook(self, data: torch.Tensor) -> None:
        """k-means++ seeding or random distinct samples from the first batch [N, D] (finite rows; with
        none, the codebook stays uninitialised until a batch has some)."""
        n = data.shape[0]
        if n == 0:
            return
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
            centers = torch.empty(self.num_codes, self.dim, dtype=cpu.dtype)
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
        broadcast_(centers)
        self.initialize(centers)

    def _record_statistics(self, counts) -> None:
        self.perplexity, self.code_usage = [], []
        for count in counts:
            p = count / count.sum().clamp_min(1)
            self.perplexity.append(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
            self.code_usage.append((count > 0).float().mean())

    def statistics(self) -> dict[str, int | list[float]]:
        """Perplexity and used-code fraction of the last batch (per modality, finite tokens only), codes
        currently unused for `dead_code_steps` steps, codes replaced so far, token positions kept out of
        the statistics for non-finite values so far, step counter."""
        stale = self.step - self.last_used
        return {
            "perplexity": [float(p) for p in self.perplexity],
            "code_usage": [float(u) for u in self.code_usage],
            "dead_codes": int((stale >= max(self.dead_code_steps, 1)).sum()),
            "replaced_codes": self.replaced,
            "nonfinite_tokens": self.nonfinite_tokens,
            "step": self.step,
        }

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, modalities={self.modalities}, decay={self.decay}, "
            f"metric={self.metric!r}, commitment={self.commitment}, dead_code_steps={self.dead_code_steps}"
        )
