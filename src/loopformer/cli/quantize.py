"""``loopformer quantize``: write a weight-only int8 / int4 copy of a checkpoint (see docs/quantization.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopformer.cli.arguments import add_checkpoint_argument, path_text
from loopformer.table import format_table

MIB = 2**20


def run(args: argparse.Namespace) -> int:
    from loopformer.loading import load_trained_model
    from loopformer.quant import QuantScheme, directory_bytes, save_quantized

    scheme = QuantScheme(args.bits, args.group_size, embedding=not args.keep_embedding, adapters=args.adapters)
    model, state, source = load_trained_model(Path(args.ckpt), use_ema=args.ema)
    parameters = model.num_parameters()
    out, names = save_quantized(Path(args.out), model, state, scheme, str(source))
    before, after = (source / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    quantized = sum(model.get_buffer(name).numel() for name in names)
    record = {
        "checkpoint": str(source),
        "out": str(out),
        "scheme": scheme.label,
        "parameters": parameters,
        "quantized_parameters": quantized,
        "quantized_tensors": len(names),
        "model_bytes_before": before,
        "model_bytes_after": after,
        "directory_bytes": directory_bytes(out),
    }
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{source} -> {out} ({scheme.label}): {len(names)} tensors, {quantized:,} of {parameters:,} parameters")
    rows = [
        ["source model.safetensors", round(before / MIB, 3)],
        ["quantized model.safetensors", round(after / MIB, 3)],
        ["quantized checkpoint directory", round(record["directory_bytes"] / MIB, 3)],
    ]
    print(format_table(["file", "MiB"], rows))
    print(f"model.safetensors is {before / after:.2f}x smaller")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("quantize", help="weight-only int8 / int4 copy of a checkpoint for CPU inference")
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--out", type=path_text, required=True, help="the new checkpoint directory (must not exist or be empty)"
    )
    parser.add_argument(
        "--bits", type=int, required=True, choices=(8, 4), help="8: per-channel int8; 4: group-wise int4"
    )
    parser.add_argument("--group-size", type=int, help="int4 columns per scale: 32, 64 (default), 128 or 256")
    parser.add_argument("--keep-embedding", action="store_true", help="leave the token embedding / tied head in fp32")
    parser.add_argument("--adapters", action="store_true", help="also quantize the depth-wise LoRA adapters")
    parser.add_argument("--ema", action="store_true", help="quantize the EMA weights when the checkpoint has them")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(run=run)
