"""The DeepSeekMoE-style FFN against a naive per-token reference, its routing, statistics and balancing."""

from __future__ import annotations

import pytest
import torch

from loopformer.errors import InputError
from loopformer.nn.moe import MoE, imbalance


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fill_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def swiglu_ref(x: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """proj(silu(gate) * up) for one token ``x [dim]``; gate = first half of the fc rows."""
    hidden = fc.shape[0] // 2
    h = fc.double() @ x.double()
    gate, up = h[:hidden], h[hidden:]
    return proj.double() @ (gate / (1 + torch.exp(-gate)) * up)


def moe_ref(moe: MoE, x: torch.Tensor, slot: int | None) -> torch.Tensor:
    """Loop over tokens: sigmoid scores, biased top-k selection, unbiased normalised weights, shared expert."""
    flat = x.detach().reshape(-1, moe.dim)
    w_router = moe.router.weight.detach().double()
    fc, proj = moe.fc.detach(), moe.proj.detach()
    rows = []
    for t in range(flat.shape[0]):
        xt = flat[t].double()
        logits = w_router @ xt
        if slot is not None:
            logits = logits + moe.loop_bias[slot].detach().double()
        scores = 1 / (1 + torch.exp(-logits))
        chosen = sorted(range(moe.routed), key=lambda e: -(scores[e] + moe.balance_bias[e].double()).item())
        chosen = chosen[: moe.top_k]
        total = sum(scores[e] for e in chosen)
        y = torch.zeros(moe.dim, dtype=torch.float64)
        for e in chosen:
            y = y + scores[e] / total * swiglu_ref(flat[t], fc[e], proj[e])
        if moe.shared is not None:
            y = y + swiglu_ref(flat[t], moe.shared.fc.weight.detach(), moe.shared.proj.weight.detach())
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], moe.dim)


def test_shapes_parameters_and_defaults() -> None:
    moe = MoE(8, 6, routed=5, top_k=2, shared=2, loop_slots=3)
    assert moe.fc.shape == (5, 12, 8) and moe.proj.shape == (5, 8, 6)
    assert moe.router.weight.shape == (5, 8) and moe.loop_bias.shape == (3, 5)
    assert moe.shared.fc.weight.shape == (24, 8) and moe.shared.proj.weight.shape == (8, 12)
    assert torch.equal(moe.loop_bias.detach(), torch.zeros(3, 5))
    assert torch.equal(moe.balance_bias, torch.zeros(5))
    assert "balance_bias" in moe.state_dict()  # persistent buffer, not a parameter
    assert "balance_bias" not in dict(moe.named_parameters())
    for p in (moe.fc, moe.proj, moe.router.weight):  # non-degenerate defaults
        assert 0.005 < p.detach().std().item() < 0.03
    assert MoE(8, 6, routed=3, top_k=1, shared=0).shared is None
    y = moe(torch.randn(2, 3, 8, generator=gen(0)))
    assert y.shape == (2, 3, 8) and torch.isfinite(y).all() and y.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize(("shape", "shared"), [((7, 8), 1), ((2, 5, 8), 0), ((2, 2, 3, 8), 2)])
def test_forward_matches_naive_reference(top_k: int, shape: tuple[int, ...], shared: int) -> None:
    moe = MoE(8, 6, routed=5, top_k=top_k, shared=shared, loop_slots=3)
    fill_(moe, 1)
    with torch.no_grad():
        moe.balance_bias.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3, -0.25]))
        moe.loop_bias.copy_(torch.randn(3, 5, generator=gen(3)) * 2)
    x = torch.randn(*shape, generator=gen(2))
    for slot in (None, 0, 2):
        y = moe(x, slot)
        assert y.shape == x.shape
        torch.testing.assert_close(y.double(), moe_ref(moe, x, slot), rtol=1e-5, atol=1e-5)
    # the loop bias and the balance bias are really exercised: they change the output
    assert not torch.allclose(moe(x, 0), moe(x, None), atol=1e-4)
    assert not torch.allclose(moe(x, 0), moe(x, 2), atol=1e-4)
    flat = x.reshape(-1, 8)
    with_bias = moe.route(flat)[0].sort(-1).values
    with torch.no_grad():
        moe.balance_bias.zero_()
    assert not torch.equal(with_bias, moe.route(flat)[0].sort(-1).values)


