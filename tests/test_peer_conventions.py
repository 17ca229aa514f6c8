"""Every convention difference documented in docs/switching.md, checked against the peer's formula.

Each peer formula below is written here from the peer's documented maths (paper, README,
docstrings, the shape of its loss code), not copied from its code, and the test checks the
relation that docs/switching.md states. The multi-process relations (GRAM release's training step
and open_clip's ``local_loss`` on several processes) are checked on 2 and 3 gloo processes in
tests/test_distributed.py (``gram_release_step``, ``open_clip_local_loss``, ``open_clip_global_loss``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED

import fastbind as fb
from fastbind.nn import VectorQuantizer
from fastbind.nn.vq import code_matching_loss

F64 = torch.float64
BACKENDS = ["torch", *FUSED]


def _unit(*shape: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _grads(loss: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def _close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# =============================================================================================
# GRAM release (ispamm/GRAM): docs/switching.md "GRAM release"
# =============================================================================================
def release_volume(anchor: torch.Tensor, *modalities: torch.Tensor) -> torch.Tensor:
    """The release's volume [B1, B2]: sqrt(|det G_ij|) of the k x k Gram matrix of
    (anchor_i, m1_j, ..., m_{k-1}_j), built as a [B1, B2, k, k] tensor and torch.det."""
    b1, b2 = anchor.shape[0], modalities[0].shape[0]
    vectors = torch.stack(
        [anchor[:, None, :].expand(b1, b2, -1)] + [m[None, :, :].expand(b1, b2, -1) for m in modalities], dim=2
    )  # [B1, B2, k, D]
    return torch.sqrt(torch.abs(torch.det(vectors @ vectors.transpose(-1, -2))))


def release_step_loss(t, v, a, tau, label_smoothing=0.1):
    """The release's training loss on one process: its feature gather runs under no_grad even for
    one process, so the gathered copies are detached; logits -vol/τ, label smoothing 0.1, the mean
    of the two cross-entropies. Returns (loss, the term the release comments "#d2a", "#a2d")."""
    t_all, v_all, a_all = t.detach(), v.detach(), a.detach()
    targets = torch.arange(t.shape[0])
    commented_d2a = F.cross_entropy(-release_volume(t, v_all, a_all) / tau, targets, label_smoothing=label_smoothing)
    commented_a2d = F.cross_entropy(-release_volume(t_all, v, a).T / tau, targets, label_smoothing=label_smoothing)
    return (commented_d2a + commented_a2d) / 2, commented_d2a, commented_a2d


def release_training_step_with_fastbind(t, v, a, tau, gather=False):
    """docs/switching.md's snippet: the release's training step (gathered copies detached)."""
    row = fb.gram_loss(t, v.detach(), a.detach(), temperature=tau, label_smoothing=0.1, direction="a2d", gather=gather)
    col = fb.gram_loss(t.detach(), v, a, temperature=tau, label_smoothing=0.1, direction="d2a", gather=gather)
    return (row + col) / 2


def _gram_inputs(b=12, d=16, seed=0, dtype=F64):
    t, v, a = (_leaf(_unit(b, d, seed=seed + i, dtype=dtype)) for i in range(3))
    tau = torch.tensor(0.07, dtype=dtype, requires_grad=True)  # the release's learnable τ, init 0.07
    return t, v, a, tau


def test_gram_release_loss_value_and_direction_names():
    """fastbind's gram_loss(label_smoothing=0.1) is the release's loss; fastbind's "a2d" (anchor rows
    ranking data columns) is the term the release comments #d2a, and "d2a" the one it comments #a2d."""
    t, v, a, tau = _gram_inputs()
    loss, commented_d2a, commented_a2d = release_step_loss(t, v, a, tau)
    _close(fb.gram_loss(t, v, a, temperature=tau, label_smoothing=0.1), loss)
    _close(fb.gram_loss(t, v, a, temperature=tau, label_smoothing=0.1, direction="a2d"), commented_d2a)
    _close(fb.gram_loss(t, v, a, temperature=tau, label_smoothing=0.1, direction="d2a"), commented_a2d)
    assert not torch.allclose(commented_d2a, commented_a2d)  # the names are not interchangeable here


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_release_training_step_snippet(backend, device):
    """The snippet reproduces the release's training step: same loss and same gradients for the
    anchor, every modality and τ (on every backend)."""
    dtype = F64 if backend == "torch" else torch.float32
    fb.set_backend(backend)
    t, v, a, tau = _gram_inputs(dtype=dtype)
    ref_inputs = [_leaf(x.double()) for x in (t, v, a, tau)]
    t, v, a, tau = (_leaf(x.to(device)) for x in (t, v, a, tau))
    want, _, _ = release_step_loss(*ref_inputs)
    want_grads = _grads(want, ref_inputs)
    got = release_training_step_with_fastbind(t, v, a, tau)
    got_grads = _grads(got, [t, v, a, tau])
    tol = 1e-9 if dtype == F64 else 2e-4
    _close(got.double().cpu(), want, tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * w.abs().max().item())


