"""Halting study on vector parity: zero-shot early exits against fixed loop counts at equal average compute.

1. Train the demo's looped model on ``--task`` (``loopformer.tasks.recipes.get_recipe``, with the changes in
   ``MODEL_CHANGES`` / ``TRAIN_CHANGES``) through the normal Trainer within ``--minutes``, or load a finished run
   with ``--ckpt``. The EMA weights are used when the run kept them. The default, ``vector-parity-sparse``, writes
   the vector as its non-zero entries, so the windowed model's scan needs more loops for more of them; the dense
   ``vector-parity`` is learned only with full attention, which answers in one loop (docs/tasks.md).
2. For every difficulty (number of non-zero elements) run ``--count`` fresh examples once to ``--max-loops``.
   After every iteration the answer position (the EOS marker; its logits predict the parity symbol) is decoded
   and fed to one :class:`~loopformer.inference.exits.ExitTracker` per criterion (the six zero-shot criteria at
   their default thresholds, plus ``--exit`` rules, plus ``act`` for a model with a learned halting head, such as
   the heads ``benchmarks/act_halting.py`` fine-tunes). An example exits at the first iteration its rule fires
   (``--max-loops`` if it never does) and is scored by the prediction at that iteration: what the model decodes
   if it stops there (with a halting head, the ACT mixture capped at that iteration).
3. Report per criterion and difficulty the mean loops used and the accuracy, next to fixed loop counts at the
   same average compute: round(mean loops over all difficulties) for the overall comparison, and
   round(mean loops of that difficulty) per difficulty. Decoding for the logit criteria is not counted.

    python benchmarks/halting_study.py --json benchmarks/results/halting_study.json --plot docs/img/halting_study.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import torch

from loopformer.config import RecurrenceConfig
from loopformer.errors import LoopformerError
from loopformer.inference.exits import EXIT_CRITERIA, ExitRule, ExitTracker, parse_exit_rule
from loopformer.loading import load_trained_model
from loopformer.table import format_table
from loopformer.tasks.builtin import get_task
from loopformer.tasks.encoding import IGNORE_INDEX, TaskEncoder
from loopformer.tasks.extrapolation import STARTUP_SECONDS, budgeted_training
from loopformer.tasks.recipes import get_recipe
from loopformer.tokenizer import TextTokenizer
from loopformer.training.trainer import Trainer

TASKS = ("vector-parity-sparse", "vector-parity")
# Changes to the demo recipe per task. For the dense layout, chosen by 6-minute runs on 2 CPU cores: the recipe's
# sliding window of 2 (the answer needs about 15 loops to see the whole vector) stayed at chance (loss ln 2) for
# the whole run, as did window 4 with truncated or full backprop, and full attention trained on difficulties 1-32.
# Full attention on the recipe's 1-8 leaves the ln 2 plateau after about 300 steps and reaches 100% on
# difficulties <= 8.
MODEL_CHANGES: dict[str, dict[str, Any]] = {
    "vector-parity": {"sliding_window": None, "recurrence": RecurrenceConfig(mean_loops=8, backprop_loops=4)},
}
TRAIN_CHANGES: dict[str, dict[str, Any]] = {"vector-parity": {"batch_size": 64}}


def fail(message: str) -> NoReturn:
    print(f"halting_study.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def train(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Train within ``args.minutes`` (calibration included); the run directory and a summary."""
    started = time.perf_counter()
    recipe = get_recipe(args.task)
    model_changes, train_changes = MODEL_CHANGES.get(args.task, {}), TRAIN_CHANGES.get(args.task, {})
    recipe = dataclasses.replace(
        recipe, model=recipe.model.replace(**model_changes), train=recipe.train.replace(**train_changes)
    )
    seconds = 60 * args.minutes - (time.perf_counter() - started) - STARTUP_SECONDS
    config = budgeted_training(recipe, recipe.model, seconds, args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="loopformer-halting-"))
    print(f"training {args.task} for about {config.time_limit_minutes:.1f} min ({config.steps} steps) -> {out}")
    result = Trainer(recipe.model, config, out).fit()
    summary = {"steps": result.step, "planned_steps": config.steps, "seconds": round(time.perf_counter() - started, 1)}
    summary.update(model=recipe.model.to_dict(), train=config.to_dict())
    return out, summary


