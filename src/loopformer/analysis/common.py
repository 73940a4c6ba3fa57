"""What the analyses share: argument checks, eval / inference mode, and streaming every iteration of a forward."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from loopformer.errors import InputError

IterationVisitor = Callable[[int, torch.Tensor, torch.Tensor | None], None]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode for the duration; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def check_loops(loops: object) -> int:
    """``loops`` as an int >= 1, else :class:`InputError`."""
    if isinstance(loops, bool) or not isinstance(loops, int | np.integer) or loops < 1:
        raise InputError(f"loops must be an integer >= 1, got {loops!r}.")
    return int(loops)


def check_ids(ids: object) -> torch.Tensor:
    """``ids`` as a [B, T] integer tensor, or an :class:`InputError`."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputError(f"ids must be an integer tensor of shape [batch, seq], got {shape}.")
    if ids.numel() == 0:
        raise InputError("ids must hold at least one token.")
    return ids


def stream_iterations(
    model: nn.Module,
    ids: torch.Tensor,
    loops: int,
    visit: IterationVisitor,
    *,
    decode: bool,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> None:
    """Run ``model(ids, loops=loops, seed=seed)`` once and call ``visit(i, state, logits)`` after every
    iteration i (1-based); ``logits`` are the decoded state when ``decode`` (else None). The last iteration's
    logits are the forward's own, so they equal ``model(ids, loops=loops, seed=seed).logits`` exactly."""
    with evaluating(model):
        ctx = model.context(ids, attention_mask=attention_mask)

        def on_state(iteration: int, state: torch.Tensor) -> None:
            if iteration < loops:  # the forward decodes the last state itself
                visit(iteration, state, model.decode(state, ctx) if decode else None)

        out = model(ids, loops=loops, seed=seed, attention_mask=attention_mask, on_state=on_state)
        visit(loops, out.state, out.logits)
