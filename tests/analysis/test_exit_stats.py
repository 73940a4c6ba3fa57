"""exit_statistics: exit steps against a slow per-depth reference, histograms, masks, validation."""

from __future__ import annotations

import math
from collections import Counter
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from loopformer import InputError, build_model
from loopformer.analysis.exit_stats import ExitStatistics, exit_statistics
from loopformer.inference.exits import ExitRule
from support import small_config

LOOPS = 7
SEED = 2


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(small_config(), seed=0).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def per_depth(model, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(state, fp64 log-probs) of a separate forward at each depth 1..LOOPS."""
    with torch.inference_mode():
        outs = [model(ids, loops=r, seed=SEED) for r in range(1, LOOPS + 1)]
    return [(out.state.double(), F.log_softmax(out.logits.double(), dim=-1)) for out in outs]


def reference_values(per_depth, criterion: str) -> torch.Tensor:
    """[LOOPS - 1, B, T]: the criterion between depths r-1 and r (r = 2..LOOPS), from its definition."""
    values = []
    for (s_old, lp_old), (s_new, lp_new) in pairwise(per_depth):
        if criterion == "kl":
            values.append((lp_old.exp() * (lp_old - lp_new)).sum(-1))
        else:  # latent-diff
            values.append((s_new - s_old).norm(dim=-1) / s_new.norm(dim=-1))
    return torch.stack(values)


def separating_threshold(values: torch.Tensor) -> float:
    """A threshold near the median that is far (relatively) from every value, so fp32 and fp64 agree."""
    ordered = values.flatten().sort().values
    middle = ordered.numel() // 2
    window = range(middle - 8, middle + 8)
    best = max(window, key=lambda i: ordered[i + 1] / ordered[i])
    low, high = float(ordered[best]), float(ordered[best + 1])
    assert high / low > 1.001
    return math.sqrt(low * high)


def first_firing(fired: torch.Tensor, first_step: int) -> torch.Tensor:
    """First iteration (fired[0] is iteration ``first_step``) at which ``fired`` holds, else LOOPS."""
    steps = torch.full(fired.shape[1:], LOOPS, dtype=torch.long)
    for offset in reversed(range(fired.shape[0])):
        steps = torch.where(fired[offset], first_step + offset, steps)
    return steps


@pytest.mark.parametrize("criterion", ["kl", "latent-diff"])
def test_exit_steps_equal_a_per_depth_reference(model, ids, per_depth, criterion: str) -> None:
    values = reference_values(per_depth, criterion)
    threshold = separating_threshold(values)
    expected = first_firing(values < threshold, first_step=2)
    assert len(expected.unique()) > 2, "the threshold should spread the exits"
    (stats,) = exit_statistics(model, ids, LOOPS, [f"{criterion}:{threshold!r}"], seed=SEED)
    assert torch.equal(stats.loops, expected)
    assert stats.criterion_label == f"{criterion}:{threshold:g}"


def test_argmax_stability_one_fires_when_the_argmax_repeats(model, ids, per_depth) -> None:
    top = torch.stack([log_probs.argmax(-1) for _, log_probs in per_depth])  # [LOOPS, B, T]
    repeats = top[1:] == top[:-1]
    (stats,) = exit_statistics(model, ids, LOOPS, ["argmax-stability:1"], seed=SEED)
    assert torch.equal(stats.loops == 2, repeats[0])
    assert repeats[0].any() and not repeats[0].all(), "the fixture should show both cases"
    assert torch.equal(stats.loops, first_firing(repeats, first_step=2))


def test_zero_threshold_never_fires(model, ids) -> None:
    stats = exit_statistics(model, ids, LOOPS, ["kl:0", "latent-diff:0", "entropy-diff:0"], seed=SEED)
    for stat in stats:
        assert (stat.loops == LOOPS).all()
        assert stat.histogram == {LOOPS: ids.numel()}
        assert stat.mean == LOOPS
    (capped,) = exit_statistics(model, ids, LOOPS, [ExitRule("kl", 0.0, max_loops=3)])
    assert (capped.loops == 3).all()


def test_histogram_counts_the_masked_positions(model, ids) -> None:
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    rules = ["kl:1e-2", "cosine:1e-3", ExitRule("argmax-stability", 2)]
    masked = exit_statistics(model, ids, LOOPS, rules, seed=SEED, mask=mask)
    whole = exit_statistics(model, ids, LOOPS, rules, seed=SEED)
    assert [s.criterion_label for s in masked] == ["kl:0.01", "cosine:0.001", "argmax-stability:2"]
    for part, full in zip(masked, whole, strict=True):
        assert isinstance(part, ExitStatistics)
        assert torch.equal(part.loops, full.loops) and part.loops.shape == ids.shape
        assert ((part.loops >= 1) & (part.loops <= LOOPS)).all()
        assert sum(part.histogram.values()) == int(mask.sum())
        assert sum(full.histogram.values()) == ids.numel()
        assert part.histogram == dict(sorted(Counter(part.loops[mask].tolist()).items()))
        assert part.mean == pytest.approx(part.loops[mask].double().mean().item())
    empty = exit_statistics(model, ids, 2, ["kl"], mask=torch.zeros_like(mask))[0]
    assert empty.histogram == {} and math.isnan(empty.mean)


def test_one_pass_and_decoding_only_when_needed(model, ids, monkeypatch) -> None:
    calls = {"forward": 0, "decode": 0}
    forward, decode = model.forward, model.decode

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(model, "forward", counted("forward", forward))
    monkeypatch.setattr(model, "decode", counted("decode", decode))
    exit_statistics(model, ids, LOOPS, ["latent-diff", "cosine"])
    assert calls == {"forward": 1, "decode": 1}  # only the forward's own final decode
    exit_statistics(model, ids, LOOPS, ["kl", "entropy-diff", "latent-diff"])
    assert calls == {"forward": 2, "decode": 1 + LOOPS}  # one decode per iteration, shared by the rules


def test_bad_input(model, ids) -> None:
    with pytest.raises(InputError, match="unknown exit criterion"):
        exit_statistics(model, ids, 3, ["halting:0.5"])
    with pytest.raises(InputError, match="loops"):
        exit_statistics(model, ids, 0, ["kl"])
    with pytest.raises(InputError, match="at least one"):
        exit_statistics(model, ids, 3, [])
    with pytest.raises(InputError, match="mask"):
        exit_statistics(model, ids, 3, ["kl"], mask=torch.ones(3, 11, dtype=torch.bool))
    with pytest.raises(InputError, match="mask"):
        exit_statistics(model, ids, 3, ["kl"], mask=torch.ones(ids.shape))
