"""Input injection: how the encoded input e re-enters the latent state at every core iteration.

Each injection splits into ``prepare(e)`` (everything that depends on e alone, computed ONCE per
forward) and ``forward(s, prepared)`` (run every iteration). For "concat" this halves the adapter's
cost per iteration: ``W [s; e] = W_s s + W_e e`` with ``W_e e`` precomputed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.config import ModelConfig
from loopformer.nn.linear import LoopLinear
from loopformer.nn.norm import RMSNorm


class ConcatInjection(nn.Module):
    """Huginn's adapter ``Linear(2h -> h)`` on ``cat[state, e]`` (state first), stored as its two halves."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.state_proj = LoopLinear(config.dim, config.dim)
        self.input_proj = LoopLinear(config.dim, config.dim)

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        return self.input_proj(e)

    def forward(self, state: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return self.state_proj(state) + prepared


class AddInjection(nn.Module):
    """``norm(state + e)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.dim, config.norm_eps)

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def forward(self, state: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return self.norm(state + prepared)


# softplus(dt) = ln(sqrt(5)) gives A_bar = exp(-softplus(dt)) = sqrt(1/5) at log_a = 0 (Parcae's init).
LTI_DT_INIT = math.log(math.sqrt(5) - 1)


class LTIInjection(nn.Module):
    """Parcae: ``A_bar * s + delta * B norm(e)`` with ``A_bar = exp(-delta * exp(log_a))``, ``delta = softplus(dt)``.

    ``A_bar`` is computed in fp32 and clamped to ``1 - max(eps, finfo(state dtype).eps)``, so every
    entry is < 1 even after rounding to bf16: the linear part of the recurrence is a strict contraction
    by construction, whatever the weights.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.lti_eps
        self.log_a = nn.Parameter(torch.zeros(config.dim))
        self.dt_bias = nn.Parameter(torch.full((config.dim,), LTI_DT_INIT))
        self.input_proj = LoopLinear(config.dim, config.dim)
        self.input_norm = RMSNorm(config.dim, config.norm_eps)

    def coefficients(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_bar, delta) in fp32; A_bar clamped so that it stays < 1 when used in ``dtype``."""
        delta = F.softplus(self.dt_bias.float())
        a_bar = torch.exp(-delta * torch.exp(self.log_a.float()))
        ceiling = 1.0 - max(self.eps, torch.finfo(dtype).eps)
        return a_bar.clamp(max=ceiling), delta

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        _, delta = self.coefficients()
        return delta * self.input_proj(self.input_norm(e)).float()

    def forward(self, state: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        a_bar, _ = self.coefficients(state.dtype)
        return (a_bar * state.float() + prepared).to(state.dtype)


INJECTIONS: dict[str, type[nn.Module]] = {
    "concat": ConcatInjection,
    "add": AddInjection,
    "lti": LTIInjection,
}