def test_gram_exact_gradient_is_the_default():
    """fastbind.gram_loss differentiates the written loss: its gradient is the release formula's
    without the detach, and larger in norm than the release's training gradient (2.98x on these
    random unit inputs; the issue measured about 2x on its own)."""
    t, v, a, tau = _gram_inputs(b=16, d=24, seed=5)
    exact = _grads(fb.gram_loss(t, v, a, temperature=tau, label_smoothing=0.1), [t, v, a])
    targets = torch.arange(t.shape[0])
    vol = release_volume(t, v, a) / tau
    written = (
        F.cross_entropy(-vol, targets, label_smoothing=0.1) + F.cross_entropy(-vol.T, targets, label_smoothing=0.1)
    ) / 2
    for g, w in zip(exact, _grads(written, [t, v, a])):
        _close(g, w)
    release = _grads(release_step_loss(t, v, a, tau)[0], [t, v, a])
    ratio = torch.cat([g.flatten() for g in exact]).norm() / torch.cat([g.flatten() for g in release]).norm()
    assert ratio.item() > 1.5, ratio


def test_gram_module_matches_release_temperature():
    """GramLoss: τ is a parameter initialised to 0.07 and learnt directly, as the release's
    contra_temp; the release's label smoothing must be passed (fastbind's default is 0)."""
    t, v, a, _ = _gram_inputs()
    module = fb.nn.GramLoss(label_smoothing=0.1)
    assert isinstance(module.temperature, torch.nn.Parameter) and module.temperature.item() == pytest.approx(0.07)
    _close(module(t, v, a).double(), release_step_loss(t, v, a, torch.tensor(0.07, dtype=F64))[0], 1e-6)


# =============================================================================================
# open_clip (ClipLoss): docs/switching.md "open_clip"
# =============================================================================================
def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss on one process: logits = logit_scale · image·textᵀ, the mean of the
    image->text and text->image cross-entropies with targets on the diagonal."""
    logits = logit_scale * image @ text.T
    targets = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_logit_scale(backend, device):
    """fb.infonce(image, text, logit_scale=model.logit_scale.exp()) is ClipLoss()(image, text,
    logit_scale): same loss, same gradients (the learnable log-scale included)."""
    dtype = F64 if backend == "torch" else torch.float32
    image, text = _leaf(_unit(10, 8, seed=1, dtype=dtype)), _leaf(_unit(10, 8, seed=2, dtype=dtype))
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)  # open_clip's init
    ref_inputs = [_leaf(x.double()) for x in (image, text, log_scale)]
    image, text, log_scale = (_leaf(x.to(device)) for x in (image, text, log_scale))
    want = clip_loss(ref_inputs[0], ref_inputs[1], ref_inputs[2].exp())
    want_grads = _grads(want, ref_inputs)
    got = fb.infonce(image, text, logit_scale=log_scale.exp(), backend=backend)
    module = fb.nn.InfoNCELoss(backend=backend)(image, text, log_scale.exp())  # ClipLoss's call order
    tol = 1e-9 if dtype == F64 else 2e-5
    _close(got.double().cpu(), want, tol)
    _close(module.double().cpu(), want, tol)
    for g, w in zip(_grads(got, [image, text, log_scale]), want_grads):
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * w.abs().max().item())


def test_open_clip_positional_scale_is_a_temperature():
    """The trap the keyword avoids: a logit scale passed positionally is read as a temperature."""
    image, text = _unit(6, 5, seed=3), _unit(6, 5, seed=4)
    scale = 1 / 0.07
    assert not torch.allclose(fb.infonce(image, text, scale), clip_loss(image, text, torch.tensor(scale, dtype=F64)))
    _close(fb.infonce(image, text, 1 / scale), clip_loss(image, text, torch.tensor(scale, dtype=F64)))


def test_siglip_logit_bias_is_not_a_softmax_parameter():
    """Why fastbind has no logit_bias: adding a bias b to every logit leaves every softmax
    cross-entropy unchanged (SigLIP's bias only matters for its sigmoid loss, a different loss)."""
    image, text = _unit(7, 5, seed=5), _unit(7, 5, seed=6)
    scale = torch.tensor(10.0, dtype=F64)
    logits = scale * image @ text.T
    targets = torch.arange(7)
    shifted = (F.cross_entropy(logits + 3.0, targets) + F.cross_entropy(logits.T + 3.0, targets)) / 2
    _close(shifted, fb.infonce(image, text, logit_scale=scale))


# =============================================================================================
# ImageBind-style fixed anchor: docs/switching.md "ImageBind-style anchors"
# =============================================================================================
def imagebind_loss(anchor: torch.Tensor, modalities, logit_scales) -> torch.Tensor:
    """The ImageBind paper's objective: for each modality M, the symmetric InfoNCE against the image
    anchor, L_{I,M} + L_{M,I} (the *sum* of the two directions, each a mean over the batch), with the
    logit scale of M (its released model multiplies each non-image unit embedding by a per-modality
    scale: text learnable, audio 20, depth 5, thermal 10, IMU 5)."""
    targets = torch.arange(anchor.shape[0])
    total = 0.0
    for z, s in zip(modalities, logit_scales):
        logits = anchor @ (s * z).T
        total = total + F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)
    return total


