"""Principal components of a trajectory's states, pooled over iterations and tokens.

The fit streams over iterations (one state in memory at a time, so a memmapped recording is never
loaded whole): pass 1 takes the mean, pass 2 the centred scatter matrix [D, D] in float64, whose
eigenvectors are the principal axes (the right singular vectors of the centred data), and pass 3
projects. Sign convention: each component's largest-magnitude loading is positive (first one on ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopformer.analysis.trajectory import Trajectory
from loopformer.errors import InputError


@dataclass
class Projection:
    """``components`` [k, D] orthonormal rows, by decreasing variance; ``explained`` [k]: the fraction of
    the total variance along each; ``coords`` [R, B, T, k]: the centred states in that basis; ``mean`` [D]."""

    components: torch.Tensor
    explained: torch.Tensor
    coords: torch.Tensor
    mean: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        """[R, B, T, D]: the states as seen through the k components (exact when k = D)."""
        return self.coords @ self.components + self.mean


def fix_signs(components: torch.Tensor) -> torch.Tensor:
    """Flip rows of ``components`` [k, D] so that each row's largest-magnitude entry is positive."""
    rows = torch.arange(components.shape[0])
    pivots = components[rows, components.abs().argmax(dim=1)]
    return components * torch.where(pivots < 0, -1.0, 1.0).to(components.dtype).unsqueeze(1)


def project_trajectory(traj: Trajectory, k: int = 6) -> Projection:
    """PCA over all (iteration, token) states of ``traj``, keeping ``k`` (1..D) components."""
    dim = traj.dim
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
        raise InputError(f"k must be an integer between 1 and the state width {dim}, got {k!r}.")
    count = traj.loops * traj.batch * traj.length
    if count == 0:
        raise InputError("Cannot fit principal components to an empty trajectory.")

    total = torch.zeros(dim, dtype=torch.float64)
    for _, state in traj.iterate():
        total += state.reshape(-1, dim).double().sum(dim=0)
    mean = total / count
    scatter = torch.zeros(dim, dim, dtype=torch.float64)
    for _, state in traj.iterate():
        centred = state.reshape(-1, dim).double() - mean
        scatter += centred.T @ centred

    eigenvalues, eigenvectors = torch.linalg.eigh(scatter)
    order = eigenvalues.argsort(descending=True)[:k]
    variance = eigenvalues.clamp_min(0.0)
    components = fix_signs(eigenvectors[:, order].T.contiguous())
    spread = variance.sum()
    explained = variance[order] / spread if spread > 0 else torch.zeros(k, dtype=torch.float64)

    coords = torch.empty(traj.loops, traj.batch, traj.length, k)
    for i, state in traj.iterate():
        coords[i - 1] = ((state.double() - mean) @ components.T).float()
    return Projection(components=components.float(), explained=explained.float(), coords=coords, mean=mean.float())
