"""``loopformer generate``: complete one or more prompts with a checkpoint, streaming the text.

One ``--prompt`` streams its completion to stdout as it is generated; several run as one padded batch and
print in order. ``--json`` prints one object with the texts, tokens, iterations per token and speeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING

from loopformer.cli.generation_args import (
    AUTO,
    add_generation_arguments,
    generation_config,
    load_engine,
    load_memory,
)
from loopformer.errors import InputError
from loopformer.inference.chat import encode_prompt

if TYPE_CHECKING:
    from loopformer.inference.engine import GenerationResult


def summary(result: GenerationResult) -> str:
    """One line: tokens, speed, mean loops per token, cache size (and speculative acceptance)."""
    speed = result.new_tokens / result.seconds if result.seconds > 0 else 0.0
    line = (
        f"{result.new_tokens} tokens in {result.seconds:.2f} s ({speed:.1f} tok/s), "
        f"{result.mean_loops:.2f} loops/token, KV cache {result.cache_bytes / 2**20:.1f} MiB"
    )
    if result.acceptance_rate is not None:
        line += f", draft acceptance {result.acceptance_rate:.0%}"
    return line


def run(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise InputError("give at least one --prompt TEXT.")
    engine, path = load_engine(args)
    config = generation_config(args)
    memory = load_memory(args, engine)
    prompts = [encode_prompt(engine.tokenizer, text) for text in args.prompt]
    probe = None
    if args.speculative == AUTO:
        from loopformer.inference.speculative_probe import probe_speculative

        probe = probe_speculative(engine, prompts, config, memory)
        config = dataclasses.replace(config, speculative=probe.best.speculative)
        if not (args.quiet or args.json):
            print(probe.describe(), file=sys.stderr)
    if args.json:
        result = engine.generate(prompts, config, memory=memory)
        record = {
            "checkpoint": str(path),
            "loops": engine.resolve_loops(config),
            "exit": config.exit.label if config.exit else None,
            "kv": config.kv.label,
            "speculative": None if config.speculative is None else "{}:{}".format(*config.speculative),
            "speculative_probe": None if probe is None else [dataclasses.asdict(run) for run in probe.runs],
            "seconds": result.seconds,
            "tokens_per_s": result.new_tokens / result.seconds if result.seconds > 0 else None,
            "mean_loops_per_token": result.mean_loops,
            "cache_bytes": result.cache_bytes,
            "acceptance_rate": result.acceptance_rate,
            "dtype": engine.dtype_choice.name,
            "dtype_reason": engine.dtype_choice.reason,
            "outputs": [
                {"prompt": text, "text": o.text, "tokens": o.tokens, "loops": o.loops, "finish_reason": o.finish_reason}
                for text, o in zip(args.prompt, result.outputs, strict=True)
            ],
        }
        print(json.dumps(record))
        return 0
    if len(prompts) == 1:
        stream = engine.stream(prompts, config, memory=memory)  # validates the prompt and the settings before printing
        print(args.prompt[0], end="", flush=True)
        for event in stream:
            print(event.text, end="", flush=True)
        print()
        result = stream.result
    else:
        result = engine.generate(prompts, config, memory=memory)
        for text, output in zip(args.prompt, result.outputs, strict=True):
            print(f"{text}{output.text}\n")
    if not args.quiet:
        print(summary(result), file=sys.stderr)
        if config.speculative is not None and probe is None:
            from loopformer.inference.speculative_probe import slower_than_plain

            notice = slower_than_plain(engine, prompts, config, result, memory)
            if notice:
                print(notice, file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="complete prompts with a checkpoint (batched, streaming)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    add_generation_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object with texts, loops and speed")
    parser.add_argument("--quiet", action="store_true", help="no summary line on stderr")
    parser.set_defaults(run=run)
