"""Multi-Latent Attention against a float64 per-head reference; absorbed == naive; masks, LoRA, config, FLOPs,
initialisation and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.config import ModelConfig
from loopformer.errors import ConfigError
from loopformer.flops import attention_linears, layer_flops
from loopformer.model import build_model
from loopformer.nn.attention import Attention, AttentionContext
from loopformer.nn.linear import LoopLinear
from loopformer.nn.mla import MLA
from support import small_config

B, T = 2, 7


def make_config(**changes: object) -> ModelConfig:
    base: dict[str, object] = {"vocab_size": 32, "dim": 32, "n_heads": 4, "max_seq_len": 64, "attention": "mla"}
    base.update(changes)
    return ModelConfig(**base)


def make_mla(config: ModelConfig, seed: int = 0, lora_rank: int = 0, lora_slots: int = 0) -> MLA:
    """An MLA with every parameter drawn at random (norm weights not one, LoRA adapters nonzero)."""
    gen = torch.Generator().manual_seed(seed)
    mla = MLA(config, lora_rank, lora_slots)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return mla


def weight(linear: LoopLinear, slot: int | None) -> torch.Tensor:
    """The float64 matrix ``linear`` applies at ``slot`` (``W + B_slot A_slot`` with an adapter)."""
    w = linear.weight.detach().double()
    if slot is not None and linear.lora_a is not None:
        w = w + linear.lora_b[slot].detach().double() @ linear.lora_a[slot].detach().double()
    return w


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.detach().double()


def rope(x: torch.Tensor, pos: torch.Tensor, base: float, style: str) -> torch.Tensor:
    """x [T, d] rotated pair by pair: pair i is (i, i + d/2) (half) or (2i, 2i + 1), angle pos * base^(-2i/d)."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        a, b = (2 * i, 2 * i + 1) if style == "interleaved" else (i, i + d // 2)
        theta = pos.double() * base ** (-2 * i / d)
        out[:, a] = x[:, a] * torch.cos(theta) - x[:, b] * torch.sin(theta)
        out[:, b] = x[:, a] * torch.sin(theta) + x[:, b] * torch.cos(theta)
    return out


def reference(
    mla: MLA, config: ModelConfig, x: torch.Tensor, allowed: torch.Tensor, pos: torch.Tensor, slot: int | None = None
) -> torch.Tensor:
    """MLA written out per (row, head) in float64, straight from the DeepSeek-V2 formulas.

    ``allowed`` [B, T, T] (True = may attend), ``pos`` [B, T] the RoPE positions.
    """
    heads, dh, dr, r = config.n_heads, config.head_dim, config.mla_rope_dim, config.mla_kv_rank
    eps, base, style = config.norm_eps, config.rope_base, config.rope_style
    w_up = weight(mla.kv_up, slot)
    out = torch.zeros(x.shape[0], x.shape[1], heads * dh, dtype=torch.float64)
    for b in range(x.shape[0]):
        xb = x[b].double()
        hq = xb if mla.q_down is None else rms(xb @ weight(mla.q_down, slot).T, mla.q_norm.weight, eps)
        q_all = hq @ weight(mla.query, slot).T
        kv = xb @ weight(mla.kv_down, slot).T
        latent = rms(kv[:, :r], mla.kv_norm.weight, eps)
        rope_key = rope(kv[:, r:], pos[b], base, style)  # one key for every head
        for h in range(heads):
            q = q_all[:, h * (dh + dr) : (h + 1) * (dh + dr)]
            q_c, q_r = q[:, :dh], rope(q[:, dh:], pos[b], base, style)
            k_c = latent @ w_up[h * dh : (h + 1) * dh].T
            v = latent @ w_up[(heads + h) * dh : (heads + h + 1) * dh].T
            scores = (q_c @ k_c.T + q_r @ rope_key.T) / math.sqrt(dh + dr)
            scores = scores.masked_fill(~allowed[b], float("-inf"))
            out[b, :, h * dh : (h + 1) * dh] = torch.softmax(scores, dim=-1) @ v
    return out @ weight(mla.out, slot).T


def causal(seq: int, window: int | None) -> torch.Tensor:
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    allowed = j <= i
    return allowed if window is None else allowed & (i - j < window)


