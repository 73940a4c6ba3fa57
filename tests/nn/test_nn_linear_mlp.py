"""LoopLinear (with and without per-slot LoRA) and the SwiGLU MLP against explicit matrix formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopformer.nn.linear import LoopLinear
from loopformer.nn.mlp import SwiGLU


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fill_(module: torch.nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    g = gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def matmul_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ W^T by explicit sums in float64."""
    return (x.double()[..., None, :] * w.detach().double()).sum(-1)


def test_loop_linear_without_lora() -> None:
    lin = LoopLinear(6, 5)
    assert lin.lora_a is None and lin.lora_b is None
    assert lin.in_features == 6 and lin.out_features == 5
    assert {n for n, _ in lin.named_parameters()} == {"weight"}
    fill_(lin, 0)
    x = torch.randn(2, 3, 6, generator=gen(1))
    expected = matmul_ref(x, lin.weight)
    for slot in (None, 0, 3):  # the slot is ignored without adapters
        y = lin(x, slot)
        assert y.shape == (2, 3, 5)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)


def test_loop_linear_fresh_lora_is_noop() -> None:
    lin = LoopLinear(6, 5, lora_rank=2, lora_slots=3)
    assert lin.lora_a.shape == (3, 2, 6) and lin.lora_b.shape == (3, 5, 2)
    assert torch.equal(lin.lora_b.detach(), torch.zeros(3, 5, 2))  # B zero-initialised
    fill_(lin, 2, skip=("lora_b",))
    x = torch.randn(4, 6, generator=gen(3))
    expected = matmul_ref(x, lin.weight)
    for slot in (None, 0, 1, 2):
        torch.testing.assert_close(lin(x, slot).double(), expected, rtol=1e-5, atol=1e-6)


def test_loop_linear_lora_uses_the_slot_adapter() -> None:
    lin = LoopLinear(6, 5, lora_rank=2, lora_slots=3)
    fill_(lin, 4)  # lora_b random now
    x = torch.randn(2, 3, 6, generator=gen(5))
    base = matmul_ref(x, lin.weight)
    torch.testing.assert_close(lin(x, None).double(), base, rtol=1e-5, atol=1e-6)
    outputs = []
    for i in range(3):
        a_i, b_i = lin.lora_a[i].detach().double(), lin.lora_b[i].detach().double()
        expected = base + x.double() @ a_i.T @ b_i.T
        y = lin(x, i)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
        outputs.append(y)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    assert not torch.allclose(outputs[1], outputs[2], atol=1e-4)


def test_loop_linear_lora_gradients_reach_only_the_used_slot() -> None:
    lin = LoopLinear(4, 3, lora_rank=2, lora_slots=3)
    fill_(lin, 6)
    lin(torch.randn(5, 4, generator=gen(7)), 1).sum().backward()
    assert lin.lora_a.grad is not None and lin.lora_b.grad is not None
    for slot in (0, 2):
        assert torch.count_nonzero(lin.lora_a.grad[slot]) == 0
        assert torch.count_nonzero(lin.lora_b.grad[slot]) == 0
    assert torch.count_nonzero(lin.lora_b.grad[1]) > 0


def swiglu_ref(mlp: SwiGLU, x: torch.Tensor, hidden: int, slot: int | None = None) -> torch.Tensor:
    """down(silu(gate) * up): gate = first `hidden` rows of fc, up = the next `hidden` rows."""

    def eff(lin: LoopLinear) -> torch.Tensor:
        w = lin.weight.detach().double()
        if slot is not None and lin.lora_a is not None:
            w = w + lin.lora_b[slot].detach().double() @ lin.lora_a[slot].detach().double()
        return w

    w_fc, w_down = eff(mlp.fc), eff(mlp.proj)
    xd = x.double()
    gate = xd @ w_fc[:hidden].T
    up = xd @ w_fc[hidden:].T
    silu = gate / (1 + torch.exp(-gate))
    return (silu * up) @ w_down.T


@pytest.mark.parametrize(("dim", "hidden"), [(8, 12), (16, 40)])
def test_swiglu_matches_reference(dim: int, hidden: int) -> None:
    mlp = SwiGLU(dim, hidden)
    assert mlp.fc.weight.shape == (2 * hidden, dim) and mlp.proj.weight.shape == (dim, hidden)
    fill_(mlp, 8)
    x = torch.randn(2, 5, dim, generator=gen(9))
    y = mlp(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), swiglu_ref(mlp, x, hidden), rtol=1e-5, atol=1e-6)


def test_swiglu_gate_and_up_are_not_interchangeable() -> None:
    """Which half is the gate matters: silu(up) * gate gives another output than silu(gate) * up."""
    mlp = SwiGLU(8, 12)
    fill_(mlp, 10)
    x = torch.randn(3, 8, generator=gen(11))
    gate, up = F.linear(x, mlp.fc.weight).chunk(2, dim=-1)
    swapped = F.linear(F.silu(up) * gate, mlp.proj.weight)
    assert not torch.allclose(mlp(x), swapped, atol=1e-4)


def test_swiglu_lora_slot() -> None:
    mlp = SwiGLU(8, 12, lora_rank=2, lora_slots=2)
    fill_(mlp, 12)
    x = torch.randn(3, 8, generator=gen(13))
    for slot in (None, 0, 1):
        torch.testing.assert_close(mlp(x, slot).double(), swiglu_ref(mlp, x, 12, slot), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mlp(x, 0), mlp(x, None), atol=1e-4)
