"""Analytic FLOP counts (multiply-add = 2 FLOPs) for model FLOP utilisation reports.

Training cost per token = 3 x forward for everything that carries gradient (prelude, coda, head, the
injection's input term, the last k core iterations) + 1 x forward for the r - k no-grad iterations.
Attention scores and values cost 4 * n_heads * head_dim * context FLOPs per token and layer (MLA: plus
2 * n_heads * mla_rope_dim for the RoPE part of the scores, counted on the naive path the training forward
takes), with the mean causal context (T + 1) / 2, or the window when smaller.
"""

from __future__ import annotations

from loopformer.config import ModelConfig


def _mean_context(config: ModelConfig, seq_len: int) -> float:
    full = (seq_len + 1) / 2
    window = config.sliding_window
    if window is None or window >= seq_len:
        return full
    # positions < W see i + 1 tokens, the rest see W.
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_linears(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) features of the projections of one attention layer (MHA / GQA, or MLA)."""
    q_width = config.n_heads * config.head_dim
    if config.attention == "mla":
        query_width = config.n_heads * (config.head_dim + config.mla_rope_dim)
        rank = config.mla_q_rank
        query = [(config.dim, rank), (rank, query_width)] if rank else [(config.dim, query_width)]
        latent = [(config.dim, config.mla_kv_rank + config.mla_rope_dim), (config.mla_kv_rank, 2 * q_width)]
        return [*query, *latent, (q_width, config.dim)]
    kv_width = config.n_kv_heads * config.head_dim
    return [(config.dim, q_width + 2 * kv_width), (q_width, config.dim)]


def layer_flops(config: ModelConfig, seq_len: int, lora: bool = False, moe: bool = False) -> float:
    """Forward FLOPs per token of one transformer layer (``moe``: the active experts and the router)."""
    hidden = (config.moe_shared + config.moe_top_k) * config.moe_hidden if moe else config.mlp_hidden
    attention = attention_linears(config)
    linears = [*attention, (config.dim, 2 * hidden), (hidden, config.dim)]
    flops = sum(2 * i * o for i, o in linears) + (2 * config.dim * config.moe_routed if moe else 0)
    if lora and config.lora_rank:
        adapted = attention if moe else linears  # experts carry no LoRA adapters
        flops += sum(2 * config.lora_rank * (i + o) for i, o in adapted)
    rope = config.mla_rope_dim if config.attention == "mla" else 0
    return flops + 2 * config.n_heads * (2 * config.head_dim + rope) * _mean_context(config, seq_len)


def core_step_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one core iteration (injection state term + core layers + ACT halting head)."""
    injection = 2 * config.dim * config.dim if config.injection == "concat" else 0
    halting = 0
    if config.halting == "act":  # the head's dot product, and with the change input two vector norms
        halting = (6 if config.halting_input == "state+change" else 2) * config.dim
    return injection + halting + config.n_core * layer_flops(config, seq_len, lora=True, moe=config.moe_routed > 0)


def once_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token outside the loop: prelude, injection input term, coda, head."""
    injection = 2 * config.dim * config.dim if config.injection in ("concat", "lti") else 0
    head = 2 * config.dim * config.vocab_size
    memory = 4 * config.dim * config.dim if config.memory_dim else 0  # the read's query and output projections
    return (config.n_prelude + config.n_coda) * layer_flops(config, seq_len) + injection + head + memory


def forward_flops_per_token(config: ModelConfig, steps: int, seq_len: int) -> float:
    return once_flops(config, seq_len) + steps * core_step_flops(config, seq_len)


def training_flops_per_token(config: ModelConfig, steps: int, backprop_loops: int, seq_len: int) -> float:
    """Forward + backward FLOPs per token at ``steps`` iterations, the last ``backprop_loops`` with grad."""
    grad_steps = min(steps, backprop_loops)
    core = core_step_flops(config, seq_len)
    return 3 * once_flops(config, seq_len) + (steps - grad_steps) * core + 3 * grad_steps * core
