"""Validation loss, perplexity and latent-state diagnostics of a looped model at several depths.

Depth r's latent state is the r-th state of any deeper run from the same initial state, so each batch is
run once at the deepest requested depth and the shallower depths are decoded from the intermediate states
as the loop passes them (only the current and previous state are kept). This gives exactly the result of
separate forward calls at a fraction of the cost: evaluating r = 1..32 costs one 32-iteration pass plus 32
decodes per batch. With ACT halting the state decoded at depth r is the halting mixture capped at r, which is
likewise exactly what a separate r-iteration forward decodes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loopformer.errors import InputError
from loopformer.table import format_table

IGNORE_INDEX = -100


@dataclass
class DepthResult:
    """Evaluation of one depth over all batches.

    ``state_change``: mean over batches of ``||s_r - s_(r-1)|| / ||s_r||`` (how far the last iteration still
    moved the state; s_0 is the initial state). ``token_correlation``: mean over sequences of the mean cosine
    similarity between the final states of two different positions (1 = every token collapsed to one vector).
    ``tokens``: the number of scored (next-token) targets. ``exact_match``: the fraction of sequences (with at
    least one scored target) whose every scored target is the argmax prediction, i.e. the accuracy of a
    reasoning task whose answer is the labelled tokens. ``state_rms``: root mean square of the final state.
    """

    loops: int
    loss: float
    perplexity: float
    state_change: float
    token_correlation: float
    tokens: int
    exact_match: float = math.nan
    state_rms: float = math.nan


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """``||new - old|| / ||new||`` (Frobenius norms over the whole tensor, in fp32)."""
    new, old = new.float(), old.float()
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(new).clamp_min(1e-12))


def _correlation_sums(state: torch.Tensor) -> tuple[float, int]:
    """Sum over sequences of the mean off-diagonal cosine similarity of ``state`` [B, T, D], and B."""
    if state.dim() != 3:
        raise InputError(f"state must have shape [batch, seq, dim], got {tuple(state.shape)}.")
    batch, seq = state.shape[:2]
    if seq < 2:
        return math.nan, batch
    # sum_{i != j} <u_i, u_j> = ||sum_i u_i||^2 - sum_i ||u_i||^2 for unit vectors u_i, without a T x T matrix;
    # a zero vector stays zero (cosine 0 with every other position) and adds nothing to the diagonal term.
    units = F.normalize(state.double(), dim=-1)
    total = units.sum(dim=1).pow(2).sum(dim=-1)
    diagonal = units.pow(2).sum(dim=(1, 2))
    per_sequence = (total - diagonal) / (seq * (seq - 1))
    return float(per_sequence.sum()), batch


def token_correlation(state: torch.Tensor) -> float:
    """Mean over sequences of the mean cosine similarity between the states of different positions.

    ``state`` is [B, T, D]. 1 means every position holds the same direction (a collapsed representation);
    random high-dimensional states give about 0. NaN when T < 2 (no pair of positions).
    """
    total, count = _correlation_sums(state)
    return total / count if count else math.nan


@dataclass
class _Accumulator:
    loss_sum: float = 0.0
    change_sum: float = 0.0
    batches: int = 0
    correlation_sum: float = 0.0
    sequences: int = 0
    exact_sum: int = 0
    scored_rows: int = 0
    square_sum: float = 0.0
    elements: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, state: torch.Tensor, previous: torch.Tensor) -> None:
        """Account one batch decoded at this depth."""
        self.loss_sum += _summed_cross_entropy(logits, targets)
        scored = targets != IGNORE_INDEX
        correct = (logits[:, :-1].argmax(-1) == targets) | ~scored
        has_target = scored.any(dim=1)
        self.exact_sum += int((correct.all(dim=1) & has_target).sum())
        self.scored_rows += int(has_target.sum())
        self.change_sum += relative_change(state, previous)
        self.batches += 1
        correlation, sequences = _correlation_sums(state)
        self.correlation_sum += correlation
        self.sequences += sequences
        self.square_sum += float(state.double().pow(2).sum())
        self.elements += state.numel()


def _check_depths(depths: Sequence[int]) -> list[int]:
    checked = []
    for depth in depths:
        if isinstance(depth, bool) or int(depth) != depth or depth < 1:
            raise InputError(f"Evaluation depths must be integers >= 1, got {depth!r}.")
        checked.append(int(depth))
    if not checked:
        raise InputError("evaluate_loops needs at least one depth.")
    return checked


@torch.no_grad()
def evaluate_loops(
    model: torch.nn.Module,
    batches: Iterable[Any],
    depths: Sequence[int],
    *,
    seed: int = 0,
    forward_kwargs: Callable[[Any], dict[str, Any]] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[DepthResult]:
    """Loss, perplexity, last-iteration state change and token correlation of ``model`` at each of ``depths``.

    ``batches``: objects with ``input_ids`` and ``labels`` ([B, T], labels aligned with the inputs, -100 =
    not scored; the model's shift applies: ``labels[:, 1:]`` are the targets of ``logits[:, :-1]``).
    Every depth starts from the same initial state (``seed``). ``forward_kwargs(batch)`` returns further
    keyword arguments of the forward call (e.g. an ``attention_mask``, already on the model's device).
    ``autocast_dtype`` runs the model under ``torch.autocast``; the loss is always computed in fp32.
    Returns one result per entry of ``depths``, in that order. The model is put in eval mode and its
    previous mode restored.
    """
    depths = _check_depths(depths)
    deepest = max(depths)
    wanted = set(depths)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    sums = {depth: _Accumulator() for depth in wanted}
    tokens = 0
    seen_batch = False
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            seen_batch = True
            ids = batch.input_ids.to(device)
            targets = batch.labels.to(device)[:, 1:]
            kwargs = forward_kwargs(batch) if forward_kwargs is not None else {}
            tokens += int((targets != IGNORE_INDEX).sum())
            autocast = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                _run_batch(model, ids, targets, kwargs, seed, deepest, sums)
    finally:
        model.train(was_training)
    if not seen_batch:
        raise InputError("evaluate_loops got no batches.")
    if tokens == 0:
        raise InputError("evaluate_loops got no scored tokens (every label is -100).")
    results = []
    for depth in depths:
        acc = sums[depth]
        loss = acc.loss_sum / tokens
        results.append(
            DepthResult(
                loops=depth,
                loss=loss,
                perplexity=_exp(loss),
                state_change=acc.change_sum / acc.batches,
                token_correlation=acc.correlation_sum / acc.sequences if acc.sequences else math.nan,
                tokens=tokens,
                exact_match=acc.exact_sum / acc.scored_rows if acc.scored_rows else math.nan,
                state_rms=math.sqrt(acc.square_sum / acc.elements),
            )
        )
    return results


def _run_batch(
    model: torch.nn.Module,
    ids: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    seed: int,
    deepest: int,
    sums: dict[int, _Accumulator],
) -> None:
    """One pass of ``deepest`` iterations, decoding and scoring the states of the wanted depths."""
    ctx = model.context(ids, attention_mask=kwargs.get("attention_mask"))
    # forward() draws the initial state from a generator seeded like this one; only the shape and device of
    # init_state's argument matter, so a zero tensor of the state's shape stands in for e.
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    previous = model.init_state(torch.zeros((*ids.shape, model.config.dim), device=ids.device), generator)

    def visit(depth: int, state: torch.Tensor) -> None:
        nonlocal previous
        if depth in sums:
            sums[depth].add(model.decode(state, ctx), targets, state, previous)
        previous = state

    model(ids, loops=deepest, seed=seed, on_output=visit, **kwargs)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of fp32 next-token cross-entropy of ``logits`` [B, T, V] against ``targets`` [B, T-1]."""
    scores = logits[:, :-1].float().flatten(0, 1)
    return float(F.cross_entropy(scores, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))


def format_loops_table(results: Sequence[DepthResult]) -> str:
    """A text table: loops | loss | ppl | state change | token corr."""
    rows = [
        [
            r.loops,
            round(r.loss, 4),
            round(r.perplexity, 2),
            f"{r.state_change:.2e}",
            round(r.token_correlation, 3),
        ]
        for r in results
    ]
    return format_table(["loops", "loss", "ppl", "state change", "token corr."], rows)
