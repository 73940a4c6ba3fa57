"""Fixtures shared by every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Test tensors are tiny: run intra-op single-threaded (OpenMP spin-waits dominate on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
