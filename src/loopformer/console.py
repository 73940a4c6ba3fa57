"""The ``loopformer`` executable: runs the command line, and turns a Ctrl-C that arrives while the command line
is still being imported into the same one line and exit status 130 as one during a command."""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for a program stopped by Ctrl-C


def interrupted() -> int:
    """Say that Ctrl-C stopped the command; the exit status to return."""
    print("loopformer: interrupted", file=sys.stderr)
    return INTERRUPTED


def main() -> int:
    try:
        from loopformer.cli import main as run
    except KeyboardInterrupt:
        return interrupted()
    return run()
