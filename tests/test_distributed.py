"""Multi-process losses on gloo: 2 and 3 CPU processes against the single-process computation.

Each world size is started once (module-scoped fixture, ``torch.multiprocessing`` spawn, a
``file://`` store in a temporary directory, bounded timeouts). Every process runs all checks and
writes "ok" or the failure per check; the parametrised tests below read those results, so that each
check fails on its own. The checks compare, for per-rank batches of unequal and of equal size:

* ``gather_with_grad``: values, offset and the gradient (sum over ranks of the upstream gradients);
* a private float64 CLIP loss built on ``gather_with_grad`` + ``local_rows_loss`` (the contract
  itself, independent of the fused ops);
* ``gram_loss``, ``infonce``, ``anchor_loss``, ``centroid_loss`` with ``gather=True``: the shares
  summed over ranks equal the single-process loss on the concatenated batch, every input gradient
  equals the single-process gradient of this rank's rows, and the temperature gradient summed over
  ranks equals the single-process one — on the ``torch`` backend in float64 and on every fused
  backend available here in float32 (Triton, under its slow interpreter: one case per loss);
* ``fastbind.train.Trainer`` on every process (gathering losses, summed gradients) against the
  single-process trainer on the global batch.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastbind as fb
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
    # float64 runs on the reference; every fused backend of this machine runs float32.
    return [("torch", torch.float64)] + [(b, torch.float32) for b in ("cpu", "triton") if b in fb.backends()]


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
    share = local_rows_loss(x @ y_global.t() / tau, x_global @ y.t() / tau, offset, label_smoothing=0.1)
    share.backward()
    torch.testing.assert_close(_summed(share), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_full.grad[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, y_full.grad[rows], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_summed(tau.grad), tau_full.grad, rtol=1e-10, atol=1e-12)


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
    share = fn(*local, temperature=tau, backend=backend, gather=True, process_group=None, **kwargs)
    tol = TOL[dtype]
    if reduction == "none":
        assert share.shape == (sizes[dist.get_rank()],), f"per-row losses of shape {tuple(share.shape)}"
        (share * weight_full[rows]).sum().backward()
        torch.testing.assert_close(share.detach(), ref.detach()[rows], **tol)
    else:
        share.backward()
        torch.testing.assert_close(_summed(share), ref.detach(), **tol)
    for i, (mine, whole) in enumerate(zip(local, full)):
        if whole.grad is None:
            assert mine.grad is None or not mine.grad.abs().any(), f"input {i}: gradient where the full loss has none"
            continue
        assert mine.grad is not None, f"input {i}: no gradient reached this rank's rows"
        torch.testing.assert_close(mine.grad, whole.grad[rows], **tol, msg=lambda m, i=i: f"input {i} gradient: {m}")
    assert tau.grad is not None, "the temperature got no gradient"
    torch.testing.assert_close(_summed(tau.grad), tau_full.grad, **tol, msg=lambda m: f"temperature gradient: {m}")


def _check_trainer(loss: str):
    """3 steps of fastbind.train on every process (gathering losses, summed gradients) equal 3
    single-process steps on the global batch: same losses, same parameters."""
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
