"""fastbind.nn.VectorQuantizer: EMA updates against a hand-written step-by-step computation of the
formulas (single- and multi-modal), dead codes, state_dict round trip, freeze, initialisation, TOC
weight, the code matching loss and the torch.distributed all-reduce of the EMA statistics."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FUSED

from fastbind.nn import VectorQuantizer
from fastbind.nn.vq import code_matching_loss
from fastbind.reference import codebook as ref

BACKENDS = ["torch", *FUSED]


def hand_ema_step(codebook, count, total, zs, gamma, eps, w_self, w_cross):
    """CMG's MM-EMA written out per code and per token (float64), modality by modality."""
    num_codes = codebook.shape[0]
    lookup = codebook.clone()  # every modality is assigned with the codebook before the step
    assign = [[int(ref.pairwise_distance(z[t : t + 1], lookup).argmin()) for t in range(z.shape[0])] for z in zs]
    count, total, codebook = count.clone(), total.clone(), codebook.clone()
    for m in range(len(zs)):
        hits = [sum(1 for a in assign[m] if a == j) for j in range(num_codes)]
        for j in range(num_codes):
            count[j] = gamma * count[j] + (1 - gamma) * hits[j]
        n = float(count.sum())
        for j in range(num_codes):
            count[j] = (count[j] + eps) / (n + num_codes * eps) * n
        for j in range(num_codes):
            acc = torch.zeros(codebook.shape[1], dtype=torch.float64)
            for t, a in enumerate(assign[m]):
                if a == j:
                    for q, z in enumerate(zs):
                        acc += (w_self if q == m else w_cross) * z[t]
            total[j] = gamma * total[j] + (1 - gamma) * acc
            codebook[j] = total[j] / count[j]
    return codebook, count, total, assign


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("modalities", [1, 2, 3])
def test_ema_matches_hand_computation(backend, modalities, device):
    num_codes, dim, tokens = 7, 5, 13
    gamma, eps, beta = 0.9, 1e-3, 0.25
    vq = VectorQuantizer(
        num_codes, dim, decay=gamma, eps=eps, commitment=beta, dead_code_steps=0, modalities=modalities, init="none"
    ).to(device)
    vq.backend = backend
    e0 = torch.randn(num_codes, dim)
    vq.initialize(e0)
    codebook, count, total = e0.double(), torch.ones(num_codes, dtype=torch.float64), e0.double()
    w_self = 0.5 if modalities > 1 else 1.0
    w_cross = 0.5 / max(modalities - 1, 1)
    for _ in range(2):
        zs = [torch.randn(tokens, dim) for _ in range(modalities)]
        before = codebook.clone()
        codebook, count, total, assign = hand_ema_step(
            codebook, count, total, [z.double() for z in zs], gamma, eps, w_self, w_cross
        )
        on_device = [z.to(device) for z in zs]
        quantized, indices, loss = vq(on_device if modalities > 1 else on_device[0])
        got_idx = indices if modalities > 1 else [indices]
        for m in range(modalities):
            assert got_idx[m].tolist() == assign[m]
        torch.testing.assert_close(vq.codebook.double().cpu(), codebook, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vq.ema_count.double().cpu(), count, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vq.ema_sum.double().cpu(), total, atol=1e-5, rtol=1e-5)
        # loss: β·MSE for one modality; CMG's 2β self term + c·β cross terms (c = 1/(M−1)) otherwise
        mse = [
            [float(((zs[m].double() - before[assign[n]]) ** 2).mean()) for n in range(modalities)]
            for m in range(modalities)
        ]
        if modalities == 1:
            expected = beta * mse[0][0]
        else:
            c = 1.0 / (modalities - 1)
            expected = sum(
                2 * beta * mse[m][m] + sum(c * beta * mse[m][n] for n in range(modalities) if n != m)
                for m in range(modalities)
            )
        assert math.isclose(float(loss), expected, rel_tol=1e-5)
        outs = quantized if modalities > 1 else [quantized]
        for m in range(modalities):
            torch.testing.assert_close(outs[m].double().cpu(), before[assign[m]], atol=1e-6, rtol=1e-6)


