"""The ``act`` exit: tokens halt where the learned halting head says and are decoded from the ACT mixture, halted
rows leave the batch (less work, same result), and the rule refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from loopformer.errors import InputError
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.exits import ExitRule, ExitTracker, parse_exit_rule
from loopformer.model import LoopLM, build_model
from loopformer.nn.halting import ACT_THRESHOLD
from support import generate_with_and_without_compaction, small_config

PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 2], [33, 7, 21, 60], [14]]


def act_model(**changes: object) -> LoopLM:
    """A tiny ACT model whose head halts tokens after one to several iterations."""
    model = build_model(small_config(halting="act", tie_embeddings=False, **changes), seed=0)
    with torch.no_grad():
        model.halting.weight.copy_(torch.randn(model.halting.weight.shape, generator=torch.Generator().manual_seed(5)))
        model.halting.bias.fill_(-0.8)
        if model.halting.change_weight is not None:
            model.halting.change_weight.fill_(-0.6)
    return model.eval()


def naive_halting(model: LoopLM, states: list[torch.Tensor], caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, written out: the halting iteration and the ACT mixture of states [B, T, D] per iteration,
    each position capped at ``caps`` [B, T]."""
    batch, length, dim = states[0].shape
    steps = torch.zeros(batch, length, dtype=torch.long)
    mixture = torch.zeros(batch, length, dim)
    for b in range(batch):
        for t in range(length):
            total = 0.0
            cap = int(caps[b, t])
            for n in range(1, cap + 1):
                previous = states[n - 2][b, t] if n > 1 else None
                p = float(model.halting(states[n - 1][b, t], previous))
                if total + p >= ACT_THRESHOLD or n == cap:
                    mixture[b, t] += (1.0 - total) * states[n - 1][b, t]
                    steps[b, t] = n
                    break
                mixture[b, t] += p * states[n - 1][b, t]
                total += p
    return steps, mixture


@pytest.mark.parametrize(
    ("rule", "loops", "halting_input"),
    [
        ("act", 1, "state"),
        ("act", 6, "state"),
        ("act", 6, "state+change"),
        ("latent-diff:0.2", 6, "state"),
        ("kl:0.05", 6, "state+change"),
    ],
)
def test_score_halts_where_the_head_says(rule: str, loops: int, halting_input: str) -> None:
    """With a one-position attention window tokens do not see each other, so a per-token reference built from
    the full forward's states is exact. With ``act`` each fed token stops at the head's halting iteration; with a
    zero-shot rule where that rule fires. Either way it is decoded from the ACT mixture capped there; the
    prefilled first token runs the whole budget and is decoded from the mixture capped at it."""
    model = act_model(sliding_window=1, halting_input=halting_input)
    engine = Engine(model)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(7))
    log_probs, steps, _ = engine.score(ids, GenerationConfig(loops=loops, exit=rule))
    positions = torch.arange(9).expand(3, 9)
    with torch.no_grad():
        out = model(ids, loops=loops, initial_state=engine.initial_state(positions), return_states=True)
        caps = torch.full((3, 9), loops) if rule == "act" else torch.cat((steps, torch.full((3, 1), loops)), 1)
        expected_steps, mixture = naive_halting(model, out.states, caps)
        logits = model.decode(mixture, model.context(ids))
    expected = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=0)
    assert steps[:, 0].tolist() == [loops] * 3
    if rule == "act":
        assert steps[:, 1:].tolist() == expected_steps[:, 1:-1].tolist()
    if loops > 1:
        assert len(set(steps[:, 1:].flatten().tolist())) > 1
        assert bool((expected_steps[:, 1:-1] < steps[:, 1:]).any()) or rule == "act"  # some mixtures halted early


