"""RoPE: interleaved vs a complex-number reference, half vs Llama rotate_half, the custom backward."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.nn.rope import apply_rope, rope_angles

B, T, H, D = 2, 6, 3, 8


def naive_freqs(head_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/d), i = 0..d/2-1, float64, computed with math.pow."""
    return torch.tensor([math.pow(base, -2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)


def naive_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """[B or 1, T, 1, d/2] float64 angles pos * theta_i."""
    pos = positions.double() if positions.dim() == 2 else positions.double()[None]
    return (pos[..., None] * naive_freqs(head_dim, base))[:, :, None, :]


def complex_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) as complex numbers, multiplied by exp(i * pos * theta_i)."""
    xd = x.double()
    z = torch.complex(xd[..., 0::2], xd[..., 1::2])
    angles = naive_angles(positions, x.shape[-1], base)
    rot = z * torch.exp(1j * angles)
    out = torch.empty_like(xd)
    out[..., 0::2] = rot.real
    out[..., 1::2] = rot.imag
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def llama_reference(x: torch.Tensor, positions: torch.Tensor, base: float, dtype=torch.float64) -> torch.Tensor:
    """Llama: x * cos + rotate_half(x) * sin, with cos/sin repeated over both halves."""
    ang = naive_angles(positions, x.shape[-1], base).to(dtype)
    cos = torch.cat((ang.cos(), ang.cos()), dim=-1)
    sin = torch.cat((ang.sin(), ang.sin()), dim=-1)
    xd = x.to(dtype)
    return xd * cos + rotate_half(xd) * sin


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rope_angles_shape_and_values() -> None:
    pos = torch.arange(T)
    cos, sin = rope_angles(pos, D, 10000.0)
    assert cos.shape == sin.shape == (1, T, 1, D // 2)
    assert cos.dtype == sin.dtype == torch.float32
    ang = naive_angles(pos, D, 10000.0)
    torch.testing.assert_close(cos.double(), ang.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), ang.sin(), rtol=0, atol=1e-6)
    cos2, _ = rope_angles(torch.arange(2 * T).view(2, T), D, 10000.0)
    assert cos2.shape == (2, T, 1, D // 2)


@pytest.mark.parametrize("base", [10000.0, 50.0])
def test_rope_interleaved_matches_complex_reference(base: float) -> None:
    x = rand(B, T, H, D, seed=1)
    cos, sin = rope_angles(torch.arange(T), D, base)
    y = apply_rope(x, cos, sin, "interleaved")
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), complex_reference(x, torch.arange(T), base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", [10000.0, 50.0])
def test_rope_half_matches_llama_rotate_half(base: float) -> None:
    x = rand(B, T, H, D, seed=2)
    cos, sin = rope_angles(torch.arange(T), D, base)
    y = apply_rope(x, cos, sin, "half")
    torch.testing.assert_close(y.double(), llama_reference(x, torch.arange(T), base), rtol=1e-5, atol=1e-5)


def test_rope_styles_related_by_even_odd_permutation() -> None:
    x = rand(B, T, H, D, seed=3)
    cos, sin = rope_angles(torch.arange(T), D, 10000.0)
    perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))  # P: gather even then odd channels
    inv = torch.argsort(perm)
    inter = apply_rope(x, cos, sin, "interleaved")
    via_half = apply_rope(x[..., perm], cos, sin, "half")[..., inv]
    torch.testing.assert_close(inter, via_half, rtol=1e-6, atol=1e-6)
    # ...and the two styles really are different functions of the same x.
    assert not torch.allclose(inter, apply_rope(x, cos, sin, "half"), atol=1e-3)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_preserves_norm_of_each_pair(style: str) -> None:
    x = rand(B, T, H, D, seed=4) * 5
    cos, sin = rope_angles(torch.arange(100, 100 + T), D, 10000.0)
    y = apply_rope(x, cos, sin, style)

    def pair_norms(t: torch.Tensor) -> torch.Tensor:
        if style == "half":
            a, b = t[..., : D // 2], t[..., D // 2 :]
        else:
            a, b = t[..., 0::2], t[..., 1::2]
        return (a * a + b * b).sqrt()

    torch.testing.assert_close(pair_norms(y), pair_norms(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-2)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_position_zero_is_identity(style: str) -> None:
    x = rand(1, 1, H, D, seed=5)
    cos, sin = rope_angles(torch.zeros(1, dtype=torch.long), D, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin, style), x, rtol=0, atol=0)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_per_row_positions(style: str) -> None:
    x = rand(B, T, H, D, seed=6)
    positions = torch.stack((torch.arange(T), torch.arange(T) + 37))  # [B, T], rows differ
    cos, sin = rope_angles(positions, D, 10000.0)
    assert cos.shape == (B, T, 1, D // 2)
    y = apply_rope(x, cos, sin, style)
    ref = complex_reference if style == "interleaved" else llama_reference
    torch.testing.assert_close(y.double(), ref(x, positions, 10000.0), rtol=1e-5, atol=1e-5)
    for b in range(B):
        cos_b, sin_b = rope_angles(positions[b], D, 10000.0)
        torch.testing.assert_close(y[b : b + 1], apply_rope(x[b : b + 1], cos_b, sin_b, style), rtol=0, atol=0)
    # Row 1 is at other positions than row 0: same input, different output.
    same = x[:1].expand(B, -1, -1, -1)
    y_same = apply_rope(same, cos, sin, style)
    assert not torch.allclose(y_same[0], y_same[1], atol=1e-3)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_base_changes_result(style: str) -> None:
    x = rand(1, T, H, D, seed=7)
    a = apply_rope(x, *rope_angles(torch.arange(T), D, 10000.0), style)
    b = apply_rope(x, *rope_angles(torch.arange(T), D, 100.0), style)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # position 0 is unrotated for any base
    assert not torch.allclose(a[:, 1:], b[:, 1:], atol=1e-3)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_bf16_input_returns_bf16(style: str) -> None:
    x = rand(B, T, H, D, seed=8).to(torch.bfloat16)
    y = apply_rope(x, *rope_angles(torch.arange(T), D, 10000.0), style)
    assert y.dtype == torch.bfloat16
    ref = complex_reference if style == "interleaved" else llama_reference
    torch.testing.assert_close(y.double(), ref(x.float(), torch.arange(T), 10000.0), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_custom_backward_matches_autograd_of_reference(style: str, per_row: bool) -> None:
    positions = torch.stack((torch.arange(T) + 3, torch.arange(T) * 2)) if per_row else torch.arange(T) + 3
    cos, sin = rope_angles(positions, D, 10000.0)
    x = rand(B, T, H, D, seed=9).requires_grad_(True)
    upstream = rand(B, T, H, D, seed=10)
    y = apply_rope(x, cos, sin, style)
    assert type(y.grad_fn).__name__ == "_RopeBackward"  # the custom autograd.Function is the one under test
    (grad,) = torch.autograd.grad(y, x, upstream)

    x_ref = x.detach().clone().requires_grad_(True)
    if style == "half":
        y_ref = llama_reference(x_ref, positions, 10000.0, dtype=torch.float32)
    else:
        ang = naive_angles(positions, D, 10000.0).float()
        a, b = x_ref[..., 0::2], x_ref[..., 1::2]
        y_ref = torch.stack((a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()), dim=-1).flatten(-2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (grad_ref,) = torch.autograd.grad(y_ref, x_ref, upstream)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_rope_backward_bf16_dtype() -> None:
    cos, sin = rope_angles(torch.arange(T), D, 10000.0)
    x = rand(B, T, H, D, seed=11).to(torch.bfloat16).requires_grad_(True)
    apply_rope(x, cos, sin, "interleaved").float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
