"""ACT halting: the accumulation against a naive per-position loop, hand-computed ponder cost and KL, the head's
initialisation, the model's halting mixture, and gradients under truncated backprop."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.model import build_model
from loopformer.nn.halting import ACT, ACT_THRESHOLD, HALTING_CHANGE_FLOOR, HaltingHead, penalty_scale
from support import small_config


def naive_act(p: list[float], cap: int, threshold: float = ACT_THRESHOLD) -> tuple[list[float], int, float]:
    """Graves' ACT for one position, written out: (weights over the iterations, N, R)."""
    weights = [0.0] * len(p)
    total = 0.0
    for n in range(1, len(p) + 1):
        if total + p[n - 1] >= threshold or n == cap:
            weights[n - 1] = 1.0 - total
            return weights, n, 1.0 - total
        weights[n - 1] = p[n - 1]
        total += p[n - 1]
    raise AssertionError("the cap lies within the iterations")


def run_act(p: torch.Tensor, states: torch.Tensor, cap: int | torch.Tensor, prior: float | None = None) -> ACT:
    """Feed iterations p [S, B, T], states [S, B, T, D] to an ACT accumulator capped at ``cap``."""
    act = ACT(HaltingHead(states.shape[-1]), cap, prior=prior)
    for n in range(p.shape[0]):
        force = act._at_cap(n + 1, states[n])
        act.update(n + 1, states[n], p[n], force)
    return act


@pytest.mark.parametrize("cap", [1, 3, 6])
def test_accumulation_matches_a_per_position_loop(cap: int) -> None:
    generator = torch.Generator().manual_seed(cap)
    p = torch.rand(6, 3, 5, generator=generator, dtype=torch.float64).float() * 0.6
    p[:, 0, 0] = 0.995  # halts at the first iteration by the threshold
    p[:, 0, 1] = 0.0  # never reaches it: the cap takes everything
    states = torch.randn(6, 3, 5, 4, generator=generator)
    act = run_act(p, states, cap)
    for b in range(3):
        for t in range(5):
            weights, n, r = naive_act(p[:, b, t].tolist(), cap)
            assert math.isclose(sum(weights), 1.0, abs_tol=1e-6)
            assert int(act.steps[b, t]) == n
            assert float(act.remainder[b, t]) == pytest.approx(r, abs=1e-6)
            assert float(act.expected[b, t]) == pytest.approx(sum((i + 1) * w for i, w in enumerate(weights)), abs=1e-5)
            mixture = sum(w * states[i, b, t] for i, w in enumerate(weights))
            torch.testing.assert_close(act.latest[b, t], mixture, atol=1e-5, rtol=0)
    assert int(act.steps[0, 0]) == 1 and int(act.steps[0, 1]) == cap
    assert not bool(act.running.any())


def test_weights_sum_to_one_at_per_row_caps() -> None:
    """Constant states give back the constant only if the weights sum to exactly 1; the cap takes the remainder."""
    p = torch.full((5, 3, 2), 0.1)
    states = torch.ones(5, 3, 2, 4)
    act = run_act(p, states, torch.tensor([1, 3, 5]))
    torch.testing.assert_close(act.latest, torch.ones(3, 2, 4))
    assert act.steps.tolist() == [[1, 1], [3, 3], [5, 5]]
    torch.testing.assert_close(act.remainder, torch.tensor([[1.0, 1.0], [0.8, 0.8], [0.6, 0.6]]))


def test_ponder_cost_and_kl_by_hand() -> None:
    # position 0: 0.3 + 0.5 = 0.8, + 0.4 >= 0.99 -> N = 3, R = 0.2; position 1: never reaches it, cap 3 -> R = 0.8
    p = torch.tensor([[[0.3, 0.1]], [[0.5, 0.1]], [[0.4, 0.1]]])
    states = torch.zeros(3, 1, 2, 2)
    act = run_act(p, states, 3, prior=0.5)
    stats = act.stats()
    torch.testing.assert_close(stats.ponder, torch.tensor([[3.2, 3.8]]))
    torch.testing.assert_close(stats.expected, torch.tensor([[0.3 + 1.0 + 0.6, 0.1 + 0.2 + 2.4]]))
    # prior 0.5 truncated at 3: 0.5, 0.25 and the tail 0.25
    kl = [
        0.3 * math.log(0.3 / 0.5) + 0.5 * math.log(0.5 / 0.25) + 0.2 * math.log(0.2 / 0.25),
        0.1 * math.log(0.1 / 0.5) + 0.1 * math.log(0.1 / 0.25) + 0.8 * math.log(0.8 / 0.25),
    ]
    torch.testing.assert_close(stats.kl, torch.tensor([kl]))
    # the penalty averages over the counted positions only
    stats.mask = torch.tensor([[True, False]])
    assert float(stats.penalty(0.1, 2.0)) == pytest.approx(0.1 * 3.2 + 2.0 * kl[0], rel=1e-5)


