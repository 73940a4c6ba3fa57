"""Child process of test_kernel_shapes.py: every native quantized product over a sweep of shapes.

``python kernel_sweep.py int8|int4|compiled-int8``. Prints each shape before running it (so a crash names it),
then ``ok N``; exits 1 on a product that differs from the dequantized one. Run in a child so that a kernel that
faults fails one test instead of killing the test process.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from loopformer.quant import QuantizedWeight, QuantScheme, quantize

WIDTHS = range(1, 81)  # K: every input width up to 80
OUTPUTS = (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 80)  # N: a sample around the blocks
ROWS = (1, 3, 18)  # M: below, at and past the kernels' 4-row blocks
TOLERANCE = 2e-2  # relative to the largest output: bf16 rounding of the activations and the result


def check_products(scheme: QuantScheme) -> int:
    """Kernel product == dequantized product for every (M, N, K); returns how many were checked."""
    generator = torch.Generator().manual_seed(0)
    count = 0
    for k in WIDTHS:
        for n in OUTPUTS:
            data = quantize(torch.randn(n, k, generator=generator), scheme)
            weight = QuantizedWeight(data)
            for m in ROWS:
                print(f"{scheme.label} M={m} N={n} K={k}", flush=True)
                # a view that starts one element into its storage: the kernel needs aligned rows
                x = torch.randn(m * k + 1, generator=generator).bfloat16()[1:].view(m, k)
                got = F.linear(x, weight).float()
                want = F.linear(x.float(), data.dequantize())
                error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
                if not error < TOLERANCE:
                    print(f"mismatch at M={m} N={n} K={k}: relative error {error:.3g}", flush=True)
                    sys.exit(1)
                count += 1
    return count


def check_compiled_int8() -> int:
    """Compiled decoding of an int8 model whose widths are no multiple of 16 gives the eager tokens and scores
    (int8 weights run the weight-only kernel on bf16-rounded activations in both modes)."""
    from loopformer.config import ModelConfig, RecurrenceConfig
    from loopformer.inference.engine import Engine, GenerationConfig
    from loopformer.model import build_model
    from loopformer.quant.model import quantize_model

    count = 0
    for dim, hidden in ((24, 40),):  # one compile: each new model costs about a minute on 2 cores
        print(f"compiled int8 dim={dim} mlp_hidden={hidden}", flush=True)
        config = ModelConfig(
            vocab_size=67,
            dim=dim,
            n_heads=2,
            n_prelude=1,
            n_core=2,
            n_coda=1,
            mlp_hidden=hidden,
            max_seq_len=64,
            recurrence=RecurrenceConfig(mean_loops=3, backprop_loops=2),
        )
        model = build_model(config, seed=0)
        quantize_model(model, QuantScheme(8))
        engine = Engine(model)
        generation = GenerationConfig(max_new_tokens=4, loops=3, stop_tokens=())
        prompts = [[1, 5, 9]]
        eager = engine.generate(prompts, generation)
        compiled = engine.generate(prompts, replace(generation, compile=True))
        if compiled.outputs[0].tokens != eager.outputs[0].tokens:
            print(f"compiled tokens differ from eager at dim={dim}", flush=True)
            sys.exit(1)
        # log-probabilities to 0.05: a last-bit difference before the bf16 rounding of the activations can flip one
        ids = torch.tensor([[1, 5, 9, 2, 7, 11]])
        gap = engine.score(ids, replace(generation, compile=True)).log_probs - engine.score(ids, generation).log_probs
        if not float(gap.abs().max()) < 0.05:
            print(f"compiled log-probabilities differ from eager by {float(gap.abs().max()):.3g}", flush=True)
            sys.exit(1)
        count += 1
    return count


def main(mode: str) -> None:
    torch.set_num_threads(1)
    if mode == "int8":
        count = check_products(QuantScheme(8))
    elif mode == "int4":
        count = check_products(QuantScheme(4, 32)) + check_products(QuantScheme(4, 64))
    elif mode == "compiled-int8":
        count = check_compiled_int8()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(f"ok {count}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
