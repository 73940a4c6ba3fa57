"""SwiGLU MLP with one fused gate|up projection (gate rows first, as in Huginn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.nn.depth import Slot
from loopformer.nn.linear import LoopLinear


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, lora_rank: int = 0, lora_slots: int = 0) -> None:
        super().__init__()
        self.fc = LoopLinear(dim, 2 * hidden, lora_rank, lora_slots)
        self.proj = LoopLinear(hidden, dim, lora_rank, lora_slots)

    def forward(self, x: torch.Tensor, slot: Slot = None) -> torch.Tensor:
        gate, up = self.fc(x, slot).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up, slot)
