"""Every preset builds (on the meta device for big ones) with its documented parameter count."""

from __future__ import annotations

import pytest
import torch

from loopformer import ConfigError, build_model
from loopformer.presets import PRESETS, get_preset

# Exact counts, documented in docs/architecture.md; a change to a preset must update both.
EXACT_COUNTS = {
    "tiny": 238_656,
    "anima-micro": 10_361_856,
    "anima-50m": 52_236_416,
    "anima-100m": 102_766_592,
    "anima-200m": 205_232_640,
    "mythos-tiny": 2_435_584,
    "huginn-3.5b": 3_564_976_800,
    "parcae-140m": 68_235_264,
    "parcae-370m": 186_413_056,
    "parcae-770m": 398_264_320,
    "parcae-1.3b": 732_248_064,
}
# ANIMA's stated sizes (REFERENCE section 4): ours must lie within 10%.
ANIMA_STATED = {"anima-micro": 10.8e6, "anima-50m": 50e6, "anima-100m": 100e6, "anima-200m": 200e6}


def count(name: str) -> int:
    return build_model(get_preset(name), device="meta").num_parameters()


def test_every_preset_has_a_recorded_count() -> None:
    assert set(PRESETS) == set(EXACT_COUNTS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count(name: str) -> None:
    assert count(name) == EXACT_COUNTS[name]


def test_tiny_is_below_one_million() -> None:
    assert count("tiny") < 1_000_000


@pytest.mark.parametrize("name", sorted(ANIMA_STATED))
def test_anima_presets_within_ten_percent_of_stated_size(name: str) -> None:
    assert abs(count(name) / ANIMA_STATED[name] - 1) < 0.10


def test_huginn_breakdown_matches_reference() -> None:
    model = build_model(get_preset("huginn-3.5b"), device="meta")
    block = sum(p.numel() for p in model.core[0].parameters())
    assert block == 395_398_080
    assert sum(p.numel() for p in model.core.parameters()) == 1_581_592_320
    assert sum(p.numel() for p in model.injection.parameters()) == 55_756_800
    assert model.tok_emb.weight.numel() == 346_030_080


@pytest.mark.parametrize("name", ["tiny", "anima-micro", "mythos-tiny"])
def test_small_presets_run_a_forward_pass(name: str) -> None:
    config = get_preset(name)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randint(0, config.vocab_size, (1, 8)), loops=2, seed=0)
    assert out.logits.shape == (1, 8, config.vocab_size) and torch.isfinite(out.logits).all()


def test_mythos_preset_combines_the_openmythos_features() -> None:
    config = get_preset("mythos-tiny")
    assert config.attention == "mla" and config.moe_routed == 8 and config.moe_top_k == 2 and config.moe_shared == 1
    assert config.injection == "lti" and config.loop_embedding == "sinusoidal" and config.lora_rank == 4
    assert count("mythos-tiny") < 3_000_000  # trainable on a laptop CPU


def test_unknown_preset_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="known presets: tiny, anima-micro"):
        get_preset("gpt-5")
