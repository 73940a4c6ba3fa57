"""Zero-shot exit criteria: each quantity against a naive per-position reference, and the rule semantics."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.errors import InputError
from loopformer.inference.exits import EXIT_CRITERIA, ExitRule, ExitTracker, parse_exit_rule

LEADING = (3, 4)
VOCAB = 7
DIM = 5
STEPS = 6


# ----- a naive reference, one position at a time, in plain Python floats -----------------------------------
def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def entropy(p: list[float]) -> float:
    return -sum(a * math.log(a) for a in p if a > 0)


def minp(p: list[float]) -> list[float]:
    top = max(p)
    flat = [a if a >= 0.1 * top else 1 / len(p) for a in p]
    total = sum(flat)
    return [a / total for a in flat]


def norm(v: list[float]) -> float:
    return math.sqrt(sum(a * a for a in v))


def reference(criterion: str, previous: list[float], current: list[float]) -> float:
    """The criterion's quantity between two iterations of one position (not for argmax-stability)."""
    if criterion == "kl":
        return kl(softmax(previous), softmax(current))
    if criterion == "entropy-diff":
        return abs(entropy(softmax(current)) - entropy(softmax(previous)))
    if criterion == "minp-kl":
        return kl(minp(softmax(previous)), minp(softmax(current)))
    if criterion == "latent-diff":
        return norm([a - b for a, b in zip(current, previous, strict=True)]) / norm(current)
    dot = sum(a * b for a, b in zip(current, previous, strict=True))
    return 1 - dot / (norm(current) * norm(previous))


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def trajectory(width: int, noise: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """STEPS random iterates [3, 4, width] that drift from a common start (so some argmaxes hold)."""
    generator = torch.Generator().manual_seed(seed)
    current = 2 * torch.randn(*LEADING, width, generator=generator, dtype=torch.float64)
    iterates = []
    for _ in range(STEPS):
        current = current + noise * torch.randn(current.shape, generator=generator, dtype=torch.float64)
        iterates.append(current.clone())
    return iterates


def positions() -> list[tuple[int, int]]:
    return [(i, j) for i in range(LEADING[0]) for j in range(LEADING[1])]


def feed(tracker: ExitTracker, step: int, tensor: torch.Tensor) -> torch.Tensor:
    if tracker.needs_logits:
        return tracker.update(step, None, tensor)
    return tracker.update(step, tensor, None)


# ----- the quantities --------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["kl", "entropy-diff", "minp-kl", "latent-diff", "cosine"])
def test_difference_criteria_match_the_reference(criterion: str) -> None:
    width = DIM if criterion in ("latent-diff", "cosine") else VOCAB
    iterates = trajectory(width, noise=0.4)
    expected = {
        step: {
            p: reference(criterion, iterates[step - 2][p].tolist(), iterates[step - 1][p].tolist()) for p in positions()
        }
        for step in range(2, STEPS + 1)
    }
    # a threshold between two observed values in the middle of the range, so both outcomes occur
    observed = sorted(v for values in expected.values() for v in values.values())
    middle = len(observed) // 2
    threshold = (observed[middle - 1] + observed[middle]) / 2
    tracker = ExitTracker(ExitRule(criterion, threshold), dtype=torch.float64)
    fired_any = set()
    for step, iterate in enumerate(iterates, start=1):
        fired = feed(tracker, step, iterate)
        assert fired.shape == LEADING and fired.dtype == torch.bool
        if step == 1:
            assert torch.isnan(tracker.last_value).all() and not fired.any()
            continue
        for p in positions():
            assert tracker.last_value[p].item() == pytest.approx(expected[step][p], rel=1e-9, abs=1e-12)
            assert bool(fired[p]) == (expected[step][p] < threshold)
            fired_any.add(bool(fired[p]))
    assert fired_any == {True, False}


def test_argmax_stability_counts_unchanged_iterations() -> None:
    iterates = trajectory(VOCAB, noise=0.5, seed=3)
    tracker = ExitTracker(ExitRule("argmax-stability", 2))
    counts = dict.fromkeys(positions(), 0)
    previous: dict[tuple[int, int], int] = {}
    outcomes = set()
    for step, iterate in enumerate(iterates, start=1):
        fired = tracker.update(step, None, iterate.float())
        for p in positions():
            top = argmax(iterate[p].tolist())
            counts[p] = counts[p] + 1 if previous.get(p) == top else 0
            previous[p] = top
            assert tracker.last_value[p].item() == counts[p]
            assert bool(fired[p]) == (counts[p] >= 2)
            outcomes.add(bool(fired[p]))
    assert outcomes == {True, False}


def test_float32_computation_agrees_with_float64() -> None:
    iterates = trajectory(VOCAB, noise=0.01)
    for criterion in ("kl", "entropy-diff", "minp-kl"):
        single, double = ExitTracker(criterion), ExitTracker(criterion, dtype=torch.float64)
        for step, iterate in enumerate(iterates, start=1):
            single.update(step, None, iterate.to(torch.bfloat16).float())
            double.update(step, None, iterate.to(torch.bfloat16).float())
        assert single.last_value.dtype == torch.float32
        # float32 rounding stays far below the smallest default threshold (minp-kl 1e-5)
        torch.testing.assert_close(single.last_value.double(), double.last_value, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("criterion", list(EXIT_CRITERIA))
def test_identical_iterations_give_zero_difference_and_exit(criterion: str) -> None:
    tensor = torch.randn(*LEADING, VOCAB)
    threshold = 2 if criterion == "argmax-stability" else EXIT_CRITERIA[criterion]
    tracker = ExitTracker(ExitRule(criterion, threshold))
    assert not feed(tracker, 1, tensor).any()  # no previous iteration: nothing to compare
    fired = feed(tracker, 2, tensor)
    if criterion == "argmax-stability":
        assert not fired.any() and (tracker.last_value == 1).all()
        assert feed(tracker, 3, tensor).all()
    else:
        assert fired.all()
        torch.testing.assert_close(tracker.last_value, torch.zeros(LEADING), atol=1e-6, rtol=0)


def test_distributions_with_impossible_tokens_stay_finite() -> None:
    logits = torch.randn(4, VOCAB)
    logits[:, 0] = -math.inf
    for criterion in ("kl", "entropy-diff", "minp-kl"):
        tracker = ExitTracker(criterion)
        tracker.update(1, None, logits)
        assert tracker.update(2, None, logits + 0.01 * torch.randn(4, VOCAB)).dtype == torch.bool
        assert torch.isfinite(tracker.last_value).all()


def test_latent_criteria_need_no_logits_and_copy_the_state() -> None:
    state = torch.randn(2, DIM)
    tracker = ExitTracker("latent-diff")
    assert not tracker.needs_logits and not ExitTracker("cosine").needs_logits
    assert ExitTracker("kl").needs_logits and ExitTracker("argmax-stability").needs_logits
    tracker.update(1, state)
    state.mul_(2)  # an engine may update its state in place; the tracker must keep the old iterate
    tracker.update(2, state)
    torch.testing.assert_close(tracker.last_value, torch.full((2,), 0.5))


# ----- the rule semantics ----------------------------------------------------------------------------
def run(rule: ExitRule, steps: int = 8) -> list[bool]:
    """Whether the rule fires at steps 1..loops for one position whose logits never change."""
    tracker = ExitTracker(rule)
    logits = torch.randn(1, VOCAB)
    return [bool(tracker.update(step, None, logits)[0]) for step in range(1, steps + 1)]


def test_first_iteration_never_exits_by_criterion() -> None:
    assert run(ExitRule("kl", 1e9)) == [False] + [True] * 7


def test_min_steps_delays_the_exit() -> None:
    assert run(ExitRule("kl", 1e-3, min_loops=4)) == [False] * 3 + [True] * 5


def test_check_every_only_checks_multiples() -> None:
    assert run(ExitRule("kl", 1e-3, check_every=3)) == [step % 3 == 0 for step in range(1, 9)]


def test_max_steps_forces_the_exit() -> None:
    # threshold 0: a difference is never < 0, so only max_loops ends the loop
    assert run(ExitRule("kl", 0.0, max_loops=5)) == [False] * 4 + [True] * 4
    tracker = ExitTracker(ExitRule("cosine", 0.0, max_loops=1))  # even the first iteration, with no previous
    assert tracker.update(1, torch.randn(3, DIM)).all()


def test_first_exit_records_the_first_firing() -> None:
    tracker = ExitTracker(ExitRule("argmax-stability", 1))
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    tracker.update(1, None, logits)
    tracker.update(2, None, logits.flip(-1))  # both argmaxes change
    tracker.update(3, None, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # row 1 keeps its argmax
    tracker.update(4, None, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert tracker.first_exit.tolist() == [4, 3]
    tracker.reset()
    assert tracker.first_exit is None and tracker.last_step == 0
    tracker.update(1, None, torch.zeros(5, 3))  # another shape after reset


# ----- errors ----------------------------------------------------------------------------------------
def test_parse_exit_rule() -> None:
    assert parse_exit_rule("kl") == ExitRule("kl", 5e-4)
    assert parse_exit_rule("kl:1e-3") == ExitRule("kl", 1e-3)
    assert parse_exit_rule("kl:") == ExitRule("kl", 5e-4)  # an empty threshold means the default
    assert parse_exit_rule(" Latent-Diff : 0.05 ").threshold == 0.05
    rule = parse_exit_rule("argmax-stability:5", min_loops=2, max_loops=64, check_every=2)
    assert rule == ExitRule("argmax-stability", 5, 2, 64, 2) and rule.label == "argmax-stability:5"
    assert {parse_exit_rule(name).threshold for name in EXIT_CRITERIA} == set(EXIT_CRITERIA.values())


@pytest.mark.parametrize("text", ["kld", "kl:abc", "", ":5", "kl:1e-3:2"])
def test_parse_errors_list_the_criteria(text: str) -> None:
    with pytest.raises(InputError) as info:
        parse_exit_rule(text)
    message = str(info.value)
    assert "argmax-stability" in message and "cosine" in message and "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"criterion": "kl", "threshold": -1.0}, "threshold"),
        ({"criterion": "kl", "threshold": math.nan}, "threshold"),
        ({"criterion": "kl", "threshold": "0.1"}, "threshold"),
        ({"criterion": "argmax-stability", "threshold": 0.5}, "argmax-stability"),
        ({"criterion": "kl", "threshold": 1e-3, "min_loops": 0}, "min_loops"),
        ({"criterion": "kl", "threshold": 1e-3, "min_loops": 3, "max_loops": 2}, "max_loops"),
        ({"criterion": "kl", "threshold": 1e-3, "check_every": 0}, "check_every"),
        ({"criterion": "entropy", "threshold": 1e-3}, "entropy-diff"),
    ],
)
def test_rule_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(InputError, match=field):
        ExitRule(**kwargs)


def test_tracker_input_errors() -> None:
    tracker = ExitTracker("kl")
    with pytest.raises(InputError, match="needs logits"):
        tracker.update(1, torch.randn(2, DIM))
    tracker.update(1, None, torch.randn(2, VOCAB))
    with pytest.raises(InputError, match="increase"):
        tracker.update(1, None, torch.randn(2, VOCAB))
    with pytest.raises(InputError, match="reset"):
        tracker.update(2, None, torch.randn(3, VOCAB))
    with pytest.raises(InputError, match="step"):
        tracker.update(0, None, torch.randn(2, VOCAB))
    with pytest.raises(InputError, match="needs the state"):
        ExitTracker("cosine").update(1, None, torch.randn(2, VOCAB))
    with pytest.raises(InputError, match="floating-point"):
        ExitTracker("kl", dtype=torch.long)
