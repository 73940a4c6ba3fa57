"""Path independence: does the final state depend on the random initial state?

The same input is run from several seeded initial states; a model whose core converges to an
input-determined fixed point ends at the same state from every start (score 1). Rounding alone leaves a relative
spread of a few ulps, so spreads up to :data:`NOISE_ULPS` times the machine epsilon of the model's dtype count as
identical (the noise floor: 3.8e-6 for float32).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loopformer.analysis.common import check_loops, evaluating
from loopformer.errors import InputError

_TINY = 1e-12
NOISE_ULPS = 32


def noise_floor(dtype: torch.dtype) -> float:
    """The relative spread that rounding alone can cause: :data:`NOISE_ULPS` x the epsilon of ``dtype``."""
    return NOISE_ULPS * torch.finfo(dtype).eps


@dataclass
class PathIndependence:
    """``per_token`` [B, T]: mean pairwise cosine similarity of the final states across seeds (1 = same
    direction); ``spread`` [B, T]: mean pairwise ``||a - b||`` over the mean ``||a||``; ``overall``: mean
    of ``per_token``; ``noise_floor``: :func:`noise_floor` of the dtype the model computes in, ``dtype`` its
    name."""

    per_token: torch.Tensor
    spread: torch.Tensor
    overall: float
    noise_floor: float
    dtype: str

    @property
    def max_spread(self) -> float:
        """The largest per-token spread."""
        return float(self.spread.max())

    @property
    def within_noise(self) -> bool:
        """True when every token reaches the same state up to rounding (spread <= ``noise_floor``)."""
        return self.max_spread <= self.noise_floor


def final_states(
    model: nn.Module,
    ids: torch.Tensor,
    loops: int,
    seeds: Sequence[int],
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[S, B, T, D] float32: ``model(ids, loops=loops, seed=s).state`` for each seed.

    The prelude runs once; only the core iterations are repeated per seed (no decoding).
    """
    loops = check_loops(loops)
    if ids.dim() != 2:
        raise InputError(f"ids must have shape [batch, seq], got {tuple(ids.shape)}.")
    if ids.shape[1] > model.config.max_seq_len:
        raise InputError(f"Sequence length {ids.shape[1]} exceeds max_seq_len ({model.config.max_seq_len}).")
    finals = []
    with evaluating(model):
        ctx = model.context(ids, attention_mask=attention_mask)
        e = model.embed(ids, ctx)
        for seed in seeds:
            generator = torch.Generator(device=ids.device).manual_seed(int(seed))
            state = model.recur(model.init_state(e, generator), e, ctx, loops).state
            finals.append(state.float().cpu())
    return torch.stack(finals)


def path_independence(
    model: nn.Module,
    ids: torch.Tensor,
    loops: int,
    seeds: Sequence[int] = (0, 1, 2, 3),
    *,
    attention_mask: torch.Tensor | None = None,
) -> PathIndependence:
    """Compare the final states after ``loops`` iterations from the initial states of ``seeds`` (>= 2 distinct)."""
    seeds = list(seeds)
    if len(set(seeds)) < 2:
        raise InputError(f"path_independence needs at least 2 distinct seeds, got {seeds}.")
    if model.config.state_init == "zero" or model.config.state_init_std == 0:
        raise InputError("path_independence needs a random initial state, but the model starts from zero.")
    finals = final_states(model, ids, loops, seeds, attention_mask=attention_mask)
    norms = finals.norm(dim=-1)
    unit = finals / norms.clamp_min(_TINY).unsqueeze(-1)
    pairs = list(itertools.combinations(range(len(seeds)), 2))
    cosine = torch.stack([(unit[a] * unit[b]).sum(dim=-1) for a, b in pairs]).mean(dim=0)
    distance = torch.stack([(finals[a] - finals[b]).norm(dim=-1) for a, b in pairs]).mean(dim=0)
    spread = distance / norms.mean(dim=0).clamp_min(_TINY)
    per_token = cosine.clamp(-1.0, 1.0)
    dtype = next(model.parameters()).dtype
    return PathIndependence(
        per_token=per_token,
        spread=spread,
        overall=float(per_token.mean()),
        noise_floor=noise_floor(dtype),
        dtype=str(dtype).removeprefix("torch."),
    )
