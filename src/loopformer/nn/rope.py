"""Rotary position embeddings in the half-split (Llama) and interleaved-pair (Huginn) conventions."""

from __future__ import annotations

import torch


def rope_angles(
    positions: torch.Tensor, head_dim: int, base: float, precision: str = "fp64"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, shape ``[B or 1, T, 1, head_dim // 2]`` (fp32), for ``positions`` [T] or [B, T].

    ``precision`` is that of the angles ``position * base^(-2i / head_dim)`` before cos / sin: ``fp64`` rounds them
    to fp32 once; ``fp32`` follows Huginn's own table (``1 / base^(2i / head_dim)`` and the product in fp32, the
    frequencies computed on the CPU as Huginn does), which differs by up to a few 1e-4 at position 4095.
    """
    pos = positions if positions.dim() == 2 else positions[None]
    if precision == "fp32":
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = pos.float()[..., None] * inv_freq.to(positions.device)
    else:
        inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
        angles = (pos.double()[..., None] * inv_freq).float()
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables ``(c, s)`` from :func:`rope_angles`, so that ``rotate(x) = x * c + partner(x) * s``.

    ``partner`` swaps the two members of every rotated pair (see :func:`_partner`); precomputing the tables once
    per pass leaves three elementwise operations per rotation.
    """
    if style == "half":
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def _partner(x: torch.Tensor, style: str) -> torch.Tensor:
    """Each pair's other member: (x[i + d/2], x[i]) for ``half``, (x[2i + 1], x[2i]) for ``interleaved``."""
    if style == "half":
        first, second = x.chunk(2, dim=-1)
        return torch.cat((second, first), dim=-1)
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, style: str) -> torch.Tensor:
    xf = x.float()
    return torch.addcmul(xf * c, _partner(xf, style), s).to(x.dtype)


class _Rope(torch.autograd.Function):
    """A rotation's gradient is the inverse rotation (the same tables with ``-s``): one cheap op backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, style: str) -> torch.Tensor:
        ctx.save_for_backward(c, s)
        ctx.style = style
        return _rotate(x, c, s, style)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        c, s = ctx.saved_tensors
        return _rotate(grad, c, -s, ctx.style), None, None, None


def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, head_dim] with tables from :func:`rope_tables`; fp32 math, returned in ``x.dtype``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, c, s, style)
    return _rotate(x, c, s, style)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate ``x`` of shape [B, T, H, head_dim]; computed in fp32, returned in ``x.dtype``.

    ``half``: pairs are (x[i], x[i + d/2]); ``interleaved``: pairs are (x[2i], x[2i + 1]).
    """
    return rotate(x, *rope_tables(cos, sin, style), style)
