"""The memory pathway (ANIMA's personal-context conditioning): outside vectors mixed into the injected input.

A set of ``M`` conditioning vectors per sequence (e.g. embeddings retrieved from a user's local memory store, width
``memory_dim``) is projected to model width. Every position reads them with one attention head (its query comes from
the prelude output) and adds what it read to the prelude output *before* the injection's input term is formed, so the
memory reaches every core iteration through the same re-injection path as the tokens.

A learned null key with a zero value lets a position read nothing, and the output projection starts at zero, so a
fresh pathway (or ``memory=None``) leaves the model's function unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.config import ModelConfig
from loopformer.errors import InputError
from loopformer.nn.linear import LoopLinear
from loopformer.nn.norm import RMSNorm

NO_PATHWAY = "this model has no memory pathway (memory_dim = 0); it cannot take memory vectors."


@dataclass(frozen=True)
class Memory:
    """Conditioning vectors of a batch: ``vectors`` [B, M, memory_dim], ``mask`` [B, M] (True = a real vector)."""

    vectors: torch.Tensor
    mask: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> Memory:
        """The memory of a subset of the batch rows (``rows``: row indices)."""
        return Memory(self.vectors[rows], None if self.mask is None else self.mask[rows])

    def to(self, device: torch.device | str) -> Memory:
        return Memory(self.vectors.to(device), None if self.mask is None else self.mask.to(device))


def as_memory(
    memory: Memory | torch.Tensor | None,
    batch: int,
    memory_dim: int,
    mask: torch.Tensor | None = None,
) -> Memory | None:
    """Validate ``memory`` for a batch of ``batch`` rows: [M, memory_dim] (shared by every row) or
    [batch, M, memory_dim], with an optional boolean ``mask`` [batch, M]."""
    if memory is None:
        if mask is not None:
            raise InputError("memory_mask was given without memory.")
        return None
    if isinstance(memory, Memory):
        memory, mask = memory.vectors, memory.mask if mask is None else mask
    if memory_dim == 0:
        raise InputError(NO_PATHWAY)
    if not isinstance(memory, torch.Tensor) or not memory.dtype.is_floating_point:
        raise InputError("memory must be a floating-point tensor of vectors.")
    if memory.dim() == 2:
        memory = memory.unsqueeze(0).expand(batch, -1, -1)
    if memory.dim() != 3 or memory.shape[0] != batch or memory.shape[2] != memory_dim:
        raise InputError(
            f"memory must have shape [vectors, {memory_dim}] or [{batch}, vectors, {memory_dim}], "
            f"got {tuple(memory.shape)}."
        )
    if not bool(torch.isfinite(memory).all()):
        raise InputError("memory holds NaN or infinite values.")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(memory.shape[:2])):
        raise InputError(f"memory_mask must be a boolean tensor of shape {tuple(memory.shape[:2])}.")
    return Memory(memory, mask)


class MemoryMixer(nn.Module):
    """``x + W_o · attend(W_q norm(x); [null; norm(W_m memory)])``: one read of the memory per position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.dim
        self.proj = LoopLinear(config.memory_dim, dim)
        self.memory_norm = RMSNorm(dim, config.norm_eps)
        self.query_norm = RMSNorm(dim, config.norm_eps)
        self.query = LoopLinear(dim, dim)
        self.null_key = nn.Parameter(torch.zeros(dim))
        self.out = LoopLinear(dim, dim)

    def forward(self, x: torch.Tensor, memory: Memory) -> torch.Tensor:
        batch, _, dim = x.shape
        vectors = memory.vectors.to(device=x.device, dtype=self.proj.weight.dtype)
        keys = self.memory_norm(self.proj(vectors)).to(x.dtype)  # [B, M, D]; keys double as values
        keys = torch.cat((self.null_key.to(x.dtype).expand(batch, 1, dim), keys), dim=1)
        values = torch.cat((keys.new_zeros(batch, 1, dim), keys[:, 1:]), dim=1)
        query = self.query(self.query_norm(x)).to(x.dtype)
        scores = query @ keys.transpose(1, 2) / math.sqrt(dim)  # [B, T, 1 + M]
        if memory.mask is not None:
            visible = F.pad(memory.mask.to(x.device), (1, 0), value=True)
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        read = torch.softmax(scores.float(), dim=-1).to(x.dtype) @ values
        return x + self.out(read)
