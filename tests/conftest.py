"""Fixtures shared by every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
