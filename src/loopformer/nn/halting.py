"""Learned ACT halting (Graves 2016), with an optional PonderNet prior: the halting head and its accumulation.

After core iteration n the head gives every position a halting probability p_n = sigmoid(w . rms(s_n) + b)
(b starts at ``halting_bias_init``, about -3, and w at 0: p = 0.047 everywhere, so a fresh model keeps most of
its weight on the last iteration); with ``halting_input="state+change"`` the logit also reads the log of the
iteration's relative step size (see :class:`HaltingHead`). A position halts at N, the first n with
p_1 + ... + p_n >= 1 - eps (eps = 0.01), or at its last allowed iteration (the cap: the sampled training depth, or
the inference loop budget). Its output is the mixture

    y = sum_{n<N} p_n s_n + R s_N,   R = 1 - sum_{n<N} p_n   (the halting iteration takes the remainder)

whose weights sum to exactly 1. The ponder cost is N + R (differentiable through R; it pushes halting earlier).
With a prior lambda_p, the KL of the weights to a geometric distribution truncated at the cap (its tail mass
on the cap) is available as a further penalty (PonderNet).

States are mixed, not logits: the mixture is decoded once (one coda + head pass per position), where mixing
logits would decode every iteration (the vocabulary-wide head r times), and at inference a halted position's
output is final the moment it halts. Under truncated backprop the head still learns from every iteration: it
runs with gradient on the states of the no-grad iterations too, which enter the mixture as constants.

:class:`ACT` accumulates over iterations for any leading shape ([B, T] in training, [b, 1] when decoding),
one vectorised update per iteration (the loop over iterations is the model's own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACT_EPS = 0.01
ACT_THRESHOLD = 1.0 - ACT_EPS
HALTING_CHANGE_FLOOR = 1e-4  # keeps log(change) finite for a state that stopped moving


def penalty_scale(step: int, warmup: int) -> float:
    """Weight of the ponder cost and KL at optimizer step ``step``: 0 for the first ``warmup`` steps, then a linear
    ramp to 1 over as many steps (1 throughout when ``warmup`` is 0).

    Under Adam even a tiny ponder cost moves the head steadily while the task loss is still on a plateau and says
    nothing about depth; the head then halts every position after one iteration and the task may never be learned
    (measured on vector parity, see docs/benchmarks.md). The delay lets the task loss shape the halting first.
    """
    if warmup == 0:
        return 1.0
    return min(max(step - warmup, 0) / warmup, 1.0)


class HaltingHead(nn.Module):
    """One halting probability per position from the RMS-normalised state, computed in fp32.

    With ``use_change`` (``halting_input="state+change"``) the logit also reads how far the state moved in the
    iteration: ``+ c * log(||s_n - s_{n-1}|| / ||s_n|| + 1e-4)``, with ``c`` starting at 0 (a fresh head is the
    plain one) and the change taken as 1 (log 0) at the first iteration. A linear read of the state alone cannot
    tell a finished computation from an unfinished one that looks alike (measured on vector-parity-sparse,
    docs/benchmarks.md); the step size is what the zero-shot ``latent-diff`` exit reads.
    """

    def __init__(self, dim: int, bias_init: float = -3.0, eps: float = 1e-6, use_change: bool = False) -> None:
        super().__init__()
        self.bias_init = bias_init
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(1, dim))
        self.bias = nn.Parameter(torch.empty(1))
        self.change_weight = nn.Parameter(torch.empty(1)) if use_change else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()
        self.bias.fill_(self.bias_init)
        if self.change_weight is not None:
            self.change_weight.zero_()

    def forward(self, state: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Halting probabilities [...] (fp32) of states [..., D]; ``previous``: the states one iteration earlier
        (None at the first iteration; ignored without ``use_change``)."""
        with torch.autocast(state.device.type, enabled=False):
            x = state.float()
            normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
            logit = F.linear(normed, self.weight.float(), self.bias.float())[..., 0]
            if self.change_weight is not None and previous is not None:
                norm = torch.linalg.vector_norm(x, dim=-1).clamp_min(self.eps)
                change = torch.linalg.vector_norm(x - previous.float(), dim=-1) / norm
                logit = logit + self.change_weight.float() * torch.log(change + HALTING_CHANGE_FLOOR)
            return torch.sigmoid(logit)


