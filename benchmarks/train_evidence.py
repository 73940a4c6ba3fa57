"""Evidence for the training issue: a small looped LM trained on the embedded corpus for a fixed wall-clock budget,
its validation perplexity at depths 1..64, the param-matched fixed-depth baseline trained for the same budget,
and the training throughput / MFU of ``anima-micro`` in fp32 and bf16.

What one run does:

1. Looped model (``--dim``-wide, layers 1/2/1, concat injection, lognormal-Poisson depth with mean ``--mean-loops``
   and truncated backprop ``--backprop-loops``) trained with the normal :class:`~loopformer.training.Trainer` on
   the standard-library corpus with a BPE tokenizer. The step count is sized from a short calibration run so the
   cosine schedule ends inside ``--minutes``; ``time_limit_minutes`` is the hard stop.
2. The param-matched baseline (:func:`loopformer.baselines.param_matched`: the same layers, run once) trained the
   same way for the same wall-clock budget.
3. Validation perplexity of both on the same validation rows (the looped model at every loop count of ``--loops``).
4. ``anima-micro`` training throughput in fp32 and bf16 autocast, read from the trainer's own metrics log.

Outputs: a JSON file, a PNG plot and a markdown table on stdout (``--render JSON`` redraws them from a saved report).

    python benchmarks/train_evidence.py --minutes 10 --json benchmarks/results/train_evidence.json \\
        --plot docs/img/train_evidence.png
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import loopformer
from loopformer.baselines import param_matched
from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.evaluation.perplexity import evaluate_loops
from loopformer.presets import get_preset
from loopformer.recurrence import sample_depths
from loopformer.table import format_table
from loopformer.training.config import TrainConfig
from loopformer.training.metrics import read_metrics
from loopformer.training.trainer import Trainer


def looped_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        dim=args.dim,
        n_heads=args.dim // 32,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        max_seq_len=args.seq_len,
        sliding_window=args.window,
        recurrence=RecurrenceConfig(mean_loops=args.mean_loops, backprop_loops=args.backprop_loops),
    )


def base_train_config(args: argparse.Namespace, steps: int) -> TrainConfig:
    return TrainConfig(
        data="stdlib",
        tokenizer="bpe",
        tokenizer_vocab=args.vocab,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=steps,
        lr=args.lr,
        warmup_steps=min(50, steps // 10),
        eval_every=0,
        save_every=0,
        log_every=10,
        eval_batches=args.eval_batches,
        eval_loops=(1,),
        seed=args.seed,
    )


def train(name: str, model: ModelConfig, args: argparse.Namespace, root: Path) -> tuple[Trainer, dict[str, Any]]:
    """Calibrate seconds per step, then train for the budget. Returns the trainer and a summary."""
    probe = Trainer(model, base_train_config(args, 6), root / f"{name}-probe", progress=False)
    probe.fit()
    timed = read_metrics(root / f"{name}-probe" / "metrics.jsonl", "train")
    tokens_per_step = args.batch_size * args.seq_len
    seconds_per_step = tokens_per_step / timed[-1]["tokens_per_s"]
    budget = 60 * args.minutes
    steps = max(10, int(0.93 * budget / seconds_per_step))
    print(f"{name}: ~{seconds_per_step:.3f} s/step -> {steps} steps in {args.minutes} min", flush=True)
    config = base_train_config(args, steps).replace(time_limit_minutes=args.minutes)
    trainer = Trainer(model, config, root / name, progress=False)
    start = time.perf_counter()
    result = trainer.fit()
    train_log = read_metrics(root / name / "metrics.jsonl", "train")
    summary = {
        "parameters": trainer.model.num_parameters(),
        "planned_steps": steps,
        "steps": result.step,
        "stopped": result.reason,
        "train_seconds": round(time.perf_counter() - start, 1),
        "tokens": trainer.tokens_seen,
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in train_log[1:]) / max(len(train_log) - 1, 1)),
        "mfu": round(sum(r["mfu"] for r in train_log[1:]) / max(len(train_log) - 1, 1), 4),
        "final_train_loss": round(train_log[-1]["loss"], 4),
    }
    return trainer, summary


def perplexities(trainer: Trainer, depths: list[int]) -> dict[int, float]:
    results = evaluate_loops(trainer.model, trainer.val_batches, depths, seed=trainer.config.seed)
    return {r.loops: round(r.perplexity, 3) for r in results}


def throughput(dtype: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Training tokens/s and MFU of anima-micro from the trainer's own log (first logged window excluded)."""
    config = TrainConfig(
        data="stdlib",
        tokenizer="bpe",
        tokenizer_vocab=args.vocab,
        seq_len=256,
        batch_size=8,
        steps=args.throughput_steps,
        dtype=dtype,
        warmup_steps=1,
        eval_every=0,
        save_every=0,
        log_every=1,
        seed=args.seed,
    )
    model = get_preset("anima-micro").replace(recurrence={"sampler": "fixed"})
    trainer = Trainer(model, config, root / f"anima-micro-{dtype}", progress=False)
    trainer.fit()
    log = read_metrics(root / f"anima-micro-{dtype}" / "metrics.jsonl", "train")[1:]
    start = read_metrics(root / f"anima-micro-{dtype}" / "metrics.jsonl", "start")[0]
    return {
        "dtype": dtype,
        "parameters": trainer.model.num_parameters(),
        "depth": model.recurrence.mean_loops,
        "backprop_loops": model.recurrence.backprop_loops,
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in log) / len(log), 1),
        "mfu": round(sum(r["mfu"] for r in log) / len(log), 4),
        "peak_gflops": round(start["peak_flops"] / 1e9, 1),
    }


