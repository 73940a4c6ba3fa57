"""``loopformer presets``: list the named configurations."""

from __future__ import annotations

import argparse
import json
from typing import Any

from loopformer.presets import PRESETS, get_preset
from loopformer.table import format_table


def preset_summary(name: str) -> dict[str, Any]:
    """Facts about one preset; the parameter count comes from a model built on the meta device."""
    from loopformer.model import build_model

    config = PRESETS[name]
    params = build_model(config, device="meta").num_parameters()
    return {
        "name": name,
        "params": params,
        "dim": config.dim,
        "layers": f"{config.n_prelude}/{config.n_core}/{config.n_coda}",
        "mean_loops": config.recurrence.mean_loops,
        "effective_depth": config.effective_depth(),
        "injection": config.injection,
        "attention": config.attention_kind,
        "vocab_size": config.vocab_size,
        "config": config.to_dict(),
    }


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run(args: argparse.Namespace) -> int:
    if args.show is not None:
        print(get_preset(args.show).to_json())
        return 0
    summaries = [preset_summary(name) for name in PRESETS]
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    headers = [
        "name",
        "params",
        "exact params",
        "dim",
        "layers P/R/C",
        "r",
        "eff. depth",
        "injection",
        "attention",
    ]
    rows = [
        [
            s["name"],
            human_count(s["params"]),
            s["params"],
            s["dim"],
            s["layers"],
            s["mean_loops"],
            s["effective_depth"],
            s["injection"],
            s["attention"],
        ]
        for s in summaries
    ]
    print(format_table(headers, rows))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("presets", help="list the named model presets")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--show", metavar="NAME", help="print one preset's full config as JSON (a starting point for --config files)"
    )
    parser.set_defaults(run=run)
