"""The training layer: synthetic data, metrics, a short training run, checkpoint resume, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fastbind as fb
from fastbind.train import (
    LOSSES,
    SyntheticConfig,
    SyntheticMultimodal,
    TrainConfig,
    Trainer,
    cli,
    linear_probe,
    pairwise_retrieval,
    retrieval,
)

# A small run: a few seconds per loss on 2 cores.
TINY = dict(steps=60, batch_size=64, dim=16, hidden=64, lr=3e-3, eval_size=200, probe_size=300, eval_every=30)


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny encoders gain nothing from threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "progress": False, **overrides})


# ----------------------------------------------------------------------------- data


def test_data_shapes_and_labels():
    data = SyntheticMultimodal(SyntheticConfig(modalities=4, input_dim=20, num_classes=5, seed=3))
    batch = data.batch(0, 33)
    assert len(batch.inputs) == 4 and len(batch) == 33
    assert all(x.shape == (33, 20) and x.dtype == torch.float32 for x in batch.inputs)
    assert batch.labels.shape == (33,) and batch.labels.dtype == torch.int64
    assert batch.shared.shape == (33, data.config.shared_dim)
    # labels are a function of the shared latent only
    torch.testing.assert_close(batch.labels, (batch.shared @ data.label_map).argmax(1), rtol=0, atol=0)
    big = data.held_out(4000)
    counts = torch.bincount(big.labels, minlength=5)
    assert (counts > 4000 / 5 / 3).all(), f"labels far from balanced: {counts.tolist()}"
    # the default informativeness makes the last modality the noisy one
    assert data.informativeness[-1] < data.informativeness[0] and data.noise[-1] > data.noise[0]


def test_data_is_deterministic_given_seed():
    a, b = SyntheticMultimodal(seed=7), SyntheticMultimodal(seed=7)
    for x, y in zip(a.batch(5, 16).inputs + a.held_out(10).inputs, b.batch(5, 16).inputs + b.held_out(10).inputs):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    other_step = a.batch(6, 16).inputs[0]
    other_seed = SyntheticMultimodal(seed=8).batch(5, 16).inputs[0]
    assert not torch.equal(other_step, a.batch(5, 16).inputs[0])
    assert not torch.equal(other_seed, a.batch(5, 16).inputs[0])
    # held-out sets are separate streams from training and from each other
    assert not torch.equal(a.held_out(16, "eval").shared, a.held_out(16, "probe").shared)
    assert not torch.equal(a.held_out(16, "eval").shared, a.batch(0, 16).shared)
    # global torch RNG state plays no part
    torch.manual_seed(123)
    again = SyntheticMultimodal(seed=7).batch(5, 16).inputs[1]
    torch.testing.assert_close(again, a.batch(5, 16).inputs[1], rtol=0, atol=0)


def test_data_modalities_share_information():
    """Shared-latent signal: a modality's inputs predict the shared latent (the noisy one less well)."""
    data = SyntheticMultimodal(seed=0)
    train, test = data.held_out(3000, "probe"), data.held_out(1000, "eval")

    def r2(m):  # ridge regression of the shared latent on the raw inputs of modality m
        x, xt = train.inputs[m], test.inputs[m]
        x1, xt1 = F.pad(x, (0, 1), value=1.0), F.pad(xt, (0, 1), value=1.0)
        w = torch.linalg.solve(x1.T @ x1 + 1e-2 * torch.eye(x1.shape[1]), x1.T @ train.shared)
        resid = ((xt1 @ w - test.shared) ** 2).sum()
        return 1 - float(resid / ((test.shared - test.shared.mean(0)) ** 2).sum())

    scores = [r2(m) for m in range(3)]
    assert scores[0] > 0.3 and scores[1] > 0.3, scores
    assert 0.0 < scores[2] < min(scores[0], scores[1]), scores


def test_data_config_errors():
    with pytest.raises(ValueError, match="modalities must be >= 2"):
        SyntheticConfig(modalities=1)
    with pytest.raises(ValueError, match="noise has 2 values"):
        SyntheticConfig(modalities=3, noise=(0.1, 0.2))
    with pytest.raises(ValueError, match="split"):
        SyntheticMultimodal().held_out(4, "test")


# ----------------------------------------------------------------------------- metrics


