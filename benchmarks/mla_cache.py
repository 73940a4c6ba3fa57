"""KV cache bytes per token: multi-head attention vs GQA vs Multi-Latent Attention at equal model width.

For each width (dim 256 / 4 heads and dim 1024 / 16 heads, head_dim 64, layers 2 / 4 / 2 as in Huginn) and each
attention variant (MHA; GQA with n_kv_heads = n_heads / 4; MLA with the default latent rank dim / 4 and RoPE key
head_dim / 2), it reports the bytes one layer slot caches per token and the bytes per token of the whole cache at
``--loops`` core iterations under the full, ring:4 and last slot policies. Every number comes from
``cache_bytes`` and is checked against the bytes of a ``KVCache`` actually allocated for ``--tokens`` tokens.

    python benchmarks/mla_cache.py --json benchmarks/results/mla_cache.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from loopformer.config import ModelConfig
from loopformer.inference.cache import KVCache, cache_bytes, cache_entry
from loopformer.table import format_table

WIDTHS = ((256, 4), (1024, 16))
POLICIES = ("full", "ring:4", "last")
LAYERS = {"n_prelude": 2, "n_core": 4, "n_coda": 2}


def variants(dim: int, heads: int) -> dict[str, ModelConfig]:
    """MHA, GQA (a quarter of the KV heads) and MLA (default latent and RoPE widths) at one width."""
    base = ModelConfig(vocab_size=256, dim=dim, n_heads=heads, max_seq_len=256, **LAYERS)
    return {
        "MHA": base,
        "GQA": base.replace(n_kv_heads=heads // 4),
        "MLA": base.replace(attention="mla"),
    }


def measure(loops: int, tokens: int, element_bytes: int) -> list[dict]:
    dtype = {4: torch.float32, 2: torch.bfloat16}[element_bytes]
    rows = []
    for dim, heads in WIDTHS:
        configs = variants(dim, heads)
        for name, config in configs.items():
            slot_bytes = sum(h * w for h, w in cache_entry(config)) * element_bytes
            for policy in POLICIES:
                per_token = cache_bytes(config, policy, 1, loops, element_bytes=element_bytes)
                cache = KVCache(config, 1, tokens, policy, max_loops=loops, dtype=dtype)
                allocated = cache.nbytes()
                if allocated != per_token * tokens:
                    raise AssertionError(f"{name} {policy}: cache_bytes {per_token * tokens} != allocated {allocated}")
                mha = cache_bytes(configs["MHA"], policy, 1, loops, element_bytes=element_bytes)
                mha_full = cache_bytes(configs["MHA"], "full", 1, loops, element_bytes=element_bytes)
                rows.append(
                    {
                        "dim": dim,
                        "heads": heads,
                        "attention": name,
                        "kind": config.attention_kind,
                        "policy": policy,
                        "bytes_per_token_per_slot": slot_bytes,
                        "bytes_per_token": per_token,
                        "allocated_bytes": allocated,
                        "allocated_tokens": tokens,
                        "mha_over_this": mha / per_token,
                        "mha_full_over_this": mha_full / per_token,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="columns of the allocated caches (default: 16)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    element_bytes = 4 if args.dtype == "fp32" else 2
    rows = measure(args.loops, args.tokens, element_bytes)
    report = {"loops": args.loops, "dtype": args.dtype, "layers": LAYERS, "rows": rows}
    table = [
        [
            f"{r['dim']}/{r['heads']}",
            r["kind"],
            r["policy"],
            f"{r['bytes_per_token_per_slot']:,}",
            f"{r['bytes_per_token'] / 1024:,.1f}",
            f"{r['mha_over_this']:.1f}x",
            f"{r['mha_full_over_this']:.1f}x",
        ]
        for r in rows
    ]
    headers = [
        "dim/heads",
        "attention",
        "policy",
        "B/token/slot",
        f"KiB/token at r={args.loops}",
        "MHA / this",
        "MHA full / this",
    ]
    print(format_table(headers, table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
