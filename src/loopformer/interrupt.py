"""What a Ctrl-C ends with: one ``loopformer: interrupted`` line and exit status 130."""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for a program stopped by Ctrl-C


def interrupted() -> int:
    """Say that Ctrl-C stopped the command; the exit status to return."""
    print("loopformer: interrupted", file=sys.stderr)
    return INTERRUPTED