def test_the_head_starts_at_its_bias() -> None:
    model = build_model(small_config(halting="act", halting_bias_init=-3.0), seed=0)
    head = model.halting
    assert float(head.bias.detach()) == -3.0 and bool((head.weight == 0).all())
    p = head(torch.randn(2, 5, 32) * 10)
    torch.testing.assert_close(p, torch.full((2, 5), 1 / (1 + math.exp(3.0))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(2, 32)).dtype == torch.float32
    assert build_model(small_config(), seed=0).halting is None
    # a fresh model halts (by the threshold) only after about 21 iterations: deep by default
    assert math.ceil(ACT_THRESHOLD / float(p[0, 0].detach())) == 21
    # the change input starts switched off: a fresh state+change head is the plain one, whatever the step size
    change_head = build_model(small_config(halting="act", halting_input="state+change"), seed=0).halting
    states = torch.randn(2, 5, 32)
    torch.testing.assert_close(change_head(states, torch.randn(2, 5, 32)), head(states))


def test_the_change_input_by_hand() -> None:
    head = HaltingHead(3, bias_init=0.5, use_change=True).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        head.change_weight.fill_(-0.7)
    previous, state = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 2.3])
    rms = state / math.sqrt(float((state**2).mean()) + 1e-6)
    plain = float(rms @ torch.tensor([1.0, -2.0, 0.5])) + 0.5
    change = 0.3 / math.sqrt(1 + 4 + 2.3**2)
    expected = 1 / (1 + math.exp(-(plain - 0.7 * math.log(change + HALTING_CHANGE_FLOOR))))
    assert float(head(state, previous)) == pytest.approx(expected, rel=1e-5)
    assert float(head(state)) == pytest.approx(1 / (1 + math.exp(-plain)), rel=1e-5)  # the first iteration
    assert float(head(state, state)) > float(head(state, previous))  # a state that stopped moving halts sooner
    assert HaltingHead(3).change_weight is None


def halting_model(**changes: object) -> torch.nn.Module:
    model = build_model(small_config(halting="act", **changes), seed=0)
    with torch.no_grad():  # a head that halts positions at different iterations
        model.halting.weight.copy_(torch.randn(model.halting.weight.shape, generator=torch.Generator().manual_seed(3)))
        model.halting.bias.fill_(-1.0)
        if model.halting.change_weight is not None:
            model.halting.change_weight.fill_(-0.5)
    return model


def head_probabilities(model: torch.nn.Module, states: list[torch.Tensor]) -> torch.Tensor:
    """p_n of every iteration [S, ...], each computed with the state before it (None at the first)."""
    return torch.stack([model.halting(s, prev) for prev, s in zip([None, *states[:-1]], states, strict=True)])


@pytest.mark.parametrize("halting_input", ["state", "state+change"])
@pytest.mark.parametrize("steps", [5, "per-row"])
def test_forward_decodes_the_act_mixture(steps: object, halting_input: str) -> None:
    model = halting_model(halting_input=halting_input).eval()
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    loops = torch.tensor([2, 5, 4]) if steps == "per-row" else steps
    caps = loops.tolist() if steps == "per-row" else [steps] * 3
    with torch.no_grad():
        out = model(ids, loops=loops, seed=0, return_states=True)
        p = head_probabilities(model, out.states)  # [S, B, T]
        ctx = model.context(ids)
        halting_steps = torch.zeros(3, 7, dtype=torch.long)
        mixture = torch.zeros(3, 7, 32)
        for b in range(3):
            for t in range(7):
                weights, n, _ = naive_act(p[:, b, t].tolist(), caps[b])
                halting_steps[b, t] = n
                mixture[b, t] = sum(w * out.states[i][b, t] for i, w in enumerate(weights[: caps[b]]))
        expected = model.decode(mixture, ctx)
    assert out.halting.steps.tolist() == halting_steps.tolist()
    assert len(set(halting_steps.flatten().tolist())) > 1  # the positions really halt at different iterations
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


def test_ponder_counts_the_positions_with_a_target() -> None:
    model = halting_model(ponder_cost=0.5)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100  # targets of positions 2..4 only (labels are shifted by one)
    plain = halting_model(ponder_cost=0.0)
    out = model(ids, loops=4, labels=labels, seed=0)
    base = plain(ids, loops=4, labels=labels, seed=0)
    scored = torch.zeros(2, 6, dtype=torch.bool)
    scored[:, 2:5] = True
    assert out.halting.mask.tolist() == scored.tolist()
    torch.testing.assert_close(out.loss - base.loss, 0.5 * out.halting.ponder[scored].mean())
    half = model(ids, loops=4, labels=labels, seed=0, halting_scale=0.5)
    torch.testing.assert_close(half.loss - base.loss, 0.25 * out.halting.ponder[scored].mean())


def test_the_penalty_waits_then_ramps() -> None:
    assert [penalty_scale(step, 4) for step in (0, 3, 4, 5, 6, 8, 100)] == [0, 0, 0, 0.25, 0.5, 1, 1]
    assert penalty_scale(0, 0) == 1.0


@pytest.mark.parametrize(("per_row", "halting_input"), [(False, "state"), (True, "state"), (True, "state+change")])
def test_truncated_backprop_still_trains_the_halting_head(per_row: bool, halting_input: str) -> None:
    """The head's gradient comes through the halting probabilities of every iteration: it is the same whether
    2 or all 6 iterations carry gradient (the states are only constants to it), and it is not zero."""
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    steps = torch.tensor([6, 4, 5]) if per_row else 6
    grads = {}
    for depth in (2, None):
        model = halting_model(halting_prior=0.3, halting_input=halting_input).train()
        out = model(ids, loops=steps, labels=ids, backprop_loops=depth, seed=0)
        out.loss.backward()
        grads[depth] = [param.grad.clone() for param in model.halting.parameters()]
    for truncated, full in zip(grads[2], grads[None], strict=True):
        assert bool(truncated.abs().sum() > 0)
        torch.testing.assert_close(truncated, full, atol=1e-6, rtol=1e-4)
