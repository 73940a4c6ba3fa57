"""Metric-vs-loops curves: task accuracy and perplexity agree with the evaluation functions they wrap."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loopformer import InputError, build_model
from loopformer.analysis.curves import Curve, perplexity_curve, task_accuracy_curve
from loopformer.evaluation.perplexity import evaluate_loops
from loopformer.tasks.builtin import get_task
from loopformer.tasks.encoding import task_tokenizer
from loopformer.tasks.evaluate import evaluate_task
from support import small_config

LOOPS = [1, 2, 4, 3]


@pytest.fixture(scope="module")
def task_setup():
    examples = get_task("prefix-parity").generate(3, 24, seed=0)
    tokenizer = task_tokenizer(["0", "1"])
    model = build_model(small_config(tie_embeddings=False), seed=0)
    bits = [tokenizer.symbol_ids()[s] for s in ("0", "1")]
    with torch.no_grad():  # every other head row becomes the mean of the bit rows: argmax is always a bit
        others = torch.ones(model.head.weight.shape[0], dtype=torch.bool)
        others[bits] = False
        model.head.weight[others] = model.head.weight[bits].mean(dim=0)
    return model.eval(), tokenizer, examples


def test_task_accuracy_curve_matches_evaluate_task(task_setup) -> None:
    model, tokenizer, examples = task_setup
    curve = task_accuracy_curve(model, tokenizer, examples, LOOPS, "parity 3", batch_size=10, seed=1)
    assert isinstance(curve, Curve)
    assert (curve.label, curve.metric, curve.loops) == ("parity 3", "accuracy", LOOPS)
    assert len(curve.values) == len(LOOPS)
    assert all(0 <= value <= 1 for value in curve.values)
    assert any(0 < value < 1 for value in curve.values), "the restricted head should solve some examples"
    results = evaluate_task(model, tokenizer, examples, LOOPS, batch_size=10, seed=1)
    assert curve.values == [r.exact_match for r in results]


def test_perplexity_curve_matches_evaluate_depths() -> None:
    model = build_model(small_config(), seed=0).eval()
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 10), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append(SimpleNamespace(input_ids=ids, labels=labels))
    curve = perplexity_curve(model, batches, LOOPS, "random text", seed=2)
    assert (curve.label, curve.metric, curve.loops) == ("random text", "perplexity", LOOPS)
    assert len(curve.values) == len(LOOPS) and all(value > 1 for value in curve.values)
    assert curve.values == [r.perplexity for r in evaluate_loops(model, batches, LOOPS, seed=2)]
    assert perplexity_curve(model, iter(batches), LOOPS, "again", seed=2).values == curve.values


def test_bad_loops(task_setup) -> None:
    model, tokenizer, examples = task_setup
    with pytest.raises(InputError, match="depths"):
        task_accuracy_curve(model, tokenizer, examples, [0, 2], "bad")
    batch = SimpleNamespace(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(InputError, match="depth"):
        perplexity_curve(model, [batch], [], "bad")
