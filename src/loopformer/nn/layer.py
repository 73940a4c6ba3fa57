"""One transformer layer with a "sandwich" (Huginn) or "pre" norm layout."""

from __future__ import annotations

import torch
from torch import nn

from loopformer.config import ModelConfig
from loopformer.nn.attention import Attention, AttentionContext
from loopformer.nn.depth import Slot
from loopformer.nn.mla import MLA
from loopformer.nn.mlp import SwiGLU
from loopformer.nn.moe import MoE
from loopformer.nn.norm import RMSNorm


class Layer(nn.Module):
    """sandwich: ``x = n2(x + attn(n1(x))); x = n4(x + mlp(n3(x)))``;
    pre: ``x = x + attn(n1(x)); x = x + mlp(n3(x))``."""

    def __init__(self, config: ModelConfig, lora_rank: int = 0, lora_slots: int = 0, moe: bool = False) -> None:
        super().__init__()
        self.sandwich = config.norm_layout == "sandwich"
        eps = config.norm_eps
        self.norm_1 = RMSNorm(config.dim, eps)
        attention = MLA if config.attention == "mla" else Attention
        self.attn = attention(config, lora_rank, lora_slots)
        self.norm_3 = RMSNorm(config.dim, eps)
        if moe:
            self.mlp = MoE(
                config.dim,
                config.moe_hidden,
                config.moe_routed,
                config.moe_top_k,
                config.moe_shared,
                loop_slots=config.per_loop_slots,
                bias_rate=config.moe_bias_rate,
            )
        else:
            self.mlp = SwiGLU(config.dim, config.mlp_hidden, lora_rank, lora_slots)
        self.norm_2 = RMSNorm(config.dim, eps) if self.sandwich else None
        self.norm_4 = RMSNorm(config.dim, eps) if self.sandwich else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext, slot: Slot = None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), ctx, slot)
        if self.sandwich:
            x = self.norm_2(x)
        x = x + self.mlp(self.norm_3(x), slot)
        if self.sandwich:
            x = self.norm_4(x)
        return x
