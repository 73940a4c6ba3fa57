"""Per-token convergence of a recorded trajectory: distance to a reference state, step sizes, a contraction
estimate and a status label.

With steps ``d_i = ||s_i - s_{i-1}||`` and the *window* = the last half of the iterations
(0-based indices ``(R - 1) // 2 .. R - 1``), each token gets the first status that applies:

* ``"converged"``  -- the last relative change ``d_R / ||s_R||`` is below :data:`CONVERGED_CHANGE`;
* ``"converging"`` -- the contraction estimate is below :data:`CONTRACTING` and the step at the end of the
  window is smaller than at its start;
* ``"drift"``      -- the state norm, or the distance to the reference, grows at every iteration of the window;
* ``"orbit"``      -- otherwise: the state keeps moving but stays bounded (cycles, chaos), or R < 2.

The contraction estimate is the median over the window of ``d_{i+1} / d_i``: the absolute step ratio, which
is exactly ``a`` for a linear contraction ``s_i - s* = a^i (s_0 - s*)`` and 1 for a drift ``s_i = i v``.
Recorded states are float16: a state that no longer moves still shows relative changes up to about 4e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopformer.analysis.trajectory import Trajectory
from loopformer.errors import InputError

CONVERGED_CHANGE = 1e-3
CONTRACTING = 0.99
STATUSES = ("converged", "converging", "drift", "orbit")
_TINY = 1e-12


@dataclass
class Convergence:
    """Per-token curves over iterations 1..R and their summary.

    ``distance`` [B, T, R]: ``||s_i - s*|| / ||s*||``; ``change`` [B, T, R]: ``||s_i - s_{i-1}|| / ||s_i||``
    (the first entry relative to the initial state if given, else NaN); ``contraction`` [B, T] (NaN if
    undefined); ``status`` [B][T], one of :data:`STATUSES` (see the module docstring).
    """

    distance: torch.Tensor
    change: torch.Tensor
    contraction: torch.Tensor
    status: list[list[str]]

    def counts(self) -> dict[str, int]:
        """How many tokens have each status (every status listed, zeros included)."""
        flat = [label for row in self.status for label in row]
        return {label: flat.count(label) for label in STATUSES}


def settled_iteration(change: torch.Tensor, threshold: float = CONVERGED_CHANGE) -> torch.Tensor:
    """[..., R] -> [...]: the first iteration (1-based) from which ``change`` stays below ``threshold`` until
    iteration R; R + 1 where even the last change is not below it."""
    iteration = torch.arange(1, change.shape[-1] + 1)
    return ((~(change < threshold)) * iteration).amax(dim=-1) + 1


def _checked(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    if tensor is None:
        return None
    if tuple(tensor.shape) != shape:
        raise InputError(f"{name} must have shape {shape} like one trajectory state, got {tuple(tensor.shape)}.")
    return tensor.detach().float().cpu()


def _strictly_increasing(curve: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [...]: every consecutive difference is > 0 (False for n < 2)."""
    if curve.shape[-1] < 2:
        return torch.zeros(curve.shape[:-1], dtype=torch.bool)
    return (curve.diff(dim=-1) > 0).all(dim=-1)


def convergence(
    traj: Trajectory, reference: torch.Tensor | None = None, initial: torch.Tensor | None = None
) -> Convergence:
    """Convergence curves of ``traj`` towards ``reference`` s* [B, T, D] (default: the last state).

    ``reference`` is typically the state after many more iterations; ``initial`` is s_0, the state before
    the first iteration, which gives the first ``change`` entry. States are read one iteration at a time.
    """
    shape = (traj.batch, traj.length, traj.dim)
    loops = traj.loops
    ref = _checked("reference", reference, shape)
    prev = _checked("initial", initial, shape)
    if ref is None:
        ref = traj.state(loops)
    ref_norm = ref.norm(dim=-1).clamp_min(_TINY)

    distance = torch.empty(*shape[:2], loops)
    norms = torch.empty(*shape[:2], loops)
    steps = torch.full((*shape[:2], loops), float("nan"))
    for i, state in traj.iterate():
        distance[..., i - 1] = (state - ref).norm(dim=-1) / ref_norm
        norms[..., i - 1] = state.norm(dim=-1)
        if prev is not None:
            steps[..., i - 1] = (state - prev).norm(dim=-1)
        prev = state
    change = steps / norms.clamp_min(_TINY)

    start = (loops - 1) // 2
    ratios = steps[..., start + 1 :] / steps[..., start:-1]
    ratios = ratios.masked_fill(~(steps[..., start:-1] > 0), float("nan"))
    empty = ratios.shape[-1] == 0
    contraction = torch.full(shape[:2], float("nan")) if empty else ratios.nanmedian(dim=-1).values

    converged = change[..., -1] < CONVERGED_CHANGE
    converging = (contraction < CONTRACTING) & (steps[..., -1] < steps[..., start])
    window = slice(start, loops)
    drift = _strictly_increasing(norms[..., window]) | _strictly_increasing(distance[..., window])
    codes = torch.full(shape[:2], STATUSES.index("orbit"))
    for label, flag in reversed(list(zip(STATUSES[:3], (converged, converging, drift), strict=True))):
        codes = torch.where(flag, STATUSES.index(label), codes)
    status = [[STATUSES[c] for c in row] for row in codes.tolist()]
    return Convergence(distance=distance, change=change, contraction=contraction, status=status)
