"""Flags shared by ``loopformer generate`` and ``loopformer chat``, and the engine they build."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loopformer.cli.arguments import add_renamed_flag, path_text
from loopformer.config import DTYPES
from loopformer.errors import InputError
from loopformer.inference.criteria import ACT_DEFAULT_THRESHOLD, EXIT_CRITERIA

if TYPE_CHECKING:  # the command line imports torch only when a command runs
    import torch

    from loopformer.inference.engine import Engine, GenerationConfig
    from loopformer.inference.exits import ExitRule


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ckpt``, ``--ema`` and ``--dtype``: what :func:`load_engine` reads."""
    parser.add_argument(
        "--ckpt", type=path_text, required=True, help="a checkpoint directory or a run directory (uses its latest)"
    )
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint has them")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype: auto = bf16 autocast where this machine runs it faster (AMX / AVX512-BF16 CPUs, "
        "CUDA), else fp32 (default: auto; `loopformer doctor` shows the choice)",
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    depth = parser.add_argument_group("loops")
    depth.add_argument("--loops", type=int, help="core iterations per token (the ceiling with --exit; default: mean)")
    add_exit_arguments(depth)
    depth.add_argument("--force", action="store_true", help="allow --loops above 4096 (minutes per token)")
    depth.add_argument("--kv", default="full", help="KV slot policy: full, last or ring:K (default: full)")
    depth.add_argument("--warm-start", action="store_true", help="start each token from the previous final state")
    depth.add_argument(
        "--speculative",
        metavar="DRAFT:LOOKAHEAD|auto",
        help="self-speculative decoding, e.g. 4:8 (draft at 4 loops, 8 tokens ahead); auto (generate): time plain "
        "decoding and a few settings on a 16-token probe of the prompts and keep the fastest",
    )
    depth.add_argument(
        "--compile",
        action="store_true",
        help="decode each token as one compiled graph (fixed depth; the first token at each length compiles)",
    )
    parser.add_argument(
        "--memory",
        metavar="FILE",
        help="memory vectors (.safetensors / .npy, [vectors, dim] or [prompts, vectors, dim]) for the memory pathway",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt at most")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default: all)")
    sampling.add_argument("--top-p", type=float, help="nucleus: the smallest set of this mass (default: off)")
    sampling.add_argument("--min-p", type=float, help="drop tokens below this fraction of the top one (default: off)")
    sampling.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="divide seen tokens' logits by this (default: 1, off)"
    )
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the sampler and of the initial states")


def add_exit_arguments(group: argparse._ActionsContainer) -> None:
    """``--exit``, ``--min-loops`` and ``--check-every``: a per-token exit rule (read by :func:`exit_rule`)."""
    defaults = {**EXIT_CRITERIA, "act": ACT_DEFAULT_THRESHOLD}
    thresholds = ", ".join(f"{name} {value:g}" for name, value in defaults.items())
    group.add_argument(
        "--exit",
        metavar="CRITERION[:THR]",
        help=f"per-token early exit, e.g. kl:5e-4; criteria and their default thresholds: {thresholds}",
    )
    min_loops = group.add_argument(
        "--min-loops", type=int, default=1, help="no exit before this many loops (default: 1)"
    )
    add_renamed_flag(group, min_loops, "--min-steps")
    group.add_argument("--check-every", type=int, default=1, help="test the exit rule every N iterations")


def exit_rule(args: argparse.Namespace) -> ExitRule | None:
    """The exit rule that ``--exit`` / ``--min-loops`` / ``--check-every`` describe (None without ``--exit``)."""
    if not args.exit:
        return None
    from loopformer.inference.exits import parse_exit_rule

    return parse_exit_rule(args.exit, min_loops=args.min_loops, check_every=args.check_every)


AUTO = "auto"


def parse_speculative(text: str | None) -> tuple[int, int] | None:
    """``"4:8"`` -> (4, 8): draft with 4 iterations, 8 tokens ahead; ``auto`` is None here (``generate`` picks the
    setting from a probe)."""
    if text is None or text == AUTO:
        return None
    draft, _, ahead = text.partition(":")
    if not (draft.strip().isdigit() and ahead.strip().isdigit()):
        raise InputError(f"--speculative {text!r} is invalid: write DRAFT_LOOPS:LOOKAHEAD, e.g. 4:8.")
    return int(draft), int(ahead)


def generation_config(args: argparse.Namespace, stop_tokens: tuple[int, ...] | None = None) -> GenerationConfig:
    """The :class:`GenerationConfig` the flags describe."""
    from loopformer.inference.engine import GenerationConfig
    from loopformer.inference.sampling import SamplingConfig

    sampling = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        loops=args.loops,
        exit=exit_rule(args),
        kv=args.kv,
        warm_start=args.warm_start,
        speculative=parse_speculative(args.speculative),
        sampling=sampling,
        stop_tokens=stop_tokens,
        stop_strings=tuple(args.stop),
        state_seed=args.seed,
        compile=args.compile,
        force=args.force,
    )


def load_memory(args: argparse.Namespace, engine: Engine) -> torch.Tensor | None:
    """The ``--memory`` vectors, checked against the model (None without the flag)."""
    if args.memory is None:
        return None
    from loopformer.inference.memory_file import load_memory_file
    from loopformer.nn.memory import NO_PATHWAY

    memory_dim = engine.model.config.memory_dim
    if memory_dim == 0:
        raise InputError(f"--memory: {NO_PATHWAY}")
    vectors = load_memory_file(args.memory)
    if vectors.shape[-1] != memory_dim:
        raise InputError(f"--memory holds vectors of width {vectors.shape[-1]}; this model takes {memory_dim}.")
    return vectors


def load_engine(args: argparse.Namespace) -> tuple[Engine, Path]:
    """The checkpoint's model and tokenizer in an :class:`Engine`, and the checkpoint directory."""
    from loopformer.inference.engine import Engine
    from loopformer.loading import load_trained_model
    from loopformer.tokenizer import TextTokenizer

    model, state, path = load_trained_model(Path(args.ckpt), use_ema=args.ema)
    if state.tokenizer_json is None:
        raise InputError(f"{path} has no tokenizer.json; generation needs the checkpoint's tokenizer.")
    tokenizer = TextTokenizer.from_json(state.tokenizer_json, roles=state.token_roles)
    return Engine(model, tokenizer, dtype=args.dtype, compile_notice=print_compile_notice), path


def print_compile_notice(shape: str, seconds: float | None) -> None:
    """One stderr line per new compiled graph: "compiling ... (shape)" and, when it is done, how long it took."""
    if seconds is None:
        print(f"loopformer: compiling the decoding graph ({shape}), once per shape ...", end="", file=sys.stderr)
    else:
        print(f" done in {seconds:.1f} s", file=sys.stderr)
    sys.stderr.flush()