@dataclass
class HaltingStats:
    """Per-position halting of one forward pass ([B, T] each) and the positions that count (``mask``).

    ``steps``: the halting iteration N; ``ponder``: N + R; ``expected``: sum_n n w_n, the mean iteration under the
    halting weights; ``kl``: KL to the prior (None without one).
    """

    steps: torch.Tensor
    ponder: torch.Tensor
    expected: torch.Tensor
    kl: torch.Tensor | None
    mask: torch.Tensor

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of ``values`` over the counted positions (0 when there are none)."""
        mask = self.mask.to(values.dtype)
        return (values * mask).sum() / mask.sum().clamp_min(1.0)

    def penalty(self, ponder_cost: float, kl_weight: float) -> torch.Tensor:
        """ponder_cost * mean(N + R) (+ kl_weight * mean KL with a prior): the term added to the loss."""
        total = ponder_cost * self.mean(self.ponder)
        if self.kl is not None:
            total = total + kl_weight * self.mean(self.kl)
        return total

    def summary(self) -> dict[str, float]:
        """Mean ponder cost, halting iteration and expected iteration (and KL) as floats, for logging."""
        out = {
            "ponder": float(self.mean(self.ponder.detach())),
            "halt_steps": float(self.mean(self.steps.float())),
            "expected_loops": float(self.mean(self.expected.detach())),
        }
        if self.kl is not None:
            out["halt_kl"] = float(self.mean(self.kl.detach()))
        return out


class ACT:
    """ACT accumulation over iterations for a fixed set of positions.

    Called as a state visitor, ``act(step, state)`` (1-based steps, in order), it computes the halting
    probability with ``head`` and halts every position at the latest at ``cap`` (an int, a [B] tensor of
    per-row caps, or None: no cap); :meth:`update` takes the probabilities from the caller. After an
    update, :attr:`latest` is the output every position would have if the cap were this iteration; once every
    position has halted it is the final output. ``prior`` (lambda_p) adds the KL term.
    """

    def __init__(
        self,
        head: HaltingHead,
        cap: int | torch.Tensor | None = None,
        threshold: float = ACT_THRESHOLD,
        prior: float | None = None,
    ) -> None:
        self.head, self.cap, self.threshold, self.prior = head, cap, threshold, prior
        self.running: torch.Tensor | None = None  # positions that have not halted
        self.cumulative: torch.Tensor | None = None  # sum of p over the iterations before this one (running rows)
        self.mixture: torch.Tensor | None = None  # sum of p_n s_n over those iterations
        self.halted: torch.Tensor | None = None  # the output of halted positions
        self.steps: torch.Tensor | None = None  # halting iteration N (0 while running)
        self.remainder: torch.Tensor | None = None  # R at the halting iteration
        self.expected: torch.Tensor | None = None
        self.kl: torch.Tensor | None = None
        self.total: torch.Tensor | None = None  # cumulative halting probability after the latest update
        self.latest: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None  # the state of the latest call (the head's change input)

    def __call__(self, step: int, state: torch.Tensor) -> None:
        p = self.head(state, self.previous if step > 1 else None)
        self.previous = state
        self.update(step, state, p, self._at_cap(step, state))

    def _at_cap(self, step: int, state: torch.Tensor) -> bool | torch.Tensor:
        if self.cap is None:
            return False
        if isinstance(self.cap, torch.Tensor):  # one cap per row: broadcast over the other leading dims
            return (step >= self.cap.to(state.device)).view(-1, *([1] * (state.dim() - 2)))
        return step >= self.cap

    def _start(self, state: torch.Tensor, p: torch.Tensor) -> None:
        lead, device = p.shape, p.device
        self.running = torch.ones(lead, dtype=torch.bool, device=device)
        self.cumulative = torch.zeros(lead, device=device)
        self.mixture = torch.zeros(state.shape, device=device)
        self.halted = torch.zeros(state.shape, device=device)
        self.steps = torch.zeros(lead, dtype=torch.long, device=device)
        self.remainder = torch.zeros(lead, device=device)
        self.expected = torch.zeros(lead, device=device)
        self.kl = torch.zeros(lead, device=device) if self.prior is not None else None

    def output(self, state: torch.Tensor) -> torch.Tensor:
        """The output of every position if the iterations stopped at ``state`` (not yet passed to update):
        halted positions keep their mixture, running ones give ``state`` the remainder."""
        if self.running is None:
            return state
        stop = self.mixture + (1.0 - self.cumulative)[..., None] * state.float()
        return torch.where(self.running[..., None], stop, self.halted).to(state.dtype)

    def update(
        self, step: int, state: torch.Tensor, p: torch.Tensor, force: bool | torch.Tensor = False
    ) -> torch.Tensor:
        """Account iteration ``step``: ``state`` [..., D], halting probabilities ``p`` [...]; ``force`` halts the
        positions at their last allowed iteration. Returns the positions that halt at this iteration."""
        p = p.float()
        if self.running is None:
            self._start(state, p)
        self.latest = self.output(state)
        remainder = 1.0 - self.cumulative
        self.total = self.cumulative + p
        halt = self.running & ((self.total >= self.threshold) | force)
        go_on = self.running & ~halt
        weight = torch.where(halt, remainder, torch.where(go_on, p, torch.zeros_like(p)))
        self.halted = torch.where(halt[..., None], self.latest.float(), self.halted)
        self.steps = torch.where(halt, step, self.steps)
        self.remainder = torch.where(halt, remainder, self.remainder)
        self.expected = self.expected + step * weight
        if self.kl is not None:
            # w log w with a finite gradient at w = 0 (xlogy's is NaN there)
            log_weight = torch.log(weight.clamp_min(1e-12))
            self.kl = self.kl + weight * (log_weight - self._log_prior(step, force))
        self.mixture = self.mixture + torch.where(go_on, p, torch.zeros_like(p))[..., None] * state.float()
        self.cumulative = torch.where(go_on, self.total, self.cumulative)
        self.running = go_on
        return halt

    def _log_prior(self, step: int, last: bool | torch.Tensor) -> torch.Tensor:
        """log of the prior at ``step``: geometric lambda (1 - lambda)^(n-1), at the cap its tail (1 - lambda)^(n-1)."""
        tail = (step - 1) * math.log1p(-self.prior)
        last = torch.as_tensor(last, device=self.cumulative.device)
        return torch.where(last, tail, tail + math.log(self.prior)).float()

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the positions ``keep`` (indices along the first leading dimension; an int or no cap)."""
        tracked = ("running", "cumulative", "mixture", "halted", "steps", "remainder", "expected", "kl", "total")
        for name in (*tracked, "latest", "previous"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])

    def stats(self, mask: torch.Tensor | None = None) -> HaltingStats:
        """The per-position halting of the iterations so far; ``mask`` (default: all) marks the counted positions."""
        if self.running is None:
            raise ValueError("ACT.stats needs at least one update.")
        mask = torch.ones_like(self.running) if mask is None else mask.to(self.running.device)
        ponder = self.steps.float() + self.remainder
        return HaltingStats(self.steps, ponder, self.expected, self.kl, mask)
