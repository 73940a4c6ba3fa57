"""``loopformer eval-ppl``: validation perplexity of a checkpoint at several depths."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from loopformer.cli.arguments import (
    add_checkpoint_argument,
    add_renamed_flag,
    add_report_arguments,
    parse_counts,
    path_text,
)
from loopformer.errors import InputError
from loopformer.training.config import BUILTIN_CORPORA, TrainConfig


def run(args: argparse.Namespace) -> int:
    import torch

    from loopformer.evaluation.perplexity import evaluate_loops, format_loops_table
    from loopformer.loading import load_trained_model
    from loopformer.tokenizer import TextTokenizer
    from loopformer.training.data import document_mask, fixed_eval_batches
    from loopformer.training.pipeline import prepare_data

    loops = parse_counts(args.loops, "--loops")
    model, state, path = load_trained_model(Path(args.ckpt), use_ema=args.ema)
    saved = dict(state.meta.get("train_config", {}))
    if args.data is None:
        _check_stored_sources(saved, Path(args.ckpt))
    changes = {"data": args.data, "val_data": None} if args.data is not None else {}
    if args.seq_len is not None:
        changes["seq_len"] = args.seq_len
    config = TrainConfig.from_dict({**saved, **changes})
    if state.tokenizer_json is None:
        raise InputError(f"Checkpoint {path} has no tokenizer.json, so its data cannot be tokenised.")
    tokenizer = TextTokenizer.from_json(state.tokenizer_json, roles=state.token_roles)
    data = prepare_data(config, tokenizer, log=lambda line: None)
    batch_size = config.batch_size if args.batch_size is None else args.batch_size
    asked = config.eval_batches if args.batches is None else args.batches
    batches = fixed_eval_batches(data.val, batch_size, asked)
    if len(batches) < asked:
        rows = sum(len(b.input_ids) for b in batches)
        print(
            f"loopformer: note: the validation split holds {rows} rows, {len(batches)} of the {asked} batches "
            f"of {batch_size} asked for.",
            file=sys.stderr,
        )
    mask = (
        (lambda b: {"attention_mask": document_mask(b.doc_ids, state.config.sliding_window)})
        if config.doc_mask
        else None
    )
    with torch.inference_mode():
        results = evaluate_loops(model, batches, loops, seed=args.seed, forward_kwargs=mask)
    if args.json:
        print(json.dumps({"checkpoint": str(path), "step": state.step, "results": [r.__dict__ for r in results]}))
    else:
        print(f"{path} (step {state.step}), {sum(r.tokens for r in results[:1]):,} validation tokens")
        print(format_loops_table(results))
    return 0


def _check_stored_sources(saved: dict, run: Path) -> None:
    """Refuse to read a corpus the checkpoint names outside the run folder the user gave (``--data`` names it)."""
    for name in ("data", "val_data"):
        stored = saved.get(name)
        if stored is None or stored in BUILTIN_CORPORA:
            continue
        if not Path(stored).resolve().is_relative_to(run.resolve()):
            raise InputError(
                f"The run's {name} is {stored!r}, outside {str(run)!r}; a checkpoint's contents never make loopformer "
                f"read a file you did not name, so pass --data {shlex.quote(stored)} to evaluate on it."
            )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval-ppl", help="validation perplexity of a checkpoint vs depth")
    add_checkpoint_argument(parser)
    loops = parser.add_argument(
        "--loops", default="1,4,8,16,32", help="comma-separated loop counts (default: %(default)s)"
    )
    add_renamed_flag(parser, loops, "--depths")
    parser.add_argument("--data", type=path_text, help="evaluate on this source instead of the run's validation split")
    parser.add_argument("--seq-len", type=int, help="row length (default: the run's)")
    parser.add_argument("--batch-size", type=int, help="rows per batch (default: the run's batch_size)")
    parser.add_argument(
        "--batches", type=int, help="validation batches (default: the run's eval_batches, as its end-of-training table)"
    )
    add_report_arguments(parser, "seed of the random initial state")
    parser.set_defaults(run=run)
