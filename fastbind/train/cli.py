"""`fastbind train`: one synthetic binding run, or the anchor study (`--compare`).

    fastbind train --loss gram --modalities 3 --steps 500
    fastbind train --compare [--quick]

A single run prints a final table (retrieval R@1/5/10 per ordered modality pair, their mean, the
linear-probe accuracy per modality) and writes ``metrics.json``, ``curves.png`` and
``checkpoint.pt`` into ``--out`` (default ``runs/<name>``). ``--compare`` trains a fixed-anchor model
for every choice of anchor, CentroBind and GRAM on the same data and seed and prints one table;
``--quick`` shrinks it for ``make demo``.

Several processes: ``torchrun --nproc_per_node 2 -m fastbind.cli train --loss centroid ...`` (gloo on
CPU, NCCL with ``--device cuda``): every process trains on its rows of each global batch with the
gathering losses (``gather=True``) and gradients averaged over processes as DDP does, so the run
equals the single-process one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace

from fastbind.train.loop import LOSSES, RunFileError, TrainConfig, Trainer, load_checkpoint

__all__ = ["main", "build_parser", "parse_args"]

# --quick: small enough for `make demo` (< ~2.5 min for the whole --compare on 2 cores).
QUICK = dict(steps=500, batch_size=128, eval_size=500, probe_size=1000, eval_every=100)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastbind train",
        description="Train per-modality encoders on synthetic multimodal data with a binding loss "
        "(GRAM, CentroBind, fixed anchor, pairwise CLIP) and report retrieval and linear-probe metrics.",
    )
    p.add_argument("--loss", choices=LOSSES, default="gram", help="binding loss (default gram)")
    p.add_argument("--modalities", type=int, default=3, help="number of modalities M >= 2 (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1500, --quick 500)")
    p.add_argument("--anchor", type=int, default=0, help="anchor modality of --loss anchor/gram (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 256, --quick 128)")
    p.add_argument(
        "--leave-one-out", action="store_true", help="--loss centroid: anchor = centroid of the other modalities"
    )
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the initialisation")
    p.add_argument("--autocast", action="store_true", help="bfloat16 autocast (CPU) / float16 (CUDA)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (0: only at the end)")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint.pt")
    p.add_argument("--compare", action="store_true", help="anchor study: every fixed anchor, CentroBind, GRAM")
    p.add_argument("--seeds", type=int, default=1, help="--compare: repeat over this many seeds and average")
    p.add_argument("--quick", action="store_true", help="a short run (make demo)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the encoders are tiny and gain nothing from more threads)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.modalities < 2:
        parser.error(f"--modalities must be >= 2, got {args.modalities}")
    if args.loss == "gram" and args.modalities > 8:
        parser.error(f"--loss gram supports 2 to 8 modalities, got {args.modalities}")
    if not 0 <= args.anchor < args.modalities:
        parser.error(
            f"--anchor must be in [0, {args.modalities - 1}] for {args.modalities} modalities, got {args.anchor}"
        )
    for name in ("steps", "batch_size", "dim", "eval_every", "seeds", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "eval_every" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.leave_one_out and args.loss != "centroid" and not args.compare:
        parser.error("--leave-one-out applies to --loss centroid")
    if args.compare and args.resume:
        parser.error("--resume applies to a single run, not to --compare")
    problem = _device_problem(args.device)
    if problem:
        parser.error(f"--device {args.device}: {problem}")
    return args


def _device_problem(device: str) -> str | None:
    """Why `device` cannot train here (None when it can): unparsable, meta (no data), not present."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        return f"not a torch device ({str(exc).splitlines()[0]})"
    if dev.type == "meta":
        return "meta tensors hold no data; training needs a real device (cpu, cuda, ...)"
    try:  # allocate and read back one value: catches absent GPUs, bad indices, unbuilt backends
        float(torch.ones(1, device=dev).sum())
    except Exception as exc:  # noqa: BLE001 - any failure means the device is unusable; report it in one line
        lines = str(exc).strip().splitlines()
        return f"not usable here ({lines[0] if lines else type(exc).__name__})"
    return None


