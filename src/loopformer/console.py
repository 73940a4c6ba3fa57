"""The ``loopformer`` executable: runs the command line, and turns a Ctrl-C that arrives while the command line
is still being imported into the same one line and exit status 130 as one during a command."""

from __future__ import annotations

from loopformer.interrupt import interrupted


def main() -> int:
    try:
        from loopformer.cli import main as run
    except KeyboardInterrupt:
        return interrupted()
    return run()
