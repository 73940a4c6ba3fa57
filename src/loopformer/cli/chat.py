"""``loopformer chat``: an interactive, streaming conversation with a checkpoint.

Each line you type is a user message; the reply streams as it is generated. Commands change the depth live:
``/loops N``, ``/exit CRITERION[:THR]`` or ``/exit off``, ``/kv POLICY``, ``/system TEXT``, ``/reset``, ``/quit``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from loopformer.cli.generate import summary
from loopformer.cli.generation_args import add_generation_arguments, generation_config, load_engine, load_memory
from loopformer.errors import InputError, LoopformerError
from loopformer.inference.chat import Message, encode_chat, reply_stop_tokens
from loopformer.inference.engine import GenerationConfig
from loopformer.inference.exits import parse_exit_rule

HELP = "commands: /loops N, /exit CRITERION[:THR] | /exit off, /kv full|last|ring:K, /system TEXT, /reset, /quit"


def _set_loops(config: GenerationConfig, value: str) -> GenerationConfig:
    if not value.strip().isdigit() or int(value) < 1:
        raise InputError(f"/loops takes an integer >= 1, got {value.strip()!r}.")
    return dataclasses.replace(config, loops=int(value))


def _set_exit(config: GenerationConfig, value: str) -> GenerationConfig:
    if value.strip().lower() in ("", "off", "none"):
        return dataclasses.replace(config, exit=None)
    return dataclasses.replace(config, exit=parse_exit_rule(value))


def _set_kv(config: GenerationConfig, value: str) -> GenerationConfig:
    return dataclasses.replace(config, kv=value.strip())


SETTINGS: dict[str, Callable[[GenerationConfig, str], GenerationConfig]] = {
    "/loops": _set_loops,
    "/exit": _set_exit,
    "/kv": _set_kv,
}


def run(args: argparse.Namespace, read: Callable[[str], str] = input) -> int:
    engine, path = load_engine(args)
    config = generation_config(args, stop_tokens=reply_stop_tokens(engine.tokenizer))
    memory = load_memory(args, engine)
    system = [Message("system", args.system)] if args.system else []
    messages: list[Message] = []
    print(f"chatting with {path} at {engine.resolve_loops(config)} loops; {HELP}", file=sys.stderr)
    while True:
        try:
            line = read("> ")
        except EOFError:
            return 0
        command, _, value = line.strip().partition(" ")
        try:
            if command == "/quit":
                return 0
            if command == "/reset":
                messages = []
                continue
            if command == "/system":
                system = [Message("system", value)] if value else []
                continue
            if command in SETTINGS:
                config = SETTINGS[command](config, value)
                print(
                    f"loops {engine.resolve_loops(config)}, exit {config.exit.label if config.exit else 'off'}, "
                    f"kv {config.kv.label}",
                    file=sys.stderr,
                )
                continue
            if command.startswith("/"):
                raise InputError(f"unknown command {command!r}; {HELP}.")
            if not line.strip():
                continue
            turn = [*messages, Message("user", line)]  # kept only once the reply is done
            stream = engine.stream([encode_chat(engine.tokenizer, system + turn)], config, memory=memory)
            for event in stream:
                print(event.text, end="", flush=True)
            print()
            messages = [*turn, Message("assistant", stream.result.outputs[0].text or "")]
            print(summary(stream.result), file=sys.stderr)
        except LoopformerError as exc:
            print(f"error: {exc}", file=sys.stderr)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="interactive streaming chat; /loops N changes the depth live")
    add_generation_arguments(parser)
    parser.add_argument("--system", help="a system message that starts the conversation")
    parser.set_defaults(run=run)
