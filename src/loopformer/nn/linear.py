"""A bias-free linear layer with optional depth-wise LoRA: one rank-r adapter per loop slot."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.nn.depth import Slot, per_loop


class LoopLinear(nn.Module):
    """``y = x W^T (+ x A_i^T B_i^T)`` where ``i`` is the loop slot of the current core iteration.

    Adapters exist only when ``lora_rank > 0``; ``B`` is zero-initialised so a fresh adapter is a
    no-op. Passing ``slot=None`` (prelude, coda, or the "off" overflow policy) skips the adapter.
    """

    def __init__(self, in_features: int, out_features: int, lora_rank: int = 0, lora_slots: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if lora_rank > 0:
            self.lora_a = nn.Parameter(torch.empty(lora_slots, lora_rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(lora_slots, out_features, lora_rank))
        else:
            self.register_parameter("lora_a", None)
            self.register_parameter("lora_b", None)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, slot: Slot = None) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if slot is not None and self.lora_a is not None:
            y = y + F.linear(F.linear(x, per_loop(self.lora_a, slot)), per_loop(self.lora_b, slot))
        return y
