"""The depth-extrapolation experiment behind ``loopformer demo``.

Train a looped model on easy instances of a task, then give it harder ones and more loops. Two fixed-depth
baselines train on the same data through the same trainer: ``param-matched`` (the same layers run once) and
``compute-matched`` (an untied stack as deep as the looped model at its mean training depth). Everything is
scored by exact match at the training difficulty and at multiples of it, for a range of loop counts, and the
looped model is run once more at ``stability_loops`` to show that extra loops do not break a solved instance.

The wall-clock budget covers everything: each model trains for a share of it (its step count is calibrated by
timing a few steps, so the learning-rate schedule completes) and the evaluation gets the rest.
"""

from __future__ import annotations

import contextlib
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from loopformer.baselines import derive_baseline
from loopformer.config import ModelConfig
from loopformer.errors import InputError
from loopformer.flops import training_flops_per_token
from loopformer.model import build_model
from loopformer.recurrence import sample_depths
from loopformer.table import format_table
from loopformer.tasks.builtin import get_task
from loopformer.tasks.data import parse_difficulty_range
from loopformer.tasks.encoding import TaskEncoder, task_tokenizer
from loopformer.tasks.evaluate import accuracy_row, evaluate_task
from loopformer.tasks.recipes import Recipe
from loopformer.training.config import TrainConfig
from loopformer.training.optim import EMA, build_optimizer
from loopformer.training.trainer import VOCAB_MULTIPLE, Trainer

Log = Callable[[str], None]
KINDS = ("looped", "param-matched", "compute-matched")
TRAIN_SHARES = {"looped": 0.56, "param-matched": 0.08, "compute-matched": 0.2}  # the rest is evaluation
STARTUP_SECONDS = 4.0  # a trainer's set-up, matmul-peak probe, final evaluation and checkpoint
SCHEDULE_MARGIN = 0.95  # the trainer's per-step bookkeeping (logging, loss sync) that the timing probe omits


@dataclass
class ModelReport:
    """One trained model: its accuracy (percent) per evaluated difficulty and loop count."""

    kind: str
    parameters: int
    steps: int
    train_seconds: float
    loops: list[int]
    accuracy: dict[int, list[float]] = field(default_factory=dict)  # difficulty -> one value per loop count


@dataclass
class DemoReport:
    task: str
    difficulty_name: str
    train_difficulty: str
    difficulties: list[int]
    budget_minutes: float
    models: list[ModelReport]
    stability: dict[str, float]
    seconds: float
    out_dir: str
    machine: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for model in data["models"]:
            model["accuracy"] = {str(d): row for d, row in model["accuracy"].items()}
        return data


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _model_config(recipe: Recipe, kind: str) -> ModelConfig:
    return recipe.model if kind == "looped" else derive_baseline(recipe.model, kind)


