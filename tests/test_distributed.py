"""Multi-process losses on gloo: 2 and 3 CPU processes against the single-process computation.

Each world size is started once (module-scoped fixture, ``torch.multiprocessing`` spawn, a
``file://`` store in a temporary directory, bounded timeouts). Every process runs all checks and
writes "ok" or the failure per check; the parametrised tests below read those results, so that each
check fails on its own. The checks compare, for per-rank batches of unequal and of equal size:

* ``gather_with_grad``: values, offset and the gradient (sum over ranks of the upstream gradients);
* a private float64 CLIP loss built on ``gather_with_grad`` + ``local_rows_loss`` (the contract
  itself, independent of the fused ops);
* ``gram_loss``, ``infonce``, ``anchor_loss``, ``centroid_loss`` with ``gather=True`` follow DDP's
  convention: the mean over ranks of the returned losses equals the single-process loss on the
  concatenated batch (with equal batches each rank's loss is the mean single-process loss of its
  own rows and columns), every input gradient is W times the single-process gradient of this
  rank's rows, and the temperature gradient averaged over ranks (as DDP averages a parameter's
  gradient) equals the single-process one — on the ``torch`` backend in float64 and on every fused
  backend available here in float32 (Triton, under its slow interpreter: one case per loss);
* ``fastbind.train.Trainer`` on every process (gathering losses, gradients averaged as DDP does)
  against the single-process trainer on the global batch.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastbind as fb
from fastbind import _backend
from fastbind.distributed import gather_with_grad, is_distributed, local_rows_loss, rank, world_size

UNEQUAL_SIZES = {2: [5, 7], 3: [4, 1, 6]}
DIM = 12
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}
JOIN_TIMEOUT_S = 300  # a whole world (spawn + imports + every check) on a busy 2-core machine
GLOO_TIMEOUT_S = 60
TRAIN_LOSSES = (
    "gram",
    "centroid",
    "anchor",
    "pairwise",
)  # a collective that one rank never enters fails instead of hanging


def _loss_cases():
    """(name, fn, number of inputs, keyword arguments) for every loss under test."""
    cases = []
    for kw in (
        dict(label_smoothing=0.1, direction="both", reduction="mean"),
        dict(direction="a2d", reduction="sum"),
        dict(direction="d2a", reduction="mean"),
        dict(label_smoothing=0.1, direction="both", reduction="none"),
    ):
        tag = "-".join(f"{v}" for v in kw.values())
        cases.append((f"gram_loss[k3-{tag}]", "gram_loss", 3, kw))
        cases.append((f"infonce[{tag}]", "infonce", 2, kw))
    cases.append(("gram_loss[k2]", "gram_loss", 2, {}))
    cases.append(("anchor_loss[M3-ls0.1]", "anchor_loss", 3, dict(label_smoothing=0.1)))
    cases.append(("anchor_loss[M4]", "anchor_loss", 4, {}))
    cases.append(("centroid_loss[M3]", "centroid_loss", 3, {}))
    cases.append(
        (
            "centroid_loss[M3-weights-normalize-ls0.1]",
            "centroid_loss",
            3,
            dict(weights=[0.5, 0.3, 0.2], normalize_anchor=True, label_smoothing=0.1),
        )
    )
    cases.append(("centroid_loss[M4-leave_one_out]", "centroid_loss", 4, dict(leave_one_out=True)))
    cases.append(("centroid_loss[M3-detach_anchor]", "centroid_loss", 3, dict(detach_anchor=True)))
    return cases


def _backends():
    # float64 runs on the reference; every fused backend of this machine that takes CPU tensors (gloo's)
    # runs float32: triton only under the interpreter (on a GPU machine its op tests run on CUDA).
    cpu = torch.device("cpu")
    fused = [b for b in ("cpu", "triton") if not _backend._why_not(b, cpu, torch.float32, _backend.BACKENDS)]
    return [("torch", torch.float64)] + [(b, torch.float32) for b in fused]


# The gather logic is backend-independent Python around each backend's rectangular, diagonal-offset
# kernels. The Triton interpreter runs kernel programs one by one (~1 s per small loss on 2 cores),
# so Triton gets the first case of each loss with unequal per-rank batches; torch and cpu get all.
TRITON_CASES = ("gram_loss[k3-0.1-both-mean]", "infonce[0.1-both-mean]", "anchor_loss[M3-ls0.1]", "centroid_loss[M3]")


def _check_names():
    basic = ["gather_values_offset", "gather_gradient", "gather_3d", "private_clip_contract"]
    names = [f"{n}/{layout}" for n in basic for layout in ("unequal", "equal")]
    for backend, _ in _backends():
        for case in _loss_cases():
            if backend != "triton":
                names += [f"{case[0]}@{backend}/unequal", f"{case[0]}@{backend}/equal"]
            elif case[0] in TRITON_CASES:
                names.append(f"{case[0]}@{backend}/unequal")
    # DistributedDataParallel itself around every gathering loss (unequal per-rank batches).
    names += [f"ddp[{fn_name}]/unequal" for fn_name in DDP_LOSSES]
    # The peers' multi-process conventions (docs/switching.md); the peers assume equal batches.
    names += [f"{peer}/equal" for peer in PEER_CHECKS]
    # The training layer on several processes (per-rank batches of 11 rows: unequal for 2 and 3).
    return names + [f"trainer[{loss}]/b11" for loss in TRAIN_LOSSES]


# ----------------------------------------------------------------------------- checks (per rank)


def _sizes(layout: str, world: int) -> list[int]:
    return UNEQUAL_SIZES[world] if layout == "unequal" else [4] * world


def _rows(sizes: list[int]) -> slice:
    start = sum(sizes[: dist.get_rank()])
    return slice(start, start + sizes[dist.get_rank()])


def _summed(value: torch.Tensor) -> torch.Tensor:
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def _averaged(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks: what DDP does to parameter gradients (and what a logged loss shows)."""
    return _summed(value) / dist.get_world_size()


