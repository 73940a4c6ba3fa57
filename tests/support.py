"""Shared test helper: a small config that runs in milliseconds on a CPU."""

from __future__ import annotations

from loopformer.config import ModelConfig, RecurrenceConfig


def small_config(**changes: object) -> ModelConfig:
    """A 32-wide model with layers 1/2/1 and a 64-token vocabulary; ``changes`` override fields."""
    base = {
        "vocab_size": 64,
        "dim": 32,
        "n_heads": 4,
        "n_prelude": 1,
        "n_core": 2,
        "n_coda": 1,
        "mlp_hidden": 64,
        "max_seq_len": 256,
        "recurrence": RecurrenceConfig(mean_steps=3, backprop_depth=2),
    }
    base.update(changes)
    return ModelConfig(**base)