def seconds_per_step(recipe: Recipe, model_config: ModelConfig, probe: int = 6) -> float:
    """Expected wall time of one optimizer step, data generation and EMA update included.

    ``probe`` steps run at evenly spaced quantiles of the depth sampler (after one warm-up step). Each gives a
    time per training FLOP; their median (robust to a step slowed by something else on the machine) times the
    sampler's expected FLOPs per step is the estimate.
    """
    train = recipe.train
    task = get_task(recipe.task)
    encoder = TaskEncoder(task_tokenizer(task.alphabet))
    vocab = math.ceil(encoder.tokenizer.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model = build_model(model_config.replace(vocab_size=vocab), seed=train.seed).train()
    optimizer = build_optimizer(model, train.lr, weight_decay=train.weight_decay)
    ema = EMA(model, train.ema_decay) if train.ema_decay > 0 else None
    low, high = parse_difficulty_range(train.task_difficulty)
    rec = model_config.recurrence
    draws = sorted(sample_depths(rec, 4096, torch.Generator().manual_seed(0)).tolist())
    depths = [draws[len(draws) // 2]] + [draws[int((i + 0.5) / probe * len(draws))] for i in range(probe)]
    rates, width = [], 1
    for step, depth in enumerate(depths):
        start = time.perf_counter()
        batch = encoder.batch(task.generate_mixed(low, high, train.batch_size, seed=step))
        out = model(batch.input_ids, loops=depth, labels=batch.labels, backprop_loops=rec.backprop_loops)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, updates=step + 1)
        width = max(width, batch.input_ids.shape[1])
        if step > 0:  # the first step pays one-off allocation costs
            flops = training_flops_per_token(model_config, depth, rec.backprop_loops, width)
            rates.append((time.perf_counter() - start) / flops)
    expected = sum(training_flops_per_token(model_config, r, rec.backprop_loops, width) for r in draws) / len(draws)
    return statistics.median(rates) * expected


def budgeted_training(recipe: Recipe, model_config: ModelConfig, seconds: float, seed: int) -> TrainConfig:
    """The recipe's training config for a run of about ``seconds``: the step count comes from
    :func:`seconds_per_step`, so the learning-rate schedule (and the curriculum) completes within the time."""
    per_step = seconds_per_step(recipe, model_config)
    seconds = max(seconds, 10 * per_step)
    steps = max(10, int(SCHEDULE_MARGIN * seconds / per_step))
    return recipe.train.replace(
        steps=steps,
        warmup_steps=min(recipe.train.warmup_steps, steps // 10),
        task_curriculum_steps=round(recipe.curriculum_fraction * steps),
        time_limit_minutes=seconds / 60,
        eval_loops=(model_config.recurrence.mean_loops,),
        seed=seed,
    )


def _evaluation_weights(trainer: Trainer) -> contextlib.AbstractContextManager:
    """The EMA weights while scoring, when the run keeps an EMA (as the trainer's own evaluation does)."""
    return trainer.ema.applied(trainer.model) if trainer.ema is not None else contextlib.nullcontext()


def _evaluation_difficulties(recipe: Recipe) -> list[int]:
    task = get_task(recipe.task)
    n = recipe.train_difficulty
    limit = task.max_difficulty
    return [m * n for m in recipe.multiples if limit is None or m * n <= limit]


def run_demo(
    recipe: Recipe,
    budget_minutes: float = 10.0,
    out_dir: str | Path | None = None,
    *,
    eval_count: int = 256,
    seed: int = 0,
    say: Log = print,
    stream: TextIO | None = None,
    progress: bool | None = None,
) -> DemoReport:
    """Train the looped model and both baselines on ``recipe`` within ``budget_minutes``, then score them.

    Checkpoints go to ``out_dir/<kind>`` (a fresh temporary directory by default). ``say`` receives the
    stage lines; ``stream`` and ``progress`` go to each :class:`Trainer` (its progress bar with ETA).
    """
    if budget_minutes <= 0:
        raise InputError(f"the budget must be > 0 minutes, got {budget_minutes}.")
    if eval_count < 1:
        raise InputError(f"the evaluation needs at least one example per difficulty, got {eval_count}.")
    started = time.perf_counter()
    budget = 60 * budget_minutes
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"loopformer-demo-{recipe.task}-"))
    task = get_task(recipe.task)
    trained = {}
    reports = []
    planned_end = 0.0
    for index, kind in enumerate(KINDS, start=1):
        config = _model_config(recipe, kind)
        planned_end += TRAIN_SHARES[kind] * budget
        # what is left of this stage's share after the time already spent, less the trainer's start-up
        seconds = planned_end - (time.perf_counter() - started) - STARTUP_SECONDS
        train = budgeted_training(recipe, config, seconds, seed)
        minutes = train.time_limit_minutes
        say(f"[{index}/4] training the {kind} model for about {minutes:.1f} min ({train.steps} steps) -> {out / kind}")
        trainer = Trainer(config, train, out / kind, stream=stream, progress=progress)
        start = time.perf_counter()
        result = trainer.fit()
        trained[kind] = trainer
        loops = list(recipe.loops) if kind == "looped" else [1]
        parameters = trainer.model.num_parameters()
        reports.append(ModelReport(kind, parameters, result.step, round(time.perf_counter() - start, 1), loops))
    difficulties = _evaluation_difficulties(recipe)
    stability_difficulty = recipe.stability_multiple * recipe.train_difficulty
    say(f"[4/4] evaluating {eval_count} examples per {task.difficulty_name} in {difficulties}")
    examples = {d: task.generate(d, eval_count, seed=seed + 10_000) for d in difficulties}
    for report in reports:
        trainer = trained[report.kind]
        for difficulty in difficulties:
            with _evaluation_weights(trainer):
                results = evaluate_task(
                    trainer.model, trainer.data.tokenizer, examples[difficulty], report.loops, seed=seed
                )
            report.accuracy[difficulty] = accuracy_row(results)
    looped = trained["looped"]
    stability: dict[str, float] = {}
    if stability_difficulty in examples:
        subset = examples[stability_difficulty][: recipe.stability_count]
        loops = [*recipe.loops, recipe.stability_loops]
        with _evaluation_weights(looped):
            results = evaluate_task(looped.model, looped.data.tokenizer, subset, loops, seed=seed)
        best = max(range(len(recipe.loops)), key=lambda i: results[i].exact_match)
        stability = {
            "difficulty": stability_difficulty,
            "examples": len(subset),
            "loops": recipe.stability_loops,
            "accuracy": round(100 * results[-1].exact_match, 1),
            "state_rms": results[-1].state_rms,
            "state_change": results[-1].state_change,
            "best_accuracy": round(100 * results[best].exact_match, 1),
            "best_loops": recipe.loops[best],
            "state_rms_at_best": results[best].state_rms,
        }
    return DemoReport(
        task=recipe.task,
        difficulty_name=task.difficulty_name,
        train_difficulty=recipe.train.task_difficulty,
        difficulties=difficulties,
        budget_minutes=budget_minutes,
        models=reports,
        stability=stability,
        seconds=round(time.perf_counter() - started, 1),
        out_dir=str(out),
        machine=_machine(),
    )


def format_report(report: DemoReport) -> str:
    """The accuracy table (one row per difficulty) and a summary of the claims it supports."""
    looped, *baselines = report.models
    n = report.difficulties[0]
    headers = [report.difficulty_name, *(f"r={r}" for r in looped.loops), *(b.kind for b in baselines)]
    rows = [
        [f"{d} ({d // n}x)", *looped.accuracy[d], *(b.accuracy[d][0] for b in baselines)] for d in report.difficulties
    ]
    lines = [
        f"{report.task}: exact-match accuracy (%) vs loops r; trained on {report.difficulty_name} "
        f"{report.train_difficulty}; baselines have a fixed depth",
        format_table(headers, rows),
        "",
    ]
    for model in report.models:
        lines.append(f"{model.kind}: {model.parameters:,} parameters, {model.steps} steps in {model.train_seconds} s")
    best = {d: max(looped.accuracy[d]) for d in report.difficulties}
    beyond = [b.accuracy[d][0] for b in baselines for d in report.difficulties[1:]]
    lines.append(
        "looped best: "
        + ", ".join(f"{d}: {best[d]}%" for d in report.difficulties)
        + (f"; baselines beyond the training {report.difficulty_name}: at most {max(beyond)}%" if beyond else "")
    )
    if report.stability:
        st = report.stability
        lines.append(
            f"stability on {st['examples']} examples of {report.difficulty_name} {st['difficulty']}: "
            f"{st['accuracy']}% after {st['loops']} loops "
            f"(best {st['best_accuracy']}% at r={st['best_loops']}); state rms {st['state_rms']:.3f} "
            f"(vs {st['state_rms_at_best']:.3f}), last-loop change {st['state_change']:.1e}"
        )
    lines.append(f"total {report.seconds:.0f} s of a {report.budget_minutes:g}-minute budget; runs in {report.out_dir}")
    return "\n".join(lines)


def plot_report(report: DemoReport, path: str | Path) -> None:
    """Accuracy vs loops, one line per difficulty; the baselines as dashed / dotted levels in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    looped, *baselines = report.models
    n = report.difficulties[0]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"param-matched": "--", "compute-matched": ":"}
    for index, d in enumerate(report.difficulties):
        colour = f"C{index}"
        ax.plot(looped.loops, looped.accuracy[d], "o-", color=colour, label=f"looped, {d} ({d // n}x)")
        for b in baselines:
            ax.axhline(b.accuracy[d][0], color=colour, linestyle=styles.get(b.kind, "-."), linewidth=1)
    for b in baselines:
        ax.plot([], [], color="grey", linestyle=styles.get(b.kind, "-."), label=f"{b.kind} (fixed depth)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(looped.loops, [str(r) for r in looped.loops])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("loops r at test time")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"{report.task}: trained on {report.difficulty_name} {report.train_difficulty}, tested longer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
