"""convergence on hand-made toy trajectories with known answers: contraction, drift, a period-2 orbit."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer import InputError, build_model
from loopformer.analysis.convergence import CONVERGED_CHANGE, STATUSES, convergence, settled_iteration
from loopformer.analysis.trajectory import Trajectory, record_trajectory
from support import small_config

B, T, D = 2, 3, 8


def toy(states: list[torch.Tensor]) -> Trajectory:
    return Trajectory(states=torch.stack(states), ids=torch.zeros(B, T, dtype=torch.long))


def contractive(loops: int, a: float = 0.5) -> tuple[Trajectory, torch.Tensor, torch.Tensor]:
    """s_i = s* + a^i (s_0 - s*): a linear contraction towards s*."""
    generator = torch.Generator().manual_seed(0)
    fixed = torch.randn(B, T, D, generator=generator)
    start = torch.randn(B, T, D, generator=generator)
    return toy([fixed + a**i * (start - fixed) for i in range(1, loops + 1)]), fixed, start


@pytest.mark.parametrize("loops", [6, 24])
def test_contractive_toy(loops: int) -> None:
    traj, fixed, start = contractive(loops)
    result = convergence(traj, reference=fixed, initial=start)
    assert result.distance.shape == result.change.shape == (B, T, loops)
    assert result.contraction.shape == (B, T)
    exact = 0.5**loops * (start - fixed).norm(dim=-1) / fixed.norm(dim=-1)
    torch.testing.assert_close(result.distance[..., -1], exact, rtol=1e-4, atol=1e-7)
    first = (traj.state(1) - start).norm(dim=-1) / traj.state(1).norm(dim=-1)
    torch.testing.assert_close(result.change[..., 0], first)
    torch.testing.assert_close(result.contraction, torch.full((B, T), 0.5), rtol=1e-3, atol=1e-3)
    expected = "converged" if loops == 24 else "converging"
    assert result.status == [[expected] * T] * B
    assert result.counts() == {s: (B * T if s == expected else 0) for s in STATUSES}


def test_contractive_toy_stored_as_float16() -> None:
    traj, fixed, start = contractive(6)
    half = Trajectory(states=traj.states.half(), ids=traj.ids)
    result = convergence(half, reference=fixed, initial=start)
    assert torch.allclose(result.contraction, torch.full((B, T), 0.5), atol=0.02)
    assert {s for row in result.status for s in row} == {"converging"}


def test_default_reference_is_the_last_state() -> None:
    traj, _, _ = contractive(6)
    result = convergence(traj)
    assert torch.equal(result.distance[..., -1], torch.zeros(B, T))
    assert (result.distance[..., :-1] > 0).all()
    assert torch.isnan(result.change[..., 0]).all()
    assert torch.equal(convergence(traj, reference=traj.state(6)).distance, result.distance)


def test_drift_is_flagged() -> None:
    v = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    traj = toy([i * v for i in range(1, 9)])
    result = convergence(traj)
    assert result.status == [["drift"] * T] * B
    torch.testing.assert_close(result.contraction, torch.ones(B, T))
    torch.testing.assert_close(result.change[..., 1:], 1 / torch.arange(2.0, 9.0).expand(B, T, 7))


def test_period_two_orbit_is_flagged() -> None:
    generator = torch.Generator().manual_seed(3)
    p, q = torch.randn(B, T, D, generator=generator), torch.randn(B, T, D, generator=generator)
    traj = toy([p if i % 2 else q for i in range(1, 11)])
    result = convergence(traj, initial=q)
    assert result.status == [["orbit"] * T] * B
    torch.testing.assert_close(result.contraction, torch.ones(B, T))
    assert (result.change > 0.1).all()


def test_fixed_point_is_converged_and_statuses_mix() -> None:
    fixed = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4))
    drift = torch.stack([i * fixed for i in range(1, 6)])
    states = fixed.expand(5, B, T, D).clone()
    states[:, 1, 2] = drift[:, 1, 2]  # one drifting token among fixed ones
    result = convergence(Trajectory(states=states, ids=torch.zeros(B, T, dtype=torch.long)), initial=fixed)
    assert (result.change[..., -1] < CONVERGED_CHANGE).sum() == B * T - 1
    assert result.status[1][2] == "drift"
    assert result.counts() == {"converged": B * T - 1, "converging": 0, "drift": 1, "orbit": 0}
    assert torch.isnan(result.contraction[0, 0])  # zero steps: no ratio is defined


def test_single_iteration() -> None:
    traj, _, _ = contractive(1)
    result = convergence(traj)
    assert result.distance.shape == (B, T, 1)
    assert torch.isnan(result.contraction).all()
    assert result.status == [["orbit"] * T] * B


def test_recorded_model_trajectory() -> None:
    model = build_model(small_config(injection="lti", norm_layout="pre"), seed=0)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    result = convergence(record_trajectory(model, ids, 12))
    assert result.distance.shape == (2, 5, 12)
    assert torch.isfinite(result.distance).all() and torch.isfinite(result.change[..., 1:]).all()
    assert all(s in STATUSES for row in result.status for s in row)
    assert not math.isnan(float(result.contraction.nanmean()))


def test_settled_iteration_is_the_start_of_the_last_run_below_the_threshold() -> None:
    change = torch.tensor([[float("nan"), 1e-4, 1e-2, 1e-4, 1e-5], [1.0, 1e-4, 1e-4, 1e-4, 1e-4], [1.0] * 5])
    assert settled_iteration(change).tolist() == [4, 2, 6]  # 6 = R + 1: the last change is still too large


def test_bad_reference_and_initial() -> None:
    traj, fixed, _ = contractive(4)
    with pytest.raises(InputError, match=r"reference must have shape \(2, 3, 8\) like one trajectory state"):
        convergence(traj, reference=fixed[0])
    with pytest.raises(InputError, match=r"initial must have shape \(2, 3, 8\)"):
        convergence(traj, initial=fixed[..., :4])
