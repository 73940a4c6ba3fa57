"""Multi-Latent Attention (DeepSeek-V2): keys and values decompressed from a small per-token latent, plus one
decoupled RoPE key shared by every head, so a KV cache stores only those two per token.

Per token: latent ``c = norm(W_dkv x)`` (``mla_kv_rank`` wide) and RoPE key ``k_r = RoPE(W_kr x)`` (``mla_rope_dim``
wide, one for all heads). Head h has the key ``[W_uk^h c, k_r]``, the value ``W_uv^h c`` and the query
``[q_c^h, RoPE(q_r^h)]``, projected from ``x`` or, with ``mla_q_rank > 0``, from a low-rank ``norm(W_dq x)``; its
scores are ``(q_c^h . W_uk^h c + q_r^h . k_r) / sqrt(head_dim + mla_rope_dim)``.

Two equal ways to compute the same attention:

* naive (the uncached forward, and cached passes longer than ``DECODE_QUERIES`` such as a prefill): decompress
  the per-head keys and values from the latents and run SDPA;
* absorbed (cached passes of at most ``DECODE_QUERIES`` tokens, i.e. decoding): ``q_c^h . W_uk^h c =
  (W_uk^h^T q_c^h) . c``, so every query head attends over the latents themselves, and ``sum_j a_j W_uv^h c_j =
  W_uv^h sum_j a_j c_j``, so the value projection runs once per query after attention. Per-head keys and values
  are never built; the work per cached token is one latent and one RoPE key read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.config import ModelConfig
from loopformer.nn.attention import DECODE_QUERIES, AttentionContext
from loopformer.nn.depth import Slot, per_loop
from loopformer.nn.linear import LoopLinear
from loopformer.nn.norm import RMSNorm
from loopformer.nn.rope import rotate


def merged_weight(linear: LoopLinear, slot: Slot) -> torch.Tensor:
    """The weight ``linear`` applies at loop slot ``slot``, its LoRA adapter (if any) folded in, as a plain tensor
    that per-head views can be taken of (a tensor subclass such as a quantized weight is materialised first)."""
    weight = linear.weight
    if type(weight) not in (torch.Tensor, nn.Parameter):
        weight = weight.clone()
    if slot is None or linear.lora_a is None:
        return weight
    return weight + per_loop(linear.lora_b, slot) @ per_loop(linear.lora_a, slot)


class MLA(nn.Module):
    """Multi-Latent Attention with the call interface of :class:`~loopformer.nn.attention.Attention`.

    Cache exchange: the "keys" are the latents [B, T, 1, mla_kv_rank], the "values" the RoPE keys
    [B, T, 1, mla_rope_dim] (see :func:`loopformer.inference.cache.cache_entry`).
    """

    def __init__(self, config: ModelConfig, lora_rank: int = 0, lora_slots: int = 0) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.kv_rank, self.rope_dim = config.mla_kv_rank, config.mla_rope_dim
        self.rope_style = config.rope_style
        width = self.n_heads * self.head_dim
        if config.mla_q_rank:
            self.q_down = LoopLinear(config.dim, config.mla_q_rank, lora_rank, lora_slots)
            self.q_norm = RMSNorm(config.mla_q_rank, config.norm_eps)
        else:
            self.q_down = self.q_norm = None
        query_in = config.mla_q_rank or config.dim
        self.query = LoopLinear(query_in, self.n_heads * (self.head_dim + self.rope_dim), lora_rank, lora_slots)
        self.kv_down = LoopLinear(config.dim, self.kv_rank + self.rope_dim, lora_rank, lora_slots)  # [c | k_r]
        self.kv_norm = RMSNorm(self.kv_rank, config.norm_eps)
        self.kv_up = LoopLinear(self.kv_rank, 2 * width, lora_rank, lora_slots)  # [keys of all heads | values]
        self.out = LoopLinear(width, config.dim, lora_rank, lora_slots)
        self.cache_role: tuple[str, int] = ("prelude", 0)  # (part, index) of this layer, set by the model

    def forward(self, x: torch.Tensor, ctx: AttentionContext, slot: Slot = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        tables = ctx.rope(self.rope_style)
        h = x if self.q_down is None else self.q_norm(self.q_down(x, slot))
        q = self.query(h, slot).view(batch, seq, self.n_heads, self.head_dim + self.rope_dim)
        q_c, q_r = q.split((self.head_dim, self.rope_dim), dim=-1)
        q_r = rotate(q_r, *tables, self.rope_style)
        kv = self.kv_down(x, slot)
        latent = self.kv_norm(kv[..., : self.kv_rank])[:, :, None]
        rope_key = rotate(kv[..., self.kv_rank :][:, :, None], *tables, self.rope_style)
        if ctx.cache is None:
            causal = ctx.mask is None
            y = self.naive(q_c, q_r, latent.transpose(1, 2), rope_key.transpose(1, 2), ctx.mask, slot, causal)
        else:
            latent, rope_key = ctx.cache.exchange(*self.cache_role, ctx.iteration, latent, rope_key)
            attend = self.absorbed if seq <= DECODE_QUERIES else self.naive
            y = attend(q_c, q_r, latent, rope_key, ctx.mask, slot)
        return self.out(y.reshape(batch, seq, -1), slot)

    def naive(
        self,
        q_c: torch.Tensor,
        q_r: torch.Tensor,
        latent: torch.Tensor,
        rope_key: torch.Tensor,
        mask: torch.Tensor | None,
        slot: Slot,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attention with decompressed per-head keys and values.

        ``q_c`` [B, T, H, head_dim] and rotated ``q_r`` [B, T, H, rope_dim]; ``latent`` [B, 1, S, kv_rank] and
        ``rope_key`` [B, 1, S, rope_dim]; ``mask`` broadcastable to [B, H, T, S]. Returns [B, T, H, head_dim].
        """
        batch, length = latent.shape[0], latent.shape[2]
        keys, values = self.kv_up(latent[:, 0], slot).view(batch, length, 2, self.n_heads, -1).unbind(2)
        shared = rope_key.transpose(1, 2).expand(-1, -1, self.n_heads, -1)
        k = torch.cat((keys, shared.to(keys.dtype)), dim=-1)
        q = torch.cat((q_c, q_r), dim=-1)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, is_causal=causal
        )
        return y.transpose(1, 2)

    def absorbed(
        self,
        q_c: torch.Tensor,
        q_r: torch.Tensor,
        latent: torch.Tensor,
        rope_key: torch.Tensor,
        mask: torch.Tensor | None,
        slot: Slot,
    ) -> torch.Tensor:
        """The same attention as :meth:`naive` (same arguments and result, ``mask`` [B, 1, T, S] or None) over
        the latents: ``W_uk`` folded into the queries, ``W_uv`` applied after attention. The query heads are
        stacked along the query axis so every product is one batched matmul against the shared latents."""
        batch, seq = q_c.shape[:2]
        heads = self.n_heads
        w_uk, w_uv = merged_weight(self.kv_up, slot).view(2, heads, self.head_dim, self.kv_rank).unbind(0)
        q_latent = torch.einsum("bthd,hdr->bhtr", q_c, w_uk).reshape(batch, 1, heads * seq, self.kv_rank)
        q_rope = q_r.transpose(1, 2).reshape(batch, 1, heads * seq, self.rope_dim)
        scores = torch.matmul(q_latent, latent.transpose(-1, -2)) + torch.matmul(q_rope, rope_key.transpose(-1, -2))
        scores = scores * (self.head_dim + self.rope_dim) ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat(1, 1, heads, 1), float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(latent.dtype)
        mixed = torch.matmul(weights, latent).view(batch, heads, seq, self.kv_rank)
        return torch.einsum("bhtr,hdr->bthd", mixed, w_uv)