def test_threshold_one_runs_the_budget_and_equals_the_fixed_depth_pass() -> None:
    """No token reaches a cumulative probability of 1 before the budget, so every token takes the remainder at
    the last iteration: the same numbers as the fixed-depth pass of an ACT model."""
    model = act_model()
    with torch.no_grad():
        model.halting.weight.mul_(0.1)  # p about 0.05: far from 1 before the fifth iteration
        model.halting.bias.fill_(-3.0)
    engine = Engine(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    exits = engine.score(ids, GenerationConfig(loops=5, exit="act:1"))
    fixed = engine.score(ids, GenerationConfig(loops=5))
    assert bool((exits.loops == 5).all())
    torch.testing.assert_close(exits.log_probs, fixed.log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("halting_input", ["state", "state+change"])
def test_halted_rows_leave_the_batch_and_nothing_else_changes(halting_input: str) -> None:
    model = act_model(halting_input=halting_input)
    engine = Engine(model)
    results, rows = generate_with_and_without_compaction(
        engine, PROMPTS, GenerationConfig(max_new_tokens=10, loops=8, exit="act")
    )
    compact, masked = results[True].outputs, results[False].outputs
    assert [o.tokens for o in compact] == [o.tokens for o in masked]
    assert [o.loops for o in compact] == [o.loops for o in masked]
    assert any(len({o.loops[t] for o in compact}) > 1 for t in range(1, 10))
    assert rows[True] < rows[False]
    # exactly the iterations the tokens ran: the prefill at the full budget, then each token's own depth
    prefill = len(PROMPTS) * 8
    assert rows[True] == model.config.n_core * (prefill + sum(sum(o.loops[1:]) for o in compact))
    assert results[True].mean_loops < 8


def test_batch_equals_each_prompt_alone() -> None:
    engine = Engine(act_model())
    config = GenerationConfig(max_new_tokens=8, loops=7, exit="act")
    batch = engine.generate(PROMPTS, config).outputs
    for prompt, output in zip(PROMPTS, batch, strict=True):
        alone = engine.generate([prompt], config).outputs[0]
        assert alone.tokens == output.tokens and alone.loops == output.loops


def test_tracker_fires_on_the_cumulative_probability() -> None:
    model = act_model()
    tracker = ExitTracker("act:0.5", halting=model.halting)
    states = [torch.randn(4, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    total = torch.zeros(4)
    first = torch.zeros(4, dtype=torch.long)
    for step, state in enumerate(states, start=1):
        fired = tracker.update(step, state)
        with torch.no_grad():
            total = torch.where(first > 0, total, total + model.halting(state))
        first = torch.where((first == 0) & (total >= 0.5), step, first)
        assert fired.tolist() == (first > 0).tolist()
    assert tracker.first_exit.tolist() == first.tolist()
    assert len(set(first.tolist())) > 1
    latest = tracker.exit_state(4, states[3])
    tracker.select(torch.tensor([2, 0]))
    torch.testing.assert_close(tracker.exit_state(4, states[3][[2, 0]]), latest[[2, 0]])
    with pytest.raises(InputError, match="exit_state needs iteration 4 or 5, got 2"):
        tracker.exit_state(2, states[1])


def test_the_rule_is_parsed_and_refused_where_it_cannot_work() -> None:
    assert parse_exit_rule("act") == ExitRule("act", ACT_THRESHOLD)
    assert parse_exit_rule("act:0.9").threshold == 0.9
    with pytest.raises(InputError, match=r"cumulative probability in \(0, 1\]"):
        parse_exit_rule("act:1.5")
    with pytest.raises(InputError, match="min_loops and check_every must be 1"):
        ExitRule("act", 0.99, min_loops=2)
    with pytest.raises(InputError, match="halting head"):
        ExitTracker("act")
    plain = Engine(build_model(small_config(), seed=0))
    with pytest.raises(InputError, match="halting head"):
        plain.stream(PROMPTS, GenerationConfig(exit="act"))  # refused before anything is generated
    with pytest.raises(InputError, match="halting head"):
        plain.score(torch.tensor([[1, 2, 3]]), GenerationConfig(exit="act"))
