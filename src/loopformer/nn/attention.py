"""Causal self-attention through torch SDPA: MHA or GQA, optional q/k bias, QK-norm and sliding window."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.config import ModelConfig
from loopformer.nn.depth import Slot
from loopformer.nn.linear import LoopLinear
from loopformer.nn.norm import RMSNorm
from loopformer.nn.rope import rope_angles, rope_tables, rotate

DECODE_QUERIES = 16  # cached passes with at most this many new tokens use the matmul attention path


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

    def freeze(self, rows: torch.Tensor | None) -> None:
        """Skip the writes of the rows marked True (None: write every row)."""
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
    tables: tuple[torch.Tensor, torch.Tensor] | None = None  # rope_tables(cos, sin, style), built once per pass

    def at_iteration(self, iteration: int) -> AttentionContext:
        """This context for core iteration ``iteration`` (only a cached pass needs to know it)."""
        return self if self.cache is None else replace(self, iteration=iteration)

    def select(self, keep: torch.Tensor) -> AttentionContext:
        """The context of a subset of the batch rows (``keep``: row indices)."""

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or t.shape[0] == 1 else t[keep]

        cache = None if self.cache is None else self.cache.select(keep)
        tables = None if self.tables is None else (rows(self.tables[0]), rows(self.tables[1]))
        return AttentionContext(rows(self.cos), rows(self.sin), rows(self.mask), cache, self.iteration, tables)

    def rope(self, style: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation tables of ``style`` (built now unless the context was made with them)."""
        return self.tables if self.tables is not None else rope_tables(self.cos, self.sin, style)

    @classmethod
    def for_positions(
        cls,
        config: ModelConfig,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVExchange | None = None,
    ) -> AttentionContext:
        """Context for tokens at ``positions`` ([T] or [B, T]) with an explicit ``mask`` and optional KV cache."""
        cos, sin = rope_angles(positions, config.rope_dim, config.rope_base, config.rope_precision)
        return cls(cos, sin, mask, cache, tables=rope_tables(cos, sin, config.rope_style))

    @classmethod
    def for_sequence(
        cls, config: ModelConfig, seq_len: int, device: torch.device, positions: torch.Tensor | None = None
    ) -> AttentionContext:
        """Context for a causal pass over ``seq_len`` tokens at ``positions`` (default 0..T-1)."""
        if positions is None:
            positions = torch.arange(seq_len, device=device)
        return cls.for_positions(config, positions, causal_mask(seq_len, config.sliding_window, device))


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

    def forward(self, x: torch.Tensor, ctx: AttentionContext, slot: Slot = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, qk_width = self.n_heads, self.split[0] + self.split[1]
        qkv = self.qkv(x, slot)
        # q and k heads side by side: bias and rotation act on both at once
        qk = qkv[..., :qk_width].view(batch, seq, heads + self.n_kv_heads, self.head_dim)
        v = qkv[..., qk_width:].view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_bias is not None:
            qk = qk + torch.cat((self.q_bias, self.k_bias))
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :heads]), self.k_norm(qk[:, :, heads:])), dim=2)
        qk = rotate(qk, *ctx.rope(self.rope_style), self.rope_style)
        q, k = qk[:, :, :heads], qk[:, :, heads:]
        if ctx.cache is not None:
            k, v = ctx.cache.exchange(*self.cache_role, ctx.iteration, k, v)
            if seq <= DECODE_QUERIES:
                y = self._decode_attention(q, k, v, ctx.mask)
                return self.out(y.reshape(batch, seq, -1), slot)
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

    def _decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of a few new queries [B, T, H, D] over cached keys / values [B, H_kv, S, D], as plain matmuls.

        For a handful of queries this is several times faster on a CPU than the fused SDPA kernel. The query heads
        that share a KV head are stacked along the query axis, so GQA needs no copy of the keys.
        Returns [B, T, H, D].
        """
        batch, seq = q.shape[:2]
        group = self.n_heads // self.n_kv_heads
        q = q.permute(0, 2, 1, 3).reshape(batch, self.n_kv_heads, group * seq, self.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat(1, 1, group, 1), float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        y = torch.matmul(weights, v).view(batch, self.n_heads, seq, self.head_dim)
        return y.transpose(1, 2)
