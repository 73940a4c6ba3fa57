"""record_trajectory: shapes, equality with the forward's states, in memory and streamed to a .npy memmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loopformer import InputError, build_model
from loopformer.analysis.trajectory import Trajectory, load_trajectory, record_trajectory
from support import small_config

LOOPS = 5


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(small_config(), seed=0).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def forward_states(model, ids, normed=False, attention_mask=None) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids, loops=LOOPS, seed=3, return_states=True, attention_mask=attention_mask)
        states = torch.stack(out.states)
        return model.final_norm(states) if normed else states


def assert_half_close(recorded: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(recorded, expected.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(recorded, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("normed", [False, True])
def test_in_memory_matches_forward(model, ids, normed: bool) -> None:
    traj = record_trajectory(model, ids, LOOPS, seed=3, normed=normed)
    assert isinstance(traj.states, torch.Tensor) and traj.states.dtype == torch.float16
    assert (traj.loops, traj.batch, traj.length, traj.dim) == (LOOPS, 2, 7, 32)
    assert traj.normed is normed and traj.path is None
    assert torch.equal(traj.ids, ids)
    expected = forward_states(model, ids, normed)
    for i in range(1, LOOPS + 1):
        state = traj.state(i)
        assert state.dtype == torch.float32 and state.shape == (2, 7, 32)
        assert_half_close(state, expected[i - 1])


def test_on_disk_streams_to_npy_memmap(model, ids, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "traj.npy"
    traj = record_trajectory(model, ids, LOOPS, seed=3, path=path)
    assert isinstance(traj.states, np.memmap) and traj.path == path
    assert traj.states.dtype == np.float16 and traj.states.shape == (LOOPS, 2, 7, 32)
    assert not traj.states.flags.writeable
    expected = forward_states(model, ids)
    reloaded = np.load(path, allow_pickle=False)
    np.testing.assert_array_equal(reloaded, expected.half().numpy())
    for i in range(1, LOOPS + 1):
        assert_half_close(traj.state(i), expected[i - 1])
    again = load_trajectory(path, ids)
    assert isinstance(again.states, np.memmap) and again.loops == LOOPS


def test_memory_and_disk_recordings_agree(model, ids, tmp_path: Path) -> None:
    on_disk = record_trajectory(model, ids, LOOPS, normed=True, path=tmp_path / "t.npy")
    in_memory = record_trajectory(model, ids, LOOPS, normed=True)
    np.testing.assert_array_equal(np.asarray(on_disk.states), in_memory.states.numpy())


def test_attention_mask_is_passed_through(model, ids) -> None:
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    block = causal.clone()
    block[4:, :4] = False  # two packed documents: positions 4.. cannot see 0..3
    mask = block.expand(2, 1, 7, 7)
    traj = record_trajectory(model, ids, LOOPS, seed=3, attention_mask=mask)
    expected = forward_states(model, ids, attention_mask=mask)
    assert_half_close(traj.state(LOOPS), expected[-1])
    unmasked = forward_states(model, ids)
    assert not torch.allclose(traj.state(LOOPS)[:, 4:], unmasked[-1, :, 4:].half().float())


def test_restores_training_mode(ids) -> None:
    model = build_model(small_config(), seed=0).train()
    record_trajectory(model, ids, 2)
    assert model.training


@pytest.mark.parametrize("loops", [0, -1, 2.5, True])
def test_bad_loops(model, ids, loops) -> None:
    with pytest.raises(InputError, match="loops must be an integer >= 1"):
        record_trajectory(model, ids, loops)


def test_bad_shapes_and_iterations(model, ids) -> None:
    with pytest.raises(InputError, match=r"ids must have shape \[batch, seq\]"):
        record_trajectory(model, ids[0], 2)
    with pytest.raises(InputError, match="Trajectory ids must have shape"):
        Trajectory(states=torch.zeros(2, 3, 4, 8), ids=torch.zeros(3, 3, dtype=torch.long))
    traj = record_trajectory(model, ids, 2)
    for i in (0, 3):
        with pytest.raises(InputError, match=r"out of range: the trajectory has iterations 1\.\.2"):
            traj.state(i)
