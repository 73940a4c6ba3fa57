"""Loop signals: the slot policy, the sinusoidal loop code and the loop embedding module."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.nn.depth import LoopEmbedding, loop_slot, sinusoidal_loop_embedding


@pytest.mark.parametrize("policy", ["reuse-last", "cycle", "off"])
@pytest.mark.parametrize("slots", [1, 3])
def test_loop_slot_within_range_is_identity(policy: str, slots: int) -> None:
    assert [loop_slot(i, slots, policy) for i in range(slots)] == list(range(slots))


def test_loop_slot_beyond_range() -> None:
    beyond = range(3, 11)
    assert [loop_slot(i, 3, "reuse-last") for i in beyond] == [2] * 8
    assert [loop_slot(i, 3, "cycle") for i in beyond] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [loop_slot(i, 3, "off") for i in beyond] == [None] * 8
    assert loop_slot(5, 1, "cycle") == 0
    assert loop_slot(1, 1, "reuse-last") == 0
    assert loop_slot(1, 1, "off") is None


def naive_sinusoid(index: int, dim: int) -> list[float]:
    half = dim // 2
    freqs = [10000.0 ** (-k / half) for k in range(half)]
    code = [math.sin(index * f) for f in freqs] + [math.cos(index * f) for f in freqs]
    return code + [0.0] * (dim % 2)


@pytest.mark.parametrize("dim", [1, 2, 7, 16])
@pytest.mark.parametrize("index", [0, 1, 5, 123])
def test_sinusoidal_loop_embedding_values(dim: int, index: int) -> None:
    code = sinusoidal_loop_embedding(index, dim)
    assert code.shape == (dim,) and code.dtype == torch.float32
    assert bool((code.abs() <= 1).all())
    torch.testing.assert_close(code.double(), torch.tensor(naive_sinusoid(index, dim), dtype=torch.float64))
    assert torch.equal(code, sinusoidal_loop_embedding(index, dim))  # deterministic
    if dim % 2:
        assert code[-1] == 0


def test_sinusoidal_loop_embedding_distinct_per_index() -> None:
    codes = torch.stack([sinusoidal_loop_embedding(i, 8) for i in range(64)])
    dists = torch.cdist(codes, codes)
    off_diag = dists[~torch.eye(64, dtype=torch.bool)]
    assert float(off_diag.min()) > 1e-3
    zero = sinusoidal_loop_embedding(0, 8)
    assert torch.equal(zero, torch.tensor([0.0] * 4 + [1.0] * 4))


def make_config(**changes: object) -> ModelConfig:
    base: dict[str, object] = {
        "vocab_size": 32,
        "dim": 9,
        "head_dim": 4,
        "n_heads": 2,
        "max_seq_len": 64,
        "recurrence": RecurrenceConfig(mean_loops=2, backprop_loops=1),
    }
    base.update(changes)
    return ModelConfig(**base)


def test_learned_loop_embedding() -> None:
    config = make_config(loop_embedding="learned", loop_embedding_scale=0.5)
    emb = LoopEmbedding(config)
    assert emb.table is not None and emb.table.shape == (config.per_loop_slots, 9) == (4, 9)
    with torch.no_grad():
        emb.table.copy_(torch.randn(4, 9, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(emb(x, 7, None), x)  # slot None adds nothing
    for slot in range(4):
        torch.testing.assert_close(emb(x, 7, slot), x + 0.5 * emb.table[slot].detach())
    # The learned code depends on the slot, not on the index.
    assert torch.equal(emb(x, 0, 2), emb(x, 9, 2))
    x_bf16 = x.to(torch.bfloat16)
    assert emb(x_bf16, 0, 1).dtype == torch.bfloat16


def test_sinusoidal_loop_embedding_module() -> None:
    config = make_config(loop_embedding="sinusoidal", loop_embedding_scale=0.25)
    emb = LoopEmbedding(config)
    assert emb.table is None and len(list(emb.parameters())) == 0
    x = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(2))
    for index, slot in [(0, 0), (3, None), (17, 1)]:
        expected = x.double() + 0.25 * torch.tensor(naive_sinusoid(index, 9), dtype=torch.float64)
        torch.testing.assert_close(emb(x, index, slot).double(), expected, rtol=1e-6, atol=1e-6)
    y = emb(x.to(torch.bfloat16), 3, None)
    assert y.dtype == torch.bfloat16


def test_loop_embedding_none_is_identity() -> None:
    emb = LoopEmbedding(make_config())
    x = torch.randn(2, 9)
    assert torch.equal(emb(x, 3, 1), x)
