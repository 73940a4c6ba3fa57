"""Argument parsers shared by several subcommands."""

from __future__ import annotations

import argparse

from loopformer.errors import InputError


def parse_steps(text: str, flag: str = "--steps") -> list[int]:
    """Parse ``"1,2,4"`` into [1, 2, 4]; every entry must be an integer >= 1 (errors name ``flag``)."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r} is invalid: expected comma-separated integers such as 1,2,4.") from None
    if not steps or min(steps) < 1:
        raise InputError(f"{flag} {text!r} is invalid: every entry must be an integer >= 1.")
    return steps


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint directory or a run directory (uses its latest)")


def add_report_arguments(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """``--ema``, ``--seed`` and ``--json``, shared by the commands that evaluate a checkpoint."""
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint has them")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