def test_retrieval_recalls_against_brute_force():
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    gallery = F.normalize(query + 0.6 * torch.randn(50, 8, generator=g), dim=-1)
    got = retrieval(query, gallery, "cosine")
    sims = query @ gallery.T
    ranks = [int((sims[i] > sims[i, i]).sum()) for i in range(50)]
    for k in (1, 5, 10):
        assert got[f"R@{k}"] == pytest.approx(sum(r < k for r in ranks) / 50)
    assert 0 < got["R@1"] < 1  # neither trivial case
    assert retrieval(query, query, "cosine")["R@1"] == 1.0


def test_volume_retrieval_ranks_by_ascending_volume():
    g = torch.Generator().manual_seed(1)
    query = F.normalize(torch.randn(40, 6, generator=g), dim=-1)
    gallery = F.normalize(query + 0.8 * torch.randn(40, 6, generator=g), dim=-1)
    got = retrieval(query, gallery, "volume")
    # k = 2 volume of unit vectors: |sin| of the angle, computed independently
    vol = (1 - (query @ gallery.T) ** 2).clamp(min=0).sqrt()
    ranks = [int((vol[i] < vol[i, i]).sum()) for i in range(40)]
    for k in (1, 5, 10):
        assert got[f"R@{k}"] == pytest.approx(sum(r < k for r in ranks) / 40)
    pairs = pairwise_retrieval([query, gallery, query], "cosine")
    assert sorted(pairs) == ["0->1", "0->2", "1->0", "1->2", "2->0", "2->1"]
    assert pairs["0->2"]["R@1"] == 1.0
    with pytest.raises(ValueError, match="scoring"):
        retrieval(query, gallery, "dot")


def test_linear_probe():
    g = torch.Generator().manual_seed(2)
    centers = 4 * torch.randn(3, 5, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 5, generator=g)
    assert linear_probe(x[:200], y[:200], x[200:], y[200:], 3) > 0.9
    noise = torch.randn(300, 5, generator=g)  # features independent of the labels
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:], 3) < 0.6


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("loss", LOSSES)
def test_short_training_run_learns(loss):
    trainer = Trainer(_tiny(loss=loss, anchor=1 if loss == "anchor" else 0))
    metrics = trainer.fit()
    losses = trainer.history["loss"]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"{loss}: loss {first:.3f} -> {last:.3f}"
    chance = metrics["chance"]["R@1"]
    # the two informative modalities retrieve each other far above chance (1/200)
    assert metrics["pairs"]["0->1"]["R@1"] > 5 * chance, metrics["pairs"]
    assert metrics["mean"]["R@10"] > 10 * 10 * chance / 2, metrics["mean"]
    assert max(metrics["probe"]) > metrics["chance"]["probe"] + 0.15, metrics["probe"]
    assert trainer.history["eval_step"] == [30, 60] and len(trainer.history["eval_r1"]) == 2
    assert metrics["scoring"] == ("volume" if loss == "gram" else "cosine")


