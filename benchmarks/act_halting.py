"""Learned ACT halting, measured: loops saved on text, and accuracy vs loops on vector parity.

(a) Corpus. The ``tiny`` preset with ``halting="act"`` trains ``--lm-steps`` steps on the embedded
    standard-library corpus (byte tokenizer) through the normal Trainer. Reported: the halting iteration over
    training (from the metrics log: no collapse to one loop), the distribution of halting iterations of a forward
    pass at the loop budget, and the validation loss scored by :meth:`Engine.score` with the ``act`` exit (halted
    tokens leave the batch) against the same model at every fixed loop count.
(b) Vector parity. The demo recipe for ``--parity-task`` trains ``--parity-steps`` steps through the normal task
    path. ``vector-parity`` (the default; the dense layout with full attention, which answers in one loop) trains
    with ``halting="act"`` from the start. ``vector-parity-sparse`` (a window of 3 and a curriculum, so the loops
    needed grow with the number of non-zero elements) trains without a head, or starts from ``--parity-init``;
    then a halting head is fine-tuned onto its EMA weights for ``--head-steps`` with everything else frozen, once
    per head input (``state``, ``state+change``). Per difficulty (non-zero elements) ``--count`` examples are
    scored through the engine with the ``act`` exit and with every zero-shot exit at its default threshold (all
    decode the model's ACT mixture capped where they stop), under a budget of ``--budget`` loops; each is set
    against the same model at fixed loops at equal average compute: round(mean loops per fed token), the real cost
    of a teacher-forced pass. ``benchmarks/halting_study.py --ckpt`` measures a head at the answer position.

    python benchmarks/act_halting.py --json benchmarks/results/act_halting.json
    python benchmarks/act_halting.py --part parity --parity-task vector-parity-sparse --out runs/act-sparse-ft \
        --json benchmarks/results/act_halting_sparse.json

Timings depend on the machine and on what else runs on it; the loop counts and losses do not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loopformer.checkpoint import resolve_checkpoint
from loopformer.config import RecurrenceConfig
from loopformer.errors import LoopformerError
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.exits import EXIT_CRITERIA, parse_exit_rule
from loopformer.presets import get_preset
from loopformer.table import format_table
from loopformer.tasks.builtin import get_task
from loopformer.tasks.evaluate import evaluate_task, evaluate_task_exits
from loopformer.tasks.recipes import get_recipe
from loopformer.tokenizer import TextTokenizer
from loopformer.training.config import TrainConfig
from loopformer.training.metrics import read_metrics
from loopformer.training.trainer import Trainer

# Text: the head's bias starts at -3 (p = 0.047: a fresh model keeps its weight on the last iteration) and Graves'
# ponder cost is 1e-3 per iteration, the config defaults; the loss is informative from the start and the halting
# iterations settle at 3-5 of 8.
HALTING = {"halting": "act", "halting_bias_init": -3.0, "ponder_cost": 1e-3}
# Dense vector parity sits on a plateau (loss ln 2) for about 250 steps. With the ponder cost on from the start (1e-3)
# the head put 93% of the weight on the first iteration within 150 steps and the task was not learned in 519 steps.
# Delayed by 300 steps (then ramped over 300), the task is learned first; then 1e-3 left the head near the budget
# (12-16 loops) after 900 steps, 1e-2 brought it to 2-3 loops with the fixed-depth accuracy, and 3e-2 collapsed the
# answer positions to one iteration (expected loops 1.02). 900-step runs, seed 0 (benchmarks.md).
# The sparse layout learns its scan only without a head: trained from scratch with one (bias -3 / ponder 1e-2, and
# bias -5 / ponder 3e-3, the ponder cost held until the curriculum reached 1-8) the loss went back to ln 2 once the
# range widened, where the recipe without the head was well below it. A position that halts early gets no gradient
# from the later iterations it would need. So the head is fine-tuned onto the trained scan model (every other weight
# frozen, at a fixed depth of 24 so that it sees every iteration the scan needs), once per head input: the state
# alone, and the state with its step size (benchmarks.md).
PARITY: dict[str, dict[str, Any]] = {
    "vector-parity": {
        "model": {
            "sliding_window": None,
            "recurrence": RecurrenceConfig(mean_loops=8, backprop_loops=4),
            **HALTING,
            "ponder_cost": 1e-2,
            "halting_warmup_steps": 300,
        },
        "train": {"batch_size": 64},
        "steps": 900,
        "budget": 16,
        "difficulties": "2,4,8,16,32",
    },
    "vector-parity-sparse": {
        "model": {},
        "train": {},
        "steps": 880,
        "head": {
            "model": {**HALTING, "ponder_cost": 1e-2, "recurrence": RecurrenceConfig(sampler="fixed", mean_loops=24)},
            "train": {"batch_size": 64, "lr": 1e-2, "warmup_steps": 20, "ema_decay": 0.0, "trainable": ("halting",)},
            "steps": 400,
            "inputs": ("state", "state+change"),
        },
        "budget": 32,
        "difficulties": "1,2,4,6,8,12,16",
    },
}


def quiet_fit(trainer: Trainer) -> None:
    trainer.stream = io.StringIO()
    trainer.fit()


def histogram(steps: torch.Tensor, budget: int) -> list[int]:
    return torch.bincount(steps.flatten(), minlength=budget + 1)[1:].tolist()


def corpus_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    model_config = get_preset("tiny").replace(max_seq_len=args.seq_len, **HALTING)
    train = TrainConfig(
        data="stdlib",
        tokenizer="byte",
        seq_len=args.seq_len,
        batch_size=16,
        steps=args.lm_steps,
        lr=3e-3,
        warmup_steps=20,
        eval_every=0,
        save_every=0,
        log_every=25,
        eval_loops=(model_config.recurrence.mean_loops,),
        eval_batches=2,
        seed=args.seed,
        device="cpu",
    )
    started = time.perf_counter()
    trainer = Trainer(model_config, train, out / "corpus", progress=False)
    quiet_fit(trainer)
    seconds = time.perf_counter() - started
    model = trainer.model.eval()
    budget = args.lm_budget
    rows = torch.cat([b.input_ids for b in trainer.val_batches])[: args.lm_rows]
    labels = torch.cat([b.labels for b in trainer.val_batches])[: args.lm_rows]
    with torch.no_grad():
        forward = model(rows, loops=budget, labels=labels, seed=args.seed)
    halting = forward.halting
    engine = Engine(model, trainer.data.tokenizer)
    scored: dict[str, dict[str, float]] = {}
    for loops, rule in [(budget, "act"), *((r, None) for r in range(1, budget + 1))]:
        scores = engine.score(rows, GenerationConfig(loops=loops, exit=rule, state_seed=args.seed))
        fed = scores.loops[:, 1:]  # the first token is prefilled at the full budget
        key = f"act:{budget}" if rule else f"fixed:{loops}"
        scored[key] = {
            "loss": round(-float(scores.log_probs.double().mean()), 4),
            "mean_loops": round(float(fed.float().mean()), 3),
        }
        if rule:
            scored[key]["exit_histogram"] = histogram(fed, budget)
    act = scored[f"act:{budget}"]
    equal = max(1, round(act["mean_loops"]))
    trajectory = [
        {k: r[k] for k in ("step", "loss", "loops", "halt_steps", "expected_loops", "ponder")}
        for r in read_metrics(out / "corpus" / "metrics.jsonl", "train")
    ]
    return {
        "model": model_config.to_dict(),
        "parameters": model.num_parameters(),
        "train_steps": trainer.step,
        "train_seconds": round(seconds, 1),
        "budget": budget,
        "rows": list(rows.shape),
        "training_trajectory": trajectory,
        "forward_halting": {
            "histogram": histogram(halting.steps[halting.mask], budget),
            "mean_halt_steps": round(halting.summary()["halt_steps"], 3),
            "mean_expected_loops": round(halting.summary()["expected_loops"], 3),
        },
        "scores": scored,
        "equal_compute_loops": equal,
        "equal_compute_fixed_loss": scored[f"fixed:{equal}"]["loss"],
    }


def parity_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train the ``--parity-task`` recipe (with a halting head from the start, or without one and then a head
    fine-tuned per input) and score every exit against fixed loops."""
    started = time.perf_counter()
    spec = PARITY[args.parity_task]
    recipe = get_recipe(args.parity_task)
    curriculum = round(recipe.curriculum_fraction * args.parity_steps)
    model_changes = {"halting_warmup_steps": curriculum, **spec["model"]} if "head" not in spec else spec["model"]
    model_config = recipe.model.replace(**model_changes)
    train = recipe.train.replace(
        **spec["train"],
        task_curriculum_steps=curriculum,
        steps=args.parity_steps,
        warmup_steps=min(recipe.train.warmup_steps, args.parity_steps // 10),
        eval_loops=(model_config.recurrence.mean_loops,),
        seed=args.seed,
    )
    report: dict[str, Any] = {"task": args.parity_task, "budget": args.budget, "count": args.count}
    if args.parity_init is None:
        trainer = Trainer(model_config, train, out / "parity", progress=False)
        quiet_fit(trainer)
        report.update(trained_run(trainer, train, out / "parity", time.perf_counter() - started))
        base = out / "parity"
    else:
        base = args.parity_init
        report["base_checkpoint"] = str(base)
    if "head" not in spec:
        fixed, exits = trained_scores(trainer, args)
        return {**report, "fixed_accuracy": fixed, "exits": exits}
    report["heads"] = {}
    for halting_input in spec["head"]["inputs"]:
        started = time.perf_counter()
        head_model = recipe.model.replace(**spec["head"]["model"], halting_input=halting_input)
        head_train = recipe.train.replace(
            **spec["head"]["train"],
            steps=args.head_steps or spec["head"]["steps"],
            init_from=str(base),
            init_from_ema=True,
            eval_loops=(head_model.recurrence.mean_loops,),
            seed=args.seed,
        )
        run_dir = out / f"head-{halting_input.replace('+', '-')}"
        trainer = Trainer(head_model, head_train, run_dir, progress=False)
        quiet_fit(trainer)
        fixed, exits = trained_scores(trainer, args)
        head = trained_run(trainer, head_train, run_dir, time.perf_counter() - started)
        report["heads"][halting_input] = {**head, "fixed_accuracy": fixed, "exits": exits}
    return report


def trained_run(trainer: Trainer, train: TrainConfig, run_dir: Path, seconds: float) -> dict[str, Any]:
    """The configs, size, length and loss / halting trajectory of a finished training run."""
    trajectory = [
        {k: r.get(k) for k in ("step", "loss", "loops", "halt_steps", "expected_loops", "ponder")}
        for r in read_metrics(run_dir / "metrics.jsonl", "train")
    ]
    return {
        "model": trainer.model_config.to_dict(),
        "train": train.to_dict(),
        "parameters": trainer.model.num_parameters(),
        "train_steps": trainer.step,
        "train_seconds": round(seconds, 1),
        "training_trajectory": trajectory,
    }


def trained_scores(trainer: Trainer, args: argparse.Namespace) -> tuple[dict, dict]:
    """:func:`parity_scores` of the trained model, with its EMA weights when it keeps them (as the trainer's own
    evaluation scores it)."""
    weights = trainer.ema.applied(trainer.model) if trainer.ema is not None else contextlib.nullcontext()
    with weights:
        return parity_scores(trainer.model.eval(), trainer.data.tokenizer, args)


def parity_scores(model: torch.nn.Module, tokenizer: TextTokenizer, args: argparse.Namespace) -> tuple[dict, dict]:
    """Fixed-loop accuracy per difficulty, and per exit rule and difficulty the loops used and the accuracy."""
    task = get_task(args.parity_task)
    budget = args.budget
    rules = [parse_exit_rule("act")] + [parse_exit_rule(name) for name in EXIT_CRITERIA]
    fixed: dict[str, list[float]] = {}
    exits: dict[str, dict[str, dict[str, float]]] = {rule.label: {} for rule in rules}
    for difficulty in args.difficulties:
        examples = task.generate(difficulty, args.count, seed=args.seed + 10_000)
        depth_results = evaluate_task(model, tokenizer, examples, range(1, budget + 1), seed=args.seed)
        fixed[str(difficulty)] = [round(100 * r.exact_match, 2) for r in depth_results]
        for rule in rules:
            (result,) = evaluate_task_exits(model, tokenizer, examples, [budget], rule, seed=args.seed)
            equal = max(1, round(result.mean_loops))
            exits[rule.label][str(difficulty)] = {
                "accuracy": round(100 * result.exact_match, 2),
                "mean_loops": round(result.mean_loops, 3),
                "answer_loops": round(result.answer_loops, 3),
                "fixed_loops": equal,
                "fixed_accuracy": fixed[str(difficulty)][equal - 1],
            }
    for cells in exits.values():
        mean = sum(c["mean_loops"] for c in cells.values()) / len(cells)
        equal = max(1, round(mean))
        cells["all"] = {
            "accuracy": round(sum(c["accuracy"] for c in cells.values()) / len(cells), 2),
            "mean_loops": round(mean, 3),
            "answer_loops": round(sum(c["answer_loops"] for c in cells.values()) / len(cells), 3),
            "fixed_loops": equal,
            "fixed_accuracy": round(sum(fixed[str(d)][equal - 1] for d in args.difficulties) / len(fixed), 2),
        }
    return fixed, exits


def corpus_table(report: dict[str, Any]) -> str:
    budget = report["budget"]
    rows = [[key, cell["mean_loops"], cell["loss"]] for key, cell in report["scores"].items()]
    lines = [f"(a) corpus, tiny ACT model, {report['train_steps']} steps; validation scored token by token"]
    lines.append(format_table(["scoring", "loops/token", "loss"], rows))
    lines.append(f"halting iterations of a forward at {budget} loops: {report['forward_halting']['histogram']}")
    lines.append(f"act exit iterations per fed token: {report['scores'][f'act:{budget}']['exit_histogram']}")
    return "\n".join(lines)


def parity_table(report: dict[str, Any]) -> str:
    if "heads" not in report:
        return exits_table(
            report, f"(b) {report['task']}, {report['train_steps']} steps; budget {report['budget']} loops"
        )
    base = f"{report['train_steps']} steps" if "train_steps" in report else report["base_checkpoint"]
    titles = {
        halting_input: f"(b) {report['task']} ({base}), a {halting_input} halting head fine-tuned "
        f"{head['train_steps']} steps; budget {report['budget']} loops"
        for halting_input, head in report["heads"].items()
    }
    return "\n".join(exits_table(head, titles[key]) for key, head in report["heads"].items())


def exits_table(result: dict[str, Any], title: str) -> str:
    columns = [*map(str, result["fixed_accuracy"]), "all"]
    exits = result["exits"].items()
    loops = [[label, *(cells[c]["mean_loops"] for c in columns)] for label, cells in exits]
    answer = [[label, *(cells[c]["answer_loops"] for c in columns)] for label, cells in exits]
    accuracy = [
        [label, *(f"{cells[c]['accuracy']:.1f} / {cells[c]['fixed_accuracy']:.1f}" for c in columns)]
        for label, cells in exits
    ]
    lines = [title, "mean loops per fed token", format_table(["exit", *columns], loops)]
    lines += ["mean loops at the answer position", format_table(["exit", *columns], answer)]
    lines += ["accuracy % at exit / fixed loops at round(loops per token)", format_table(["exit", *columns], accuracy)]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "corpus", "parity"), default="all")
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--lm-budget", type=int, default=8, help="loop budget of the corpus scoring")
    parser.add_argument("--lm-rows", type=int, default=16, help="validation rows scored")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--parity-task", choices=tuple(PARITY), default=next(iter(PARITY)), help="the vector layout")
    parser.add_argument("--parity-steps", type=int, help="vector-parity training steps (default: per layout)")
    parser.add_argument(
        "--parity-init",
        type=Path,
        help="vector-parity-sparse: fine-tune the halting heads onto this trained checkpoint instead of training one",
    )
    parser.add_argument("--head-steps", type=int, help="halting-head fine-tuning steps (default: per layout)")
    parser.add_argument("--budget", type=int, help="vector-parity loop budget (default: per layout)")
    parser.add_argument("--difficulties", help="non-zero element counts (default: per layout)")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--out", type=Path, help="run directory (default: a new temporary directory)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    defaults = PARITY[args.parity_task]
    for given, flag in ((args.parity_init, "--parity-init"), (args.head_steps, "--head-steps")):
        if given is not None and "head" not in defaults:
            parser.error(f"{flag} applies to a layout whose halting head is fine-tuned, not {args.parity_task}")
    if args.head_steps is not None and args.head_steps < 1:
        parser.error(f"--head-steps must be >= 1, got {args.head_steps}")
    if args.parity_init is not None:
        try:
            resolve_checkpoint(args.parity_init)
        except LoopformerError as exc:
            parser.error(str(exc))
    args.parity_steps = args.parity_steps or defaults["steps"]
    args.budget = args.budget or defaults["budget"]
    args.difficulties = args.difficulties or defaults["difficulties"]
    try:
        args.difficulties = [int(d) for d in args.difficulties.split(",")]
    except ValueError:
        parser.error(f"--difficulties must be comma-separated integers, got {args.difficulties!r}")
    return args


def main() -> None:
    args = parse_args()
    try:
        run(args)
    except LoopformerError as exc:  # e.g. a --parity-init checkpoint of another model: one sentence, exit 2
        print(f"act_halting.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="loopformer-act-"))
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": {"platform": platform.platform(), "torch": torch.__version__}}
    if args.part in ("all", "corpus"):
        report["corpus"] = corpus_part(args, out)
        print(corpus_table(report["corpus"]), flush=True)
    if args.part in ("all", "parity"):
        report["parity"] = parity_part(args, out)
        print(parity_table(report["parity"]), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["command"] = " ".join(["python", *sys.argv])
    print(f"{report['seconds']:.0f} s in all; runs in {out}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
