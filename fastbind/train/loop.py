"""The training loop: binding losses on synthetic multimodal data, evaluation, checkpoints.

Losses (``TrainConfig.loss``), all through fastbind's public API with the model's learnable
temperature:

* ``gram``     — ``fastbind.gram_loss(z[anchor], *others)`` (GRAM: the anchor modality crossed with
  the batch, the other modalities of each sample span the volume; anchor 0 by default).
* ``centroid`` — ``fastbind.centroid_loss(*z)`` (CentroBind: every modality against the per-sample
  centroid of all modalities; ``leave_one_out``: against the centroid of the other modalities).
* ``anchor``   — ``fastbind.anchor_loss(z[anchor], *others)`` (ImageBind-style fixed anchor).
* ``pairwise`` — the sum of ``fastbind.infonce(z[a], z[b])`` over all pairs a < b (CLIP on every
  pair).

A training batch is a function of (seed, step) only, so a checkpoint's data cursor is its step; the
checkpoint also holds the model, the optimizer, the RNG states and the history, and resuming gives
the same next loss as the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import sys
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import fastbind as fb
import fastbind.distributed as dist_utils
from fastbind.train.data import SyntheticConfig, SyntheticMultimodal
from fastbind.train.metrics import joint_volume_retrieval, linear_probe, pairwise_retrieval
from fastbind.train.models import BindingModel

__all__ = ["LOSSES", "TrainConfig", "Trainer", "train", "binding_loss", "load_checkpoint", "RunFileError"]

LOSSES = ("gram", "centroid", "anchor", "pairwise")


@dataclass
class TrainConfig:
    loss: str = "gram"
    modalities: int = 3
    steps: int = 300
    anchor: int = 0
    batch_size: int = 256
    dim: int = 64
    hidden: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    temperature: float = 0.1  # initial value of the learnable temperature
    leave_one_out: bool = False  # centroid: each modality's anchor is the centroid of the others
    seed: int = 0
    autocast: bool = False
    eval_every: int = 100  # 0: evaluate only at the end
    eval_size: int = 1000  # held-out pairs for retrieval (chance R@1 = 1/eval_size) and probe accuracy
    probe_size: int = 2000  # held-out samples the linear probe is fitted on
    checkpoint_every: int = 0  # 0: a checkpoint only at the end (when an output folder is given)
    out: str | None = None
    progress: bool = True
    data: dict = field(default_factory=dict)  # SyntheticConfig overrides (input_dim, noise, ...)

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.modalities < 2:
            raise ValueError(f"TrainConfig: modalities must be >= 2, got {self.modalities}")
        if self.loss == "gram" and self.modalities > 8:
            raise ValueError(f"TrainConfig: gram supports 2 to 8 modalities, got {self.modalities}")
        if self.leave_one_out and self.loss != "centroid":
            raise ValueError(f"TrainConfig: leave_one_out applies to the centroid loss, not to {self.loss!r}")
        if not 0 <= self.anchor < self.modalities:
            raise ValueError(f"TrainConfig: anchor must be in [0, {self.modalities - 1}], got {self.anchor}")
        for name in ("steps", "batch_size", "dim", "hidden", "eval_size", "probe_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def scoring(self) -> str:
        """How retrieval ranks gallery items for this loss (see fastbind.train.metrics)."""
        return "volume" if self.loss == "gram" else "cosine"


def binding_loss(
    name: str,
    embeddings: list[torch.Tensor],
    temperature,
    anchor: int = 0,
    leave_one_out: bool = False,
    gather: bool = False,
) -> torch.Tensor:
    """The scalar training loss `name` (one of LOSSES) of the per-modality embeddings [B, D].

    gather=True: embeddings are this process's rows; the result is the DDP-convention loss on the
    batch gathered over the default process group (its mean over processes is the global loss)."""
    others = [z for i, z in enumerate(embeddings) if i != anchor]
    kw = {"temperature": temperature, "gather": gather}
    if name == "gram":
        return fb.gram_loss(embeddings[anchor], *others, **kw)
    if name == "centroid":
        return fb.centroid_loss(*embeddings, leave_one_out=leave_one_out, **kw)
    if name == "anchor":
        return fb.anchor_loss(embeddings[anchor], *others, **kw)
    if name == "pairwise":
        pairs = [(a, b) for a in range(len(embeddings)) for b in range(a + 1, len(embeddings))]
        return sum(fb.infonce(embeddings[a], embeddings[b], **kw) for a, b in pairs)
    raise ValueError(f"binding_loss: loss must be one of {', '.join(LOSSES)}, got {name!r}")


def _progress(total: int, start: int, enabled: bool, label: str) -> tqdm:
    """tqdm on stderr (stdout keeps the tables). Off a terminal (logs, CI) tqdm still redraws with
    carriage returns, so refresh at most every 30 s there instead of every 0.1 s."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=start,
        desc=label,
        disable=not enabled,
        mininterval=0.1 if tty else 30.0,
        dynamic_ncols=tty,
        leave=True,
    )


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


