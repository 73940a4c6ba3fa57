"""``loopformer eval-task``: exact-match accuracy of a task checkpoint per loop count.

The examples come from a JSONL file (``--data``, the format ``train --task-data`` reads) or from a built-in
generator (``--task``, default: the task the checkpoint was trained on, at ``--difficulty``). With ``--exit`` each
``--loops`` entry is a loop budget and the examples are scored token by token through the inference engine with
that per-token exit rule (e.g. ``act`` for a model with a learned halting head), reporting the loops used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopformer.cli.arguments import add_checkpoint_argument, add_report_arguments, parse_counts, path_text
from loopformer.cli.generation_args import add_exit_arguments, exit_rule
from loopformer.errors import InputError
from loopformer.tasks.builtin import get_task


def run(args: argparse.Namespace) -> int:
    from loopformer.loading import load_trained_model
    from loopformer.tasks.evaluate import evaluate_task, evaluate_task_exits, format_accuracy_table, format_exit_table
    from loopformer.tasks.jsonl import read_task_file
    from loopformer.tokenizer import TextTokenizer

    loops = parse_counts(args.loops, "--loops")
    rule = exit_rule(args)
    if args.data and (args.task is not None or args.difficulty is not None):
        raise InputError("give either --data or --task/--difficulty, not both.")
    model, state, path = load_trained_model(Path(args.ckpt), use_ema=args.ema)
    if state.tokenizer_json is None or not TextTokenizer.from_json(state.tokenizer_json).is_symbolic:
        raise InputError(f"{path} is not a task checkpoint (it has no task vocabulary); use eval-ppl for text models.")
    tokenizer = TextTokenizer.from_json(state.tokenizer_json)
    if args.data:
        examples, source = read_task_file(args.data), args.data
    else:
        name = args.task or state.meta.get("train_config", {}).get("task")
        if name is None:
            raise InputError(f"{path} was trained on task files, so pass --data FILE with the examples to score.")
        if args.difficulty is None:
            raise InputError(f"pass --difficulty (the {get_task(name).difficulty_name} of the generated examples).")
        task = get_task(name)
        task.check_difficulty(args.difficulty)
        examples = task.generate(args.difficulty, args.count, seed=args.seed)
        source = f"{name} at {task.difficulty_name} {args.difficulty}"
    options = {"batch_size": args.batch_size, "seed": args.seed, "source": source}
    if rule is None:
        results = evaluate_task(model, tokenizer, examples, loops, **options)
    else:
        results = evaluate_task_exits(model, tokenizer, examples, loops, rule, **options)
    if args.json:
        record = {"checkpoint": str(path), "step": state.step, "examples": len(examples), "source": source}
        print(json.dumps({**record, "results": [r.__dict__ for r in results]}))
    else:
        print(f"{path} (step {state.step}): {len(examples)} examples from {source}")
        print(format_accuracy_table(results) if rule is None else format_exit_table(results))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval-task", help="exact-match accuracy of a task checkpoint vs loop count")
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--data", type=path_text, metavar="FILE", help='JSONL of {"input": ..., "target": ...} examples'
    )
    parser.add_argument("--task", help="a built-in task (default: the checkpoint's)")
    parser.add_argument("--difficulty", type=int, help="difficulty of generated examples (with --task)")
    parser.add_argument("--count", type=int, default=256, help="generated examples (default: 256)")
    parser.add_argument("--loops", default="1,2,4,8,16,32", help="comma-separated loop counts (budgets with --exit)")
    add_exit_arguments(parser.add_argument_group("early exit (scored token by token through the inference engine)"))
    parser.add_argument("--batch-size", type=int, default=256, help="examples scored together")
    add_report_arguments(parser, "seed of the examples and of the initial state")
    parser.set_defaults(run=run)
