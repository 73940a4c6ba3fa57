"""Depth samplers: reproducible, >= 1, the right means, Huginn's published quantiles."""

from __future__ import annotations

import pytest
import torch

from loopformer.config import RecurrenceConfig
from loopformer.recurrence import sample_depth, sample_depths


@pytest.mark.parametrize("sampler", ["lognormal-poisson", "fixed", "uniform", "poisson", "geometric"])
def test_samplers_are_seeded_and_positive(sampler: str) -> None:
    config = RecurrenceConfig(mean_loops=6, sampler=sampler)
    a = sample_depths(config, 500, torch.Generator().manual_seed(0))
    b = sample_depths(config, 500, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.long and int(a.min()) >= 1


@pytest.mark.parametrize(
    ("sampler", "expected_mean"),
    [("lognormal-poisson", 7.0), ("fixed", 6.0), ("uniform", 6.0), ("poisson", 6.0), ("geometric", 6.0)],
)
def test_sampler_means(sampler: str, expected_mean: float) -> None:
    draws = sample_depths(RecurrenceConfig(mean_loops=6, sampler=sampler), 40_000, torch.Generator().manual_seed(1))
    assert draws.double().mean().item() == pytest.approx(expected_mean, rel=0.03)


def test_huginn_sampler_matches_published_statistics() -> None:
    config = RecurrenceConfig(mean_loops=32, sampler="lognormal-poisson", backprop_loops=8)
    draws = sample_depths(config, 100_000, torch.Generator().manual_seed(2)).double()
    assert draws.mean().item() == pytest.approx(33, abs=0.5)
    assert draws.median().item() == pytest.approx(29, abs=1)
    assert draws.quantile(0.95).item() == pytest.approx(67, abs=2)


def test_uniform_range_and_cap() -> None:
    draws = sample_depths(RecurrenceConfig(mean_loops=4, sampler="uniform"), 5000, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(range(1, 8))
    capped = RecurrenceConfig(mean_loops=4, sampler="geometric", max_loops=6)
    assert int(sample_depths(capped, 5000, torch.Generator().manual_seed(0)).max()) == 6


def test_per_batch_and_per_sequence_depth() -> None:
    per_batch = sample_depth(RecurrenceConfig(mean_loops=5), 3, torch.Generator().manual_seed(0))
    assert isinstance(per_batch, int)
    per_row = sample_depth(RecurrenceConfig(mean_loops=5, per_sequence=True), 3, torch.Generator().manual_seed(0))
    assert isinstance(per_row, torch.Tensor) and per_row.shape == (3,)
