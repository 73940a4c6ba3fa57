"""Metric-vs-loops curves: task accuracy or perplexity of one model at several loop counts, from one deep pass."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loopformer.evaluation.perplexity import evaluate_loops
from loopformer.tasks.base import Example
from loopformer.tasks.evaluate import evaluate_task
from loopformer.tokenizer import TextTokenizer


@dataclass
class Curve:
    """``values[i]`` is ``metric`` ("accuracy" as a fraction in [0, 1], or "perplexity") at ``loops[i]``."""

    label: str
    loops: list[int]
    values: list[float]
    metric: str


def task_accuracy_curve(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    examples: Sequence[Example],
    loops: Sequence[int],
    label: str,
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> Curve:
    """Exact-match accuracy (fraction of solved ``examples``) at each of ``loops``, via :func:`evaluate_task`."""
    results = evaluate_task(model, tokenizer, examples, loops, batch_size=batch_size, seed=seed)
    return Curve(label, [r.loops for r in results], [r.exact_match for r in results], "accuracy")


def perplexity_curve(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loops: Sequence[int],
    label: str,
    *,
    seed: int = 0,
) -> Curve:
    """Perplexity of the scored tokens of ``batches`` (``input_ids`` / ``labels``) at each of ``loops``.

    Computed by :func:`evaluate_loops`; every loop count starts from the same initial state (``seed``).
    """
    with torch.inference_mode():
        results = evaluate_loops(model, batches, loops, seed=seed)
    return Curve(label, [r.loops for r in results], [r.perplexity for r in results], "perplexity")