def test_straight_through_and_commitment_gradient():
    vq = VectorQuantizer(6, 4, commitment=0.5, init="none", dead_code_steps=0)
    vq.initialize(torch.randn(6, 4))
    x = torch.randn(3, 5, 4, requires_grad=True)
    codes = vq.codebook.clone()
    q, idx, loss = vq(x)
    assert q.shape == x.shape and idx.shape == (3, 5)
    g = torch.randn_like(q)
    (gx,) = torch.autograd.grad((q * g).sum() + loss, x)
    expected = g + 0.5 * 2 * (x.detach() - codes[idx]) / x.numel()
    torch.testing.assert_close(gx, expected)


def test_dead_code_reset_survives_next_step():
    e0 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]])  # code 2 is never chosen
    vq = VectorQuantizer(3, 2, decay=0.9, dead_code_steps=2, init="none")
    vq.initialize(e0)
    x = torch.randn(40, 2) * 0.1 + torch.tensor([0.5, 0.5])
    vq(x)
    assert vq.codebook[2].tolist() == [50.0, 50.0] or torch.allclose(vq.codebook[2], torch.tensor([50.0, 50.0]))
    vq(x)  # second unused step: replaced
    reset = vq.codebook[2].clone()
    assert reset.norm() < 5, "dead code was not replaced by an active code"
    active = vq.codebook[:2]
    assert torch.cdist(reset[None], active).min() < 0.1
    assert float(vq.ema_count[2]) == 1.0
    torch.testing.assert_close(vq.ema_sum[2], reset)
    assert vq.last_used[2] == vq.step
    # the next step must not undo the reset (CMG's release lets the decayed EMA sum/count pull it
    # back): feed tokens sitting exactly on the code that was NOT copied, so code 2 stays unused
    source = int(torch.cdist(reset[None], active).argmin())
    other = vq.codebook[1 - source].clone()
    _, idx, _ = vq(other.expand(40, 2).clone())
    assert (idx == 1 - source).all()
    moved = (vq.codebook[2] - reset).norm() / reset.norm()
    assert moved < 1e-2, f"reset code moved by {float(moved):.3g} of its norm in the next EMA step"


def _train_steps(vq, batches):
    out = []
    for x in batches:
        out.append(vq(x))
    return out


@pytest.mark.parametrize("modalities", [1, 2])
def test_state_dict_round_trip_continues_identically(modalities):
    torch.manual_seed(1)
    kw = dict(decay=0.8, dead_code_steps=2, modalities=modalities, init="kmeans++")
    vq = VectorQuantizer(16, 6, **kw)
    data = [
        [torch.randn(30, 6) * (0.2 if s > 1 else 1.0) for _ in range(modalities)] for s in range(6)
    ]  # narrowing data after step 2: codes go dead and get replaced (uses the layer's RNG)
    feed = [d if modalities > 1 else d[0] for d in data]
    _train_steps(vq, feed[:3])
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vq.state_dict().items()}
    torch.manual_seed(123)  # another global seed: the copy must not depend on it
    copy = VectorQuantizer(16, 6, **kw)
    copy.load_state_dict(state)
    replaced_before = vq.replaced
    a = _train_steps(vq, feed[3:])
    b = _train_steps(copy, feed[3:])
    assert vq.statistics()["step"] == copy.statistics()["step"] == 6
    for (qa, ia, la), (qb, ib, lb) in zip(a, b):
        for x, y in zip(qa if modalities > 1 else [qa], qb if modalities > 1 else [qb]):
            assert torch.equal(x, y)
        for x, y in zip(ia if modalities > 1 else [ia], ib if modalities > 1 else [ib]):
            assert torch.equal(x, y)
        assert torch.equal(la, lb)
    for name, buf in vq.named_buffers():
        assert torch.equal(buf, dict(copy.named_buffers())[name]), name
    assert vq.replaced > replaced_before, "no dead code was replaced after the reload: RNG state untested"
    assert copy.statistics()["replaced_codes"] == vq.replaced


