"""QuantizedWeight: the integer kernels against the dequantized weight, lookups, experts, and whole models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.model import build_model
from loopformer.nn.linear import LoopLinear
from loopformer.quant import QuantizedWeight, QuantScheme, is_quantized, quantize, quantize_model
from support import small_config

GEN = torch.Generator().manual_seed(5)
SCHEMES = [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64)]


def weight(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * 0.05


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(64, 64), (270, 100), (40, 688)])  # N % 16 != 0 and K % group != 0 included
def test_kernel_product_matches_the_dequantized_weight(scheme: QuantScheme, shape: tuple[int, int]) -> None:
    data = quantize(weight(*shape), scheme)
    w = QuantizedWeight(data)
    x = torch.randn(3, 5, shape[1], generator=GEN)
    y = F.linear(x, w)
    # the kernel multiplies bf16-rounded activations with the stored integers and rounds its output to bf16
    reference = F.linear(x.bfloat16().float(), data.dequantize())
    assert y.shape == (3, 5, shape[0]) and y.dtype == torch.float32
    assert relative(y, reference) < 4e-3
    bias = torch.randn(shape[0], generator=GEN)
    torch.testing.assert_close(F.linear(x, w, bias), y + bias)
    torch.testing.assert_close(F.linear(x, weight=w), y)


@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_linear_runs_the_integer_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    name = "_weight_int8pack_mm" if kernel == "int8" else "_weight_int4pack_mm_for_cpu"
    calls = []
    real = getattr(torch, name)
    monkeypatch.setattr(torch, name, lambda *args: calls.append(args[1].dtype) or real(*args))
    w = QuantizedWeight(quantize(weight(32, 64), QuantScheme(8) if kernel == "int8" else QuantScheme(4, 32)))
    F.linear(torch.randn(2, 64), w)
    assert calls == [torch.int8 if kernel == "int8" else torch.uint8]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_embedding_lookup_dequantizes_the_rows(scheme: QuantScheme) -> None:
    data = quantize(weight(50, 40), scheme)
    table = torch.nn.Embedding(50, 40)
    del table.weight
    table.register_buffer("weight", QuantizedWeight(data))
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(table(ids), data.dequantize()[ids])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_expert_of_a_stack_is_its_own_quantized_weight(scheme: QuantScheme) -> None:
    stack = QuantizedWeight(quantize(weight(3, 48, 64), scheme))
    full = stack.dequantize()
    for e in range(3):
        expert = stack[e]
        assert isinstance(expert, QuantizedWeight) and expert.shape == (48, 64)
        assert torch.equal(expert.dequantize(), full[e])


def test_other_operations_see_the_dequantized_tensor() -> None:
    data = quantize(weight(16, 32), QuantScheme(8))
    w = QuantizedWeight(data)
    assert w.shape == (16, 32) and w.dtype == torch.float32 and w.device.type == "cpu" and w.numel() == 512
    full = data.dequantize()
    for result, expected in [
        (w.double(), full.double()),
        (w.sum(), full.sum()),
        (w[2:4], full[2:4]),
        (w.detach(), full),
    ]:
        assert type(result) is torch.Tensor
        torch.testing.assert_close(result, expected)
    assert "int8" in repr(w)
    assert w.to("cpu") is w
    half = w.to(torch.bfloat16)
    assert isinstance(half, QuantizedWeight) and half.dtype == torch.bfloat16
    assert F.linear(torch.randn(2, 32, dtype=torch.bfloat16), half).dtype == torch.bfloat16


MOE = small_config(
    injection="lti", lora_rank=2, per_loop_slots=2, moe_routed=4, moe_top_k=2, halting="act", state_init="zero"
)


def kept_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_quantize_model_picks_projections_and_experts_and_keeps_the_rest() -> None:
    model = build_model(MOE, seed=0)
    before = kept_tensors(model)
    names = quantize_model(model, QuantScheme(8))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, LoopLinear) and "router" not in n}
    experts = {f"core.{i}.mlp.{part}" for i in range(MOE.n_core) for part in ("fc", "proj")}
    assert set(names) == linears | experts | {"tok_emb.weight"}
    assert is_quantized(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before) - set(names)
    for kept in ("injection.log_a", "injection.dt_bias", "halting.weight", "core.0.mlp.router.weight"):
        assert torch.equal(after[kept], before[kept])
    assert any(".lora_a" in name for name in after) and any("norm" in name for name in after)
    for name in names:
        assert isinstance(model.get_buffer(name), QuantizedWeight)


def test_adapters_are_quantized_on_request_and_still_used() -> None:
    """Nonzero adapters: quantizing them keeps the output close; they are then per-slot quantized stacks."""
    config = small_config(lora_rank=4, per_loop_slots=3, state_init="zero")
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=GEN)

    def with_adapters() -> torch.nn.Module:
        model = build_model(config, seed=0).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoopLinear) and module.lora_b is not None:
                    module.lora_b.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
        return model

    reference = logits(with_adapters(), ids, steps=3)
    without = build_model(config, seed=0).eval()
    assert relative(logits(without, ids, steps=3), reference) > 0.05  # the adapters matter
    model = with_adapters()
    names = quantize_model(model, QuantScheme(8, adapters=True))
    assert "core.0.mlp.fc.lora_a" in names and "core.1.attn.out.lora_b" in names
    assert isinstance(model.core[0].mlp.fc.lora_b[2], QuantizedWeight)
    assert relative(logits(model, ids, steps=3), reference) < 0.03


def logits(model: torch.nn.Module, ids: torch.Tensor, steps: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, loops=steps, seed=0).logits


@pytest.mark.parametrize("config", [small_config(), MOE], ids=["dense", "moe-lora-lti-act"])
def test_quantized_model_output_is_close_to_fp32(config) -> None:
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=GEN)
    reference = logits(build_model(config, seed=0).eval(), ids)
    errors = {}
    for scheme in (QuantScheme(8), QuantScheme(4, 32)):
        model = build_model(config, seed=0).eval()
        quantize_model(model, scheme)
        errors[scheme.bits] = relative(logits(model, ids), reference)
    assert errors[8] < 0.03, errors
    assert errors[4] < 0.3, errors
    assert errors[8] < errors[4]


def test_engine_decoding_of_a_quantized_model_matches_its_forward() -> None:
    """Token-by-token scoring (cached decode on the integer kernels) equals the full forward of the same model."""
    config = small_config(state_init="zero")
    model = build_model(config, seed=0).eval()
    quantize_model(model, QuantScheme(4, 32))
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=GEN)
    log_probs, _, _ = Engine(model).score(ids, GenerationConfig(loops=3))
    direct = torch.log_softmax(logits(model, ids, steps=3)[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(log_probs, direct, atol=1e-4, rtol=0)