def trace(model: torch.nn.Module, batch: Any, rules: list[ExitRule], args: argparse.Namespace) -> tuple:
    """One pass to max_loops: correctness per iteration [loops, rows] and each rule's exit iteration [rows].

    Each iteration decodes what the model outputs if it stops there (with a halting head: the ACT mixture capped
    at that iteration); the trackers read the answer position's latent state."""
    rows = torch.arange(batch.input_ids.shape[0])
    position = (batch.labels != IGNORE_INDEX).int().argmax(dim=1) - 1  # the EOS marker predicts the answer
    target = batch.labels[rows, position + 1]
    ctx = model.context(batch.input_ids)
    trackers = [ExitTracker(rule, halting=model.halting if rule.criterion == "act" else None) for rule in rules]
    correct = torch.zeros(args.max_loops, len(rows), dtype=torch.bool)
    latest: list[torch.Tensor] = []

    def remember(step: int, state: torch.Tensor) -> None:
        latest[:] = [state[rows, position]]

    def visit(step: int, output: torch.Tensor) -> None:
        logits = model.decode(output, ctx)[rows, position].float()
        correct[step - 1] = logits.argmax(dim=-1) == target
        for tracker in trackers:
            tracker.update(step, latest[0], logits)

    with torch.inference_mode():
        model(batch.input_ids, loops=args.max_loops, seed=args.seed, on_state=remember, on_output=visit)
    return correct, [tracker.first_exit for tracker in trackers]  # every row exits by max_loops = max_loops


def study(model: torch.nn.Module, encoder: TaskEncoder, rules: list[ExitRule], args: argparse.Namespace) -> dict:
    """Per difficulty: the fixed-loop accuracy at 1..max_loops, and per rule the loops used and the accuracy."""
    task = get_task(args.task)
    fixed: dict[int, list[float]] = {}
    exits: dict[str, dict[str, dict[str, float]]] = {rule.label: {} for rule in rules}
    for difficulty in args.difficulties:
        examples = task.generate(difficulty, args.count, seed=args.seed + 10_000)
        encoder.check(examples, f"{args.task} at difficulty {difficulty}")
        correct, used_loops = trace(model, encoder.batch(examples), rules, args)
        fixed[difficulty] = [round(100 * float(c.float().mean()), 2) for c in correct]
        for rule, used in zip(rules, used_loops, strict=True):
            hit = correct[used - 1, torch.arange(args.count)].float()
            exits[rule.label][str(difficulty)] = {
                "mean_loops": round(float(used.float().mean()), 2),
                "median_loops": int(used.median()),
                "max_loops": int(used.max()),
                "accuracy": round(100 * float(hit.mean()), 2),
            }
    for per_difficulty in exits.values():
        for difficulty, cell in per_difficulty.items():
            loops = max(1, round(cell["mean_loops"]))
            cell.update(fixed_loops=loops, fixed_accuracy=fixed[int(difficulty)][loops - 1])
        mean = sum(c["mean_loops"] for c in per_difficulty.values()) / len(per_difficulty)
        loops = max(1, round(mean))
        per_difficulty["all"] = {
            "mean_loops": round(mean, 2),
            "accuracy": round(sum(c["accuracy"] for c in per_difficulty.values()) / len(per_difficulty), 2),
            "fixed_loops": loops,
            "fixed_accuracy": round(sum(fixed[d][loops - 1] for d in args.difficulties) / len(args.difficulties), 2),
        }
    return {"fixed_accuracy": {str(d): row for d, row in fixed.items()}, "exits": exits}


