"""Input injections: concat (one Linear on cat[s, e]), add (norm(s + e)) and Parcae's LTI recurrence."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.config import ModelConfig
from loopformer.nn.injection import INJECTIONS, LTI_DT_INIT, AddInjection, ConcatInjection, LTIInjection

DIM = 16


def make_config(**changes: object) -> ModelConfig:
    base: dict[str, object] = {"vocab_size": 32, "dim": DIM, "n_heads": 2, "max_seq_len": 64}
    base.update(changes)
    return ModelConfig(**base)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def naive_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.double(), w.detach().double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_injection_registry() -> None:
    assert {"concat": ConcatInjection, "add": AddInjection, "lti": LTIInjection} == INJECTIONS


def test_concat_injection_equals_one_linear_on_state_then_input() -> None:
    inj = ConcatInjection(make_config())
    with torch.no_grad():
        inj.state_proj.weight.copy_(randn(DIM, DIM, seed=0) * 0.3)
        inj.input_proj.weight.copy_(randn(DIM, DIM, seed=1) * 0.3)
    s, e = randn(2, 3, DIM, seed=2), randn(2, 3, DIM, seed=3)
    y = inj(s, inj.prepare(e))
    w = torch.cat([inj.state_proj.weight, inj.input_proj.weight], dim=1).detach().double()  # [h, 2h], state first
    assert w.shape == (DIM, 2 * DIM)
    linear = torch.nn.Linear(2 * DIM, DIM, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(w)
        expected = linear(torch.cat([s, e], dim=-1).double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    # The order matters: e first would be a different map.
    with torch.no_grad():
        swapped = linear(torch.cat([e, s], dim=-1).double())
    assert not torch.allclose(y.double(), swapped, atol=1e-3)
    # prepare() depends on e alone and is reused across iterations.
    torch.testing.assert_close(
        inj.prepare(e).double(), e.double() @ inj.input_proj.weight.detach().double().T, rtol=1e-5, atol=1e-5
    )


def test_add_injection_is_norm_of_sum() -> None:
    config = make_config(norm_eps=1e-5)
    inj = AddInjection(config)
    with torch.no_grad():
        inj.norm.weight.copy_(1 + 0.5 * randn(DIM, seed=4))
    s, e = randn(2, 3, DIM, seed=5) * 2, randn(2, 3, DIM, seed=6)
    assert inj.prepare(e) is e
    y = inj(s, inj.prepare(e))
    torch.testing.assert_close(y.double(), naive_rms(s + e, inj.norm.weight, 1e-5), rtol=1e-5, atol=1e-6)


def make_lti(seed: int | None = None, **changes: object) -> LTIInjection:
    inj = LTIInjection(make_config(**changes))
    g = gen(100 if seed is None else seed)
    with torch.no_grad():
        inj.input_proj.weight.copy_(torch.randn(DIM, DIM, generator=g) * 0.3)
        inj.input_norm.weight.copy_(1 + 0.3 * torch.randn(DIM, generator=g))
        if seed is not None:
            inj.log_a.copy_(torch.randn(DIM, generator=g))
            inj.dt_bias.copy_(torch.randn(DIM, generator=g) * 2)
    return inj


def naive_a_bar_delta(inj: LTIInjection) -> tuple[torch.Tensor, torch.Tensor]:
    dt = inj.dt_bias.detach().double()
    delta = torch.log1p(torch.exp(dt))  # softplus
    return torch.exp(-delta * torch.exp(inj.log_a.detach().double())), delta


def test_lti_init_a_bar_and_delta() -> None:
    inj = LTIInjection(make_config())
    assert math.log1p(math.exp(LTI_DT_INIT)) == pytest.approx(math.log(math.sqrt(5)), abs=1e-12)
    a_bar, delta = inj.coefficients()
    assert a_bar.dtype == delta.dtype == torch.float32 and a_bar.shape == delta.shape == (DIM,)
    torch.testing.assert_close(a_bar, torch.full((DIM,), math.sqrt(1 / 5)), rtol=0, atol=1e-6)
    torch.testing.assert_close(delta, torch.full((DIM,), math.log(math.sqrt(5))), rtol=0, atol=1e-6)


def test_lti_a_bar_formula_with_random_params() -> None:
    inj = make_lti(seed=7)
    a_bar, delta = inj.coefficients()
    ref_a, ref_delta = naive_a_bar_delta(inj)
    assert float(ref_a.max()) < 1 - 1e-3  # the random params stay below the clamp
    torch.testing.assert_close(a_bar.double(), ref_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-5, atol=1e-7)
    assert bool(((a_bar > 0) & (a_bar < 1)).all())


@pytest.mark.parametrize(("log_a", "dt_bias"), [(-20.0, LTI_DT_INIT), (0.0, -30.0), (-20.0, -30.0)])
def test_lti_a_bar_stays_below_one_when_it_would_round_to_one(log_a: float, dt_bias: float) -> None:
    inj = make_lti()
    with torch.no_grad():
        inj.log_a.fill_(log_a)
        inj.dt_bias.fill_(dt_bias)
    assert bool((naive_a_bar_delta(inj)[0].float() == 1.0).all())  # unclamped it would be exactly 1
    a_bf16 = inj.coefficients(torch.bfloat16)[0]
    assert bool((a_bf16.to(torch.bfloat16) < 1).all())
    a_fp32 = inj.coefficients(torch.float32)[0]
    assert bool((a_fp32 <= 1 - inj.eps).all())
    assert inj.coefficients()[0].dtype == torch.float32


@pytest.mark.parametrize("log_a", [-4.0, -8.0])
def test_lti_a_bar_near_one_is_exact_below_the_clamp(log_a: float) -> None:
    """Close to 1 but under the fp32 ceiling the formula is untouched; the bf16 ceiling is 1 - 2^-7."""
    inj = make_lti()
    with torch.no_grad():
        inj.log_a.fill_(log_a)
    ref = naive_a_bar_delta(inj)[0]
    assert bool((ref > 0.98).all()) and bool((ref < 1 - inj.eps).all())
    torch.testing.assert_close(inj.coefficients(torch.float32)[0].double(), ref, rtol=0, atol=1e-6)
    expected_bf16 = ref.clamp(max=1 - 2**-7)
    torch.testing.assert_close(inj.coefficients(torch.bfloat16)[0].double(), expected_bf16, rtol=0, atol=1e-6)


def test_lti_clamp_respects_configured_eps() -> None:
    inj = make_lti(lti_eps=0.05)
    with torch.no_grad():
        inj.log_a.fill_(-20.0)
    assert bool((inj.coefficients(torch.float32)[0] <= 0.95 + 1e-7).all())
    assert bool((inj.coefficients(torch.bfloat16)[0] <= 0.95 + 1e-7).all())


def lti_ref(inj: LTIInjection, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """A_bar * s + delta * W rmsnorm(e) (A_bar unclamped), float64."""
    a_bar, delta = naive_a_bar_delta(inj)
    prepared = delta * (
        naive_rms(e, inj.input_norm.weight, inj.input_norm.eps) @ inj.input_proj.weight.detach().T.double()
    )
    return a_bar * s.double() + prepared


def test_lti_prepare_and_forward_match_reference() -> None:
    inj = make_lti(seed=8)
    s, e = randn(2, 3, DIM, seed=9), randn(2, 3, DIM, seed=10) * 2
    y = inj(s, inj.prepare(e))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), lti_ref(inj, s, e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16])
def test_lti_forward_bf16_state(module_dtype: torch.dtype) -> None:
    inj = make_lti(seed=11).to(module_dtype)
    s = (randn(2, 3, DIM, seed=12) * 3).to(torch.bfloat16)
    e = randn(2, 3, DIM, seed=13).to(module_dtype)
    prepared = inj.prepare(e)
    assert prepared.dtype == torch.float32  # the input-side term is kept in fp32
    y = inj(s, prepared)
    assert y.dtype == torch.bfloat16
    a_bar = inj.coefficients(torch.bfloat16)[0]
    expected = (a_bar * s.float() + prepared).to(torch.bfloat16)
    torch.testing.assert_close(y.float(), expected.float(), rtol=2**-7, atol=1e-3)
    bound = (a_bar * s.float()).abs() + prepared.abs()
    assert bool((y.float().abs() <= bound * (1 + 2**-7) + 1e-6).all())
    torch.testing.assert_close(y.double(), lti_ref(inj, s.float(), e.float()), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("push_to_clamp", [False, True])
def test_lti_update_is_a_strict_contraction(push_to_clamp: bool) -> None:
    inj = make_lti(seed=14)
    if push_to_clamp:
        with torch.no_grad():
            inj.log_a.fill_(-20.0)
    e = randn(2, 4, DIM, seed=15)
    prepared = inj.prepare(e)
    for seed in range(5):
        s1, s2 = randn(2, 4, DIM, seed=20 + seed) * 3, randn(2, 4, DIM, seed=40 + seed) * 3
        gap = (inj(s1, prepared) - inj(s2, prepared)).abs().max()
        assert gap < (s1 - s2).abs().max()
        a_max = float(inj.coefficients()[0].detach().max())
        assert gap <= a_max * (s1 - s2).abs().max() * (1 + 1e-6)