def _check_gather_values_offset(sizes):
    full = torch.randn(sum(sizes), DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = _rows(sizes)
    x_global, offset = gather_with_grad(full[rows].clone())
    assert offset == rows.start, f"offset {offset}, expected {rows.start}"
    torch.testing.assert_close(x_global, full, rtol=0, atol=0)
    assert world_size() == len(sizes) and rank() == dist.get_rank() and is_distributed()


def _check_gather_gradient(sizes):
    full = torch.randn(sum(sizes), DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = _rows(sizes)
    x = full[rows].clone().requires_grad_(True)
    x_global, _ = gather_with_grad(x)
    # A different upstream gradient on every rank: the backward must sum them over ranks.
    upstream = [
        torch.randn(sum(sizes), DIM, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64)
        for r in range(len(sizes))
    ]
    (x_global * upstream[dist.get_rank()]).sum().backward()
    torch.testing.assert_close(x.grad, sum(upstream)[rows], rtol=1e-12, atol=1e-12)


def _check_gather_3d(sizes):
    full = torch.randn(sum(sizes), 3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = _rows(sizes)
    x = full[rows].clone().requires_grad_(True)
    x_global, _ = gather_with_grad(x)
    torch.testing.assert_close(x_global, full, rtol=0, atol=0)
    (x_global.pow(2).sum() / 2).backward()  # every rank: upstream = x_global -> summed: world * x
    torch.testing.assert_close(x.grad, len(sizes) * full[rows], rtol=1e-12, atol=1e-12)


def _check_private_clip_contract(sizes):
    """A float64 CLIP loss written only with gather_with_grad + local_rows_loss vs F.cross_entropy."""
    g = torch.Generator().manual_seed(4)
    x_full = F.normalize(torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    y_full = F.normalize(torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    tau_full = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    logits = x_full @ y_full.t() / tau_full
    target = torch.arange(sum(sizes))
    ref = F.cross_entropy(logits, target, label_smoothing=0.1) + F.cross_entropy(
        logits.t(), target, label_smoothing=0.1
    )
    ref = ref / 2
    ref.backward()

    rows = _rows(sizes)
    x = x_full.detach()[rows].clone().requires_grad_(True)
    y = y_full.detach()[rows].clone().requires_grad_(True)
    tau = tau_full.detach().clone().requires_grad_(True)
    x_global, offset = gather_with_grad(x)
    y_global, _ = gather_with_grad(y)
    loss = local_rows_loss(x @ y_global.t() / tau, x_global @ y.t() / tau, offset, label_smoothing=0.1)
    loss.backward()
    world = len(sizes)
    torch.testing.assert_close(_averaged(loss), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, world * x_full.grad[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, world * y_full.grad[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_averaged(tau.grad), tau_full.grad, rtol=1e-10, atol=1e-12)


def _check_loss(sizes, fn_name, n_inputs, kwargs, backend, dtype):
    fn = getattr(fb, fn_name)
    g = torch.Generator().manual_seed(5 + n_inputs)
    total = sum(sizes)
    # Fresh random inputs with non-unit norms (the losses do not normalise).
    full = [
        (
            torch.randn(total, DIM, generator=g, dtype=torch.float64)
            * (0.5 + torch.rand(total, 1, generator=g, dtype=torch.float64))
        )
        .to(dtype)
        .requires_grad_(True)
        for _ in range(n_inputs)
    ]
    tau_full = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    reduction = kwargs.get("reduction", "mean")
    weight_full = torch.rand(total, generator=g, dtype=torch.float64).to(dtype)
    ref = fn(*full, temperature=tau_full, backend=backend, **kwargs)
    (ref * weight_full).sum().backward() if reduction == "none" else ref.backward()

    rows = _rows(sizes)
    local = [t.detach()[rows].clone().requires_grad_(True) for t in full]
    tau = tau_full.detach().clone().requires_grad_(True)
    loss = fn(*local, temperature=tau, backend=backend, gather=True, process_group=None, **kwargs)
    tol = TOL[dtype]
    world = len(sizes)
    if reduction == "none":
        # per-row losses are not rescaled: the caller's own reduction decides, and the gathered
        # backward sums every rank's gradient into the owner's rows (factor 1 for a sum over ranks)
        assert loss.shape == (sizes[dist.get_rank()],), f"per-row losses of shape {tuple(loss.shape)}"
        (loss * weight_full[rows]).sum().backward()
        torch.testing.assert_close(loss.detach(), ref.detach()[rows], **tol)
        grad_factor, reduce_tau = 1, _summed
    else:
        loss.backward()
        # DDP convention: the mean over ranks is the single-process loss
        torch.testing.assert_close(_averaged(loss), ref.detach(), **tol)
        if len(set(sizes)) == 1 and reduction == "mean" and fn_name in ("gram_loss", "infonce"):
            # equal batches: a rank's loss is the mean single-process loss of its own rows and columns
            per_row = fn(
                *[t.detach() for t in full], temperature=0.3, backend=backend, **{**kwargs, "reduction": "none"}
            )
            torch.testing.assert_close(loss.detach(), per_row[rows].mean(), **tol)
        grad_factor, reduce_tau = world, _averaged
    for i, (mine, whole) in enumerate(zip(local, full)):
        if whole.grad is None:
            assert mine.grad is None or not mine.grad.abs().any(), f"input {i}: gradient where the full loss has none"
            continue
        assert mine.grad is not None, f"input {i}: no gradient reached this rank's rows"
        torch.testing.assert_close(
            mine.grad, grad_factor * whole.grad[rows], **tol, msg=lambda m, i=i: f"input {i} gradient: {m}"
        )
    assert tau.grad is not None, "the temperature got no gradient"
    torch.testing.assert_close(reduce_tau(tau.grad), tau_full.grad, **tol, msg=lambda m: f"temperature gradient: {m}")


DDP_LOSSES = {"gram_loss": 3, "infonce": 2, "anchor_loss": 3, "centroid_loss": 3}


class _Encoders(torch.nn.Module):
    """One linear encoder per input and a learnable temperature; forward returns the loss, so that
    every parameter's gradient goes through DDP's reducer."""

    def __init__(self, fn_name: str):
        super().__init__()
        self.fn_name = fn_name
        self.encoders = torch.nn.ModuleList(
            torch.nn.Linear(DIM, 6, dtype=torch.float64) for _ in range(DDP_LOSSES[fn_name])
        )
        self.temperature = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, inputs, gather: bool):
        zs = [F.normalize(enc(x), dim=-1) for enc, x in zip(self.encoders, inputs)]
        return getattr(fb, self.fn_name)(*zs, temperature=self.temperature, backend="torch", gather=gather)


def _check_ddp(sizes, fn_name: str):
    """torch.nn.parallel.DistributedDataParallel around a model whose loss gathers: the mean of the
    ranks' losses is the single-process loss and DDP's averaged parameter gradients equal the
    single-process gradients, with no world-size factor anywhere."""
    import copy

    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(11)  # same initial parameters on every rank (DDP also broadcasts rank 0's)
    model = _Encoders(fn_name)
    single = copy.deepcopy(model)
    g = torch.Generator().manual_seed(12)
    full = [torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64) for _ in range(DDP_LOSSES[fn_name])]
    expected = single(full, gather=False)
    expected.backward()
    ddp = DistributedDataParallel(model)
    loss = ddp([x[_rows(sizes)] for x in full], gather=True)
    loss.backward()
    torch.testing.assert_close(_averaged(loss), expected.detach(), rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def _peer_inputs(sizes, n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(full unit-row tensors, this rank's rows as fresh leaves), float64."""
    g = torch.Generator().manual_seed(seed)
    full = [F.normalize(torch.randn(sum(sizes), DIM, generator=g, dtype=torch.float64), dim=-1) for _ in range(n)]
    return full, [x[_rows(sizes)].clone().requires_grad_(True) for x in full]


def _check_gram_release_step(sizes):
    """The GRAM release's training step on several processes (features gathered without gradient,
    local rows against the gathered columns and the gathered rows against the local columns, targets
    offset by rank·b; its "#d2a" term is fastbind's "a2d") equals docs/switching.md's snippet with
    gather=True on every rank: same loss and same gradients per rank."""
    _, local = _peer_inputs(sizes, 3, seed=21)
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)

    def gathered_without_grad(x):
        blocks = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(blocks, x.detach().contiguous())
        return torch.cat(blocks)

    def volume(anchor, *mods):  # sqrt |det| of the [B1, B2, k, k] Gram tensor, as the release
        b1, b2 = anchor.shape[0], mods[0].shape[0]
        vecs = torch.stack([anchor[:, None].expand(b1, b2, -1)] + [m[None].expand(b1, b2, -1) for m in mods], dim=2)
        return torch.sqrt(torch.abs(torch.det(vecs @ vecs.transpose(-1, -2))))

    t, v, a = local
    t_all, v_all, a_all = (gathered_without_grad(x) for x in local)
    targets = torch.arange(t.shape[0]) + _rows(sizes).start
    release = (
        F.cross_entropy(-volume(t, v_all, a_all) / tau, targets, label_smoothing=0.1)
        + F.cross_entropy(-volume(t_all, v, a).T / tau, targets, label_smoothing=0.1)
    ) / 2
    want = torch.autograd.grad(release, [*local, tau])
    row = fb.gram_loss(t, v.detach(), a.detach(), temperature=tau, label_smoothing=0.1, direction="a2d", gather=True)
    col = fb.gram_loss(t.detach(), v, a, temperature=tau, label_smoothing=0.1, direction="d2a", gather=True)
    ours = (row + col) / 2
    got = torch.autograd.grad(ours, [*local, tau])
    torch.testing.assert_close(ours, release, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def _clip_local_logits(image, text, scale, local_loss: bool):
    """open_clip's ClipLoss logits with gather_with_grad=True: local_loss -> local rows against the
    gathered features (labels offset by rank·b); otherwise the full global logits on every rank."""
    all_image = torch.cat(torch.distributed.nn.all_gather(image))
    all_text = torch.cat(torch.distributed.nn.all_gather(text))
    if local_loss:
        labels = torch.arange(image.shape[0]) + image.shape[0] * dist.get_rank()
        return scale * image @ all_text.T, scale * text @ all_image.T, labels
    logits = scale * all_image @ all_text.T
    return logits, logits.T, torch.arange(all_image.shape[0])


def _check_open_clip(sizes, local_loss: bool):
    """fb.infonce(image, text, logit_scale=s, gather=True) against open_clip's ClipLoss with
    gather_with_grad=True. local_loss=True: the same loss and gradients on every rank. Global loss
    (local_loss=False: every rank returns the global loss): the mean over ranks is the same loss and
    the input gradients are the same (both W times the single-process ones), the scale's averaged."""
    import torch.distributed.nn  # noqa: F401  (open_clip's differentiable all_gather)

    _, local = _peer_inputs(sizes, 2, seed=22)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    per_image, per_text, labels = _clip_local_logits(*local, log_scale.exp(), local_loss)
    clip = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    want = torch.autograd.grad(clip, [*local, log_scale])
    ours = fb.infonce(*local, logit_scale=log_scale.exp(), gather=True)
    got = torch.autograd.grad(ours, [*local, log_scale])
    tol = dict(rtol=1e-9, atol=1e-11)
    if local_loss:
        torch.testing.assert_close(ours, clip, **tol)
        torch.testing.assert_close(got[2], want[2], **tol)
    else:
        torch.testing.assert_close(_averaged(ours), clip.detach(), **tol)
        torch.testing.assert_close(_averaged(got[2]), _averaged(want[2]), **tol)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, **tol)


PEER_CHECKS = {
    "gram_release_step": _check_gram_release_step,
    "open_clip_local_loss": lambda sizes: _check_open_clip(sizes, local_loss=True),
    "open_clip_global_loss": lambda sizes: _check_open_clip(sizes, local_loss=False),
}


def _check_trainer(loss: str):
    """3 steps of fastbind.train on every process (gathering losses, gradients averaged as DDP does)
    equal 3 single-process steps on the global batch: same losses, same parameters."""
    from fastbind.train import TrainConfig, Trainer

    config = TrainConfig(loss=loss, steps=3, batch_size=11, dim=8, hidden=16, eval_every=0, progress=False)
    multi, single = Trainer(config, distributed=True), Trainer(config, distributed=False)
    assert multi.world == dist.get_world_size()
    got = [multi.train_step() for _ in range(3)]
    expected = [single.train_step() for _ in range(3)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(multi.model.named_parameters(), single.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _run_checks(world: int) -> dict[str, str]:
    simple = {
        "gather_values_offset": _check_gather_values_offset,
        "gather_gradient": _check_gather_gradient,
        "gather_3d": _check_gather_3d,
        "private_clip_contract": _check_private_clip_contract,
    }
    results = {}
    for name in _check_names():
        base, layout = name.rsplit("/", 1)
        sizes = _sizes(layout, world) if layout in ("unequal", "equal") else None
        try:
            if base in simple:
                simple[base](sizes)
            elif base.startswith("trainer["):
                _check_trainer(base[len("trainer[") : -1])
            elif base.startswith("ddp["):
                _check_ddp(sizes, base[len("ddp[") : -1])
            elif base in PEER_CHECKS:
                PEER_CHECKS[base](sizes)
            else:
                case_name, backend = base.rsplit("@", 1)
                dtype = dict(_backends())[backend]
                _, fn_name, n_inputs, kwargs = next(c for c in _loss_cases() if c[0] == case_name)
                _check_loss(sizes, fn_name, n_inputs, kwargs, backend, dtype)
            results[name] = "ok"
        except Exception as exc:  # recorded per check; the parent test reports it
            results[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        dist.barrier()  # keep the ranks in step between checks
    return results


def _worker(local_rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=local_rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    try:
        results = _run_checks(world)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{local_rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"gloo{world}")
    ctx = mp.start_processes(
        _worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo processes did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    results = []
    for r in range(world):
        with open(tmp / f"rank{r}.json") as f:
            results.append(json.load(f))
    return world, results


@pytest.mark.parametrize("check", _check_names())
def test_multiprocess(world_results, check):
    world, results = world_results
    failures = [f"rank {r}: {res[check]}" for r, res in enumerate(results) if res[check] != "ok"]
    assert not failures, f"{check} on {world} gloo processes failed:\n" + "\n".join(failures)


def test_gather_is_identity_without_process_group():
    assert not is_distributed() and world_size() == 1 and rank() == 0
    x = torch.randn(3, 4, requires_grad=True)
    y, offset = gather_with_grad(x)
    assert offset == 0 and y is x


def test_local_rows_loss_single_process_equals_cross_entropy():
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randn(6, 5, dtype=torch.float64)
    logits = x @ y.t()
    target = torch.arange(6)
    for direction, expected in (
        ("a2d", F.cross_entropy(logits, target, label_smoothing=0.2)),
        ("d2a", F.cross_entropy(logits.t(), target, label_smoothing=0.2)),
        (
            "both",
            (
                F.cross_entropy(logits, target, label_smoothing=0.2)
                + F.cross_entropy(logits.t(), target, label_smoothing=0.2)
            )
            / 2,
        ),
    ):
        got = local_rows_loss(logits, logits, 0, label_smoothing=0.2, direction=direction)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="col_logits has shape"):
        local_rows_loss(logits, logits[:, :3], 0)
    with pytest.raises(ValueError, match="direction"):
        local_rows_loss(logits, logits, 0, direction="up")
