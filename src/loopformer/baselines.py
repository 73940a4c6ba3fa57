"""Fixed-depth baselines derived from a looped config; they are ordinary LoopLM configs run at r = 1,
so they train and evaluate through exactly the same code as the looped model.

* ``param-matched``: the same layers run once (same parameters, a third of the compute or less).
  Every parameter of the looped model exists, so the counts are identical.
* ``compute-matched``: an untied stack of ``n_prelude + n_core * r + n_coda`` layers run once, i.e. the
  looped model unrolled at r iterations with separate weights per iteration. Per-loop signals (LoRA,
  loop embedding) are dropped because there is only one iteration; its parameter count is therefore
  ``looped + (r - 1) * core_layer_params - per_loop_params``.

Both use a zero initial state: with one iteration a random state would only add noise.
"""

from __future__ import annotations

from loopformer.config import ModelConfig
from loopformer.errors import ConfigError

BASELINES = ("param-matched", "compute-matched")


def _single_pass(config: ModelConfig, **changes: object) -> ModelConfig:
    return config.replace(
        state_init="zero",
        recurrence={
            "mean_loops": 1,
            "sampler": "fixed",
            "backprop_loops": 1,
            "max_loops": None,
            "per_sequence": False,
        },
        **changes,
    )


def param_matched(config: ModelConfig) -> ModelConfig:
    """Same parameters, one pass through the core."""
    return _single_pass(config, per_loop_slots=config.per_loop_slots)


def compute_matched(config: ModelConfig, steps: int | None = None) -> ModelConfig:
    """Untied stack with the compute of ``steps`` iterations (default: the config's ``mean_loops``)."""
    r = config.recurrence.mean_loops if steps is None else steps
    if r < 1:
        raise ConfigError(f"compute_matched steps={r!r} is invalid: must be >= 1.")
    return _single_pass(config, n_core=config.n_core * r, lora_rank=0, loop_embedding="none", per_loop_slots=1)


def derive_baseline(config: ModelConfig, kind: str, steps: int | None = None) -> ModelConfig:
    """``kind`` is one of :data:`BASELINES`."""
    if kind == "param-matched":
        return param_matched(config)
    if kind == "compute-matched":
        return compute_matched(config, steps)
    raise ConfigError(f"Unknown baseline {kind!r}; allowed values are {', '.join(BASELINES)}.")
