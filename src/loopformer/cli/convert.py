"""``loopformer convert``: checkpoints to and from other layouts.

    loopformer convert huginn SRC DST [--dtype bf16]   a Huginn-0125 directory -> a loopformer checkpoint
    loopformer convert to-huginn SRC DST                a loopformer checkpoint -> the Huginn layout
    loopformer convert to-hf SRC DST                    a loopformer checkpoint -> a transformers model directory

Bad input (missing or extra tensors, wrong shapes, an unknown model_type) is one sentence and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loopformer.cli.arguments import path_text

DTYPES = ("auto", "fp32", "bf16")  # auto: as stored


def run_huginn(args: argparse.Namespace) -> int:
    import torch

    from loopformer.interop.huginn import import_huginn

    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    path = import_huginn(Path(args.src), Path(args.dst), dtype)
    print(f"wrote loopformer checkpoint {path}")
    return 0


def run_to_huginn(args: argparse.Namespace) -> int:
    from loopformer.interop.huginn import export_huginn

    path = export_huginn(Path(args.src), Path(args.dst), int(args.max_shard_mb * 2**20))
    print(f"wrote Huginn checkpoint {path}")
    return 0


def run_to_hf(args: argparse.Namespace) -> int:
    from loopformer.interop.hf_export import export_hf  # transformers is an optional extra: imported on use

    path = export_hf(Path(args.src), Path(args.dst))
    print(f"wrote transformers model {path} (load with trust_remote_code=True)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints to and from Huginn / transformers layouts")
    kinds = parser.add_subparsers(title="conversions", metavar="KIND")

    def usage(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(run=usage)

    huginn = kinds.add_parser("huginn", help="import a Huginn-0125 checkpoint directory")
    huginn.add_argument(
        "src", type=path_text, help="Huginn directory: config.json, safetensors (single or index + shards), tokenizer"
    )
    huginn.add_argument("dst", type=path_text, help="new loopformer checkpoint directory")
    huginn.add_argument("--dtype", choices=DTYPES, default="auto", help="cast weights (default: as stored)")
    huginn.set_defaults(run=run_huginn)

    to_huginn = kinds.add_parser("to-huginn", help="export a loopformer checkpoint in the Huginn layout")
    to_huginn.add_argument("src", type=path_text, help="loopformer checkpoint or run directory")
    to_huginn.add_argument("dst", type=path_text, help="new Huginn directory")
    to_huginn.add_argument("--max-shard-mb", type=float, default=5120.0, help="shard size limit (default: 5120)")
    to_huginn.set_defaults(run=run_to_huginn)

    to_hf = kinds.add_parser("to-hf", help="export a loopformer checkpoint as a transformers model (needs [hf])")
    to_hf.add_argument("src", type=path_text, help="loopformer checkpoint or run directory")
    to_hf.add_argument(
        "dst", type=path_text, help="new model directory (config, safetensors, tokenizer, remote-code shims)"
    )
    to_hf.set_defaults(run=run_to_hf)
