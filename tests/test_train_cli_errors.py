"""`fastbind train` on bad input (issue 12, points 8 and 11) and its tqdm progress bar (issue 13,
point 9): clear one-line errors before any training, never a traceback, and M > 8 tables."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from test_train import _one_thread  # noqa: F401 - the autouse one-thread fixture of the training tests

from fastbind.train import TrainConfig, Trainer, cli
from fastbind.train.loop import RunFileError, load_checkpoint

FAST = ["--steps", "2", "--batch-size", "16", "--dim", "8", "--quick", "--no-progress"]


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fastbind train: error:"), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr=-1e-3"], "--lr must be a finite number > 0"),
        (["--device", "bogus"], "--device bogus: not a torch device"),
        (["--device", "meta"], "--device meta: meta tensors hold no data"),
        (["--device", "cuda:99"], "--device cuda:99: not usable here"),
    ],
)
def test_cli_rejects_bad_numbers_and_devices(argv, message, capsys):
    assert cli.main([*argv, *FAST]) == 2
    _one_line_error(capsys, message)


class _RunsCode:
    """Unpickling this object calls open(path, "w"): what an untrusted checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_checkpoints(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(256))
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": torch.randn(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    evil = tmp_path / "evil.pt"
    torch.save({"config": _RunsCode(str(tmp_path / "pwned"))}, evil)
    return {
        "missing": (tmp_path / "nope.pt", "does not exist"),
        "directory": (tmp_path, "is not a file"),
        "empty": (empty, "is empty"),
        "corrupt": (corrupt, "is not a readable torch checkpoint"),
        "truncated": (truncated, "is not a readable torch checkpoint"),
        "foreign": (foreign, "is not a fastbind training checkpoint (missing config"),
        "plain pickle": (plain, "is not a readable torch checkpoint"),
        "code": (evil, "holds objects other than tensors"),
    }


@pytest.mark.parametrize(
    "kind", ["missing", "directory", "empty", "corrupt", "truncated", "foreign", "plain pickle", "code"]
)
def test_cli_resume_of_a_bad_file_is_one_line(kind, tmp_path, capsys):
    path, message = _bad_checkpoints(tmp_path)[kind]
    out = tmp_path / "out"
    assert cli.main(["--resume", str(path), "--out", str(out), *FAST]) == 2
    _one_line_error(capsys, message)
    assert not out.exists()  # failed before training and before writing anything
    assert not (tmp_path / "pwned").exists()  # weights_only=True: the file's code never ran


def test_resume_of_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "a" / "checkpoint.pt"
    assert cli.main(["--loss", "pairwise", "--out", str(ckpt.parent), *FAST]) == 0
    capsys.readouterr()
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {"not": torch.ones(1)}
    torch.save(state, ckpt)
    assert cli.main(["--loss", "pairwise", "--out", str(tmp_path / "b"), "--resume", str(ckpt), *FAST]) == 2
    _one_line_error(capsys, "does not match this model")


def test_checkpoints_load_with_weights_only(tmp_path, monkeypatch):
    """Our own checkpoints hold only what torch.load(weights_only=True) accepts, and every load
    goes through it."""
    trainer = Trainer(TrainConfig(steps=2, batch_size=16, dim=8, eval_size=50, probe_size=50, progress=False))
    trainer.train_step()
    path = str(tmp_path / "c.pt")
    trainer.save(path)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fresh = Trainer(TrainConfig(steps=2, batch_size=16, dim=8, eval_size=50, probe_size=50, progress=False))
    fresh.load(path)
    assert seen == [True] and fresh.step == 1
    assert isinstance(load_checkpoint(path), dict)
    with pytest.raises(RunFileError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("compare", [False, True])
def test_cli_unusable_out_fails_before_training(compare, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    trained = []
    monkeypatch.setattr(Trainer, "fit", lambda self, steps=None: trained.append(1))
    for out in (blocker, blocker / "sub"):
        argv = ["--compare", "--modalities", "2"] if compare else []
        assert cli.main([*argv, "--out", str(out), *FAST]) == 2
        _one_line_error(capsys, f"--out {out}: cannot write there")
    assert trained == []


def test_cli_more_than_eight_modalities_prints_and_writes(tmp_path, capsys):
    """M = 9: no GRAM joint-volume retrieval (gram_volume has k <= 8), and no KeyError '0->rest'."""
    out = tmp_path / "m9"
    argv = ["--loss", "centroid", "--modalities", "9", "--out", str(out), *FAST]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "R@1 8->7" in printed and "probe m8" in printed and "vol R@1 0->rest" not in printed
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["metrics"]["joint_volume"] == {} and len(payload["metrics"]["probe"]) == 9
    assert (out / "curves.png").exists()


def test_compare_table_for_more_than_eight_modalities():
    """--compare --modalities 9 has no GRAM row and no joint-volume retrieval: the tables still print."""
    pairs = {f"{a}->{b}": {"R@1": 0.5, "R@5": 0.6, "R@10": 0.7} for a in range(9) for b in range(9) if a != b}
    metrics = {
        "scoring": "cosine",
        "pairs": pairs,
        "mean": {"R@1": 0.5, "R@5": 0.6, "R@10": 0.7},
        "joint_volume": {},
        "probe": [0.25] * 9,
    }
    rows = [{"method": m, "metrics": metrics, "r1_per_seed": [0.5, 0.4], "seconds": 1.0} for m in ("anchor=0", "x")]
    text = cli.format_tables(rows, 9)
    assert "R@1 0->8" in text and "probe m8" in text and "vol R@1" not in text and "sd (seeds)" in text
    assert "vol R@1 0->rest" in cli.format_tables(
        [{**rows[0], "metrics": {**metrics, "joint_volume": {f"{i}->rest": {"R@1": 0.1} for i in range(9)}}}], 9
    )


def test_progress_bar_is_tqdm_on_stderr(capsys):
    config = TrainConfig(steps=3, batch_size=16, dim=8, eval_size=50, probe_size=50, eval_every=0, progress=True)
    Trainer(config).fit()
    captured = capsys.readouterr()
    assert "gram@0" in captured.err and "3/3" in captured.err and "100%|" in captured.err  # tqdm's format
    assert "gram@0" not in captured.out  # stdout keeps the tables
    Trainer(TrainConfig(**{**config.__dict__, "progress": False})).fit()
    assert capsys.readouterr().err == ""
