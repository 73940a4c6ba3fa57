"""``loopformer demo``: a short end-to-end job on embedded data.

Builds a preset, encodes a slice of the interpreter's own standard library as bytes, and runs the same
batch at several depths, printing time, throughput, loss and how much the last iteration still moved
the latent state. Weights are freshly initialised (training is a separate command).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from loopformer.config import ModelConfig
from loopformer.errors import InputError
from loopformer.model import build_model
from loopformer.presets import get_preset
from loopformer.table import format_table

STDLIB_SAMPLE = Path(argparse.__file__)


def parse_steps(text: str, flag: str = "--steps") -> list[int]:
    """Parse ``"1,2,4"`` into [1, 2, 4]; every entry must be an integer >= 1 (errors name ``flag``)."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{flag} {text!r} is invalid: expected comma-separated integers such as 1,2,4.") from None
    if not steps or min(steps) < 1:
        raise InputError(f"{flag} {text!r} is invalid: every depth must be >= 1.")
    return steps


def sample_batch(batch: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """Consecutive byte windows of a standard-library source file, shape [batch, seq_len]."""
    if vocab_size < 256:
        raise InputError(f"The demo encodes bytes and needs vocab_size >= 256, got {vocab_size}.")
    data = torch.frombuffer(bytearray(STDLIB_SAMPLE.read_bytes()), dtype=torch.uint8).long()
    need = batch * seq_len
    if data.numel() < need:
        raise InputError(f"batch x seq-len = {need} bytes exceeds the sample file ({data.numel()} bytes).")
    return data[:need].view(batch, seq_len)


def run(args: argparse.Namespace) -> int:
    steps_list = parse_steps(args.steps)
    config = ModelConfig.load(args.config) if args.config else get_preset(args.preset)
    name = args.config or args.preset
    if args.seq_len < 2 or args.batch < 1:
        raise InputError("--seq-len must be >= 2 and --batch >= 1.")
    torch.manual_seed(args.seed)
    model = build_model(config, seed=args.seed).eval()
    ids = sample_batch(args.batch, args.seq_len, config.vocab_size)
    print(
        f"{name}: {model.num_parameters():,} parameters, layers "
        f"{config.n_prelude}/{config.n_core}/{config.n_coda}, {config.injection} injection, untrained weights"
    )
    print(f"input: {args.batch} x {args.seq_len} bytes of {STDLIB_SAMPLE}\n")
    rows = []
    for steps in steps_list:
        start = time.perf_counter()
        with torch.no_grad():
            out = model(ids, num_steps=steps, labels=ids, seed=args.seed, return_states=True)
        elapsed = time.perf_counter() - start
        prev = out.states[-2] if steps > 1 else model.init_state(out.state, torch.Generator().manual_seed(args.seed))
        moved = float((out.state - prev).norm() / out.state.norm().clamp_min(1e-12))
        rows.append(
            [
                steps,
                config.effective_depth(steps),
                round(elapsed * 1000, 1),
                round(ids.numel() / elapsed),
                round(float(out.loss), 4),
                f"{moved:.2e}",
            ]
        )
    headers = ["steps", "eff. depth", "ms", "tokens/s", "loss", "last-step change"]
    print(format_table(headers, rows))
    print("\nlast-step change = ||s_r - s_(r-1)|| / ||s_r||: how far the final iteration still moved the state.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a preset at several depths on embedded data")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", help="preset name (see `loopformer presets`)")
    source.add_argument("--config", help="a model config file (JSON or YAML), e.g. from `loopformer presets --show`")
    parser.add_argument("--steps", default="1,2,4,8,16,32,64", help="comma-separated core iteration counts")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)