CASES = {
    "full-rank-q": {},
    "low-rank-q": {"mla_q_rank": 12},
    "interleaved": {"rope_style": "interleaved", "mla_rope_dim": 2, "mla_kv_rank": 5},
    "window": {"sliding_window": 3, "mla_kv_rank": 4},
    "head-dim": {"head_dim": 6, "mla_rope_dim": 6, "mla_q_rank": 8, "rope_base": 50.0},
}


@pytest.mark.parametrize("changes", CASES.values(), ids=CASES.keys())
def test_mla_matches_the_float64_reference(changes: dict[str, object]) -> None:
    config = make_config(**changes)
    mla = make_mla(config)
    x = torch.randn(B, T, config.dim, generator=torch.Generator().manual_seed(1))
    ctx = AttentionContext.for_sequence(config, T, x.device)
    with torch.no_grad():
        got = mla(x, ctx)
    allowed = causal(T, config.sliding_window).expand(B, T, T)
    expected = reference(mla, config, x, allowed, torch.arange(T).expand(B, T))
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_mla_with_per_loop_lora_uses_the_slot_adapter() -> None:
    config = make_config(mla_q_rank=8)
    mla = make_mla(config, lora_rank=2, lora_slots=3)
    x = torch.randn(B, T, config.dim, generator=torch.Generator().manual_seed(2))
    ctx = AttentionContext.for_sequence(config, T, x.device)
    allowed, pos = causal(T, None).expand(B, T, T), torch.arange(T).expand(B, T)
    outputs = {}
    with torch.no_grad():
        for slot in (None, 0, 2):
            outputs[slot] = mla(x, ctx, slot)
            torch.testing.assert_close(
                outputs[slot].double(), reference(mla, config, x, allowed, pos, slot), atol=1e-5, rtol=1e-5
            )
    assert (outputs[0] - outputs[2]).abs().max() > 1e-2 and (outputs[None] - outputs[0]).abs().max() > 1e-2


def random_mask(batch: int, seq: int, length: int, seed: int) -> torch.Tensor:
    """[B, 1, T, S] with random holes; query t always sees column S - T + t (its own entry)."""
    mask = torch.rand(batch, 1, seq, length, generator=torch.Generator().manual_seed(seed)) < 0.6
    own = torch.arange(length)[None, :] == (length - seq + torch.arange(seq))[:, None]
    return mask | own


@pytest.mark.parametrize(("seq", "masked"), [(1, False), (1, True), (3, True), (5, False)])
@pytest.mark.parametrize("slot", [None, 1])
def test_absorbed_decode_equals_the_naive_path(seq: int, masked: bool, slot: int | None) -> None:
    config = make_config(mla_q_rank=10, mla_kv_rank=6)
    mla = make_mla(config, lora_rank=3, lora_slots=2)
    gen = torch.Generator().manual_seed(3)
    length, heads = 9, config.n_heads
    q_c = torch.randn(B, seq, heads, config.head_dim, generator=gen)
    q_r = torch.randn(B, seq, heads, config.mla_rope_dim, generator=gen)
    latent = torch.randn(B, 1, length, config.mla_kv_rank, generator=gen)
    rope_key = torch.randn(B, 1, length, config.mla_rope_dim, generator=gen)
    mask = random_mask(B, seq, length, seed=seq) if masked else None
    with torch.no_grad():
        naive = mla.naive(q_c, q_r, latent, rope_key, mask, slot)
        absorbed = mla.absorbed(q_c, q_r, latent, rope_key, mask, slot)
    assert absorbed.shape == naive.shape == (B, seq, heads, config.head_dim)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_document_mask_equals_separate_documents() -> None:
    """A block-diagonal mask with positions restarting per document: each document as if it ran alone."""
    config = make_config(mla_q_rank=8)
    mla = make_mla(config)
    x = torch.randn(1, 7, config.dim, generator=torch.Generator().manual_seed(4))
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    mask = (doc[:, None] == doc[None, :]) & causal(7, None)
    ctx = AttentionContext.for_positions(config, positions, mask[None, None])
    with torch.no_grad():
        packed = mla(x, ctx)
        first = mla(x[:, :3], AttentionContext.for_sequence(config, 3, x.device))
        second = mla(x[:, 3:], AttentionContext.for_sequence(config, 4, x.device))
    torch.testing.assert_close(packed, torch.cat((first, second), dim=1), atol=1e-5, rtol=1e-5)