def test_freeze_and_eval_do_not_update():
    vq = VectorQuantizer(8, 3, init="random")
    x = torch.randn(50, 3)
    vq(x)
    before = {k: v.clone() for k, v in vq.named_buffers()}
    vq.freeze()
    vq(torch.randn(50, 3) + 3)
    vq.unfreeze().eval()
    q, idx, _ = vq(torch.randn(50, 3) - 3)
    for k, v in vq.named_buffers():
        assert torch.equal(v, before[k]), k
    assert vq.step == 1
    torch.testing.assert_close(q, vq.codebook[idx])


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_init_from_first_batch(init):
    vq = VectorQuantizer(10, 4, init=init, dead_code_steps=0, decay=0.0)
    x = torch.randn(64, 4)
    vq.train()
    # decay 0: after the step each used code is the (Laplace-smoothed) mean of its tokens, so check
    # the initial codes through a frozen copy instead
    frozen = VectorQuantizer(10, 4, init=init)
    frozen._rng.set_state(vq._rng.get_state())
    frozen._init_codebook(x)
    codes = frozen.codebook
    assert (codes[:, None, :] == x[None]).all(-1).any(1).all(), "initial codes are batch tokens"
    assert len({tuple(c.tolist()) for c in codes}) == 10, "initial codes are distinct"
    vq(x)
    assert vq.initialized


def test_kmeanspp_spreads_codes():
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centers[:, None, :] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    vq = VectorQuantizer(4, 2, init="kmeans++")
    vq._init_codebook(x)
    nearest = torch.cdist(vq.codebook, centers).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]


