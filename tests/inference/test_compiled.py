"""Compiled decoding (``GenerationConfig(compile=True)``) against the eager engine, and what it refuses."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loopformer.errors import InputError
from loopformer.inference.compiled import CompiledDecoder, history_width
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.passes import PassRunner
from loopformer.model import build_model
from loopformer.quant import QuantScheme
from loopformer.quant.model import quantize_model
from support import needs_compiler, small_config

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 8, 7]]  # left-padded to a common width


def _compare(engine: Engine, config: GenerationConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring and padded batched generation give the eager results with compile=True (and really ran compiled)."""
    counts = {"single-token passes": 0, "compiled passes": 0}
    run_pass, run_compiled = PassRunner.run, CompiledDecoder.run

    def counted_pass(self: PassRunner, cache, rows, ids: torch.Tensor, *args: object, **kwargs: object):
        counts["single-token passes"] += ids.shape[1] == 1 and self is engine.passes
        return run_pass(self, cache, rows, ids, *args, **kwargs)

    def counted_compiled(self: CompiledDecoder, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        counts["compiled passes"] += 1
        return run_compiled(self, *args)

    monkeypatch.setattr(PassRunner, "run", counted_pass)
    monkeypatch.setattr(CompiledDecoder, "run", counted_compiled)
    ids = torch.randint(0, engine.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    eager_scores = engine.score(ids, config)
    eager = engine.generate(PROMPTS, config)
    counts["single-token passes"] = 0
    compiled_scores = engine.score(ids, replace(config, compile=True))
    torch.testing.assert_close(compiled_scores.log_probs, eager_scores.log_probs, atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled_scores.predictions, eager_scores.predictions)
    compiled = engine.generate(PROMPTS, replace(config, compile=True))
    assert [o.tokens for o in compiled.outputs] == [o.tokens for o in eager.outputs]
    assert [o.loops for o in compiled.outputs] == [o.loops for o in eager.outputs]
    assert counts["compiled passes"] == counts["single-token passes"] > 0  # every decoding pass ran compiled


@needs_compiler
def test_compiled_decoding_equals_eager_on_padded_windowed_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """GQA with a sliding window shorter than the sequences (the mask matters), a ring policy, two rows of different
    lengths: logits match to 1e-4 and greedy tokens are identical. The compile notice hears of each new shape once,
    before and after it compiled, and not again at a shape already compiled."""
    model = build_model(small_config(n_kv_heads=2, sliding_window=8), seed=0)
    config = GenerationConfig(max_new_tokens=24, loops=3, kv="ring:2", stop_tokens=())
    notices: list[tuple[str, float | None]] = []
    engine = Engine(model, compile_notice=lambda shape, seconds: notices.append((shape, seconds)))
    _compare(engine, config, monkeypatch)
    shapes = [shape for shape, _ in notices[::2]]
    assert shapes and len(set(shapes)) == len(shapes) and all(s.startswith("loops 3, history ") for s in shapes)
    assert all(s.endswith(", batch 2+, kv ring:2") for s in shapes)
    assert [shape for shape, _ in notices[1::2]] == shapes
    assert all(seconds is None for _, seconds in notices[::2]) and all(s > 0 for _, s in notices[1::2])
    seen = len(notices)
    engine.generate(PROMPTS, replace(config, compile=True))
    assert len(notices) == seen


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("kv", ["full", "ring:2", "last"])
@pytest.mark.parametrize(
    "changes",
    [{}, {"attention": "mla", "mla_kv_rank": 16, "mla_q_rank": 16, "mla_rope_dim": 8}, {"injection": "lti"}],
    ids=["mha", "mla", "lti"],
)
def test_compiled_decoding_equals_eager_across_variants(
    kv: str, changes: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(build_model(small_config(**changes), seed=0))
    for warm_start in (False, True):
        config = GenerationConfig(max_new_tokens=12, loops=4, kv=kv, warm_start=warm_start, stop_tokens=())
        _compare(engine, config, monkeypatch)


@pytest.mark.slow
@needs_compiler
def test_speculative_decoding_with_compiled_drafts_equals_plain_greedy() -> None:
    engine = Engine(build_model(small_config(), seed=0))
    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=12, loops=4, stop_tokens=()))
    config = GenerationConfig(max_new_tokens=12, loops=4, stop_tokens=(), speculative=(2, 3), compile=True)
    speculative = engine.generate(PROMPTS, config)
    assert [o.tokens for o in speculative.outputs] == [o.tokens for o in plain.outputs]


def test_history_width_is_a_power_of_two_of_at_least_64() -> None:
    assert [history_width(n) for n in (1, 63, 64, 65, 128, 129, 1000)] == [64, 64, 64, 128, 128, 256, 1024]


def _perturbed(changes: dict) -> Engine:
    """An engine over a small model with ``changes`` whose zero-initialised per-loop parameters (LoRA B, router loop
    biases) are made non-zero, so that picking the wrong slot would change the result."""
    model = build_model(small_config(**changes), seed=0)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("lora_b", "loop_bias")):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return Engine(model)