# ----- config ------------------------------------------------------------------------------------------
def test_config_derives_the_mla_widths() -> None:
    config = small_config(attention="mla")  # dim 32, 4 heads of 8
    assert (config.mla_kv_rank, config.mla_rope_dim, config.mla_q_rank) == (8, 4, 0)
    assert config.rope_dim == 4 and small_config().rope_dim == config.head_dim
    wider = config.replace(dim=64)
    assert (wider.mla_kv_rank, wider.mla_rope_dim) == (16, 8)  # derived again from the new width
    kept = small_config(attention="mla", mla_kv_rank=5, mla_rope_dim=2).replace(dim=64)
    assert (kept.mla_kv_rank, kept.mla_rope_dim) == (5, 2)
    assert ModelConfig.from_json(config.to_json()) == config
    assert "MLA" in config.attention_kind


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"attention": "gqa"}, "attention='gqa' is invalid: allowed values are 'mha', 'mla'"),
        ({"mla_kv_rank": 0}, "mla_kv_rank=0 is invalid: must be >= 1"),
        ({"mla_q_rank": -1}, "mla_q_rank=-1 is invalid: must be >= 0"),
        ({"mla_rope_dim": 3}, "mla_rope_dim=3 is invalid: must be a positive even number"),
        ({"mla_rope_dim": 0}, "mla_rope_dim=0 is invalid"),
        ({"mla_kv_rank": 2.5}, "mla_kv_rank=2.5 is invalid"),
        ({"attention": "mla", "qk_norm": True}, "qk_norm=True is invalid: must be False with attention='mla'"),
        ({"attention": "mla", "qk_bias": True}, "qk_bias=True is invalid"),
        ({"attention": "mla", "n_kv_heads": 2}, "n_kv_heads=2 is invalid: must equal n_heads (4)"),
    ],
)
def test_config_rejects_bad_mla_fields(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        small_config(**changes)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ----- model: FLOPs, initialisation, training ----------------------------------------------------------
@pytest.mark.parametrize("changes", [{"attention": "mla"}, {"attention": "mla", "mla_q_rank": 12}, {"n_kv_heads": 2}])
def test_flops_count_the_attention_projections(changes: dict[str, object]) -> None:
    config = small_config(**changes)
    model = build_model(config, seed=0)
    attn = model.core[0].attn
    weights = sum(m.weight.numel() for m in attn.modules() if isinstance(m, LoopLinear))
    assert sum(i * o for i, o in attention_linears(config)) == weights
    dense = small_config(attention="mha")
    mlp = 2 * 3 * config.dim * config.mlp_hidden
    rope = config.mla_rope_dim if config.attention == "mla" else 0
    context = (16 + 1) / 2
    assert layer_flops(config, 16) == 2 * weights + mlp + 2 * config.n_heads * (2 * config.head_dim + rope) * context
    assert layer_flops(dense, 16) == 2 * 4 * 32 * 32 + mlp + 4 * 32 * context


def test_reset_scales_the_output_projection_like_attention() -> None:
    model = build_model(small_config(attention="mla", n_core=3, dim=64), seed=0)
    attn = model.core[0].attn
    assert isinstance(attn, MLA) and all(isinstance(layer.attn, MLA) for layer in model.layers())
    std = model.config.init_std
    for name in ("query", "kv_down", "kv_up"):
        assert getattr(attn, name).weight.std().item() == pytest.approx(std, rel=0.1)
    out_std = std / math.sqrt(2 * model.config.effective_depth())
    assert attn.out.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert not isinstance(attn, Attention)


def test_an_mla_model_with_per_loop_lora_trains() -> None:
    config = small_config(attention="mla", mla_q_rank=12, lora_rank=2)
    model = build_model(config, seed=0).train()
    pattern = torch.tensor([3, 9, 27, 17, 51, 25, 11, 33])
    ids = torch.stack([pattern.roll(s) for s in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        loss = model(ids, loops=3, labels=ids, seed=step).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            attn = model.core[0].attn
            for name, p in attn.named_parameters():
                if not name.endswith("lora_a"):  # A gets gradient once B has moved away from zero
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert model.core[0].attn.kv_up.lora_b.abs().sum() > 0  # the per-loop adapters learned something
