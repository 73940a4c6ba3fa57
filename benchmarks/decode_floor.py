"""Where batch-1 decode time goes: the matrix-vector floor vs one core iteration as the engine runs it.

For a checkpoint (or a fresh model of the benchmark shape) it measures, at batch 1:

1. **matmul floor**: the core's weight products alone (qkv, attention out, MLP in, MLP out of every core layer, plus the
   injection's state projection), cycled in order as one iteration runs them, in fp32 and bf16: the time no
   implementation can beat without reading fewer weight bytes;
2. **one core iteration**: ``model.step`` on one token with a KV cache of ``--context`` tokens attached (what the
   engine calls ``loops`` times per token);
3. **one token**: ``Engine.generate`` time per new token at ``--loops`` (batch 1, greedy);
4. **weight products inside decoding**: the mean time of one core ``LoopLinear`` call during that generation (timed
   by forward hooks), against the same products' mean in the isolated cycle of (1).

    python benchmarks/decode_floor.py --ckpt runs/bench-lm --loops 32 --json benchmarks/results/decode_floor.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from loopformer.config import ModelConfig
from loopformer.hardware import cpu_info
from loopformer.inference.cache import KVCache
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.loading import load_trained_model
from loopformer.model import LoopLM, build_model
from loopformer.nn.attention import AttentionContext

BENCH_SHAPE = ModelConfig(vocab_size=4096, dim=256, n_heads=4, mlp_hidden=688, max_seq_len=1024)


def median_us(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    """Median wall time of ``fn`` in microseconds over ``repeats`` calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def core_weights(model: LoopLM) -> list[torch.Tensor]:
    """The weight matrices one core iteration multiplies by, in order."""
    weights = [model.injection.state_proj.weight] if hasattr(model.injection, "state_proj") else []
    for layer in model.core:
        weights += [layer.attn.qkv.weight, layer.attn.out.weight, layer.mlp.fc.weight, layer.mlp.proj.weight]
    return weights


def matmul_floor(model: LoopLM, dtype: torch.dtype, repeats: int) -> float:
    """Microseconds for one pass over the core's weight products at batch 1, weights in ``dtype``."""
    weights = [w.detach().to(dtype) for w in core_weights(model)]
    inputs = [torch.randn(1, w.shape[1], dtype=dtype) for w in weights]

    def cycle() -> None:
        for w, x in zip(weights, inputs, strict=True):
            F.linear(x, w)

    return median_us(cycle, repeats)


def matmul_floor_per_layer_product(model: LoopLM, repeats: int) -> float:
    """Microseconds for one cycle over the core layers' four products each (no injection), fp32."""
    weights = [w for layer in model.core for w in (layer.attn.qkv.weight, layer.attn.out.weight)]
    weights += [w for layer in model.core for w in (layer.mlp.fc.weight, layer.mlp.proj.weight)]
    inputs = [torch.randn(1, w.shape[1]) for w in weights]
    return median_us(lambda: [F.linear(x, w.detach()) for w, x in zip(weights, inputs, strict=True)], repeats)


def iteration_time(model: LoopLM, context: int, repeats: int) -> float:
    """Microseconds of ``model.step`` for one new token attending to ``context`` cached tokens."""
    cfg = model.config
    cache = KVCache(cfg, 1, context + 1, "full", max_loops=1)
    rows = torch.arange(1)
    cache.lengths[:] = context
    cache.valid[:, :context] = True
    cache.depth[:, :context] = 1
    cache.positions[0, :context] = torch.arange(context)
    kv = cache.begin(rows, torch.tensor([[context]]))
    ctx = AttentionContext.for_positions(cfg, torch.tensor([[context]]), kv.mask, kv)
    state, e = torch.randn(1, 1, cfg.dim), torch.randn(1, 1, cfg.dim)
    return median_us(lambda: model.step(state, e, 0, ctx), repeats)


def token_time(model: LoopLM, loops: int, tokens: int) -> float:
    """Milliseconds per new token of greedy batch-1 generation (32-token prompt) at ``loops``."""
    engine = Engine(model)
    prompt = [list(range(100, 132))]
    config = GenerationConfig(loops=loops, max_new_tokens=tokens, stop_tokens=())
    engine.generate(prompt, GenerationConfig(loops=loops, max_new_tokens=4, stop_tokens=()))
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        engine.generate(prompt, config)
        runs.append((time.perf_counter() - start) / tokens)
    return statistics.median(runs) * 1e3


class LinearTimer:
    """Wall time between the pre- and post-forward hooks of every core ``LoopLinear`` (the weight product)."""

    def __init__(self, model: LoopLM) -> None:
        self.total, self.calls, self._start = 0.0, 0, 0.0
        modules = [layer.attn.qkv for layer in model.core] + [layer.attn.out for layer in model.core]
        modules += [layer.mlp.fc for layer in model.core] + [layer.mlp.proj for layer in model.core]
        self.handles = [
            h for m in modules for h in (m.register_forward_pre_hook(self.pre), m.register_forward_hook(self.post))
        ]

    def pre(self, module: torch.nn.Module, args: object) -> None:
        self._start = time.perf_counter()

    def post(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> float:
        """Detach the hooks; the mean microseconds per call."""
        for handle in self.handles:
            handle.remove()
        return self.total / max(1, self.calls) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="checkpoint (default: a fresh model of the benchmark shape)")
    parser.add_argument("--loops", type=int, default=32)
    parser.add_argument("--context", type=int, default=64, help="cached tokens the iteration attends to")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation timing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = load_trained_model(Path(args.ckpt))[0] if args.ckpt else build_model(BENCH_SHAPE, seed=0).eval()
    with torch.inference_mode():
        floor32 = matmul_floor(model, torch.float32, args.repeats)
        floor16 = matmul_floor(model, torch.bfloat16, args.repeats)
        step = iteration_time(model, args.context, args.repeats)
        per_token = token_time(model, args.loops, args.tokens)
        timer = LinearTimer(model)
        token_time(model, args.loops, args.tokens)
        linear_in_decode = timer.remove()
    products = len(core_weights(model)) - (1 if hasattr(model.injection, "state_proj") else 0)
    isolated = matmul_floor_per_layer_product(model, args.repeats) / products
    report = {
        "command": "python benchmarks/decode_floor.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_info().to_dict(),
        "threads": torch.get_num_threads(),
        "parameters": model.num_parameters(),
        "loops": args.loops,
        "matmul_floor_us_per_iteration": {"fp32": round(floor32, 1), "bf16": round(floor16, 1)},
        "core_iteration_us": round(step, 1),
        "token_ms": round(per_token, 2),
        "token_ms_if_only_matmuls_fp32": round(floor32 * args.loops / 1e3, 2),
        "tokens_per_s": round(1e3 / per_token, 1),
        "core_linear_us_in_decode": round(linear_in_decode, 1),
        "core_linear_us_isolated_cycle": round(isolated, 1),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
