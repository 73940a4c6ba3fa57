"""Causal self-attention through torch SDPA: MHA or GQA, optional q/k bias, QK-norm and sliding window."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.config import ModelConfig
from loopformer.nn.linear import LoopLinear
from loopformer.nn.norm import RMSNorm
from loopformer.nn.rope import apply_rope, rope_angles


class KVExchange(Protocol):
    """A KV cache pass as attention sees it (implemented by ``loopformer.inference.cache.KVPass``)."""

    def exchange(
        self, role: str, layer: int, iteration: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys / values [B, T, H, D]; return every visible key / value, [B, H, S, D]."""
        ...

    def select(self, keep: torch.Tensor) -> KVExchange:
        """The pass restricted to a subset of its rows."""
        ...


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares: RoPE angles, the mask and the KV cache.

    ``mask`` is a boolean tensor broadcastable to [B, H, T, S] (True = may attend). Without a cache,
    ``None`` means plain causal attention over the same T positions; with a cache (incremental decoding)
    it means every query sees every key the cache returns. ``iteration`` is the core iteration running
    (it picks the cache slot of core layers).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    cache: KVExchange | None = None
    iteration: int = 0

    def at_iteration(self, iteration: int) -> AttentionContext:
        """This context for core iteration ``iteration`` (only a cached pass needs to know it)."""
        return self if self.cache is None else replace(self, iteration=iteration)

    def select(self, keep: torch.Tensor) -> AttentionContext:
        """The context of a subset of the batch rows (``keep``: row indices)."""

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.shape[0] == 1 else t[keep]

        cache = None if self.cache is None else self.cache.select(keep)
        return AttentionContext(rows(self.cos), rows(self.sin), rows(self.mask), cache, self.iteration)

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
        self.cache_role: tuple[str, int] = ("prelude", 0)  # (part, index) of this layer, set by the model
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
        if ctx.cache is not None:
            k, v = ctx.cache.exchange(*self.cache_role, ctx.iteration, k, v)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k,
            v,
            attn_mask=ctx.mask,
            is_causal=ctx.mask is None and ctx.cache is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.out(y.transpose(1, 2).reshape(batch, seq, -1), slot)
