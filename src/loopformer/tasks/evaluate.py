"""Exact-match accuracy of a trained model on task examples, at several loop counts, from one deep pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loopformer.evaluation.perplexity import DepthResult, evaluate_depths
from loopformer.table import format_table
from loopformer.tasks.base import Example
from loopformer.tasks.encoding import TaskEncoder
from loopformer.training.tokenizer import TextTokenizer


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
        return evaluate_depths(model, encoder.batches(examples, batch_size), loops, seed=seed)


def accuracy_row(results: Sequence[DepthResult]) -> list[float]:
    """Exact-match accuracy in percent per loop count, in the order of ``results``."""
    return [round(100 * r.exact_match, 1) for r in results]


def format_accuracy_table(results: Sequence[DepthResult]) -> str:
    """loops | exact match % | loss | state change | state rms."""
    rows = [
        [r.steps, f"{100 * r.exact_match:.1f}", round(r.loss, 4), f"{r.state_change:.2e}", f"{r.state_rms:.3f}"]
        for r in results
    ]
    return format_table(["loops", "exact match %", "loss", "state change", "state rms"], rows)