def test_loop_slot_changes_routing() -> None:
    moe = MoE(8, 4, routed=4, top_k=1, shared=0, loop_slots=3)
    fill_(moe, 3)
    with torch.no_grad():
        moe.loop_bias.zero_()
        moe.loop_bias[1, 2] = 20.0
    x = torch.randn(64, 8, generator=gen(4))
    experts_1 = moe.route(x, 1)[0]
    experts_none = moe.route(x, None)[0]
    assert torch.equal(experts_1, torch.full((64, 1), 2))
    assert (experts_none != 2).any()
    moe(x, 1)
    torch.testing.assert_close(moe.last_load, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    moe(x, None)
    assert moe.last_load[2] < 1.0


def expert_out(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    return swiglu_ref(x, moe.fc[e].detach(), moe.proj[e].detach())


def test_balance_bias_steers_selection_not_weights() -> None:
    moe = MoE(4, 3, routed=3, top_k=2, shared=0)
    fill_(moe, 5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([2.0, 1.0, -1.0])  # logits for x = e_0
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    s = torch.sigmoid(torch.tensor([2.0, 1.0, -1.0]))
    experts, _, _ = moe.route(x)
    assert sorted(experts[0].tolist()) == [0, 1]  # without bias: the two highest scores
    bias = torch.tensor([0.3, -5.0, 1.0])
    with torch.no_grad():
        moe.balance_bias.copy_(bias)  # kicks expert 1 out, lets expert 2 in
    experts, weights, scores = moe.route(x)
    assert sorted(experts[0].tolist()) == [0, 2]
    torch.testing.assert_close(scores[0], s)
    by_expert = dict(zip(experts[0].tolist(), weights[0].tolist(), strict=True))
    assert by_expert[0] == pytest.approx((s[0] / (s[0] + s[2])).item(), abs=1e-6)
    assert by_expert[2] == pytest.approx((s[2] / (s[0] + s[2])).item(), abs=1e-6)
    y = moe(x)[0].double()
    unbiased = (s[0] * expert_out(moe, 0, x[0]) + s[2] * expert_out(moe, 2, x[0])) / (s[0] + s[2])
    b = s + bias
    biased = (b[0] * expert_out(moe, 0, x[0]) + b[2] * expert_out(moe, 2, x[0])) / (b[0] + b[2])
    torch.testing.assert_close(y, unbiased.double(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, biased.double(), atol=1e-4)


def test_load_statistics_and_aux_loss() -> None:
    moe = MoE(8, 4, routed=5, top_k=2, shared=1, loop_slots=2)
    fill_(moe, 6)
    x = torch.randn(3, 7, 8, generator=gen(7))
    moe(x, 1)
    experts, _, scores = moe.route(x.reshape(-1, 8), 1)
    counts = torch.bincount(experts.reshape(-1), minlength=5).float()
    torch.testing.assert_close(moe.last_load, counts / counts.sum())
    assert moe.last_load.sum().item() == pytest.approx(1.0)
    assert not moe.last_load.requires_grad
    probs = (scores / scores.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(moe.last_aux, 5 * (counts / counts.sum() * probs).sum())
    # differentiable w.r.t. the router weight (and the loop bias of the slot used)
    moe.last_aux.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.loop_bias.grad[1].abs().sum() > 0 and moe.loop_bias.grad[0].abs().sum() == 0


def test_aux_loss_is_one_when_balanced_and_larger_when_collapsed() -> None:
    # token i = e_i, router = 3 * I: token i picks expert i, and by symmetry the mean probabilities are uniform
    moe = MoE(4, 3, routed=4, top_k=1, shared=0)
    with torch.no_grad():
        moe.router.weight.copy_(3 * torch.eye(4))
    moe(torch.eye(4))
    torch.testing.assert_close(moe.last_load, torch.full((4,), 0.25))
    assert moe.last_aux.item() == pytest.approx(1.0, abs=1e-6)
    assert imbalance(moe.last_load) == pytest.approx(1.0)
    # collapsed: every token prefers expert 0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 3.0
    moe(torch.rand(16, 4, generator=gen(8)) + 0.5)
    torch.testing.assert_close(moe.last_load, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert moe.last_aux.item() > 1.5
    assert imbalance(moe.last_load) == pytest.approx(4.0)


def biased_toy(bias_rate: float) -> tuple[MoE, list[torch.Tensor]]:
    moe = MoE(8, 4, routed=4, top_k=1, shared=0, bias_rate=bias_rate)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(4, 8, generator=gen(9)) * 0.5)
        moe.router.weight[0] += 2.0  # inputs have mean 0.5: expert 0 scores highest for most tokens
    batches = [torch.randn(256, 8, generator=gen(10 + i)) + 0.5 for i in range(4)]
    return moe, batches


@torch.no_grad()
def run_balancing(moe: MoE, batches: list[torch.Tensor], steps: int) -> list[float]:
    history = []
    for step in range(steps):
        moe(batches[step % len(batches)])
        history.append(imbalance(moe.last_load))
        moe.update_balance()
    return history


def test_update_balance_rule() -> None:
    moe = MoE(4, 2, routed=4, top_k=1, bias_rate=0.5)
    moe.update_balance(torch.tensor([0.7, 0.1, 0.2, 0.0]))  # mean 0.25
    torch.testing.assert_close(moe.balance_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    moe.update_balance(torch.tensor([0.25, 0.25, 0.5, 0.0]))  # at the mean: no change
    torch.testing.assert_close(moe.balance_bias, torch.tensor([-0.5, 0.5, 0.0, 1.0]))
    moe(torch.eye(4))  # default: the last forward's load
    before = moe.balance_bias.clone()
    moe.update_balance()
    torch.testing.assert_close(moe.balance_bias, before + 0.5 * torch.sign(moe.last_load.mean() - moe.last_load))


def test_balancing_evens_out_a_biased_router() -> None:
    moe, batches = biased_toy(0.01)
    history = run_balancing(moe, batches, 200)
    assert history[0] > 3.0
    assert max(history[-8:]) < 1.5
    assert moe.balance_bias[0] < moe.balance_bias[1:].min()  # the favoured expert was pushed down
    frozen, batches = biased_toy(0.0)
    history = run_balancing(frozen, batches, 200)
    assert min(history) > 3.0
    assert torch.equal(frozen.balance_bias, torch.zeros(4))


def test_gradients_reach_every_parameter() -> None:
    moe = MoE(8, 4, routed=4, top_k=2, shared=1, loop_slots=2)
    fill_(moe, 11)
    x = torch.randn(2, 9, 8, generator=gen(12), requires_grad=True)
    y = moe(x, 0)
    (y.square().sum() + moe.last_aux).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert moe.loop_bias.grad[1].abs().sum() == 0  # only the slot used
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert {n for n, _ in moe.named_parameters()} == {
        "fc",
        "proj",
        "router.weight",
        "loop_bias",
        "shared.fc.weight",
        "shared.proj.weight",
    }


def test_empty_input_and_bfloat16_autocast() -> None:
    moe = MoE(8, 4, routed=4, top_k=2, shared=1)
    fill_(moe, 13)
    y = moe(torch.zeros(0, 3, 8))
    assert y.shape == (0, 3, 8)
    assert torch.equal(moe.last_load, torch.zeros(4))
    x = torch.randn(5, 8, generator=gen(14))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), moe(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"routed": 0, "top_k": 1},
        {"top_k": 0},
        {"top_k": 5},
        {"expert_hidden": 0},
        {"dim": 0},
        {"shared": -1},
        {"loop_slots": 0},
        {"bias_rate": -0.1},
        {"bias_rate": float("nan")},
    ],
)
def test_bad_arguments_raise(kwargs: dict) -> None:
    args = {"dim": 8, "expert_hidden": 4, "routed": 4, "top_k": 2} | kwargs
    with pytest.raises(InputError):
        MoE(**args)


def test_bad_calls_raise() -> None:
    moe = MoE(8, 4, routed=4, top_k=2, loop_slots=2)
    with pytest.raises(InputError):
        moe.update_balance()  # no forward yet
    with pytest.raises(InputError):
        moe(torch.randn(3, 7))
    with pytest.raises(InputError):
        moe(torch.randn(3, 8), slot=2)
    with pytest.raises(InputError):
        moe.update_balance(torch.ones(3))
    with pytest.raises(InputError):
        imbalance(torch.zeros(4))
