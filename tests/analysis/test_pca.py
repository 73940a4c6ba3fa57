"""project_trajectory: known 2-D structure, orthonormal components, exact reconstruction, fixed signs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loopformer import InputError, build_model
from loopformer.analysis.pca import fix_signs, project_trajectory
from loopformer.analysis.trajectory import Trajectory, load_trajectory, record_trajectory
from support import small_config

R, B, T, D = 5, 2, 4, 16


def planar(noise: float = 1e-3, seed: int = 0) -> tuple[Trajectory, torch.Tensor]:
    """States = mean + a u + b w + small noise: essentially a 2-D plane in 16 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, 2, generator=generator)).Q.T  # [2, D] orthonormal
    mean = torch.randn(D, generator=generator)
    scale = torch.tensor([3.0, 1.0])
    coefficients = torch.randn(R, B, T, 2, generator=generator) * scale
    states = mean + coefficients @ basis + noise * torch.randn(R, B, T, D, generator=generator)
    return Trajectory(states=states, ids=torch.zeros(B, T, dtype=torch.long)), basis


def test_known_plane() -> None:
    traj, basis = planar()
    projection = project_trajectory(traj, k=4)
    assert projection.components.shape == (4, D) and projection.explained.shape == (4,)
    assert projection.coords.shape == (R, B, T, 4) and projection.mean.shape == (D,)
    assert projection.explained.sum() <= 1 + 1e-6
    assert (projection.explained[:-1] >= projection.explained[1:]).all()
    assert projection.explained[:2].sum() > 0.99
    assert projection.explained[0] > projection.explained[1]
    # the top-2 components span the plane
    overlap = projection.components[:2] @ basis.T
    torch.testing.assert_close(torch.linalg.svdvals(overlap), torch.ones(2), atol=1e-4, rtol=0)
    top2 = projection.coords[..., :2] @ projection.components[:2] + projection.mean
    torch.testing.assert_close(top2, traj.states, atol=1e-2, rtol=0)


def test_full_rank_reconstructs_the_centred_data() -> None:
    traj, _ = planar(noise=0.3)
    projection = project_trajectory(traj, k=D)
    torch.testing.assert_close(projection.components @ projection.components.T, torch.eye(D), atol=1e-5, rtol=0)
    centred = traj.states - traj.states.reshape(-1, D).mean(dim=0)
    torch.testing.assert_close(projection.coords @ projection.components, centred, atol=1e-5, rtol=0)
    torch.testing.assert_close(projection.reconstruct(), traj.states, atol=1e-5, rtol=0)
    torch.testing.assert_close(projection.explained.sum(), torch.tensor(1.0))
    variance = projection.coords.reshape(-1, D).var(dim=0, unbiased=False)
    torch.testing.assert_close(projection.explained, variance / variance.sum(), atol=1e-5, rtol=0)


def test_sign_convention_is_deterministic() -> None:
    traj, _ = planar(noise=0.1)
    first, second = project_trajectory(traj), project_trajectory(traj)
    assert torch.equal(first.components, second.components) and torch.equal(first.coords, second.coords)
    rows = torch.arange(first.components.shape[0])
    assert (first.components[rows, first.components.abs().argmax(dim=1)] > 0).all()
    flipped = project_trajectory(Trajectory(states=-traj.states, ids=traj.ids))
    torch.testing.assert_close(flipped.components, first.components, atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped.coords, -first.coords, atol=1e-4, rtol=0)
    torch.testing.assert_close(fix_signs(-torch.eye(3)), torch.eye(3))


def test_memmapped_recording(tmp_path: Path) -> None:
    model = build_model(small_config(), seed=0)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    traj = record_trajectory(model, ids, 6, path=tmp_path / "t.npy")
    assert isinstance(traj.states, np.memmap)
    projection = project_trajectory(traj, k=3)
    in_memory = Trajectory(states=torch.from_numpy(np.array(traj.states)), ids=ids)
    torch.testing.assert_close(projection.coords, project_trajectory(in_memory, k=3).coords)
    assert projection.coords.shape == (6, 2, 5, 3)
    assert 0 < float(projection.explained.sum()) <= 1 + 1e-6
    assert load_trajectory(tmp_path / "t.npy", ids).dim == 32


@pytest.mark.parametrize("k", [0, -2, D + 1, 2.0, True])
def test_bad_k(k) -> None:
    traj, _ = planar()
    with pytest.raises(InputError, match=f"k must be an integer between 1 and the state width {D}"):
        project_trajectory(traj, k=k)
