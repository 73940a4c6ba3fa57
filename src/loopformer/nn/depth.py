"""Per-loop signals: the loop-index embedding and the policy mapping loop indices to trained slots.

Per-loop parameters (LoRA adapters, a learned loop embedding) exist for ``per_loop_slots`` loop
indices. Beyond them, ``loop_overflow`` decides:

* ``reuse-last`` (default): every later iteration uses the last slot. Past the trained range the core
  is then one fixed map, the same as the last trained iteration, so the state can settle at its fixed
  point; this is what makes extrapolation to many more loops well-behaved.
* ``cycle``: iteration i uses slot ``i mod per_loop_slots``.
* ``off``: no per-loop parameters beyond the trained range (the shared weights alone).

The sinusoidal embedding is a fixed function of i and is defined for every i.

The loop index is a Python int in eager loops, or a 0-d integer tensor where a compiled graph carries it as data
(the ``scan`` of :mod:`loopformer.inference.compiled`); a tensor slot of -1 then means "no per-loop parameters", and
:func:`per_loop` turns either form into the parameters of the slot.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from loopformer.config import ModelConfig

LoopIndex = int | torch.Tensor  # a Python int, or a 0-d integer tensor inside a compiled graph
Slot = int | torch.Tensor | None  # None (or -1 as a tensor): no per-loop parameters


def loop_slot(index: LoopIndex, slots: int, policy: str) -> Slot:
    """The per-loop parameter slot used at loop ``index`` (0-based), or None for "no adapter" (-1 for a tensor)."""
    if isinstance(index, torch.Tensor):
        if policy == "reuse-last":
            return index.clamp(max=slots - 1)
        if policy == "cycle":
            return index % slots
        return torch.where(index < slots, index, -1)
    if index < slots:
        return index
    if policy == "reuse-last":
        return slots - 1
    if policy == "cycle":
        return index % slots
    return None


def per_loop(parameter: torch.Tensor, slot: Slot) -> torch.Tensor | None:
    """``parameter[slot]`` (the first dimension indexes slots); None for no slot. A tensor slot selects inside the
    graph, and slot -1 gives zeros (the "off" policy past the trained range), which makes every per-loop term
    (an adapter, a loop embedding, a router bias) vanish."""
    if slot is None:
        return None
    if not isinstance(slot, torch.Tensor):
        return parameter[slot]
    row = parameter.index_select(0, slot.clamp_min(0).reshape(1))[0]
    return row * (slot >= 0).to(row.dtype)


def sinusoidal_loop_embedding(index: LoopIndex, dim: int, device: torch.device | None = None) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, index: LoopIndex, slot: Slot) -> torch.Tensor:
        if self.kind == "sinusoidal":
            code = _code(index, self.dim, x.device)
            return x + self.scale * code.to(x.dtype)
        row = per_loop(self.table, slot) if self.kind == "learned" else None
        return x if row is None else x + self.scale * row.to(x.dtype)


def _code(index: LoopIndex, dim: int, device: torch.device) -> torch.Tensor:
    """The sinusoidal code of ``index``: cached for an int, computed in the graph for a tensor."""
    if isinstance(index, torch.Tensor):
        return sinusoidal_loop_embedding(index, dim, device)
    return _cached_code(index, dim, device)