def test_statistics_perplexity():
    vq = VectorQuantizer(4, 2, init="none", dead_code_steps=0)
    vq.initialize(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    x = torch.tensor([[0.1, 0.0]] * 3 + [[9.9, 0.0]] * 1)
    vq.eval()
    vq(x)
    p = torch.tensor([0.75, 0.25])
    stats = vq.statistics()
    assert math.isclose(stats["perplexity"][0], float(torch.exp(-(p * p.log()).sum())), rel_tol=1e-6)
    assert stats["code_usage"][0] == 0.5


def test_toc_weight_in_lookup():
    torch.manual_seed(2)
    vq = VectorQuantizer(12, 8, init="none", dead_code_steps=0)
    vq.initialize(torch.randn(12, 8))
    mask = vq.apply_toc(keep=5)
    assert mask.sum() == 5
    x = torch.randn(30, 8)
    vq.eval()
    _, idx, _ = vq(x)
    _, expected = ref.codebook_lookup(x.double(), vq.codebook.double(), 1, "l2", mask.double())
    assert torch.equal(idx, expected[:, 0])
    state = vq.state_dict()
    copy = VectorQuantizer(12, 8, init="none")
    copy.load_state_dict(state)
    copy.eval()
    assert torch.equal(copy(x)[1], idx)


def _matching_loss_direct(xs, codebook, tau):
    """Float64, explicit softmaxes and averages (no log-sum-exp tricks); fine for moderate inputs."""
    ps = []
    for x in xs:
        d = ((x.double()[:, :, None, :] - codebook.double()[None, None]) ** 2).sum(-1)
        p = torch.softmax(-d.clamp_min(1e-12).sqrt(), -1).mean(1)
        ps.append(p)
    total = 0.0
    for a in range(len(xs)):
        for b in range(a + 1, len(xs)):
            s = (ps[a] @ ps[b].log().T + (ps[b] @ ps[a].log().T).T) / tau
            n = s.shape[0]
            row = sum(-s[i, i] + torch.log(torch.exp(s[i]).sum()) for i in range(n)) / n
            col = sum(-s[j, j] + torch.log(torch.exp(s[:, j]).sum()) for j in range(n)) / n
            total = total + 0.5 * (row + col)
    return total


def test_code_matching_loss_formula_and_stability():
    xs = [torch.randn(5, 3, 4) for _ in range(3)]
    codebook = torch.randn(6, 4)
    got = code_matching_loss(xs, codebook, temperature=0.5)
    torch.testing.assert_close(got.double(), _matching_loss_direct(xs, codebook, 0.5), atol=1e-5, rtol=1e-5)
    # far tokens: softmax probabilities underflow to 0; the log-mean-exp form stays finite
    far = [x * 1e3 for x in xs]
    loss = code_matching_loss(far, codebook)
    assert torch.isfinite(loss)
    x0 = far[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(code_matching_loss([x0, far[1]], codebook), x0)
    assert torch.isfinite(g).all()


def test_vq_matching_weight_adds_loss():
    xs = [torch.randn(4, 2, 3) for _ in range(2)]
    e = torch.randn(5, 3)
    plain = VectorQuantizer(5, 3, modalities=2, init="none", dead_code_steps=0).eval()
    plain.initialize(e)
    matched = VectorQuantizer(5, 3, modalities=2, init="none", matching_weight=0.3, dead_code_steps=0).eval()
    matched.initialize(e)
    _, _, l0 = plain(xs)
    _, _, l1 = matched(xs)
    torch.testing.assert_close(l1 - l0, 0.3 * code_matching_loss(xs, e))


def test_input_errors():
    vq = VectorQuantizer(4, 3, modalities=2)
    with pytest.raises(TypeError, match="list of 2 tensors"):
        vq(torch.randn(2, 3))
    with pytest.raises(ValueError, match="paired tokens"):
        vq([torch.randn(2, 3), torch.randn(3, 3)])
    with pytest.raises(ValueError, match=r"expected non-empty \[\.\.\., 3\]"):
        VectorQuantizer(4, 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="init"):
        VectorQuantizer(4, 3, init="kmeans")


# ------------------------------------------------------------------ torch.distributed (gloo)


def _dist_worker(rank, world, init_file, e0, batches, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # ranks draw different seeds: replacements must still agree
        vq = VectorQuantizer(e0.shape[0], e0.shape[1], decay=0.7, modalities=2, init="none", dead_code_steps=2)
        vq.initialize(e0)
        for xs in batches:
            half = xs[0].shape[0] // world
            vq([x[rank * half : (rank + 1) * half] for x in xs])
        torch.save(
            {k: v for k, v in vq.state_dict().items() if k != "_extra_state"}, os.path.join(out_dir, f"{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def test_distributed_ema_equals_single_process_on_concatenated_batch():
    torch.manual_seed(5)
    e0 = torch.randn(6, 4)
    e0[5] += 40  # never used: goes dead at step 2 and is replaced identically on every rank
    batches = [[torch.randn(16, 4) for _ in range(2)] for _ in range(3)]
    torch.manual_seed(100)  # rank 0's seed: the single process draws rank 0's replacement code
    single = VectorQuantizer(6, 4, decay=0.7, modalities=2, init="none", dead_code_steps=2)
    single.initialize(e0)
    for xs in batches:
        single(xs)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "store"), e0, batches, tmp), nprocs=2, join=True)
        states = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    for name in ("ema_count", "last_used"):
        for s in states:
            torch.testing.assert_close(s[name], getattr(single, name))
    for name in ("codebook", "ema_sum"):
        torch.testing.assert_close(states[0][name], states[1][name], atol=0, rtol=0)
        torch.testing.assert_close(states[0][name], getattr(single, name), atol=1e-5, rtol=1e-5)
    assert float(states[0]["codebook"][5].norm()) < 10, "code 5 was not replaced"
