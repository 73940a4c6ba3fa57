"""Exact-match accuracy of a trained model on task examples, at several loop counts.

At fixed depths every loop count is decoded from one deep pass; with an exit rule the examples are scored token
by token through the inference engine, so exited tokens really leave the batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loopformer.evaluation.perplexity import DepthResult, evaluate_loops
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.exits import ExitRule
from loopformer.table import format_table
from loopformer.tasks.base import Example
from loopformer.tasks.encoding import IGNORE_INDEX, TaskEncoder
from loopformer.tokenizer import TextTokenizer
from loopformer.training.data import Batch


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    examples: Sequence[Example],
    loops: Sequence[int],
    *,
    batch_size: int = 256,
    seed: int = 0,
    source: str = "the evaluation data",
) -> list[DepthResult]:
    """One :class:`DepthResult` per entry of ``loops``; ``exact_match`` is the task accuracy.

    Symbols the vocabulary lacks are an error naming ``source``. Every loop count starts from the same
    initial state (``seed``); the examples are scored in batches of ``batch_size``.
    """
    encoder = TaskEncoder(tokenizer)
    encoder.check(examples, source)
    with torch.inference_mode():
        return evaluate_loops(model, encoder.batches(examples, batch_size), loops, seed=seed)


def accuracy_row(results: Sequence[DepthResult]) -> list[float]:
    """Exact-match accuracy in percent per loop count, in the order of ``results``."""
    return [round(100 * r.exact_match, 1) for r in results]


def format_accuracy_table(results: Sequence[DepthResult]) -> str:
    """loops | exact match % | loss | state change | state rms."""
    rows = [
        [r.loops, f"{100 * r.exact_match:.1f}", round(r.loss, 4), f"{r.state_change:.2e}", f"{r.state_rms:.3f}"]
        for r in results
    ]
    return format_table(["loops", "exact match %", "loss", "state change", "state rms"], rows)


@dataclass
class ExitResult:
    """Task accuracy with an exit rule under a loop budget.

    ``mean_loops``: core iterations per fed token (the first token is prefilled at the full budget);
    ``answer_loops``: iterations behind the scored predictions; ``loss``: mean negative log-likelihood of the
    scored targets.
    """

    loops: int
    exit: str
    exact_match: float
    loss: float
    mean_loops: float
    answer_loops: float
    tokens: int


def _equal_length_batches(encoder: TaskEncoder, examples: Sequence[Example], batch_size: int) -> list[Batch]:
    """Batches of examples whose encodings have the same length (the engine scores unpadded rows)."""
    groups: dict[int, list[Example]] = defaultdict(list)
    for example in examples:
        groups[len(encoder.encode(example)[0])].append(example)
    return [
        encoder.batch(group[i : i + batch_size]) for group in groups.values() for i in range(0, len(group), batch_size)
    ]


def evaluate_task_exits(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    examples: Sequence[Example],
    loops: Sequence[int],
    rule: ExitRule,
    *,
    batch_size: int = 256,
    seed: int = 0,
    source: str = "the evaluation data",
) -> list[ExitResult]:
    """One :class:`ExitResult` per loop budget in ``loops``: the examples scored (teacher-forced, token by token)
    by :meth:`Engine.score` with ``rule``; an example is solved when every scored argmax is its target."""
    encoder = TaskEncoder(tokenizer)
    encoder.check(examples, source)
    batches = _equal_length_batches(encoder, examples, batch_size)
    was_training = model.training
    engine = Engine(model, tokenizer)
    try:
        results = [_score_with_exits(engine, batches, loops_, rule, seed) for loops_ in loops]
    finally:
        model.train(was_training)
    return results


def _score_with_exits(engine: Engine, batches: list[Batch], loops: int, rule: ExitRule, seed: int) -> ExitResult:
    config = GenerationConfig(loops=loops, exit=rule, state_seed=seed)
    solved = rows = tokens = 0
    nll = fed_loops = answer_loops = 0.0
    fed = 0
    for batch in batches:
        scores = engine.score(batch.input_ids.to(engine.device), config)
        targets = batch.labels[:, 1:].to(engine.device)
        scored = targets != IGNORE_INDEX
        correct = (scores.predictions == targets) | ~scored
        solved += int((correct.all(dim=1) & scored.any(dim=1)).sum())
        rows += int(scored.any(dim=1).sum())
        tokens += int(scored.sum())
        nll -= float(scores.log_probs[scored].double().sum())
        fed_loops += float(scores.loops.sum())
        fed += scores.loops.numel()
        answer_loops += float(scores.loops[scored].sum())
    return ExitResult(
        loops=loops,
        exit=rule.label,
        exact_match=solved / rows if rows else math.nan,
        loss=nll / tokens if tokens else math.nan,
        mean_loops=fed_loops / fed,
        answer_loops=answer_loops / tokens if tokens else math.nan,
        tokens=tokens,
    )


def format_exit_table(results: Sequence[ExitResult]) -> str:
    """loop budget | exit | exact match % | loss | loops per token | loops at the answers."""
    rows = [
        [
            r.loops,
            r.exit,
            f"{100 * r.exact_match:.1f}",
            round(r.loss, 4),
            round(r.mean_loops, 2),
            round(r.answer_loops, 2),
        ]
        for r in results
    ]
    return format_table(["loop budget", "exit", "exact match %", "loss", "loops/token", "loops at answers"], rows)