def tables(report: dict) -> str:
    difficulties = [int(d) for d in report["fixed_accuracy"]]
    max_loops = report["settings"]["max_loops"]
    shown = [r for r in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128) if r <= max_loops]
    rows = [[d, *(report["fixed_accuracy"][str(d)][r - 1] for r in shown)] for d in difficulties]
    parts = ["fixed loops: accuracy (%) per difficulty (non-zero elements)"]
    parts.append(format_table(["difficulty", *(f"r={r}" for r in shown)], rows))
    columns = [*map(str, difficulties), "all"]
    loops_rows, accuracy_rows = [], []
    for label, cells in report["exits"].items():
        ordered = [cells[c] for c in columns]
        loops_rows.append([label, *(c["mean_loops"] for c in ordered)])
        accuracy_rows.append([label, *(f"{c['accuracy']:.1f} / {c['fixed_accuracy']:.1f}" for c in ordered)])
    parts += ["", "exits: mean loops used at the answer", format_table(["criterion", *columns], loops_rows)]
    parts += ["", "accuracy (%) at exit / fixed loops at round(mean loops used)"]
    parts.append(format_table(["criterion", *columns], accuracy_rows))
    return "\n".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    difficulties = [int(d) for d in report["fixed_accuracy"]]
    head = f" of a halting head fine-tuned onto\n{report['init_from']}" if report.get("init_from") else ""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for index, (label, cells) in enumerate(report["exits"].items()):
        colour, marker = f"C{index}", "osD^vP*X"[index % 8]
        left.plot(
            difficulties, [cells[str(d)]["mean_loops"] for d in difficulties], marker=marker, color=colour, label=label
        )
        right.plot(cells["all"]["mean_loops"], cells["all"]["accuracy"], marker, color=colour, ms=9, label=label)
    max_loops = report["settings"]["max_loops"]
    loops = range(1, max_loops + 1)
    mean_fixed = [sum(report["fixed_accuracy"][str(d)][r - 1] for d in difficulties) / len(difficulties) for r in loops]
    for shade, d in zip((0.35, 0.45, 0.55, 0.65, 0.75, 0.85) * 4, difficulties, strict=False):
        right.plot(loops, report["fixed_accuracy"][str(d)], color=str(shade), linewidth=0.8, linestyle="--")
        right.annotate(f"{d}", (max_loops, report["fixed_accuracy"][str(d)][-1]), fontsize=7, color="0.4")
    right.plot(loops, mean_fixed, color="black", linewidth=1.5, label="fixed loops (dashed: per difficulty)")
    highest = max(c[str(d)]["mean_loops"] for c in report["exits"].values() for d in difficulties)
    left.set_xscale("log", base=2)
    left.set_xticks(difficulties, [str(d) for d in difficulties])
    left.set_xlabel("difficulty: non-zero elements (of 32)")
    left.set_ylabel("mean loops used")
    left.set_ylim(0, min(max_loops, highest) * 1.25 + 1)
    left.set_title("loops used by each exit")
    right.set_xscale("log", base=2)
    ticks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= max_loops]
    right.set_xticks(ticks, [str(r) for r in ticks])
    right.set_xlabel("loops (exits: mean over all examples)")
    right.set_ylabel("accuracy (%), mean over difficulties")
    lowest = min(mean_fixed + [c["all"]["accuracy"] for c in report["exits"].values()])
    right.set_ylim(min(40, lowest - 5) - 14, 101)  # room below the curves for the legend
    right.set_title("accuracy vs compute: exits (markers) vs fixed loops (line)")
    left.legend(fontsize=8, loc="best")
    right.legend(fontsize=7.5, loc="lower center", ncol=3)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{report['settings']['task']}: {report['settings']['count']} examples per difficulty, trained on non-zero "
        f"elements {report['train_difficulty']} ({report['step']} steps{head}); zero-shot exits may stop from "
        "iteration 2",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default=TASKS[0], help="the vector layout (docs/tasks.md)")
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget (calibration included)")
    parser.add_argument("--ckpt", type=Path, help="evaluate this trained run instead of training one")
    parser.add_argument("--out", type=Path, help="training run directory (default: a new temporary directory)")
    parser.add_argument("--difficulties", default="1,2,4,6,8,12,16,24,32", help="non-zero element counts")
    parser.add_argument("--count", type=int, default=256, help="examples per difficulty")
    parser.add_argument("--max-loops", type=int, default=64)
    parser.add_argument("--exit", action="append", default=[], help="extra rule CRITERION[:THRESHOLD] (repeatable)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        args.difficulties = [int(d) for d in args.difficulties.split(",")]
    except ValueError:
        fail(f"--difficulties must be comma-separated integers, got {args.difficulties!r}")
    for difficulty in args.difficulties:
        get_task(args.task).check_difficulty(difficulty)
    if not args.minutes > 0:
        fail(f"--minutes must be > 0, got {args.minutes}")
    if args.count < 1 or args.max_loops < 2:
        fail(f"--count must be >= 1 and --max-loops >= 2, got {args.count} and {args.max_loops}")
    return args


def main() -> None:
    try:
        args = parse_args()
        rules = [ExitRule(name, threshold, max_loops=args.max_loops) for name, threshold in EXIT_CRITERIA.items()]
        for text in args.exit:
            rule = parse_exit_rule(text, max_loops=args.max_loops)
            if rule.label not in {r.label for r in rules}:
                rules.append(rule)
        started = time.perf_counter()
        torch.manual_seed(args.seed)
        training = None
        run = args.ckpt
        if run is None:
            run, training = train(args)
        model, state, directory = load_trained_model(run, use_ema=True)
        act = parse_exit_rule("act", max_loops=args.max_loops)
        if model.halting is not None and act.label not in {r.label for r in rules}:  # next to the zero-shot ones
            rules.insert(0, act)
        task = (state.meta.get("train_config") or {}).get("task")
        if task != args.task or not state.tokenizer_json:
            fail(f"{directory} is not a {args.task} run (its task is {task!r})")
        encoder = TaskEncoder(TextTokenizer.from_json(state.tokenizer_json, str(directory)))
        report = study(model, encoder, rules, args)
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "ckpt", "out")}
        report.update(settings=settings, checkpoint=str(directory), training=training, step=state.step)
        report["train_difficulty"] = state.meta["train_config"].get("task_difficulty")
        report["init_from"] = state.meta["train_config"].get("init_from")
        report["rules"] = [dataclasses.asdict(rule) for rule in rules]
        report["machine"] = {"platform": platform.platform(), "torch": torch.__version__}
        report["seconds"] = round(time.perf_counter() - started, 1)
        print(tables(report))
        print(f"\n{report['seconds']:.0f} s in all; checkpoint {directory} (step {state.step})")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.plot:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            plot(report, args.plot)
    except (LoopformerError, OSError) as exc:
        fail(str(exc))


if __name__ == "__main__":
    main()
