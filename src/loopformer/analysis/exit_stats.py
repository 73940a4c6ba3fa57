"""Zero-shot early-exit statistics: at which iteration each position would stop under each exit rule.

One forward pass of ``loops`` iterations streams every state through an :class:`ExitTracker` per rule (see
:mod:`loopformer.inference.exits` for the criteria); the states are decoded only when a rule reads the
distribution, once per iteration for all rules. The model has no learned halting head, so there is no halting
calibration to report here; the criteria below are all zero-shot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loopformer.analysis.common import check_ids, check_loops, stream_iterations
from loopformer.errors import InputError
from loopformer.inference.exits import ExitRule, ExitTracker, parse_exit_rule


@dataclass
class ExitStatistics:
    """Exit iterations of one rule.

    ``loops`` [B, T]: the first iteration (1-based) at which the rule fired at that position, or ``loops`` if it
    never did within the pass (so a rule firing exactly at ``loops`` and one that never fires look the same).
    ``histogram``: ``{iteration: number of positions}`` over the positions of ``mask``, only iterations that
    occur, ascending; its counts sum to the number of masked positions. ``mean``: mean exit iteration over those
    positions (NaN if the mask selects none).
    """

    criterion_label: str
    loops: torch.Tensor
    histogram: dict[int, int]
    mean: float


def _rules(rules: Sequence[ExitRule | str]) -> list[ExitRule]:
    if isinstance(rules, str | ExitRule):
        rules = [rules]
    parsed = [rule if isinstance(rule, ExitRule) else parse_exit_rule(rule) for rule in rules]
    if not parsed:
        raise InputError("exit_statistics needs at least one exit rule.")
    return parsed


def _mask(mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"mask must be a boolean tensor of the ids' shape {tuple(ids.shape)}, got {got}.")
    return mask.to(ids.device)


def _summary(rule: ExitRule, tracker: ExitTracker, loops: int, mask: torch.Tensor) -> ExitStatistics:
    first = tracker.first_exit
    steps = torch.where(first == 0, loops, first).cpu()
    chosen = steps[mask.cpu()]
    values, counts = chosen.unique(sorted=True, return_counts=True)
    histogram = {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}
    mean = float(chosen.double().mean()) if chosen.numel() else math.nan
    return ExitStatistics(rule.label, steps, histogram, mean)


def exit_statistics(
    model: torch.nn.Module,
    ids: torch.Tensor,
    loops: int,
    rules: Sequence[ExitRule | str],
    *,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> list[ExitStatistics]:
    """Exit iteration of every position of ``ids`` [B, T] under each of ``rules`` within ``loops`` iterations.

    ``rules``: :class:`ExitRule` objects or strings such as ``"kl:5e-4"`` (see :func:`parse_exit_rule`).
    The pass is ``model(ids, loops=loops, seed=seed, attention_mask=attention_mask)``; depth r's state is
    the one a separate r-iteration forward would reach. ``mask`` [B, T] (bool, default all True) selects the
    positions counted by the histogram and mean, e.g. the scored targets of a task. Returns one
    :class:`ExitStatistics` per rule, in order. The model runs in eval mode (its previous mode is restored).
    """
    ids = check_ids(ids)
    loops = check_loops(loops)
    parsed = _rules(rules)
    mask = _mask(mask, ids)
    trackers = [ExitTracker(rule) for rule in parsed]
    decode = any(tracker.needs_logits for tracker in trackers)

    def update(iteration: int, state: torch.Tensor, logits: torch.Tensor | None) -> None:
        for tracker in trackers:
            tracker.update(iteration, state, logits)

    stream_iterations(model, ids, loops, update, decode=decode, seed=seed, attention_mask=attention_mask)
    return [_summary(rule, tracker, loops, mask) for rule, tracker in zip(parsed, trackers, strict=True)]
