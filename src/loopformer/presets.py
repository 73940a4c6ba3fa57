"""Named model configurations. Presets are data: a name -> ModelConfig table.

Shapes follow ../shared/REFERENCE.md. Where the reference leaves a choice open (ANIMA's vocabulary and
layer split, Parcae's head count and MLP width) the choice is stated next to the preset; the
parameter counts are asserted by tests and listed by ``loopformer presets``.
"""

from __future__ import annotations

import math

from loopformer.config import ModelConfig, RecurrenceConfig, shown
from loopformer.errors import ConfigError


def _anima(
    dim: int, heads: int, loops: int, split: tuple[int, int, int], mlp: int, head_dim: int | None = None
) -> ModelConfig:
    """ANIMA-style edge model: LTI injection, pre-norm, sinusoidal loop index, rank-8 per-loop LoRA, vocab 32768."""
    return ModelConfig(
        vocab_size=32768,
        dim=dim,
        n_heads=heads,
        head_dim=head_dim,
        n_prelude=split[0],
        n_core=split[1],
        n_coda=split[2],
        mlp_hidden=mlp,
        norm_layout="pre",
        injection="lti",
        loop_embedding="sinusoidal",
        lora_rank=8,
        per_loop_slots=loops,
        max_seq_len=2048,
        recurrence=RecurrenceConfig(mean_loops=loops, backprop_loops=max(loops // 2, 1)),
    )


def _parcae(dim: int, layers: int) -> ModelConfig:
    """Parcae: LTI injection, pre-norm, head_dim 64, SwiGLU 8/3 MLP, vocab 32768, 8 loops, per-row Poisson depth."""
    return ModelConfig(
        vocab_size=32768,
        dim=dim,
        n_heads=dim // 64,
        n_prelude=layers,
        n_core=layers,
        n_coda=layers,
        norm_layout="pre",
        injection="lti",
        max_seq_len=2048,
        recurrence=RecurrenceConfig(
            mean_loops=8, sampler="poisson", backprop_loops=math.ceil(8 / 2), per_sequence=True
        ),
    )


def _mythos(dim: int, heads: int, loops: int, split: tuple[int, int, int], vocab: int) -> ModelConfig:
    """OpenMythos-style: an MoE core (1 shared + 8 routed experts, top-2, loop-aware router), Multi-Latent Attention
    (latent dim / 4, shared RoPE key), LTI injection, pre-norm, sinusoidal loop index, rank-4 per-loop LoRA."""
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_heads=heads,
        n_prelude=split[0],
        n_core=split[1],
        n_coda=split[2],
        norm_layout="pre",
        attention="mla",
        injection="lti",
        loop_embedding="sinusoidal",
        lora_rank=4,
        per_loop_slots=loops,
        moe_routed=8,
        moe_shared=1,
        moe_top_k=2,
        max_seq_len=1024,
        recurrence=RecurrenceConfig(mean_loops=loops, backprop_loops=max(loops // 2, 1)),
    )


HUGINN_3_5B = ModelConfig(
    vocab_size=65536,
    dim=5280,
    n_heads=55,
    n_prelude=2,
    n_core=4,
    n_coda=2,
    mlp_hidden=17920,
    norm_eps=1e-6,
    norm_layout="sandwich",
    rope_style="interleaved",
    rope_base=50000.0,
    rope_precision="fp32",  # Huginn-0125's own table
    qk_bias=True,
    max_seq_len=4096,
    tie_embeddings=True,
    embed_scale=True,
    injection="concat",
    state_init="like-init",
    recurrence=RecurrenceConfig(mean_loops=32, sampler="lognormal-poisson", backprop_loops=8),
)

PRESETS: dict[str, ModelConfig] = {
    # Tests and examples: byte vocabulary, 64 wide, layers 1/2/1, 4 loops.
    "tiny": ModelConfig(
        vocab_size=256,
        dim=64,
        n_heads=4,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        max_seq_len=1024,
        recurrence=RecurrenceConfig(mean_loops=4, backprop_loops=2),
    ),
    "anima-micro": _anima(192, 6, 8, (2, 2, 2), 768),
    "anima-50m": _anima(832, 8, 16, (1, 1, 1), 1920),
    "anima-100m": _anima(1024, 12, 16, (1, 3, 1), 2752, head_dim=80),
    "anima-200m": _anima(1280, 16, 24, (2, 3, 2), 3840),
    "mythos-tiny": _mythos(128, 4, 8, (1, 2, 1), 8192),
    "huginn-3.5b": HUGINN_3_5B,
    "parcae-140m": _parcae(768, 2),
    "parcae-370m": _parcae(1024, 4),
    "parcae-770m": _parcae(1280, 6),
    "parcae-1.3b": _parcae(1536, 8),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    if not isinstance(name, str) or name not in PRESETS:  # a run file's `preset:` may hold any value
        raise ConfigError(f"Unknown preset {shown(name)}; known presets: {', '.join(PRESETS)}.")
    return PRESETS[name]
