"""Argument parsers shared by several subcommands."""

from __future__ import annotations

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
