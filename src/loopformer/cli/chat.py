"""``loopformer chat``: an interactive, streaming conversation with a checkpoint.

Each line you type is a user message; the reply streams as it is generated. Commands change the depth live:
``/loops N``, ``/exit CRITERION[:THR]`` or ``/exit off``, ``/kv POLICY``; ``/system TEXT`` and ``/reset`` change
the conversation (and say so), ``/help`` lists the commands, ``/bye`` or ``/quit`` leaves. Ctrl-C stops the reply
being generated (the session goes on); Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from loopformer.cli.generate import summary
from loopformer.cli.generation_args import (
    AUTO,
    add_generation_arguments,
    generation_config,
    load_engine,
    load_memory,
)
from loopformer.errors import InputError, LoopformerError
from loopformer.inference.chat import Message, encode_chat, reply_stop_tokens

if TYPE_CHECKING:  # the command line imports torch only when a command runs
    import torch

    from loopformer.inference.engine import Engine, GenerationConfig

HELP = (
    "commands: /loops N, /exit CRITERION[:THR] | /exit off, /kv full|last|ring:K, /system TEXT, /reset, /help, "
    "/bye (or /quit); Ctrl-C stops a reply, Ctrl-D or /bye leaves"
)
LEAVE = ("/bye", "/quit")


def _set_loops(config: GenerationConfig, value: str) -> GenerationConfig:
    if not value.strip().isdigit() or int(value) < 1:
        raise InputError(f"/loops takes an integer >= 1, got {value.strip()!r}.")
    return dataclasses.replace(config, loops=int(value))


def _set_exit(config: GenerationConfig, value: str) -> GenerationConfig:
    if not value.strip():
        raise InputError("/exit takes CRITERION[:THR] (e.g. /exit kl:5e-4) or off; /bye leaves the chat.")
    if value.strip().lower() in ("off", "none"):
        return dataclasses.replace(config, exit=None)
    from loopformer.inference.exits import parse_exit_rule

    return dataclasses.replace(config, exit=parse_exit_rule(value))


def _set_kv(config: GenerationConfig, value: str) -> GenerationConfig:
    return dataclasses.replace(config, kv=value.strip())


SETTINGS: dict[str, Callable[[GenerationConfig, str], GenerationConfig]] = {
    "/loops": _set_loops,
    "/exit": _set_exit,
    "/kv": _set_kv,
}


def run(args: argparse.Namespace, read: Callable[[str], str] = input) -> int:
    if args.speculative == AUTO:
        raise InputError("--speculative auto times the prompts of one generate call; give DRAFT:LOOKAHEAD in chat.")
    engine, path = load_engine(args)
    config = generation_config(args, stop_tokens=reply_stop_tokens(engine.tokenizer))
    memory = load_memory(args, engine)
    system = [Message("system", args.system)] if args.system else []
    messages: list[Message] = []

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    say(f"chatting with {path} at {engine.resolve_loops(config)} loops; {HELP}")
    while True:
        try:
            line = read("> ")
        except EOFError:
            return 0
        except KeyboardInterrupt:  # at the prompt: nothing to stop; say how to leave
            say("\n(Ctrl-D or /bye leaves the chat)")
            continue
        command, _, value = line.strip().partition(" ")
        try:
            if command in LEAVE:
                return 0
            if command == "/help":
                say(HELP)
            elif command == "/reset":
                messages = []
                say("conversation cleared" + (" (the system message stays)" if system else ""))
            elif command == "/system":
                system = [Message("system", value)] if value else []
                size = f"{len(value)} character{'s' if len(value) != 1 else ''}"
                say(f"system message set ({size})" if value else "system message cleared")
            elif command in SETTINGS:
                config = SETTINGS[command](config, value)
                say(
                    f"loops {engine.resolve_loops(config)}, exit {config.exit.label if config.exit else 'off'}, "
                    f"kv {config.kv.label}"
                )
            elif command.startswith("/"):
                raise InputError(f"unknown command {command!r}; {HELP}.")
            elif line.strip():
                turn = [*messages, Message("user", line)]  # kept only once the reply is done
                reply = _reply(engine, encode_chat(engine.tokenizer, system + turn), config, memory)
                if reply is not None:
                    messages = [*turn, Message("assistant", reply)]
        except LoopformerError as exc:
            say(f"error: {exc}")


def _reply(engine: Engine, prompt: list[int], config: GenerationConfig, memory: torch.Tensor | None) -> str | None:
    """Stream one reply to stdout and its summary to stderr; None when Ctrl-C stopped it (the turn is dropped)."""
    stream = engine.stream([prompt], config, memory=memory)
    try:
        for event in stream:
            print(event.text, end="", flush=True)
    except KeyboardInterrupt:
        print()
        print("(reply stopped; it is not part of the conversation)", file=sys.stderr)
        return None
    print()
    print(summary(stream.result), file=sys.stderr)
    return stream.result.outputs[0].text or ""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="interactive streaming chat; /loops N changes the depth live")
    add_generation_arguments(parser)
    parser.add_argument("--system", help="a system message that starts the conversation")
    parser.set_defaults(run=run)