@pytest.mark.parametrize("backend", BACKENDS)
def test_imagebind_anchor_loss(backend, device):
    """One temperature: imagebind_loss = 2 · anchor_loss(anchor, *modalities, logit_scale=s). Per-
    modality scales: 2 · anchor_loss(anchor, *scaled_embeddings, temperature=1.0) with the embeddings
    as ImageBind's postprocessors return them (unit vector · scale)."""
    dtype = F64 if backend == "torch" else torch.float32
    tol = 1e-9 if dtype == F64 else 2e-5
    anchor = _unit(9, 8, seed=7, dtype=dtype)
    mods = [_unit(9, 8, seed=8 + i, dtype=dtype) for i in range(3)]
    same = imagebind_loss(anchor.double(), [m.double() for m in mods], [14.0] * 3)
    on = [z.to(device) for z in (anchor, *mods)]
    _close(2 * fb.anchor_loss(*on, logit_scale=14.0, backend=backend).double().cpu(), same, tol)
    scales = [20.0, 5.0, 10.0]
    per_modality = imagebind_loss(anchor.double(), [m.double() for m in mods], scales)
    scaled = [s * m for s, m in zip(scales, on[1:])]
    _close(2 * fb.anchor_loss(on[0], *scaled, temperature=1.0, backend=backend).double().cpu(), per_modality, tol)


# =============================================================================================
# Codebook peers: vector-quantize-pytorch, CMG, faiss
# =============================================================================================


def _assign(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest code by squared Euclidean distance (argmin, ties to the lowest index)."""
    return torch.cdist(z.double(), codebook.double()).argmin(-1)


# ---------------------------------------------------------------------------------- CMG


def cmg_mm_ema(codebook, count, weight, zs, decay, eps, w_self, w_cross):
    """CMG's MM-EMA step (its Cross_VQEmbeddingEMA): every modality is assigned with the codebook
    of the start of the step; then, modality by modality, the counts are EMA'd and Laplace-smoothed
    (stored), the sums EMA'd with w_self·(own tokens) + w_cross·(the other modalities' paired
    tokens) scattered by this modality's assignments, and the codebook = sums / counts."""
    k = codebook.shape[0]
    onehots = [F.one_hot(_assign(z, codebook), k).double() for z in zs]
    for m, a in enumerate(onehots):
        count = decay * count + (1 - decay) * a.sum(0)
        n = count.sum()
        count = (count + eps) / (n + k * eps) * n
        dw = sum((w_self if q == m else w_cross) * a.T @ z for q, z in enumerate(zs))
        weight = decay * weight + (1 - decay) * dw
        codebook = weight / count[:, None]
    return codebook, count, weight


