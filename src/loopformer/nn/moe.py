"""DeepSeekMoE-style mixture-of-experts FFN: shared SwiGLU experts plus sigmoid-routed top-k experts.

Routing (DeepSeek-V3): ``scores = sigmoid(x W_r^T + loop_bias[slot])``; the top-k experts are picked from
``scores + balance_bias`` (the balance bias steers selection only), and the gate weights are the selected
*unbiased* scores normalised to sum to 1. ``balance_bias`` is moved by :meth:`MoE.update_balance`
(aux-loss-free balancing); a Switch-style auxiliary loss is also recorded for callers that want one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loopformer.errors import InputError
from loopformer.nn.depth import Slot, per_loop
from loopformer.nn.linear import LoopLinear
from loopformer.nn.mlp import SwiGLU


def imbalance(load: torch.Tensor) -> float:
    """``max(load) / mean(load)``: 1.0 when every expert gets the same share, ``routed`` when one gets all."""
    load = load.detach().float()
    mean = load.mean()
    if load.numel() == 0 or mean <= 0:
        raise InputError("imbalance needs a non-empty load with a positive mean.")
    return float(load.max() / mean)


class MoE(nn.Module):
    """Mixture-of-experts FFN for ``x [..., dim]``; ``slot`` selects the per-loop router bias (None: none).

    After every forward, ``last_load`` ([routed], detached, sums to 1) holds each expert's fraction of the
    ``tokens * top_k`` assignments and ``last_aux`` the auxiliary loss ``routed * sum_e f_e P_e``
    (differentiable w.r.t. the router and the loop bias; 1.0 when balanced).
    """

    last_load: torch.Tensor | None
    last_aux: torch.Tensor | None

    def __init__(
        self,
        dim: int,
        expert_hidden: int,
        routed: int,
        top_k: int,
        shared: int = 1,
        loop_slots: int = 1,
        bias_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise InputError(f"MoE dim must be >= 1, got {dim}.")
        if expert_hidden < 1:
            raise InputError(f"MoE expert_hidden must be >= 1, got {expert_hidden}.")
        if routed < 1:
            raise InputError(f"MoE needs at least one routed expert, got routed={routed}.")
        if not 1 <= top_k <= routed:
            raise InputError(f"MoE top_k must be between 1 and routed ({routed}), got {top_k}.")
        if shared < 0:
            raise InputError(f"MoE shared must be >= 0, got {shared}.")
        if loop_slots < 1:
            raise InputError(f"MoE loop_slots must be >= 1, got {loop_slots}.")
        if not bias_rate >= 0:  # also rejects NaN
            raise InputError(f"MoE bias_rate must be >= 0, got {bias_rate}.")
        self.dim = dim
        self.expert_hidden = expert_hidden
        self.routed = routed
        self.top_k = top_k
        self.num_shared = shared
        self.loop_slots = loop_slots
        self.bias_rate = float(bias_rate)

        self.shared = SwiGLU(dim, shared * expert_hidden) if shared > 0 else None
        # routed experts, stacked: fc = [gate rows; up rows] per expert (as SwiGLU.fc), proj = down projection
        self.fc = nn.Parameter(torch.empty(routed, 2 * expert_hidden, dim))
        self.proj = nn.Parameter(torch.empty(routed, dim, expert_hidden))
        self.router = LoopLinear(dim, routed)
        self.loop_bias = nn.Parameter(torch.zeros(loop_slots, routed))
        self.register_buffer("balance_bias", torch.zeros(routed), persistent=True)
        self.last_load = None
        self.last_aux = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) for the inputs side, std / sqrt(2) for the output projections; zero biases."""
        nn.init.normal_(self.fc, 0.0, std)
        nn.init.normal_(self.proj, 0.0, std / math.sqrt(2))
        nn.init.normal_(self.router.weight, 0.0, std)
        self.loop_bias.zero_()
        self.balance_bias.zero_()
        if self.shared is not None:
            nn.init.normal_(self.shared.fc.weight, 0.0, std)
            nn.init.normal_(self.shared.proj.weight, 0.0, std / math.sqrt(2))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, expert_hidden={self.expert_hidden}, routed={self.routed}, top_k={self.top_k}, "
            f"shared={self.num_shared}, loop_slots={self.loop_slots}, bias_rate={self.bias_rate}"
        )

    def _check_slot(self, slot: Slot) -> None:
        if isinstance(slot, int) and not 0 <= slot < self.loop_slots:
            raise InputError(f"MoE slot must be None or in [0, {self.loop_slots}), got {slot}.")

    def route(self, x: torch.Tensor, slot: Slot = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing of tokens ``x [N, dim]``: ``(experts [N, top_k], weights [N, top_k], scores [N, routed])``.

        Computed in fp32 (outside autocast); ``weights`` are differentiable, ``experts`` are not.
        """
        self._check_slot(slot)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
            bias = per_loop(self.loop_bias, slot)
            if bias is not None:
                logits = logits + bias.float()
            scores = torch.sigmoid(logits)
            biased = scores.detach() + self.balance_bias.float()
            experts = torch.topk(biased, self.top_k, dim=-1).indices
            selected = scores.gather(-1, experts)
            weights = selected / selected.sum(-1, keepdim=True)
        return experts, weights, scores

    def forward(self, x: torch.Tensor, slot: Slot = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise InputError(f"MoE expects inputs with last dimension {self.dim}, got shape {tuple(x.shape)}.")
        flat = x.reshape(-1, self.dim)
        n = flat.shape[0]
        experts, weights, scores = self.route(flat, slot)
        if torch.compiler.is_compiling():
            return self._every_expert(flat, experts, weights).reshape(*x.shape[:-1], self.dim)

        # (token, expert) assignments sorted by expert: every expert runs once on a contiguous block
        assigned = experts.reshape(-1)
        order = torch.argsort(assigned, stable=True)
        tokens = torch.arange(n, device=x.device).repeat_interleave(self.top_k)[order]
        gates = weights.reshape(-1)[order]
        counts = torch.bincount(assigned, minlength=self.routed)

        out: torch.Tensor | None = None
        out_dtype = x.dtype
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            end = start + count
            idx = tokens[start:end]
            y = self._expert(e, flat[idx])
            if out is None:  # accumulate in at least fp32, whatever autocast chose for the experts
                out_dtype = y.dtype
                out = torch.zeros(n, self.dim, dtype=torch.promote_types(y.dtype, torch.float32), device=x.device)
            out.index_add_(0, idx, y.to(out.dtype) * gates[start:end, None].to(out.dtype))
            start = end
        routed = flat.new_zeros(n, self.dim) if out is None else out.to(out_dtype)
        if self.shared is not None:
            routed = routed + self.shared(flat)
        result = routed.reshape(*x.shape[:-1], self.dim)

        # statistics of this call
        total = max(assigned.numel(), 1)
        load = counts.float() / total
        self.last_load = load.detach()
        if n > 0:
            probs = (scores / scores.sum(-1, keepdim=True)).mean(0)
            self.last_aux = self.routed * (load * probs).sum()
        else:
            self.last_aux = scores.new_ones(())
        return result

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Routed expert ``e`` (a SwiGLU) on tokens ``x`` [n, dim]."""
        gate, up = F.linear(x, self.fc[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.proj[e])

    def _every_expert(self, flat: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed output with static shapes (for compiled graphs, which cannot group tokens by a data-dependent
        count): every expert runs on every token and the unselected ones get gate 0. In the sum the terms come in the
        same expert order as the grouped loop's, so the result matches it; costs routed / top_k times the expert
        compute, which decoding's few tokens per pass can afford. Records no load statistics (inference only)."""
        gates = torch.zeros(flat.shape[0], self.routed, device=flat.device).scatter(1, experts, weights.float())
        out = torch.zeros(flat.shape[0], self.dim, device=flat.device)
        for e in range(self.routed):
            y = self._expert(e, flat)
            out = out + y.float() * gates[:, e, None]
        routed = out.to(y.dtype)
        return routed if self.shared is None else routed + self.shared(flat)

    @torch.no_grad()
    def update_balance(self, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: ``balance_bias += bias_rate * sign(mean(load) - load)``.

        ``load`` [routed] defaults to ``last_load``; overloaded experts get a lower bias, idle ones a higher.
        """
        if load is None:
            load = self.last_load
        if load is None:
            raise InputError("MoE.update_balance needs a load: run forward first or pass one.")
        if load.shape != (self.routed,):
            raise InputError(f"MoE load must have shape [{self.routed}], got {tuple(load.shape)}.")
        load = load.detach().to(self.balance_bias.device, torch.float32)
        step = self.bias_rate * torch.sign(load.mean() - load)
        self.balance_bias.add_(step.to(self.balance_bias.dtype))
