"""The memory pathway: the mixer against a naive reference, masking, validation, and a model that learns to use it."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.config import ModelConfig
from loopformer.errors import ConfigError, InputError
from loopformer.model import build_model
from loopformer.nn.memory import Memory, MemoryMixer, as_memory
from support import small_config

MEMORY_DIM = 8


def trained_mixer(seed: int = 0) -> MemoryMixer:
    """A mixer whose output projection and null key are non-zero (a fresh one adds nothing)."""
    torch.manual_seed(seed)
    mixer = MemoryMixer(small_config(memory_dim=MEMORY_DIM))
    for parameter in mixer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return mixer


def naive_mix(mixer: MemoryMixer, x: torch.Tensor, vectors: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One position and one memory vector at a time, from the module docstring's formula."""
    out = x.clone()
    dim = x.shape[-1]
    for b in range(x.shape[0]):
        keys = [mixer.null_key]
        values = [torch.zeros(dim)]
        for j in range(vectors.shape[1]):
            if mask is None or mask[b, j]:
                key = mixer.memory_norm(mixer.proj.weight @ vectors[b, j])
                keys.append(key)
                values.append(key)
        for t in range(x.shape[1]):
            query = mixer.query.weight @ mixer.query_norm(x[b, t])
            weights = torch.softmax(torch.stack([query @ k / math.sqrt(dim) for k in keys]), dim=0)
            read = sum(w * v for w, v in zip(weights, values, strict=True))
            out[b, t] = x[b, t] + mixer.out.weight @ read
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_mixer_matches_naive_reference(masked: bool) -> None:
    mixer = trained_mixer()
    x = torch.randn(2, 5, 32)
    vectors = torch.randn(2, 3, MEMORY_DIM)
    mask = torch.tensor([[True, False, True], [False, False, False]]) if masked else None
    with torch.no_grad():
        fast = mixer(x, Memory(vectors, mask))
        slow = naive_mix(mixer, x, vectors, mask)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_masked_vectors_have_no_effect() -> None:
    mixer = trained_mixer()
    x = torch.randn(1, 4, 32)
    vectors = torch.randn(1, 3, MEMORY_DIM)
    mask = torch.tensor([[True, False, True]])
    changed = vectors.clone()
    changed[0, 1] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(mixer(x, Memory(vectors, mask)), mixer(x, Memory(changed, mask)))
        assert not torch.allclose(mixer(x, Memory(vectors)), mixer(x, Memory(changed)))


def test_fresh_pathway_leaves_the_model_unchanged() -> None:
    model = build_model(small_config(memory_dim=MEMORY_DIM), seed=0).eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        plain = model(ids, loops=3, seed=1).logits
        conditioned = model(ids, loops=3, seed=1, memory=torch.randn(2, 4, MEMORY_DIM)).logits
    torch.testing.assert_close(plain, conditioned, atol=0, rtol=0)


def test_shared_memory_equals_per_row_copies() -> None:
    model = build_model(small_config(memory_dim=MEMORY_DIM), seed=0).eval()
    torch.nn.init.normal_(model.memory.out.weight, std=0.3)
    ids = torch.randint(0, 64, (3, 5))
    vectors = torch.randn(4, MEMORY_DIM)
    with torch.no_grad():
        shared = model(ids, loops=2, seed=1, memory=vectors).logits
        copies = model(ids, loops=2, seed=1, memory=vectors.expand(3, 4, MEMORY_DIM)).logits
        other = model(ids, loops=2, seed=1, memory=torch.randn(4, MEMORY_DIM)).logits
    torch.testing.assert_close(shared, copies)
    assert not torch.allclose(shared, other)


def test_memory_validation() -> None:
    with pytest.raises(InputError, match="no memory pathway"):
        as_memory(torch.randn(2, 4), batch=1, memory_dim=0)
    with pytest.raises(InputError, match=r"shape \[vectors, 8\]"):
        as_memory(torch.randn(2, 5), batch=1, memory_dim=MEMORY_DIM)
    with pytest.raises(InputError, match=r"\[3, vectors, 8\]"):
        as_memory(torch.randn(2, 4, MEMORY_DIM), batch=3, memory_dim=MEMORY_DIM)
    with pytest.raises(InputError, match="NaN"):
        as_memory(torch.full((2, MEMORY_DIM), math.nan), batch=1, memory_dim=MEMORY_DIM)
    with pytest.raises(InputError, match="floating-point"):
        as_memory(torch.ones(2, MEMORY_DIM, dtype=torch.long), batch=1, memory_dim=MEMORY_DIM)
    with pytest.raises(InputError, match="memory_mask must be a boolean"):
        as_memory(
            torch.randn(1, 2, MEMORY_DIM), batch=1, memory_dim=MEMORY_DIM, mask=torch.ones(1, 3, dtype=torch.bool)
        )
    with pytest.raises(InputError, match="without memory"):
        as_memory(None, batch=1, memory_dim=MEMORY_DIM, mask=torch.ones(1, 3, dtype=torch.bool))
    model = build_model(small_config(), seed=0)
    with pytest.raises(InputError, match="no memory pathway"):
        model(torch.zeros(1, 3, dtype=torch.long), loops=1, memory=torch.randn(2, MEMORY_DIM))
    with pytest.raises(ConfigError, match="memory_dim"):
        small_config(memory_dim=-1)


# ----- a toy task whose answer is only in the memory ------------------------------------------
KEYS, VALUES, SLOTS, QUERY = 8, 8, 4, 16  # tokens: keys 0..7, values 8..15, the query marker 16


def lookup_batch(generator: torch.Generator, tables: tuple[torch.Tensor, torch.Tensor], rows: int):
    """Each row's memory holds SLOTS (key, value) pairs as vectors key_table[k] + value_table[v]; the input
    ``QUERY k v`` asks for the value stored with key k (labels only on v). Without the memory, v is a coin toss."""
    key_table, value_table = tables
    keys = torch.stack([torch.randperm(KEYS, generator=generator)[:SLOTS] for _ in range(rows)])
    values = torch.randint(0, VALUES, (rows, SLOTS), generator=generator)
    asked = torch.randint(0, SLOTS, (rows,), generator=generator)
    index = torch.arange(rows)
    answer = KEYS + values[index, asked]
    ids = torch.stack([torch.full((rows,), QUERY), keys[index, asked], answer], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = answer
    return ids, labels, key_table[keys] + value_table[values]


def train_lookup(with_memory: bool, steps: int = 150) -> float:
    """Train a tiny model on the lookup task; return its answer accuracy on fresh rows."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    tables = (torch.randn(KEYS, 16, generator=generator), torch.randn(VALUES, 16, generator=generator))
    config = ModelConfig(
        vocab_size=QUERY + 1, dim=32, n_heads=2, n_prelude=1, n_core=1, n_coda=1, memory_dim=16 if with_memory else 0
    )
    model = build_model(config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        ids, labels, memory = lookup_batch(generator, tables, 64)
        loss = model(ids, loops=2, labels=labels, memory=memory if with_memory else None).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ids, _, memory = lookup_batch(torch.Generator().manual_seed(99), tables, 512)
    with torch.no_grad():
        logits = model(ids[:, :2], loops=2, seed=0, memory=memory if with_memory else None).logits
    return float((logits[:, -1].argmax(dim=-1) == ids[:, 2]).float().mean())


def test_a_model_learns_to_read_the_memory() -> None:
    with_pathway = train_lookup(with_memory=True)
    without = train_lookup(with_memory=False)
    assert with_pathway >= 0.9, with_pathway
    assert without <= 0.25, without  # chance is 1 / 8