@pytest.mark.parametrize("modalities", [2, 3])
def test_cmg_mm_ema_with_its_zero_count_start(modalities):
    """CMG starts ema_count at 0 (ema_weight = the codes): count_init="zero" gives CMG's codebooks
    exactly (float64, as CMG trains); the default count_init="one" differs from step 2 on."""
    torch.manual_seed(0)
    k, d, decay, eps = 9, 6, 0.99, 1e-5
    e0 = torch.randn(k, d, dtype=torch.float64)
    batches = [[torch.randn(2, 5, d, dtype=torch.float64) for _ in range(modalities)] for _ in range(3)]
    w_self, w_cross = 0.5, 0.5 / (modalities - 1)  # CMG: ½ ½ (two), ½ ¼ ¼ (three)

    ours = VectorQuantizer(k, d, modalities=modalities, count_init="zero", dead_code_steps=0, init="none").double()
    ours.initialize(e0)
    default = VectorQuantizer(k, d, modalities=modalities, dead_code_steps=0, init="none").double()
    default.initialize(e0)
    codebook, count, weight = e0.clone(), torch.zeros(k, dtype=torch.float64), e0.clone()
    for step, batch in enumerate(batches, start=1):
        ours(batch)
        default(batch)
        flat = [z.reshape(-1, d) for z in batch]
        codebook, count, weight = cmg_mm_ema(codebook, count, weight, flat, decay, eps, w_self, w_cross)
        torch.testing.assert_close(ours.codebook, codebook, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.ema_count, count, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ours.ema_sum, weight, rtol=1e-12, atol=1e-12)
        if step == 1:  # one EMA step from the same codes: the start only changes unused codes' scale
            assert not torch.allclose(default.ema_count, count)
    assert not torch.allclose(default.codebook, codebook)


def cmg_commitment(zs, codes, beta):
    """CMG: for each modality m, 2β·MSE(z^m, sg(q^m)) + Σ_{m'≠m} c·β·MSE(z^m, sg(q^{m'})), with
    c = 1 for two modalities and ½ for three."""
    c = 1.0 / (len(zs) - 1)
    total = 0.0
    for m, z in enumerate(zs):
        total = total + 2 * beta * F.mse_loss(z, codes[m])
        total = total + sum(c * beta * F.mse_loss(z, codes[q]) for q in range(len(zs)) if q != m)
    return total


@pytest.mark.parametrize("modalities", [2, 3])
def test_cmg_commitment_loss_is_fastbinds(modalities):
    torch.manual_seed(1)
    k, d = 7, 4
    vq = VectorQuantizer(k, d, modalities=modalities, init="none").double().eval()
    zs = [torch.randn(3, 4, d, dtype=torch.float64) for _ in range(modalities)]
    _, idx, loss = vq(zs)
    codes = [vq.codebook[i] for i in idx]
    torch.testing.assert_close(loss, cmg_commitment(zs, codes, 0.25), rtol=1e-12, atol=1e-12)


def cmg_toc_scores(codebook, alpha=0.7, beta=0.3):
    """CMG's TOC criterion (ACL'25 release): the mean over ordered pairs i ≠ j of E_id·E_jd, and
    torch.var's default (unbiased) variance over the codes."""
    k = codebook.shape[0]
    sim = sum(codebook[i] * codebook[j] for i in range(k) for j in range(k) if i != j) / (k * (k - 1))
    var = ((codebook - codebook.mean(0)) ** 2).sum(0) / (k - 1)
    return -alpha * sim + beta * var


def test_cmg_toc_uses_the_unbiased_variance():
    torch.manual_seed(2)
    codebook = torch.randn(16, 12, dtype=torch.float64) * torch.linspace(0.2, 2.0, 12, dtype=torch.float64)
    theirs = cmg_toc_scores(codebook)
    torch.testing.assert_close(fb.toc_scores(codebook, 0.7, 0.3), theirs, rtol=1e-12, atol=1e-12)
    keep = 6
    assert fb.toc_select(codebook, keep, 0.7, 0.3).tolist() == theirs.topk(keep).indices.tolist()
    # CMG keeps the top `max_num` share and the bottom `min_num` share of the scores: the guide's
    # recipe on toc_scores
    scores = fb.toc_scores(codebook, 0.7, 0.3)
    chosen = torch.cat([scores.topk(4).indices, scores.topk(2, largest=False).indices])
    assert chosen.tolist() == torch.cat([theirs.topk(4).indices, theirs.topk(2, largest=False).indices]).tolist()