def plot(path: Path, looped: dict[int, float], baseline: float, mean_loops: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=120)
    depths = sorted(looped)
    values = [looped[d] for d in depths]
    ax.plot(depths, values, marker="o", label="looped model (one shared core)")
    for depth, value in zip(depths, values, strict=True):
        ax.annotate(f"{value:.1f}", (depth, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.axhline(baseline, color="tab:red", linestyle="--", label=f"param-matched baseline, 1 pass ({baseline:.1f})")
    ax.axvline(mean_loops, color="gray", linestyle=":", label=f"mean training depth ({mean_loops})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_ylim(0, max([*values, baseline]) * 1.15)
    ax.set_xlabel("core iterations at evaluation (test-time depth)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--mean-loops", type=int, default=6)
    parser.add_argument("--backprop-loops", type=int, default=3)
    parser.add_argument("--window", type=int, help="sliding attention window (default: full causal attention)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--loops", default="1,2,4,8,16,32,64")
    parser.add_argument("--throughput-steps", type=int, default=6, help="anima-micro steps per dtype (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the runs in this folder (default: a temp folder)")
    parser.add_argument("--render", type=Path, help="only print the tables and draw the plot of a saved JSON report")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
    else:
        report = measure(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    show(report, args.plot)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    depths = [int(d) for d in args.loops.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        looped_trainer, looped = train("looped", looped_config(args), args, root)
        looped["perplexity"] = perplexities(looped_trainer, depths)
        baseline_trainer, baseline = train("baseline", param_matched(looped_config(args)), args, root)
        baseline["perplexity"] = perplexities(baseline_trainer, [1])
        speed = [throughput(d, args, root) for d in ("fp32", "bf16")] if args.throughput_steps else []
    return {
        "loopformer": loopformer.__version__,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "looped": looped,
        "baseline": baseline,
        "throughput": speed,
    }


def depth_draws(mean_loops: int, backprop_loops: int) -> tuple[float, float, float]:
    """Mean, median and 95th percentile of the looped model's training-depth sampler."""
    config = RecurrenceConfig(mean_loops=mean_loops, backprop_loops=backprop_loops)
    draws = sample_depths(config, 200_000, torch.Generator().manual_seed(0)).double()
    return float(draws.mean()), float(draws.median()), float(draws.quantile(0.95))


def show(report: dict[str, Any], plot_path: Path | None) -> None:
    """Print the markdown tables of a report (fresh or loaded from JSON) and optionally draw its plot."""
    looped, baseline, args = report["looped"], report["baseline"], report["args"]
    ppl = {int(d): v for d, v in looped["perplexity"].items()}
    base_ppl = next(iter(baseline["perplexity"].values()))
    rows = [[d, ppl[d], round(ppl[d] / ppl[1], 3), round(ppl[d] / base_ppl, 3)] for d in sorted(ppl)]
    print(format_table(["depth", "looped ppl", "vs depth 1", "vs baseline"], rows))
    print(f"\nparam-matched baseline (1 pass): ppl {base_ppl}")
    draws = depth_draws(args["mean_loops"], args["backprop_loops"])
    print(
        f"training depth draws (200,000, seed 0): mean {draws[0]:.2f}, median {draws[1]:.0f}, 95th pct {draws[2]:.0f}"
    )
    for name, run in (("looped", looped), ("baseline", baseline)):
        print(
            f"{name}: {run['parameters']:,} params, {run['steps']} steps, {run['tokens']:,} tokens, "
            f"{run['tokens_per_s']} tok/s, MFU {run['mfu']:.1%}"
        )
    for row in report["throughput"]:
        peak = row["peak_gflops"]
        print(f"anima-micro {row['dtype']}: {row['tokens_per_s']} tok/s, MFU {row['mfu']:.1%} of {peak} GFLOP/s")
    if plot_path:
        window = args.get("window")
        attention = f"attention window {window}" if window else "full attention"
        title = f"Validation perplexity vs depth (stdlib corpus, {attention}, equal training time)"
        plot(plot_path, ppl, base_ppl, args["mean_loops"], title)


if __name__ == "__main__":
    main()
