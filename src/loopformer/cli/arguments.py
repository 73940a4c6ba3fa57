"""Argument parsers shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from loopformer.deprecation import warn_renamed
from loopformer.errors import InputError


def parse_counts(text: str, flag: str) -> list[int]:
    """Parse ``"1,2,4"`` into [1, 2, 4]; every entry must be an integer >= 1 (errors name ``flag``)."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r} is invalid: expected comma-separated integers such as 1,2,4.") from None
    if not counts or min(counts) < 1:
        raise InputError(f"{flag} {text!r} is invalid: every entry must be an integer >= 1.")
    return counts


class _RenamedFlag(argparse.Action):
    """A flag's deprecated old spelling: warns, then stores into the new flag's destination."""

    def __init__(self, option_strings: list[str], dest: str, new_flag: str, **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        warn_renamed(f"The flag {option_string}", self.new_flag)
        setattr(namespace, self.dest, values)


def add_renamed_flag(group: argparse._ActionsContainer, action: argparse.Action, old_flag: str) -> None:
    """Accept ``old_flag``, the deprecated spelling of ``action``'s flag (e.g. ``--min-steps`` for ``--min-loops``),
    hidden from ``--help``."""
    group.add_argument(
        old_flag,
        dest=action.dest,
        action=_RenamedFlag,
        new_flag=action.option_strings[-1],
        type=action.type,
        metavar=action.metavar,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


def path_text(text: str) -> str:
    """An argparse ``type`` for a file or folder flag: an empty name would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder")
    return text


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", type=path_text, required=True, help="a checkpoint directory or a run directory (uses its latest)"
    )


def add_report_arguments(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """``--ema``, ``--seed`` and ``--json``, shared by the commands that evaluate a checkpoint."""
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint has them")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
