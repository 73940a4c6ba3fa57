"""Record the latent state after every core iteration, in memory or streamed to a float16 ``.npy`` file.

A recording holds ``loops * batch * seq * dim`` float16 values. On disk it is written through
:func:`numpy.lib.format.open_memmap` one iteration at a time, so the process only ever holds a single
state; the file is a plain ``.npy`` array (no pickle) that ``numpy.load`` reopens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loopformer.analysis.common import check_loops, evaluating
from loopformer.errors import InputError

STORE_DTYPE = np.float16


@dataclass
class Trajectory:
    """The states s_1..s_R of one forward pass: ``states[i]`` is the state after iteration ``i + 1``.

    ``states`` is a [R, B, T, D] float16 tensor, or a read-only :class:`numpy.memmap` of the ``.npy``
    file at ``path``. ``normed`` tells whether the final norm was applied before storing.
    """

    states: torch.Tensor | np.memmap
    ids: torch.Tensor
    normed: bool = False
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.states.shape) != 4:
            raise InputError(
                f"Trajectory states must have shape [loops, batch, seq, dim], got {tuple(self.states.shape)}."
            )
        if tuple(self.ids.shape) != tuple(self.states.shape[1:3]):
            raise InputError(
                f"Trajectory ids must have shape {tuple(self.states.shape[1:3])}, got {tuple(self.ids.shape)}."
            )

    @property
    def loops(self) -> int:
        return int(self.states.shape[0])

    @property
    def batch(self) -> int:
        return int(self.states.shape[1])

    @property
    def length(self) -> int:
        return int(self.states.shape[2])

    @property
    def dim(self) -> int:
        return int(self.states.shape[3])

    def state(self, i: int) -> torch.Tensor:
        """The float32 [B, T, D] state after iteration ``i`` (1-based)."""
        if not 1 <= i <= self.loops:
            raise InputError(f"Iteration {i} is out of range: the trajectory has iterations 1..{self.loops}.")
        stored = self.states[i - 1]
        if isinstance(stored, torch.Tensor):
            return stored.float()
        return torch.from_numpy(np.array(stored, dtype=np.float32))

    def iterate(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(i, state(i))`` for i = 1..R, one float32 state in memory at a time."""
        for i in range(1, self.loops + 1):
            yield i, self.state(i)


def record_trajectory(
    model: nn.Module,
    ids: torch.Tensor,
    loops: int,
    *,
    seed: int = 0,
    normed: bool = False,
    attention_mask: torch.Tensor | None = None,
    path: Path | None = None,
) -> Trajectory:
    """Run ``loops`` core iterations on ``ids`` [B, T] and keep the state after each one (float16).

    ``normed`` applies ``model.final_norm`` to each state before storing it (the coda's view of it).
    With ``path`` the states are streamed into a ``.npy`` memmap there and the result reads from it;
    otherwise they go into a preallocated float16 tensor. ``attention_mask`` is passed to the forward.
    """
    loops = check_loops(loops)
    if ids.dim() != 2:
        raise InputError(f"ids must have shape [batch, seq], got {tuple(ids.shape)}.")
    shape = (loops, ids.shape[0], ids.shape[1], model.config.dim)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        store = np.lib.format.open_memmap(path, mode="w+", dtype=STORE_DTYPE, shape=shape)
    else:
        store = torch.empty(shape, dtype=torch.float16)

    def keep(i: int, state: torch.Tensor) -> None:
        if normed:
            state = model.final_norm(state)
        half = state.detach().to(device="cpu", dtype=torch.float16)
        if path is not None:
            store[i - 1] = half.numpy()
        else:
            store[i - 1].copy_(half)

    with evaluating(model):
        model(ids, loops=loops, seed=seed, attention_mask=attention_mask, on_state=keep)
    if path is None:
        return Trajectory(states=store, ids=ids.detach().cpu(), normed=normed)
    store.flush()
    return load_trajectory(path, ids, normed=normed)


def load_trajectory(path: Path, ids: torch.Tensor, *, normed: bool = False) -> Trajectory:
    """Reopen a trajectory written by :func:`record_trajectory` (read-only memmap, no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Trajectory file {path} does not exist.")
    states = np.load(path, mmap_mode="r", allow_pickle=False)
    return Trajectory(states=states, ids=ids.detach().cpu(), normed=normed, path=path)
