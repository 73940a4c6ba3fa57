"""Rotary position embeddings in the half-split (Llama) and interleaved-pair (Huginn) conventions."""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, shape ``[B or 1, T, 1, head_dim // 2]`` (fp32), for ``positions`` [T] or [B, T]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    pos = positions if positions.dim() == 2 else positions[None]
    angles = (pos.double()[..., None] * inv_freq).float()
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    xf = x.float()
    if style == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class _Rope(torch.autograd.Function):
    """A rotation's gradient is the inverse rotation: one cheap op backward instead of a slice graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.style = style
        return _rotate(x, cos, sin, style)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin, ctx.style), None, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate ``x`` of shape [B, T, H, head_dim]; computed in fp32, returned in ``x.dtype``.

    ``half``: pairs are (x[i], x[i + d/2]); ``interleaved``: pairs are (x[2i], x[2i + 1]).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin, style)
    return _rotate(x, cos, sin, style)
