"""Causal self-attention through torch SDPA: MHA or GQA, optional q/k bias, QK-norm and sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.config import ModelConfig
from loopformer.nn.linear import LoopLinear
from loopformer.nn.norm import RMSNorm
from loopformer.nn.rope import apply_rope, rope_angles


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares: RoPE angles and the mask.

    ``mask`` is a boolean tensor broadcastable to [B, H, T, S] (True = may attend), or ``None``
    for plain causal attention over the same T positions.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def for_sequence(
        cls, config: ModelConfig, seq_len: int, device: torch.device, positions: torch.Tensor | None = None
    ) -> AttentionContext:
        """Context for a causal pass over ``seq_len`` tokens at ``positions`` (default 0..T-1)."""
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        cos, sin = rope_angles(positions, config.head_dim, config.rope_base)
        return cls(cos, sin, causal_mask(seq_len, config.sliding_window, device))


def causal_mask(seq_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """None for full causal attention, else a [T, T] mask letting position i see i-W+1 .. i."""
    if window is None or window >= seq_len:
        return None
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, lora_rank: int = 0, lora_slots: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_style = config.rope_style
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = LoopLinear(config.dim, q_width + 2 * kv_width, lora_rank, lora_slots)
        self.out = LoopLinear(q_width, config.dim, lora_rank, lora_slots)
        self.split = (q_width, kv_width, kv_width)
        if config.qk_bias:
            self.q_bias = nn.Parameter(torch.zeros(self.n_heads, self.head_dim))
            self.k_bias = nn.Parameter(torch.zeros(self.n_kv_heads, self.head_dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("k_bias", None)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext, slot: int | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x, slot).split(self.split, dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_bias is not None:
            q, k = q + self.q_bias, k + self.k_bias
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, ctx.cos, ctx.sin, self.rope_style)
        k = apply_rope(k, ctx.cos, ctx.sin, self.rope_style)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=ctx.mask,
            is_causal=ctx.mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.out(y.transpose(1, 2).reshape(batch, seq, -1), slot)
