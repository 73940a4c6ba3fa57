"""Latent-state growth over many iterations from random weights, per injection and norm layout.

Reports the largest per-token RMS of the state over ``--steps`` iterations, with all weight matrices
as initialised and scaled up 10x. LTI injection is bounded by construction (A_bar < 1); the others
are bounded only when a sandwich norm renormalises the state.

    python benchmarks/lti_stability.py --steps 4096
"""

from __future__ import annotations

import argparse
import json

import torch

from loopformer import build_model
from loopformer.presets import get_preset

DIVERGED = 1e30


@torch.no_grad()
def state_growth(injection: str, layout: str, scale: float, steps: int, seed: int = 0) -> dict[str, object]:
    """Run ``steps`` core iterations and summarise the per-token state RMS."""
    config = get_preset("tiny").replace(injection=injection, norm_layout=layout)
    model = build_model(config, seed=seed).eval()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2:
            weight.mul_(scale)
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    states = model(ids, loops=steps, seed=seed, return_states=True).states
    rms = torch.stack([state.float().pow(2).mean(-1).sqrt().max() for state in states])
    bad = (~(rms < DIVERGED)).nonzero()  # also catches inf and nan
    if len(bad):
        return {"max_rms": float("inf"), "diverged_at": int(bad[0]) + 1, "final_rms": float(rms[-1])}
    peak_at = int(rms.argmax())
    return {"max_rms": float(rms[peak_at]), "max_at": peak_at + 1, "final_rms": float(rms[-1]), "diverged_at": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    rows = []
    for injection, layout in [("lti", "pre"), ("lti", "sandwich"), ("concat", "sandwich"), ("concat", "pre"),
                              ("add", "pre")]:  # fmt: skip
        for scale in (1.0, 10.0):
            rows.append({"injection": injection, "layout": layout, "scale": scale,
                         **state_growth(injection, layout, scale, args.steps)})  # fmt: skip
    print(f"| injection | norm layout | weights | max state RMS over {args.steps} steps | reached at | final |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if row["diverged_at"] is not None:
            summary = f"diverged (> 1e30) | step {row['diverged_at']} | -"
        else:
            summary = f"{row['max_rms']:.4g} | step {row['max_at']} | {row['final_rms']:.4g}"
        print(f"| {row['injection']} | {row['layout']} | x{row['scale']:g} | {summary} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
