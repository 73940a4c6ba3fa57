"""``loopformer eval``: lm-evaluation-harness tasks at several depths, one table (needs the ``eval`` extra)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopformer.cli.arguments import add_checkpoint_argument, parse_counts, path_text
from loopformer.errors import InputError
from loopformer.table import format_table


def run(args: argparse.Namespace) -> int:
    loops = parse_counts(args.loops, "--loops")
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise InputError(f"--tasks {args.tasks!r} names no task; give comma-separated lm-eval task names.")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be an integer >= 1, got {args.limit}.")
    if args.include_path and not Path(args.include_path).is_dir():
        raise InputError(f"--include-path {args.include_path!r} is not a directory.")
    if args.no_builtin_tasks and not args.include_path:
        raise InputError("--no-builtin-tasks leaves no task to run without --include-path.")
    try:
        from loopformer.evaluation.lm_eval_model import LoopformerLM, find_tasks, sweep_loops, sweep_table
    except ImportError:
        raise InputError("loopformer eval needs lm-eval: pip install 'loopformer[eval]'.") from None
    manager = find_tasks(tasks, args.include_path, builtin=not args.no_builtin_tasks)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        places = ["loopformer's example tasks", *([args.include_path] if args.include_path else [])]
        places += [] if args.no_builtin_tasks else ["lm-eval's tasks"]
        raise InputError(f"unknown task {unknown[0]!r}: no such task in {', '.join(places)}.")
    lm = LoopformerLM(ckpt=args.ckpt, exit=args.exit, kv=args.kv, batch_size=args.batch_size)
    results = sweep_loops(lm, tasks, loops, manager, limit=args.limit, num_fewshot=args.num_fewshot)
    if args.json:
        print(json.dumps({"checkpoint": args.ckpt, "tasks": tasks, "results": [r.__dict__ for r in results]}))
    else:
        print(format_table(*sweep_table(results)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="lm-eval tasks at several loop counts (pip install 'loopformer[eval]')")
    add_checkpoint_argument(parser)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group / tag) names")
    parser.add_argument("--loops", default="1,4,16", help="comma-separated loop counts (default: 1,4,16)")
    parser.add_argument(
        "--include-path",
        type=path_text,
        help="a directory of task YAMLs to add to the shipped example tasks (tag loopformer_examples)",
    )
    parser.add_argument(
        "--no-builtin-tasks",
        action="store_true",
        help="never index lm-eval's own ~15,000 task files (they are indexed only when a task is not found locally)",
    )
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    parser.add_argument("--exit", metavar="CRITERION[:THR]", help="per-token early exit; --loops are then budgets")
    parser.add_argument("--kv", default="full", help="KV slot policy: full, last or ring:K (default: full)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows scored or generated together (default: 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(run=run)
