"""``loopformer demo``: the depth-extrapolation experiment (train easy, test hard with more loops).

Trains a looped model and its param-matched and compute-matched fixed-depth baselines on a generated reasoning
task within a wall-clock budget, prints exact-match accuracy per test difficulty and loop count, checks that
1024 loops keep the answer, and writes the numbers (JSON) and a plot (PNG). See docs/tasks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from loopformer.cli.arguments import parse_counts, path_text
from loopformer.config import atomic_write_text
from loopformer.errors import InputError
from loopformer.presets import PRESETS, get_preset
from loopformer.tasks.recipes import RECIPES, get_recipe, with_architecture

DEFAULT_OUT = "runs/demo"


def run(args: argparse.Namespace) -> int:
    from loopformer.tasks.extrapolation import format_report, plot_report, run_demo

    recipe = get_recipe(args.task)
    if args.preset:
        recipe = with_architecture(recipe, get_preset(args.preset))
    if args.loops:
        recipe = replace(recipe, loops=tuple(sorted(set(parse_counts(args.loops, "--loops")))))
    if args.out is None:
        out_dir = fresh_folder(Path(DEFAULT_OUT))
        if out_dir != Path(DEFAULT_OUT):
            print(f"{DEFAULT_OUT} holds an earlier demo; this one goes to {out_dir}", file=sys.stderr)
    elif Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
        raise InputError(f"--out {args.out} is not empty; choose a new directory for the demo's runs.")
    else:
        out_dir = Path(args.out)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_demo(
        recipe,
        args.budget_minutes,
        out_dir,
        eval_count=args.eval_count,
        seed=args.seed,
        say=say,
        progress=False if args.no_progress else None,
    )
    out = Path(report.out_dir)
    json_path = Path(args.json) if args.json else out / "results.json"
    plot_path = Path(args.plot) if args.plot else out / "accuracy.png"
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    plot_report(report, plot_path)
    print(format_report(report))
    print(f"results: {json_path}\nplot: {plot_path}")
    return 0


def fresh_folder(base: Path) -> Path:
    """``base`` when it is absent or empty, else the first of ``base-2``, ``base-3``, ... that is."""
    candidate, number = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train looped vs fixed-depth models on a reasoning task and test depth extrapolation"
    )
    parser.add_argument("--task", default="prefix-parity", choices=list(RECIPES), help="(default: prefix-parity)")
    parser.add_argument(
        "--budget-minutes", type=float, default=10.0, help="wall-clock budget for training and evaluation (default: 10)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help=f"where the three runs go (default: {DEFAULT_OUT}, or {DEFAULT_OUT}-2 if taken)",
    )
    parser.add_argument("--json", type=path_text, metavar="FILE", help="results JSON (default: DIR/results.json)")
    parser.add_argument(
        "--plot", type=path_text, metavar="FILE", help="accuracy-vs-loops PNG (default: DIR/accuracy.png)"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="train this preset's architecture (the task keeps its vocabulary, context, window and depth schedule)",
    )
    parser.add_argument("--loops", help="comma-separated test loop counts (default: 1,2,4,...,128)")
    parser.add_argument("--eval-count", type=int, default=256, help="test examples per difficulty (default: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