@pytest.mark.parametrize("loss", ["gram", "centroid"])
def test_checkpoint_resume_gives_the_same_next_loss(loss, tmp_path):
    config = _tiny(loss=loss, steps=5, eval_every=0, out=str(tmp_path))
    straight = Trainer(config)
    for _ in range(3):
        straight.train_step()
    straight.save(str(tmp_path / "ckpt.pt"))
    expected = [straight.train_step() for _ in range(2)]

    resumed = Trainer(config)
    resumed.load(str(tmp_path / "ckpt.pt"))
    assert resumed.step == 3
    got = [resumed.train_step() for _ in range(2)]
    assert got == expected, f"{got} != {expected}"
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert resumed.history["loss"] == straight.history["loss"]

    with pytest.raises(ValueError, match="was trained with loss="):
        Trainer(_tiny(loss="pairwise")).load(str(tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("loss", LOSSES)
def test_autocast_run_follows_float32_run(loss, backend):
    """bf16 autocast: finite losses close to the float32 run's (same data, same initialisation)."""
    fb.set_backend(backend)  # conftest resets it
    config = _tiny(loss=loss, steps=3, eval_every=0, batch_size=32)
    lowp = Trainer(replace(config, autocast=True))
    full = Trainer(config)
    got = [lowp.train_step() for _ in range(3)]
    expected = [full.train_step() for _ in range(3)]
    assert all(math.isfinite(v) for v in got), got
    assert got != expected  # autocast did change the arithmetic
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss", "triplet"], "invalid choice: 'triplet'"),
        (["--loss", "anchor", "--anchor", "3"], "--anchor must be in [0, 2]"),
        (["--anchor", "-1"], "--anchor must be in"),
        (["--modalities", "1"], "--modalities must be >= 2"),
        (["--loss", "gram", "--modalities", "9"], "2 to 8 modalities"),
        (["--steps", "0"], "--steps must be positive"),
        (["--compare", "--resume", "x.pt"], "--resume applies to a single run"),
        (["--compare", "--seeds", "0"], "--seeds must be positive"),
        (["--loss", "anchor", "--leave-one-out"], "--leave-one-out applies to --loss centroid"),
        (["--modalities", "three"], "invalid int value"),
    ],
)
def test_cli_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_parse_defaults_and_quick():
    args = cli.parse_args(["--loss", "anchor", "--anchor", "2", "--modalities", "4", "--quick", "--seed", "5"])
    config = cli._config(args)
    assert (config.loss, config.anchor, config.modalities, config.seed) == ("anchor", 2, 4, 5)
    assert config.steps == cli.QUICK["steps"] and config.batch_size == cli.QUICK["batch_size"]
    assert cli._config(cli.parse_args(["--quick", "--steps", "7"])).steps == 7
    assert cli.main(["--help"]) == 0
    compare = cli.compare_configs(cli.parse_args(["--compare", "--modalities", "3"]))
    assert [(c.loss, c.anchor) for c in compare] == [
        ("anchor", 0),
        ("anchor", 1),
        ("anchor", 2),
        ("centroid", 0),
        ("centroid", 0),
        ("pairwise", 0),
        ("gram", 0),
    ]
    assert [c.leave_one_out for c in compare] == [False, False, False, False, True, False, False]
    assert len({(c.seed, c.steps, c.batch_size, c.dim, c.lr) for c in compare}) == 1  # same data, seed, budget


def test_cli_single_run_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--loss", "pairwise", "--steps", "6", "--batch-size", "32", "--dim", "8", "--quick", "--no-progress"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "R@1 0->1" in printed and "probe m2" in printed and "pairwise CLIP" in printed
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["config"]["loss"] == "pairwise" and len(payload["history"]["loss"]) == 6
    assert set(payload["metrics"]["pairs"]) == {"0->1", "0->2", "1->0", "1->2", "2->0", "2->1"}
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").exists()
    # resume to 9 steps: the history continues from step 6
    assert (
        cli.main([*argv[:2], *argv[4:], "--steps", "9", "--out", str(out), "--resume", str(out / "checkpoint.pt")]) == 0
    )
    assert "resumed from" in capsys.readouterr().out
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["history"]["step"] == list(range(1, 10))


def test_cli_compare_runs_every_method_and_averages_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--compare", "--modalities", "2", "--steps", "3", "--batch-size", "16", "--quick", "--seeds", "2"]
    assert cli.main([*argv, "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    methods = [
        "anchor=0",
        "anchor=1",
        "centroid (CentroBind)",
        "centroid leave-one-out",
        "pairwise CLIP",
        "gram (anchor 0)",
    ]
    for method in methods:
        assert method in printed
    assert "sd (seeds)" in printed and "vol R@1 1->rest" in printed
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["seeds"] == [0, 1] and len(payload["runs"]) == 2 * len(methods)
    for row in payload["summary"]:
        runs = [r for r in payload["runs"] if r["method"] == row["method"]]
        assert sorted(r["seed"] for r in runs) == [0, 1]
        mean_r1 = sum(r["metrics"]["mean"]["R@1"] for r in runs) / 2
        assert row["metrics"]["mean"]["R@1"] == pytest.approx(mean_r1)
        assert row["r1_per_seed"] == [r["metrics"]["mean"]["R@1"] for r in runs]
    # seeds give different data and initialisations
    first = [r for r in payload["runs"] if r["method"] == "anchor=0"]
    assert first[0]["history"]["loss"] != first[1]["history"]["loss"]
    assert (out / "curves.png").exists()
