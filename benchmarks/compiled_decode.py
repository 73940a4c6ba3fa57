"""Compiled against eager decoding: greedy tokens/s at batch 1 and 8, loops 8 and 32, on a trained checkpoint.

The same protocol as the decode section of ``benchmarks/inference.py`` (prompts of held-out text tokens, a fixed
number of new tokens, no stop token, the time includes the prefill), with ``GenerationConfig(compile=True)`` against
the eager engine. Per setting: one untimed call of each mode (the compiled one compiles here; its time is reported as
``first_call_s``), then ``--repeats`` timed calls that alternate the two modes, so drift of the machine's speed hits
both alike; the medians are compared. Each compiled generation must give the eager tokens.

    python benchmarks/compiled_decode.py --ckpt runs/bench-lm --json benchmarks/results/compiled_decode.json
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from inference import (
    DECODE_BATCHES,
    DECODE_LOOPS,
    FULL,
    HUGINN_REFERENCE_TOKENS_PER_S,
    fail,
    held_out_stream,
    machine,
    progress,
    run_report,
    take,
)
from loopformer.errors import LoopformerError
from loopformer.inference.engine import Engine, GenerationConfig, GenerationResult
from loopformer.loading import load_trained_model
from loopformer.table import format_table
from loopformer.tokenizer import TextTokenizer

SCRIPT = "compiled_decode.py"


def timed(engine: Engine, prompts: list[list[int]], config: GenerationConfig) -> tuple[float, GenerationResult]:
    start = time.perf_counter()
    result = engine.generate(prompts, config)
    return time.perf_counter() - start, result


def measure_setting(engine: Engine, prompts: list[list[int]], loops: int, new_tokens: int, repeats: int) -> dict:
    """Eager and compiled decoding of ``prompts`` at ``loops``: medians, speed-up and token identity."""
    eager = GenerationConfig(max_new_tokens=new_tokens, loops=loops, stop_tokens=())
    compiled = GenerationConfig(max_new_tokens=new_tokens, loops=loops, stop_tokens=(), compile=True)
    first_call, _ = timed(engine, prompts, compiled)
    timed(engine, prompts, eager)
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    identical = True
    for _ in range(repeats):
        eager_s, eager_result = timed(engine, prompts, eager)
        compiled_s, compiled_result = timed(engine, prompts, compiled)
        seconds["eager"].append(eager_s)
        seconds["compiled"].append(compiled_s)
        identical &= [o.tokens for o in eager_result.outputs] == [o.tokens for o in compiled_result.outputs]
    tokens = eager_result.new_tokens
    speeds = {mode: tokens / statistics.median(values) for mode, values in seconds.items()}
    return {
        "batch": len(prompts),
        "loops": loops,
        "new_tokens": tokens,
        "first_call_s": round(first_call, 2),
        "seconds": {mode: [round(s, 4) for s in values] for mode, values in seconds.items()},
        "eager_tokens_per_s": round(speeds["eager"], 2),
        "compiled_tokens_per_s": round(speeds["compiled"], 2),
        "speedup": round(speeds["compiled"] / speeds["eager"], 3),
        "identical_tokens": identical,
    }


def measure(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model, state, directory = load_trained_model(Path(args.ckpt))
    if state.tokenizer_json is None:
        raise LoopformerError(f"{directory} has no tokenizer.json; the benchmark needs the checkpoint's tokenizer.")
    stream, source = held_out_stream(state, TextTokenizer.from_json(state.tokenizer_json))
    prompts = take(stream, max(DECODE_BATCHES), FULL.prompt_tokens).tolist()
    engine = Engine(model)
    rows = []
    for batch in DECODE_BATCHES:
        for loops in DECODE_LOOPS:
            row = measure_setting(engine, prompts[:batch], loops, FULL.new_tokens, args.repeats)
            rows.append(row)
            progress(
                "decode",
                f"batch {batch}, r={loops}: eager {row['eager_tokens_per_s']:.1f}, compiled "
                f"{row['compiled_tokens_per_s']:.1f} tok/s (x{row['speedup']:.2f}, first call {row['first_call_s']} s)",
            )
    reference = next(r for r in rows if r["batch"] == 1 and r["loops"] == 32)
    return {
        "command": " ".join(["benchmarks/compiled_decode.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(threads),
        "checkpoint": {"path": str(directory), "step": state.step, "parameters": model.num_parameters()},
        "held_out": source,
        "prompt_tokens": FULL.prompt_tokens,
        "rows": rows,
        "huginn_reference_tokens_per_s": HUGINN_REFERENCE_TOKENS_PER_S,
        "ratio_compiled_batch1_r32_vs_huginn": round(
            reference["compiled_tokens_per_s"] / HUGINN_REFERENCE_TOKENS_PER_S, 3
        ),
    }


def show(report: dict[str, Any]) -> None:
    header = ["batch", "loops", "eager tok/s", "compiled tok/s", "speed-up", "first call (s)", "same tokens"]
    columns = ("batch", "loops", "eager_tokens_per_s", "compiled_tokens_per_s", "speedup", "first_call_s")
    table = [[*(r[c] for c in columns), "yes" if r["identical_tokens"] else "NO"] for r in report["rows"]]
    print(format_table(header, table))
    print(
        f"compiled batch 1, r = 32: x{report['ratio_compiled_batch1_r32_vs_huginn']} the Huginn reference "
        f"({report['huginn_reference_tokens_per_s']} tok/s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="text LM checkpoint (a checkpoint or run directory)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode and setting (default: 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        fail("--repeats must be >= 1.", SCRIPT)
    return run_report(args, argv, measure, show, SCRIPT)


if __name__ == "__main__":
    raise SystemExit(main())