def cmg_code_matching(xs, codebook):
    """CMG's cross-modal code matching loss as its release writes it: p = softmax(−sqrt(d)) per token
    averaged over segments to P [B, K]; for every pair (a, b)
    S_ij = Σ_k P^a_ik log(P^b_jk + 1e-10) + Σ_k P^b_ik log(P^a_jk + 1e-10) (no transpose on the second
    term); L = −mean_i log(exp(S_ii − max) / (Σ_j exp(S_ij − max) + 1e-5)); the result ½·Σ_pairs L."""
    ps = []
    for x in xs:
        b, t, d = x.shape
        dist = (x.reshape(-1, d)[:, None, :] - codebook[None]).square().sum(-1)
        ps.append(torch.softmax(-dist.sqrt(), dim=1).reshape(b, t, -1).mean(1))
    total = 0.0
    for a in range(len(ps)):
        for c in range(a + 1, len(ps)):
            s = ps[a] @ torch.log(ps[c].T + 1e-10) + ps[c] @ torch.log(ps[a].T + 1e-10)
            e = torch.exp(s + torch.max(-s))
            total = total - torch.log(e.diagonal() / (e.sum(1) + 1e-5)).mean()
    return 0.5 * total


@pytest.mark.parametrize("modalities", [2, 3])
def test_cmg_code_matching_form(modalities):
    """matching_form="cmg" is CMG's loss (up to its 1e-10 / 1e-5 stabilisers); the default
    symmetric form pairs sample i of a with sample j of b in both terms and averages both directions."""
    torch.manual_seed(3)
    codebook = torch.randn(12, 5, dtype=torch.float64)
    xs = [torch.randn(6, 4, 5, dtype=torch.float64) * 0.7 for _ in range(modalities)]
    theirs = cmg_code_matching(xs, codebook)
    torch.testing.assert_close(code_matching_loss(xs, codebook, form="cmg"), theirs, rtol=1e-6, atol=1e-8)
    ours = code_matching_loss(xs, codebook)
    assert not torch.allclose(ours, theirs, rtol=1e-3)
    # the symmetric form: ½(row CE + column CE) of S_ij = Σ P^a_i log P^b_j + Σ P^b_j log P^a_i, per pair
    vq = VectorQuantizer(12, 5, modalities=modalities, matching_weight=1.0, matching_form="cmg", init="none")
    vq = vq.double().eval()
    vq.initialize(codebook)
    _, _, with_matching = vq(xs)
    vq.matching_weight = 0.0
    _, _, without = vq(xs)
    torch.testing.assert_close(with_matching - without, theirs, rtol=1e-6, atol=1e-8)


def test_cmg_dead_code_reset_survives_the_next_ema_step():
    """CMG resets only a dead code, keeping its EMA sum and count, so the next EMA step recomputes
    the code as sum/count and undoes the reset; fastbind resets the sum and count with it, so the
    replacement survives."""
    torch.manual_seed(4)
    e0 = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [0.0, 0.01, 0.0], [100.0, 100.0, 100.0]])
    x = torch.randn(32, 3, dtype=torch.float64) * 0.01
    ours = VectorQuantizer(4, 3, dead_code_steps=2, init="none").double()
    kept = VectorQuantizer(4, 3, dead_code_steps=0, init="none").double()  # CMG's untouched sums/counts
    ours.initialize(e0)
    kept.initialize(e0)
    for _ in range(2):
        ours(x)
        kept(x)
    assert ours.statistics()["replaced_codes"] == 1
    replaced = ours.codebook[3].clone()
    assert replaced.abs().max() < 1.0  # a copy of a used code
    # CMG's next step: the reset codebook, the old EMA sums and counts
    cmg_codebook, _, _ = cmg_mm_ema(ours.codebook.clone(), kept.ema_count, kept.ema_sum, [x], 0.99, 1e-5, 1.0, 0.0)
    ours(x)
    assert (ours.codebook[3] - replaced).abs().max() < 0.05  # kept: one EMA step moves it a little
    assert cmg_codebook[3].abs().min() > 50  # CMG: back out near the dead code