def _check_out(out: str) -> None:
    """Create the output folder and make sure a file can be written there, before any training (a
    failure at the final save would lose the whole run). RunFileError with the reason."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".fastbind-write-test-"):
            pass
    except OSError as exc:
        raise RunFileError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _config(args: argparse.Namespace, **overrides) -> TrainConfig:
    base = TrainConfig(
        loss=args.loss,
        modalities=args.modalities,
        steps=1500,
        anchor=args.anchor,
        batch_size=256,
        dim=args.dim,
        lr=args.lr,
        seed=args.seed,
        autocast=args.autocast,
        leave_one_out=args.leave_one_out and args.loss == "centroid",
        eval_every=100,
        progress=not args.no_progress,
    )
    if args.quick:
        base = replace(base, **QUICK)
    for name in ("steps", "batch_size", "eval_every"):
        if getattr(args, name) is not None:
            base = replace(base, **{name: getattr(args, name)})
    return replace(base, **overrides)


def _run_name(config: TrainConfig) -> str:
    anchored = config.loss in ("anchor", "gram")
    loo = "-loo" if config.leave_one_out else ""
    return f"{config.loss}{config.anchor if anchored else ''}{loo}-m{config.modalities}-s{config.seed}"


def _method(config: TrainConfig) -> str:
    if config.loss == "anchor":
        return f"anchor={config.anchor}"
    if config.loss == "gram":
        return f"gram (anchor {config.anchor})"
    if config.loss == "centroid":
        return "centroid leave-one-out" if config.leave_one_out else "centroid (CentroBind)"
    return "pairwise CLIP"


def _average(metrics: list[dict]) -> dict:
    """Leaf-wise mean of several runs' metrics (same structure); strings are kept."""
    first = metrics[0]
    if isinstance(first, dict):
        return {k: _average([m[k] for m in metrics]) for k in first}
    if isinstance(first, list):
        return [_average([m[i] for m in metrics]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return sum(metrics) / len(metrics)
    return first


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def _render(header: list[str], lines: list[list[str]], left: int = 1) -> str:
    """A Markdown table; the first `left` columns left-aligned, numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]

    def fmt(cells):
        return (
            "| "
            + " | ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    rule = "|" + "|".join(("-" * (w + 2)) if i < left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *(fmt(r) for r in lines)])


def format_tables(rows: list[dict], modalities: int) -> str:
    """Two tables, one line per method. rows: {"method", "metrics" (seed-averaged), "r1_per_seed",
    "seconds"}. Retrieval: R@1 of every ordered pair (query->gallery), mean R@1/5/10 over pairs.
    Probe and GRAM-style retrieval: linear-probe accuracy per modality, their mean, R@1 of each
    modality against the tuple of all others by ascending volume (k = M; M <= 8 only, the range of
    gram_volume), training time."""
    pairs = [f"{a}->{b}" for a in range(modalities) for b in range(modalities) if a != b]
    seeds = len(rows[0]["r1_per_seed"])
    header = ["method", "score", *(f"R@1 {p}" for p in pairs), "mean R@1"]
    header += ["sd (seeds)"] if seeds > 1 else []
    header += ["mean R@5", "mean R@10"]
    lines = []
    for row in rows:
        m = row["metrics"]
        cells = [
            row["method"],
            m["scoring"],
            *(f"{m['pairs'][p]['R@1']:.3f}" for p in pairs),
            f"{m['mean']['R@1']:.3f}",
        ]
        cells += [f"{_std(row['r1_per_seed']):.3f}"] if seeds > 1 else []
        cells += [f"{m['mean']['R@5']:.3f}", f"{m['mean']['R@10']:.3f}"]
        lines.append(cells)
    retrieval_table = _render(header, lines, left=2)

    # GRAM's joint-volume retrieval exists for M <= 8 only (gram_volume's k = M); no columns otherwise
    volume = all(row["metrics"]["joint_volume"] for row in rows)
    header = ["method", *(f"probe m{i}" for i in range(modalities)), "mean probe"]
    header += [f"vol R@1 {i}->rest" for i in range(modalities)] if volume else []
    header += ["train s"]
    lines = []
    for row in rows:
        m = row["metrics"]
        probe = m["probe"]
        cells = [row["method"], *(f"{acc:.3f}" for acc in probe), f"{sum(probe) / len(probe):.3f}"]
        cells += [f"{m['joint_volume'][f'{i}->rest']['R@1']:.3f}" for i in range(modalities)] if volume else []
        cells += [f"{row['seconds']:.1f}"]
        lines.append(cells)
    return retrieval_table + "\n\n" + _render(header, lines)


def _plot(path: str, runs: list[tuple[str, dict]]) -> bool:
    """Loss and periodic mean R@1 curves of each run into a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in runs:
        ax_loss.plot(history["step"], history["loss"], label=name, linewidth=1)
        if history["eval_step"]:
            ax_r1.plot(history["eval_step"], history["eval_r1"], marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    ax_r1.set(xlabel="step", ylabel="mean R@1 (held out)", title="cross-modal retrieval")
    for ax in (ax_loss, ax_r1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _write_outputs(out: str, payload: dict, runs: list[tuple[str, dict]]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(payload, f, indent=1)
    png = os.path.join(out, "curves.png")
    wrote = _plot(png, runs)
    print(f"wrote {os.path.join(out, 'metrics.json')}" + (f" and {png}" if wrote else " (no matplotlib: no PNG)"))


def _legend(chance: dict) -> str:
    return (
        f"chance: R@1 {chance['R@1']:.4f}, probe {chance['probe']:.3f}. Retrieval scoring: cosine for the "
        "InfoNCE losses; for GRAM ascending volume with the query modality as anchor and the gallery "
        "modality as the single data modality (k = 2). 'vol R@1 m->rest': modality m against the tuple of "
        "all other modalities of each sample by ascending volume (k = M, GRAM's multimodal retrieval), "
        "for every method (M <= 8 only)."
    )


def _single(args: argparse.Namespace) -> int:
    config = _config(args)
    config = replace(config, out=args.out or os.path.join("runs", _run_name(config)))
    if args.resume:
        load_checkpoint(args.resume)  # a bad file fails here, before the output folder is created
    _check_out(config.out)
    trainer = Trainer(config, args.device)
    if args.resume:
        trainer.load(args.resume)
        print(f"resumed from {args.resume} at step {trainer.step}")
    start = time.perf_counter()
    metrics = trainer.fit()
    seconds = time.perf_counter() - start
    history = trainer.history
    print(f"\nloss {history['loss'][0]:.4f} (step 1) -> {history['loss'][-1]:.4f} (step {trainer.step})")
    row = {"method": _method(config), "metrics": metrics, "r1_per_seed": [metrics["mean"]["R@1"]], "seconds": seconds}
    print(format_tables([row], config.modalities))
    print(_legend(metrics["chance"]))
    payload = {"config": asdict(config), "metrics": metrics, "history": history, "seconds": seconds}
    _write_outputs(config.out, payload, [(_method(config), history)])
    return 0


def compare_configs(args: argparse.Namespace, seed: int | None = None) -> list[TrainConfig]:
    """Fixed anchor for each choice of anchor, CentroBind (plain and leave-one-out), pairwise CLIP and
    GRAM (anchor --anchor),
    all on the same data, seed and budget."""
    seed = args.seed if seed is None else seed

    def make(loss, anchor=args.anchor, leave_one_out=False):
        return _config(args, loss=loss, anchor=anchor, leave_one_out=leave_one_out, seed=seed)

    configs = [make("anchor", anchor=a) for a in range(args.modalities)]
    configs += [make("centroid"), make("centroid", leave_one_out=True), make("pairwise")]
    if args.modalities <= 8:
        configs.append(make("gram"))
    return configs


def _compare(args: argparse.Namespace) -> int:
    seeds = list(range(args.seed, args.seed + args.seeds))
    tag = f"compare-m{args.modalities}-s{args.seed}{f'x{args.seeds}' if args.seeds > 1 else ''}"
    out = args.out or os.path.join("runs", tag + ("-quick" if args.quick else ""))
    _check_out(out)
    c0 = compare_configs(args)[0]
    print(
        f"anchor study: {args.modalities} modalities (modality {args.modalities - 1} is the noisy one), "
        f"{c0.steps} steps x batch {c0.batch_size}, seed(s) {', '.join(map(str, seeds))}, "
        f"{c0.eval_size} held-out pairs, probe fitted on {c0.probe_size}"
    )
    per_method: dict[str, dict] = {}
    runs, results = [], []
    for seed in seeds:
        for config in compare_configs(args, seed):
            start = time.perf_counter()
            trainer = Trainer(config, args.device)
            metrics = trainer.fit()
            seconds = time.perf_counter() - start
            name = _method(config)
            entry = per_method.setdefault(name, {"metrics": [], "seconds": 0.0})
            entry["metrics"].append(metrics)
            entry["seconds"] += seconds / len(seeds)
            if seed == seeds[0]:
                runs.append((name, trainer.history))
            results.append(
                {
                    "method": name,
                    "seed": seed,
                    "config": asdict(config),
                    "metrics": metrics,
                    "seconds": seconds,
                    "history": trainer.history,
                }
            )
    rows = [
        {
            "method": name,
            "metrics": _average(entry["metrics"]),
            "r1_per_seed": [m["mean"]["R@1"] for m in entry["metrics"]],
            "seconds": entry["seconds"],
        }
        for name, entry in per_method.items()
    ]
    print()
    if len(seeds) > 1:
        print(f"means over {len(seeds)} seeds; 'sd (seeds)': standard deviation of mean R@1 across seeds")
    print(format_tables(rows, args.modalities))
    print(_legend(rows[0]["metrics"]["chance"]))
    _write_outputs(out, {"seeds": seeds, "summary": rows, "runs": results}, runs)
    return 0


def main(argv: list[str]) -> int:
    """Entry of `fastbind train ...`; returns the exit status (2 for a usage error, as argparse)."""
    try:
        args = parse_args(list(argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    import torch

    torch.set_num_threads(args.threads)
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and _init_torchrun(args)
    try:
        if _is_rank0():
            return _compare(args) if args.compare else _single(args)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # only rank 0 prints
            return _compare(args) if args.compare else _single(args)
    except RunFileError as exc:  # a bad --resume or --out: one line, as argparse reports usage errors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fastbind train: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _is_rank0() -> bool:
    from fastbind.distributed import rank

    return rank() == 0


def _init_torchrun(args: argparse.Namespace) -> bool:
    """Launched by torchrun: join the process group (NCCL for CUDA devices, gloo for CPU). Every
    process then trains on its rows of each global batch with the gathering losses."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # the caller owns the process group
        return False
    if args.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