class Trainer:
    """Holds the data, the model, the optimizer and the history of one training run."""

    def __init__(self, config: TrainConfig, device: str | torch.device = "cpu", distributed: bool | None = None):
        """distributed: None = when a torch.distributed process group is initialised (torchrun). Then
        every process trains on its rows of the global batch, the losses gather the batch
        (gather=True), the parameter gradients and losses are averaged over processes as DDP does
        (the losses follow DDP's convention, so no world-size factor appears) and only rank 0 prints
        and writes: the run equals the single-process run on the global batch up to float rounding."""
        config.validate()
        self.config = config
        self.device = torch.device(device)
        self.distributed = dist_utils.world_size() > 1 if distributed is None else distributed
        self.rank = dist_utils.rank() if self.distributed else 0
        self.world = dist_utils.world_size() if self.distributed else 1
        if config.batch_size < self.world:
            raise ValueError(f"Trainer: batch_size {config.batch_size} < {self.world} processes")
        self.data = SyntheticMultimodal(SyntheticConfig(modalities=config.modalities, seed=config.seed, **config.data))
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model = BindingModel(self.data.input_dims, config.dim, config.hidden, config.temperature).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.history: dict[str, list] = {"step": [], "loss": [], "temperature": [], "eval_step": [], "eval_r1": []}
        self._eval_sets = None

    # ---------------------------------------------------------------- training
    def _autocast(self):
        if not self.config.autocast:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> float:
        """One optimizer step on training batch number `self.step`; returns its loss."""
        c = self.config
        batch = self.data.batch(self.step, c.batch_size)
        rows = self._local_rows()
        inputs = [x[rows].to(self.device) for x in batch.inputs]
        self.model.train()
        with self._autocast():
            embeddings = self.model(inputs)
        # The loss runs outside autocast: every backend takes the bf16/fp16 embeddings as they are
        # and accumulates in float32 (the reference upcasts 16-bit inputs itself).
        loss = binding_loss(
            c.loss, embeddings, self.model.temperature, c.anchor, c.leave_one_out, gather=self.distributed
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.distributed:
            loss = self._average_over_processes(loss)
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        self.history["step"].append(self.step)
        self.history["loss"].append(value)
        self.history["temperature"].append(float(self.model.temperature.detach()))
        return value

    def _local_rows(self) -> slice:
        """This process's rows of the global batch: sizes differ by at most one (B need not divide)."""
        base, extra = divmod(self.config.batch_size, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def _average_over_processes(self, loss: torch.Tensor) -> torch.Tensor:
        """Average the parameter gradients and the losses over processes, as DDP does: with the
        gathering losses' DDP convention both averages are the single-process values."""
        import torch.distributed as dist

        # Every process uses every parameter (all encoders, the temperature), so no grad is None.
        params = [p for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [loss.detach().float().reshape(1)])
        dist.all_reduce(flat)  # one collective for every gradient and the loss
        flat /= self.world
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.grad.dtype)
            offset += p.numel()
        return flat[-1]

    def fit(self, steps: int | None = None) -> dict:
        """Train until `steps` (default config.steps) total steps, evaluating and checkpointing
        periodically; returns the final metrics."""
        c = self.config
        total = c.steps if steps is None else steps
        bar = _progress(
            total,
            self.step,
            c.progress and self.rank == 0,
            f"{c.loss}{'@' + str(c.anchor) if c.loss in ('anchor', 'gram') else ''}{'-loo' if c.leave_one_out else ''}",
        )
        while self.step < total:
            loss = self.train_step()
            values = {"loss": loss, "tau": self.history["temperature"][-1]}
            if c.eval_every and self.step % c.eval_every == 0 and self.step < total:
                values["R@1"] = self._periodic_eval()
            elif self.history["eval_r1"]:
                values["R@1"] = self.history["eval_r1"][-1]
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            bar.update(1)
            if c.out and c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.rank == 0:
                self.save(os.path.join(c.out, "checkpoint.pt"))
        bar.close()
        metrics = self.evaluate()
        self.history["eval_step"].append(self.step)
        self.history["eval_r1"].append(metrics["mean"]["R@1"])
        if c.out and self.rank == 0:
            self.save(os.path.join(c.out, "checkpoint.pt"))
        return metrics

    # ---------------------------------------------------------------- evaluation
    def _held_out(self):
        if self._eval_sets is None:
            self._eval_sets = (
                self.data.held_out(self.config.eval_size, "eval"),
                self.data.held_out(self.config.probe_size, "probe"),
            )
        return self._eval_sets

    @torch.no_grad()
    def embed(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.model.eval()
        return [z.float().cpu() for z in self.model([x.to(self.device) for x in inputs])]

    def _periodic_eval(self) -> float:
        """Mean R@1 over ordered modality pairs on the eval set (cheap: no probe)."""
        eval_set, _ = self._held_out()
        recalls = pairwise_retrieval(self.embed(eval_set.inputs), self.config.scoring)
        r1 = sum(r["R@1"] for r in recalls.values()) / len(recalls)
        self.history["eval_step"].append(self.step)
        self.history["eval_r1"].append(r1)
        return r1

    def evaluate(self) -> dict:
        """Retrieval R@1/5/10 for every ordered pair, their means, GRAM-style joint-volume retrieval,
        and linear-probe accuracy of the shared label per modality."""
        eval_set, probe_set = self._held_out()
        z_eval = self.embed(eval_set.inputs)
        z_probe = self.embed(probe_set.inputs)
        pairs = pairwise_retrieval(z_eval, self.config.scoring)
        mean = {k: sum(r[k] for r in pairs.values()) / len(pairs) for k in next(iter(pairs.values()))}
        probe = [
            linear_probe(zp, probe_set.labels, ze, eval_set.labels, self.data.config.num_classes)
            for zp, ze in zip(z_probe, z_eval)
        ]
        joint = joint_volume_retrieval(z_eval) if self.config.modalities <= 8 else {}
        return {
            "scoring": self.config.scoring,
            "pairs": pairs,
            "mean": mean,
            "joint_volume": joint,
            "probe": probe,
            "chance": {"R@1": 1 / self.config.eval_size, "probe": 1 / self.data.config.num_classes},
        }

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "data_cursor": self.step,  # batch i is a function of (seed, i): the cursor is the step
            "rng": _rng_state(),
            "history": self.history,
        }

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind

    def load(self, path: str) -> None:
        """Resume from a checkpoint written by :meth:`save`. Loaded with ``weights_only=True`` (an
        untrusted file cannot run code); a missing, empty, corrupt or foreign file raises a one-line
        ``ValueError``."""
        state = load_checkpoint(path, self.device)
        saved = state["config"]
        if not isinstance(saved, dict):
            raise RunFileError(f"resume: {path} is not a fastbind training checkpoint (config is not a dict)")
        for key in ("loss", "modalities", "anchor", "leave_one_out", "dim", "hidden", "seed", "batch_size", "data"):
            if saved.get(key, getattr(TrainConfig(), key)) != getattr(self.config, key):
                raise RunFileError(
                    f"resume: checkpoint {path} was trained with {key}={saved.get(key)!r}, "
                    f"this run has {key}={getattr(self.config, key)!r}"
                )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunFileError(f"resume: {path} does not match this model ({reason})") from None
        self.step = state["data_cursor"]
        self.history = state["history"]
        _set_rng_state(state["rng"])


class RunFileError(ValueError):
    """A checkpoint or output folder that cannot be used (missing, empty, corrupt, foreign, not
    writable): the CLI reports it in one line instead of a traceback."""


_CHECKPOINT_KEYS = ("config", "model", "optimizer", "data_cursor", "rng", "history")


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> dict:
    """The state dict of a fastbind training checkpoint, loaded with ``torch.load(weights_only=True)``;
    ValueError (one line, naming the file) when it is missing, empty, unreadable or not one of ours."""
    if not os.path.exists(path):
        raise RunFileError(f"resume: checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise RunFileError(f"resume: checkpoint {path} is not a file")
    if os.path.getsize(path) == 0:
        raise RunFileError(f"resume: checkpoint {path} is empty")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only" in reason.lower():  # torch's advice to load unsafely is not ours to give
            reason = "it holds objects other than tensors and plain containers, which weights_only=True refuses"
        raise RunFileError(f"resume: {path} is not a readable torch checkpoint ({reason})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunFileError(f"resume: {path} is not a fastbind training checkpoint (missing {', '.join(missing)})")
    return state


def train(config: TrainConfig, resume: str | None = None, device: str | torch.device = "cpu"):
    """Train one model; returns (trainer, final metrics)."""
    trainer = Trainer(config, device)
    if resume:
        trainer.load(resume)
    metrics = trainer.fit()
    return trainer, metrics