# ------------------------------------------------------------------- vector-quantize-pytorch


def vqp_ema(codebook, cluster_size, embed_avg, z, decay, eps):
    """vector-quantize-pytorch's EuclideanCodebook step: cluster_size and embed_avg are lerped towards
    the batch counts / sums; the codebook is embed_avg divided by a Laplace-smoothed *copy* of the
    counts, (N + ε)/(ΣN + K·ε)·ΣN; the stored cluster_size stays the raw EMA."""
    k = codebook.shape[0]
    a = F.one_hot(_assign(z, codebook), k).double()
    cluster_size = decay * cluster_size + (1 - decay) * a.sum(0)
    embed_avg = decay * embed_avg + (1 - decay) * a.T @ z
    smoothed = (cluster_size + eps) / (cluster_size.sum() + k * eps) * cluster_size.sum()
    return embed_avg / smoothed[:, None], cluster_size, embed_avg


@pytest.mark.parametrize("start", ["one", "zero"])
def test_vqp_smoothed_copy_of_the_counts(start):
    """laplace="copy" is vector-quantize-pytorch's EMA: cluster_size starts at 1 in current releases
    (count_init="one"), at 0 in older ones (count_init="zero"), embed_avg at the codes; the default
    "stored" differs for codes a batch leaves unused."""
    torch.manual_seed(5)
    k, d, decay, eps = 8, 4, 0.8, 1e-5
    e0 = torch.randn(k, d, dtype=torch.float64)
    kw = dict(decay=decay, count_init=start, dead_code_steps=0, init="none")
    ours = VectorQuantizer(k, d, laplace="copy", **kw).double()
    stored = VectorQuantizer(k, d, **kw).double()
    ours.initialize(e0)
    stored.initialize(e0)
    size = torch.full((k,), 1.0 if start == "one" else 0.0, dtype=torch.float64)
    codebook, avg = e0.clone(), e0.clone()
    for _ in range(4):
        z = torch.randn(40, d, dtype=torch.float64) * 0.5 + e0[:3].mean(0)  # most codes stay unused
        ours(z)
        stored(z)
        codebook, size, avg = vqp_ema(codebook, size, avg, z, decay, eps)
        torch.testing.assert_close(ours.codebook, codebook, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.ema_count, size, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ours.ema_sum, avg, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(stored.ema_count, size)


def test_vqp_never_used_codes_shrink_faster_with_stored_counts():
    """The guide's figure: a code no token ever picks shrinks towards 0 after ≈ ln(ε/(1−γ))/ln γ
    steps with stored smoothing, but only once γ^t ≈ ε with the smoothed copy."""
    k, d = 4, 2
    e0 = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [3.0, 3.0]], dtype=torch.float64)
    norms = {}
    for laplace in ("stored", "copy"):
        vq = VectorQuantizer(k, d, decay=0.99, laplace=laplace, dead_code_steps=0, init="none").double()
        vq.initialize(e0)
        x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]], dtype=torch.float64).repeat(4, 1)
        for _ in range(1000):
            vq(x)
        norms[laplace] = float(vq.codebook[3].norm())
    assert norms["stored"] < 0.5 < 2.0 < norms["copy"], norms


def test_vqp_commitment_loss_and_eval_loss():
    """Training loss = commitment · MSE(x, sg(q)) as vector-quantize-pytorch's commitment term (its
    default weight is 1.0, ours 0.25); in eval mode the peer returns 0, fastbind the same commitment
    loss of the batch (a validation metric)."""
    torch.manual_seed(6)
    vq = VectorQuantizer(8, 4, commitment=1.0, decay=0.8, init="none")
    x = torch.randn(2, 10, 4)
    q, idx, loss = vq(x)
    codes = q.detach()
    torch.testing.assert_close(loss, F.mse_loss(x, codes))
    vq.eval()
    q, idx, loss = vq(x)
    torch.testing.assert_close(loss, F.mse_loss(x, vq.codebook[idx]))
    assert float(loss) > 0  # not vector-quantize-pytorch's 0
    assert float(loss * vq.training) == 0  # the guide's one-liner for the peer's eval convention


