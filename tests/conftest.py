"""Fixtures shared by every test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from loopformer.hardware import AUTO_DTYPE_ENV

# The suite's equivalences and thresholds are fp32 numerics: `dtype: auto` would pick bf16 autocast on an AMX /
# AVX512-BF16 machine and change them there. Tests of the choice itself (tests/test_hardware.py) unset this.
# Child processes (CLI tests) inherit it.
os.environ.setdefault(AUTO_DTYPE_ENV, "fp32")


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
