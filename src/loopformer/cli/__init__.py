"""The ``loopformer`` command line: thin; parses, calls the library, prints.

A subcommand is a module in this package with ``register(subparsers)`` that adds its parser and sets
``run=function(args) -> int``; list it in :data:`COMMANDS`. User mistakes (:class:`LoopformerError`)
print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from loopformer.cli import (
    analyze,
    chat,
    convert,
    demo,
    doctor,
    eval_lm,
    eval_ppl,
    eval_task,
    generate,
    kv_size,
    presets,
    quantize,
    serve,
    train,
)
from loopformer.deprecation import LoopformerDeprecationWarning
from loopformer.errors import InputError, LoopformerError
from loopformer.interrupt import interrupted
from loopformer.version import __version__

COMMANDS = (
    presets, demo, train, eval_ppl, eval_task, eval_lm, generate, chat, serve, kv_size, analyze, convert, quantize,
    doctor,
)  # fmt: skip


class DefaultsFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help unless the help already names its default, or there is none
    to name (None, off flags, empty lists)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._names_default(action):  # argparse prints no help line for help=None
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or not self._names_default(action):
            return action.help
        return f"{text} (default: %(default)s)".lstrip()

    @staticmethod
    def _names_default(action: argparse.Action) -> bool:
        default = action.default
        silent = any(default is value for value in (None, False, True, argparse.SUPPRESS)) or default in ([], "")
        return bool(action.option_strings) and not silent


class Parser(argparse.ArgumentParser):
    """Every ``loopformer`` parser and sub-parser: defaults shown once in ``--help``; a bad flag is one
    ``loopformer: error:`` sentence and status 2, like every other user mistake (not argparse's usage dump)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see `{self.prog} --help`).")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loopformer", description="Recurrent-depth (looped) transformer language models.")
    parser.add_argument("--version", action="version", version=f"loopformer {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user mistake is one ``loopformer: error:`` line and status 2, Ctrl-C status 130."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line(warnings.showwarning)
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if not hasattr(args, "run"):
                parser.print_help(sys.stderr)
                return 2
            return args.run(args)
        except LoopformerError as exc:
            print(f"loopformer: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return interrupted()


def _one_line(show: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` that prints our deprecation warnings as one ``loopformer: warning:`` line."""

    def shown(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, LoopformerDeprecationWarning):
            print(f"loopformer: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kwargs)

    return shown


if __name__ == "__main__":
    sys.exit(main())