def test_assigning_the_codebook_counts_as_initialised():
    """vq.codebook = cb before the first step (vector-quantize-pytorch's setter) is kept: the lazy
    k-means++ initialisation does not overwrite it, and the EMA starts from it."""
    torch.manual_seed(7)
    cb = torch.randn(6, 3)
    x = torch.randn(50, 3)
    assigned = VectorQuantizer(6, 3, dead_code_steps=0)
    assigned.codebook = cb
    assert assigned.initialized and isinstance(assigned.codebook, torch.Tensor)
    explicit = VectorQuantizer(6, 3, dead_code_steps=0, init="none")
    explicit.initialize(cb)
    assigned(x)
    explicit(x)
    torch.testing.assert_close(assigned.codebook, explicit.codebook, rtol=0, atol=0)
    assert "codebook" in dict(assigned.named_buffers())  # still a buffer: state_dict, .to() keep it
    half = VectorQuantizer(6, 3).half()
    half.codebook = cb
    assert half.codebook.dtype == torch.float16 and half.ema_sum.dtype == torch.float32


# ---------------------------------------------------------------------------------- faiss

BACKENDS = ["torch", *FUSED]


def _faiss_flat_search(x, codebook, k, inner_product):
    """faiss IndexFlatL2 / IndexFlatIP search: squared L2 distances ascending, or inner products
    descending (float64 here)."""
    x, codebook = x.double(), codebook.double()
    if inner_product:
        scores = x @ codebook.T
        values, index = scores.topk(k, dim=1)
        return values, index
    dist = x.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * x @ codebook.T
    values, index = dist.topk(k, dim=1, largest=False)
    return values, index


@pytest.mark.parametrize("backend", BACKENDS)
def test_faiss_l2_ip_and_cosine(backend, device):
    """IndexFlatL2 returns squared L2 (as fastbind's "l2"); IndexFlatIP returns +x·e sorted descending
    (fastbind's "dot" returns −x·e ascending: same order, negated values); normalize_L2 + IndexFlatIP
    returns cos (fastbind's "cosine" returns 1 − cos)."""
    torch.manual_seed(8)
    x, codebook, k = torch.randn(37, 16), torch.randn(50, 16), 5

    def lookup(metric):  # on the backend's device, the results back on CPU beside faiss's
        return (t.cpu() for t in fb.codebook_lookup(x.to(device), codebook.to(device), k, metric, backend=backend))

    dist, index = lookup("l2")
    d_ref, i_ref = _faiss_flat_search(x, codebook, k, inner_product=False)
    assert torch.equal(index, i_ref)
    torch.testing.assert_close(dist.double(), d_ref, rtol=1e-5, atol=1e-4)

    dist, index = lookup("dot")
    s_ref, i_ref = _faiss_flat_search(x, codebook, k, inner_product=True)
    assert torch.equal(index, i_ref)
    torch.testing.assert_close(-dist.double(), s_ref, rtol=1e-5, atol=1e-4)

    dist, index = lookup("cosine")
    s_ref, i_ref = _faiss_flat_search(F.normalize(x, dim=1), F.normalize(codebook, dim=1), k, inner_product=True)
    assert torch.equal(index, i_ref)
    torch.testing.assert_close(1 - dist.double(), s_ref, rtol=1e-5, atol=1e-5)


def test_faiss_has_no_weights_scale_by_sqrt_w():
    """A per-dimension weight w is what faiss users get by scaling both sides by sqrt(w)."""
    torch.manual_seed(9)
    x, codebook = torch.randn(30, 8), torch.randn(20, 8)
    w = torch.rand(8)
    w[2] = 0
    dist, index = fb.codebook_lookup(x, codebook, 3, "l2", w)
    d_ref, i_ref = _faiss_flat_search(x * w.sqrt(), codebook * w.sqrt(), 3, inner_product=False)
    assert torch.equal(index, i_ref)
    torch.testing.assert_close(dist.double(), d_ref, rtol=1e-5, atol=1e-5)


def test_faiss_k_beyond_the_codebook():
    """faiss pads k > ntotal with label −1 and an infinite distance; fastbind raises instead."""
    with pytest.raises(ValueError, match="k = 5 out of range"):
        fb.codebook_lookup(torch.randn(3, 4), torch.randn(4, 4), 5)
    assert math.isfinite(float(fb.codebook_lookup(torch.randn(3, 4), torch.randn(4, 4), 4)[0].max()))
