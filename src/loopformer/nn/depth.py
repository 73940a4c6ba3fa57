"""Per-loop signals: the loop-index embedding and the policy mapping loop indices to trained slots.

Per-loop parameters (LoRA adapters, a learned loop embedding) exist for ``per_loop_slots`` loop
indices. Beyond them, ``loop_overflow`` decides:

* ``reuse-last`` (default): every later iteration uses the last slot. Past the trained range the core
  is then one fixed map, the same as the last trained iteration, so the state can settle at its fixed
  point; this is what makes extrapolation to many more loops well-behaved.
* ``cycle``: iteration i uses slot ``i mod per_loop_slots``.
* ``off``: no per-loop parameters beyond the trained range (the shared weights alone).

The sinusoidal embedding is a fixed function of i and is defined for every i.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from loopformer.config import ModelConfig


def loop_slot(index: int, slots: int, policy: str) -> int | None:
    """The per-loop parameter slot used at loop ``index`` (0-based), or None for "no adapter"."""
    if index < slots:
        return index
    if policy == "reuse-last":
        return slots - 1
    if policy == "cycle":
        return index % slots
    return None


def sinusoidal_loop_embedding(index: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Transformer-style sin/cos code of the loop index, [dim], values in [-1, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float64) / half)
    angles = index * freqs
    code = torch.cat((angles.sin(), angles.cos()))
    if dim % 2:
        code = torch.cat((code, code.new_zeros(1)))
    return code.float()


# The code depends only on (index, dim, device): built once, not on every iteration. Shared: never modify it.
_cached_code = functools.lru_cache(maxsize=1024)(sinusoidal_loop_embedding)


class LoopEmbedding(nn.Module):
    """Adds a code of the loop index to the injected state: sinusoidal (fixed) or learned per slot."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.loop_embedding
        self.dim = config.dim
        self.scale = config.loop_embedding_scale
        if self.kind == "learned":
            self.table = nn.Parameter(torch.empty(config.per_loop_slots, config.dim))
        else:
            self.register_parameter("table", None)

    def forward(self, x: torch.Tensor, index: int, slot: int | None) -> torch.Tensor:
        if self.kind == "sinusoidal":
            return x + self.scale * _cached_code(index, self.dim, x.device).to(x.dtype)
        if self.kind == "learned" and slot is not None:
            return x + self.scale * self.table[slot].to(x.dtype)
        return x
