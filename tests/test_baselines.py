"""Fixed-depth baselines: stated parameter and compute relations, same code path as the looped model."""

from __future__ import annotations

import pytest
import torch

from loopformer import ConfigError, build_model
from loopformer.baselines import compute_matched, derive_baseline, param_matched
from loopformer.flops import core_step_flops, forward_flops_per_token, layer_flops
from support import small_config


def params(config) -> int:
    return build_model(config, device="meta").num_parameters()


@pytest.mark.parametrize("extra", [{}, {"lora_rank": 2, "loop_embedding": "learned"}, {"injection": "lti"}])
def test_param_matched_has_identical_parameters(extra: dict) -> None:
    looped = small_config(**extra)
    baseline = param_matched(looped)
    assert params(baseline) == params(looped)
    assert baseline.recurrence.mean_loops == 1 and baseline.effective_depth() == looped.n_layers


@pytest.mark.parametrize("extra", [{}, {"lora_rank": 2, "loop_embedding": "learned"}, {"injection": "add"}])
def test_compute_matched_is_the_unrolled_stack(extra: dict) -> None:
    looped = small_config(**extra)
    r = 5
    baseline = compute_matched(looped, r)
    model = build_model(looped, device="meta")
    layer_params = sum(p.numel() for n, p in model.core[0].named_parameters() if "lora" not in n)
    per_loop = sum(p.numel() for n, p in model.named_parameters() if "lora" in n or "loop_embedding" in n)
    assert baseline.n_core == looped.n_core * r
    assert baseline.effective_depth() == looped.effective_depth(r)
    assert params(baseline) == params(looped) + (r - 1) * looped.n_core * layer_params - per_loop
    # Compute: equal up to the injection, which the unrolled stack runs once instead of r times.
    seq = 16
    plain = looped.replace(lora_rank=0)
    injection_step = core_step_flops(plain, seq) - plain.n_core * layer_flops(plain, seq)
    expected = forward_flops_per_token(plain, r, seq) - (r - 1) * injection_step
    assert forward_flops_per_token(baseline, 1, seq) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["param-matched", "compute-matched"])
def test_baselines_train_and_evaluate_through_the_same_model(kind: str) -> None:
    baseline = derive_baseline(small_config(), kind, steps=3)
    model = build_model(baseline, seed=0).train()
    ids = torch.randint(0, 64, (2, 6))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.loops == 1
    assert all(p.grad is not None for p in model.core.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # zero state: deterministic


def test_unknown_baseline() -> None:
    with pytest.raises(ConfigError, match="Unknown baseline 'deep'"):
        derive_baseline(small_config(), "deep")