PER_LOOP = {"lora_rank": 2, "per_loop_slots": 2, "moe_routed": 4, "moe_top_k": 2, "moe_hidden": 32}


@needs_compiler
def test_compiled_decoding_equals_eager_with_per_loop_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA adapters, a learned loop embedding and MoE router biases, selected inside the graph by the iteration index
    it carries; four loops over two slots with the "off" policy, so iterations 3 and 4 run without per-loop terms."""
    engine = _perturbed({**PER_LOOP, "loop_embedding": "learned", "loop_overflow": "off"})
    _compare(engine, GenerationConfig(max_new_tokens=10, loops=4, stop_tokens=()), monkeypatch)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("overflow", ["reuse-last", "cycle"])
@pytest.mark.parametrize("embedding", ["sinusoidal", "learned"])
def test_compiled_decoding_equals_eager_across_overflow_policies(
    overflow: str, embedding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _perturbed({**PER_LOOP, "loop_embedding": embedding, "loop_overflow": overflow})
    for kv in ("full", "ring:2"):
        _compare(engine, GenerationConfig(max_new_tokens=8, loops=5, kv=kv, stop_tokens=()), monkeypatch)


def test_act_models_are_refused() -> None:
    engine = Engine(build_model(small_config(halting="act"), seed=0))
    with pytest.raises(InputError, match="ACT"):
        engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=2, loops=2, compile=True))


# compiled int8 decoding against eager: tests/quant/test_kernel_shapes.py (in a child process)


def test_int4_models_are_refused() -> None:
    model = build_model(small_config(), seed=0)
    quantize_model(model, QuantScheme(4, 32))
    with pytest.raises(InputError, match="int4"):
        Engine(model).generate([[1, 2]], GenerationConfig(max_new_tokens=2, compile=True))


def test_compile_refuses_exits() -> None:
    with pytest.raises(InputError, match="exit rule"):
        GenerationConfig(exit="kl:1e-3", compile=True)


@needs_compiler
def test_compiled_decoding_reads_memory_vectors_like_eager() -> None:
    """Per-row memory vectors (with a mask) reach the compiled prelude: tokens identical, log-probs within 1e-4."""
    model = build_model(small_config(memory_dim=8), seed=0)
    with torch.no_grad():
        model.memory.out.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    engine = Engine(model)
    memory = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    config = GenerationConfig(loops=3, stop_tokens=())
    eager = engine.score(ids, config, memory=memory, memory_mask=mask)
    compiled = engine.score(ids, replace(config, compile=True), memory=memory, memory_mask=mask)
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled.predictions, eager.predictions)
    blank = engine.score(ids, replace(config, compile=True))
    assert not torch.allclose(blank.log_probs, compiled.log_probs, atol=1e-3)  # the memory did change the result
