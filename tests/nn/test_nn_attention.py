"""Attention against a naive per-head reference: MHA, GQA, q/k bias, QK-norm, RoPE styles, sliding window."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.config import ModelConfig
from loopformer.nn.attention import Attention, AttentionContext, causal_mask

B, T = 2, 7


def make_config(**changes: object) -> ModelConfig:
    base: dict[str, object] = {"vocab_size": 32, "dim": 32, "n_heads": 4, "max_seq_len": 64}
    base.update(changes)
    return ModelConfig(**base)


def make_attention(config: ModelConfig, seed: int = 0, lora_rank: int = 0, lora_slots: int = 0) -> Attention:
    """An Attention with every parameter drawn at random (biases and norm weights nonzero / not one)."""
    gen = torch.Generator().manual_seed(seed)
    attn = Attention(config, lora_rank, lora_slots)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return attn


def naive_rope(x: torch.Tensor, pos: torch.Tensor, base: float, style: str) -> torch.Tensor:
    """x [T, hd] float64 at positions pos [T]; pairs (2i, 2i+1) or (i, i + hd/2) rotated by pos * base^(-2i/hd)."""
    hd = x.shape[-1]
    out = x.clone()
    for i in range(hd // 2):
        theta = pos.double() * base ** (-2 * i / hd)
        c, s = torch.cos(theta), torch.sin(theta)
        a_idx, b_idx = (2 * i, 2 * i + 1) if style == "interleaved" else (i, i + hd // 2)
        a, b = x[:, a_idx], x[:, b_idx]
        out[:, a_idx] = a * c - b * s
        out[:, b_idx] = a * s + b * c
    return out


def naive_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def naive_attention(attn: Attention, config: ModelConfig, x: torch.Tensor, positions=None) -> torch.Tensor:
    """Explicit float64 reference: one (batch, head) at a time."""
    nh, nkv, hd = config.n_heads, config.n_kv_heads, config.head_dim
    group = nh // nkv
    xd = x.double()
    w = attn.qkv.weight.detach().double()
    wq, wk, wv = w[: nh * hd], w[nh * hd : (nh + nkv) * hd], w[(nh + nkv) * hd :]
    assert wv.shape[0] == nkv * hd
    w_out = attn.out.weight.detach().double()
    seq = x.shape[1]
    pos = torch.arange(seq) if positions is None else positions
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    allowed = j <= i
    if config.sliding_window is not None:
        allowed = allowed & (i - j < config.sliding_window)
    out = torch.zeros(x.shape[0], seq, nh * hd, dtype=torch.float64)
    for b in range(x.shape[0]):
        for h in range(nh):
            kv = h // group  # kv head j serves query heads j*g .. (j+1)*g - 1
            q = xd[b] @ wq[h * hd : (h + 1) * hd].T
            k = xd[b] @ wk[kv * hd : (kv + 1) * hd].T
            v = xd[b] @ wv[kv * hd : (kv + 1) * hd].T
            if config.qk_bias:
                q = q + attn.q_bias[h].detach().double()
                k = k + attn.k_bias[kv].detach().double()
            if config.qk_norm:
                q = naive_rms(q, attn.q_norm.weight.detach().double(), config.norm_eps)
                k = naive_rms(k, attn.k_norm.weight.detach().double(), config.norm_eps)
            q = naive_rope(q, pos, config.rope_base, config.rope_style)
            k = naive_rope(k, pos, config.rope_base, config.rope_style)
            scores = (q @ k.T) / math.sqrt(hd)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, :, h * hd : (h + 1) * hd] = torch.softmax(scores, dim=-1) @ v
    return out @ w_out.T


def run(attn: Attention, config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    ctx = AttentionContext.for_sequence(config, x.shape[1], x.device)
    with torch.no_grad():
        return attn(x, ctx)


def rand_x(config: ModelConfig, seed: int = 1, seq: int = T) -> torch.Tensor:
    return torch.randn(B, seq, config.dim, generator=torch.Generator().manual_seed(seed))


CASES = {
    "mha": {},
    "mha-interleaved": {"rope_style": "interleaved"},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "qk-bias": {"qk_bias": True},
    "qk-norm": {"qk_norm": True},
    "bias-norm-gqa": {"qk_bias": True, "qk_norm": True, "n_kv_heads": 2},
    "window": {"sliding_window": 3},
    "window-gqa-interleaved": {"sliding_window": 2, "n_kv_heads": 2, "rope_style": "interleaved"},
    "head-dim": {"head_dim": 4, "n_kv_heads": 2},
    "rope-base": {"rope_base": 30.0},
}


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_attention_matches_naive_reference(changes: dict[str, object]) -> None:
    config = make_config(**changes)
    attn = make_attention(config)
    x = rand_x(config)
    y = run(attn, config, x)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), naive_attention(attn, config, x), rtol=1e-4, atol=1e-5)


def test_attention_gqa_head_grouping_is_contiguous() -> None:
    """Sanity check of the reference itself: an interleaved (h % n_kv) grouping gives another answer."""
    config = make_config(n_kv_heads=2)
    attn = make_attention(config, seed=3)
    x = rand_x(config, seed=4)
    y = run(attn, config, x).double()
    # Permute the kv heads: swapping kv head 0 and 1 must change the output if the grouping matters.
    hd, nh = config.head_dim, config.n_heads
    with torch.no_grad():
        w = attn.qkv.weight
        k0 = w[nh * hd : nh * hd + hd].clone()
        w[nh * hd : nh * hd + hd] = w[nh * hd + hd : nh * hd + 2 * hd]
        w[nh * hd + hd : nh * hd + 2 * hd] = k0
    y_swapped = run(attn, config, x).double()
    assert not torch.allclose(y, y_swapped, atol=1e-4)
    torch.testing.assert_close(y_swapped, naive_attention(attn, config, x), rtol=1e-4, atol=1e-5)


def test_attention_qk_bias_is_used() -> None:
    config = make_config(qk_bias=True)
    attn = make_attention(config, seed=5)
    x = rand_x(config)
    y = run(attn, config, x)
    with torch.no_grad():
        attn.q_bias.zero_()
        attn.k_bias.zero_()
    assert not torch.allclose(y, run(attn, config, x), atol=1e-4)
    assert attn.q_bias.shape == (config.n_heads, config.head_dim)


def test_attention_without_bias_or_norm_has_no_such_parameters() -> None:
    attn = Attention(make_config())
    assert attn.q_bias is None and attn.k_bias is None
    assert attn.q_norm is None and attn.k_norm is None
    names = {n for n, _ in attn.named_parameters()}
    assert names == {"qkv.weight", "out.weight"}


@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 2, "qk_norm": True}, {"sliding_window": 3}])
def test_attention_is_causal(changes: dict[str, object]) -> None:
    config = make_config(**changes)
    attn = make_attention(config, seed=6)
    x = rand_x(config, seed=7)
    y = run(attn, config, x)
    for t in (2, T - 1):
        x2 = x.clone()
        x2[:, t] = torch.randn(B, config.dim, generator=torch.Generator().manual_seed(t))
        y2 = run(attn, config, x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(y2[:, t], y[:, t], atol=1e-4)


def test_attention_sliding_window_sees_exactly_last_w_positions() -> None:
    window = 3
    config = make_config(sliding_window=window)
    attn = make_attention(config, seed=8)
    x = rand_x(config, seed=9)
    y = run(attn, config, x)
    target = T - 1
    # Position target - W is outside the window: changing it leaves the output at `target` unchanged.
    x_out = x.clone()
    x_out[:, target - window] += 3.0
    torch.testing.assert_close(run(attn, config, x_out)[:, target], y[:, target], rtol=1e-6, atol=1e-6)
    # Position target - W + 1 is inside it.
    x_in = x.clone()
    x_in[:, target - window + 1] += 3.0
    assert not torch.allclose(run(attn, config, x_in)[:, target], y[:, target], atol=1e-4)
    # Without the window, the far token matters.
    full = make_config()
    attn_full = make_attention(full, seed=8)
    assert not torch.allclose(run(attn_full, full, x_out)[:, target], run(attn_full, full, x)[:, target], atol=1e-4)


def test_attention_window_at_least_seq_len_equals_full_causal() -> None:
    base = make_config()
    windowed = make_config(sliding_window=T)
    attn = make_attention(base, seed=10)
    x = rand_x(base, seed=11)
    torch.testing.assert_close(run(attn, windowed, x), run(attn, base, x), rtol=0, atol=0)


def test_attention_context_positions_per_row() -> None:
    config = make_config(n_kv_heads=2)
    attn = make_attention(config, seed=12)
    x = rand_x(config, seed=13)
    positions = torch.stack((torch.arange(T) + 5, torch.arange(T) + 11))
    ctx = AttentionContext.for_sequence(config, T, x.device, positions)
    with torch.no_grad():
        y = attn(x, ctx)
    for b in range(B):
        ref = naive_attention(attn, config, x[b : b + 1], positions[b])
        torch.testing.assert_close(y[b : b + 1].double(), ref, rtol=1e-4, atol=1e-5)


def test_attention_lora_slot_changes_output() -> None:
    config = make_config()
    attn = make_attention(config, seed=14, lora_rank=2, lora_slots=3)
    x = rand_x(config)
    ctx = AttentionContext.for_sequence(config, T, x.device)
    with torch.no_grad():
        base = attn(x, ctx)
        torch.testing.assert_close(attn(x, ctx, None), naive_attention(attn, config, x).float(), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(attn(x, ctx, 1), base, atol=1e-4)


@pytest.mark.parametrize("seq", [1, 4, 9])
def test_causal_mask(seq: int) -> None:
    device = torch.device("cpu")
    assert causal_mask(seq, None, device) is None
    assert causal_mask(seq, seq, device) is None
    assert causal_mask(seq, seq + 5, device) is None
    for window in range(1, seq):
        mask = causal_mask(seq, window, device)
        assert mask is not None and mask.dtype == torch.bool and mask.shape == (seq, seq)
        expected = torch.tensor([[i - window + 1 <= j <= i for j in range(seq)] for i in range(seq)])
        assert torch.equal(mask, expected)


def test_context_for_sequence_fields() -> None:
    config = make_config(sliding_window=2)
    ctx = AttentionContext.for_sequence(config, 5, torch.device("cpu"))
    assert ctx.cos.shape == ctx.sin.shape == (1, 5, 1, config.head_dim // 2)
    assert ctx.mask is not None and ctx.mask.shape == (5, 5)
    assert AttentionContext.for_sequence(make_config(), 5, torch.device("cpu")).mask is None
