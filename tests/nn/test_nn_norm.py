"""RMSNorm against a naive fp32 formula, in fp32, bf16 and under CPU autocast."""

from __future__ import annotations

import pytest
import torch

from loopformer.nn.norm import RMSNorm


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w, computed in float64 and returned in float64."""
    x, weight = x.double(), weight.double()
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def make_norm(dim: int, eps: float, seed: int = 0) -> RMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(dim, generator=gen))
    return norm


@pytest.mark.parametrize("eps", [1e-6, 1e-2, 1.0])
def test_rmsnorm_matches_naive_formula_fp32(eps: float) -> None:
    gen = torch.Generator().manual_seed(1)
    norm = make_norm(24, eps)
    x = torch.randn(3, 5, 24, generator=gen) * 0.3
    y = norm(x)
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), naive_rms_norm(x, norm.weight, eps), rtol=1e-5, atol=1e-6)


def test_rmsnorm_default_weight_is_ones_and_normalises_rms() -> None:
    norm = RMSNorm(16)
    assert torch.equal(norm.weight.detach(), torch.ones(16))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)) * 7.0
    rms = norm(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(4), rtol=1e-5, atol=1e-5)


def test_rmsnorm_eps_matters_for_small_inputs() -> None:
    x = torch.full((1, 8), 1e-3)
    small, big = RMSNorm(8, 1e-12)(x), RMSNorm(8, 1e-2)(x)
    torch.testing.assert_close(small, torch.ones(1, 8), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(big.double(), naive_rms_norm(x, torch.ones(8), 1e-2), rtol=1e-5, atol=1e-7)
    assert big.abs().max() < 0.02
    assert torch.equal(RMSNorm(8)(torch.zeros(2, 8)), torch.zeros(2, 8))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_bf16_input_statistics_in_fp32(weight_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    norm = make_norm(64, 1e-6).to(weight_dtype)
    x = (torch.randn(4, 7, 64, generator=gen) * 3.0).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    # fp32 reference of the bf16 input, rounded once to bf16 at the end.
    expected = naive_rms_norm(x.float(), norm.weight.float(), 1e-6).float().to(torch.bfloat16)
    # Both sides round an (almost) identical fp32 value: at most one bf16 ulp apart.
    torch.testing.assert_close(y.float(), expected.float(), rtol=2**-7, atol=1e-6)
    # The bulk of entries round identically.
    assert (y == expected).float().mean() > 0.95


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_under_autocast_keeps_input_dtype(in_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    norm = make_norm(32, 1e-6)
    x = torch.randn(2, 3, 32, generator=gen).to(in_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == in_dtype
    expected = naive_rms_norm(x.float(), norm.weight, 1e-6).to(in_dtype)
    tol = 2**-7 if in_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), expected.double(), rtol=tol, atol=1e-6)
