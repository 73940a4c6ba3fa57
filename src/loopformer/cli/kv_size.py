"""``loopformer kv-size``: bytes of KV cache per slot policy, for any model, length and depth (nothing is run).

The attention variant decides what a layer caches per token (:func:`loopformer.inference.cache.cache_entry`):
keys and values of every KV head, or with Multi-Latent Attention one latent and one shared RoPE key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopformer.cli.arguments import parse_counts, path_text
from loopformer.errors import InputError
from loopformer.presets import get_preset
from loopformer.table import format_table

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def run(args: argparse.Namespace) -> int:
    from loopformer.checkpoint import load_model_config
    from loopformer.inference.cache import cache_bytes, parse_slot_policy

    if (args.preset is None) == (args.ckpt is None):
        raise InputError("give either --preset NAME or --ckpt DIR.")
    config = get_preset(args.preset) if args.preset is not None else load_model_config(Path(args.ckpt))
    policies = [parse_slot_policy(text) for text in args.kv.split(",") if text.strip()]
    tokens = parse_counts(args.tokens, "--tokens")
    loops = parse_counts(args.loops, "--loops")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}.")
    rows = []
    for r in loops:
        full = cache_bytes(config, "full", 1, r, element_bytes=ELEMENT_BYTES[args.dtype])
        for policy in policies:
            per_token = cache_bytes(config, policy, 1, r, element_bytes=ELEMENT_BYTES[args.dtype])
            for n in tokens:
                rows.append(
                    {
                        "policy": policy.label,
                        "loops": r,
                        "tokens": n,
                        "bytes": per_token * n * args.batch,
                        "bytes_per_token": per_token,
                        "full_over_policy": full / per_token,
                    }
                )
    if args.json:
        print(json.dumps({"attention": config.attention_kind, "batch": args.batch, "dtype": args.dtype, "rows": rows}))
        return 0
    table = [
        [row["policy"], row["loops"], row["tokens"], f"{row['bytes'] / 2**20:,.2f}", f"{row['full_over_policy']:.1f}x"]
        for row in rows
    ]
    print(f"attention: {config.attention_kind}")
    print(format_table(["policy", "loops", "tokens", "MiB", "full / policy"], table))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kv-size", help="KV cache bytes per slot policy, length and depth")
    parser.add_argument("--preset", help="a preset name")
    parser.add_argument("--ckpt", type=path_text, help="a checkpoint or run directory (its config)")
    parser.add_argument("--kv", default="full,ring:4,last", help="comma-separated policies (default: full,ring:4,last)")
    parser.add_argument("--tokens", default="1024", help="comma-separated lengths per row (default: 1024)")
    parser.add_argument("--loops", default="32", help="comma-separated core iteration counts (default: 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(ELEMENT_BYTES), default="fp32", help="cache element type")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(run=run)
