"""Layer: the sandwich and pre norm layouts composed from attention, MLP and naive RMSNorms."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.config import ModelConfig
from loopformer.nn.attention import AttentionContext
from loopformer.nn.layer import Layer

B, T = 2, 5


def make_config(**changes: object) -> ModelConfig:
    base: dict[str, object] = {"vocab_size": 32, "dim": 16, "n_heads": 2, "mlp_hidden": 24, "max_seq_len": 64}
    base.update(changes)
    return ModelConfig(**base)


def make_layer(config: ModelConfig, seed: int = 0, lora_rank: int = 0, lora_slots: int = 0) -> Layer:
    g = torch.Generator().manual_seed(seed)
    layer = Layer(config, lora_rank, lora_slots)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight") or name.startswith("norm_"):
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return layer


def rms(x: torch.Tensor, norm: torch.nn.Module, eps: float) -> torch.Tensor:
    w = norm.weight.detach()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def layer_ref(layer: Layer, config: ModelConfig, x: torch.Tensor, ctx: AttentionContext, slot=None) -> torch.Tensor:
    eps = config.norm_eps
    if config.norm_layout == "sandwich":
        x = rms(x + layer.attn(rms(x, layer.norm_1, eps), ctx, slot), layer.norm_2, eps)
        return rms(x + layer.mlp(rms(x, layer.norm_3, eps), slot), layer.norm_4, eps)
    x = x + layer.attn(rms(x, layer.norm_1, eps), ctx, slot)
    return x + layer.mlp(rms(x, layer.norm_3, eps), slot)


@pytest.mark.parametrize("layout", ["sandwich", "pre"])
@pytest.mark.parametrize("slot", [None, 1])
def test_layer_matches_layout_formula(layout: str, slot: int | None) -> None:
    config = make_config(norm_layout=layout)
    layer = make_layer(config, lora_rank=2, lora_slots=2)
    x = torch.randn(B, T, config.dim, generator=torch.Generator().manual_seed(1)) * 2
    ctx = AttentionContext.for_sequence(config, T, x.device)
    with torch.no_grad():
        y = layer(x, ctx, slot)
        expected = layer_ref(layer, config, x, ctx, slot)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_layer_layouts_have_the_right_norms_and_differ() -> None:
    sandwich, pre = make_config(norm_layout="sandwich"), make_config(norm_layout="pre")
    ls, lp = make_layer(sandwich), Layer(pre)
    assert ls.norm_2 is not None and ls.norm_4 is not None
    assert lp.norm_2 is None and lp.norm_4 is None
    # Same shared weights in both layouts: the outputs must differ (the sandwich renormalises).
    lp.load_state_dict({k: v for k, v in ls.state_dict().items() if not k.startswith(("norm_2", "norm_4"))})
    x = torch.randn(B, T, 16, generator=torch.Generator().manual_seed(2)) * 3
    ctx = AttentionContext.for_sequence(sandwich, T, x.device)
    with torch.no_grad():
        ys, yp = ls(x, ctx), lp(x, ctx)
    assert not torch.allclose(ys, yp, atol=1e-3)
    # A sandwich layer's output is RMS-normalised by norm_4: rms(y / w4) == 1.
    unscaled = ys / ls.norm_4.weight.detach()
    torch.testing.assert_close(unscaled.pow(2).mean(-1).sqrt(), torch.ones(B, T), rtol=1e-4, atol=1e-4)


def test_layer_pre_residual_passes_input_through() -> None:
    """With zero output projections, the pre layout is exactly the identity (pure residual)."""
    config = make_config(norm_layout="pre")
    layer = make_layer(config, seed=3)
    with torch.no_grad():
        layer.attn.out.weight.zero_()
        layer.mlp.proj.weight.zero_()
    x = torch.randn(B, T, config.dim, generator=torch.Generator().manual_seed(4))
    ctx = AttentionContext.for_sequence(config, T, x.device)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, ctx), x, rtol=0, atol=0)
