"""The one-pass cross-entropy equals torch's, in value and gradient, including ignored targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopformer.nn.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_torch_cross_entropy(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 11, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (37,), generator=generator)
    targets[[0, 5, 36]] = -100
    expected = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(expected * 2.5, logits)
    got = cross_entropy(logits, targets)
    (got_grad,) = torch.autograd.grad(got * 2.5, logits)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-5}
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, expected.to(got.dtype), **tol)
    torch.testing.assert_close(got_grad.float(), expected_grad.float(), **tol)
    assert torch.all(got_grad[[0, 5, 36]] == 0)


def test_custom_ignore_index_and_all_ignored() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    targets = torch.tensor([1, 7, 7, 2])
    torch.testing.assert_close(cross_entropy(logits, targets, 7), F.cross_entropy(logits, targets, ignore_index=7))
    none_valid = cross_entropy(logits, torch.full((4,), -100))
    assert none_valid.item() == 0.0
    none_valid.backward()
    assert torch.all(logits.grad == 0)
