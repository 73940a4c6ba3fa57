"""Parameter groups, AdamW decay, learning-rate schedules and the weight EMA."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from loopformer.errors import InputError
from loopformer.model import build_model
from loopformer.training.optim import (
    EMA,
    SCHEDULES,
    build_optimizer,
    learning_rate,
    parameter_groups,
    set_learning_rate,
    unwrap_name,
)
from support import small_config


def full_model(**changes: object) -> nn.Module:
    config = small_config(qk_bias=True, injection="lti", loop_embedding="learned", lora_rank=2, **changes)
    return build_model(config, seed=0)


def group_names(groups: list[dict]) -> tuple[set[str], set[str]]:
    decay, no_decay = groups
    return set(decay["names"]), set(no_decay["names"])


def test_every_parameter_lands_in_exactly_one_group() -> None:
    model = full_model()
    decay, no_decay = group_names(parameter_groups(model, 0.1))
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {name for name, _ in model.named_parameters()}
    for name in no_decay:
        leaf = name.rsplit(".", 1)[-1]
        assert (
            name.startswith(("injection.", "loop_embedding.", "tok_emb."))
            or "norm" in name
            or leaf in ("q_bias", "k_bias")
        ), name
    assert {"injection.log_a", "injection.dt_bias", "injection.input_proj.weight", "loop_embedding.table"} <= no_decay
    assert {"tok_emb.weight", "core.0.attn.q_bias", "prelude.0.attn.k_bias", "final_norm.weight"} <= no_decay
    for name in decay:
        assert name.endswith((".weight", ".lora_a", ".lora_b")) and "norm" not in name, name
    assert {"core.0.attn.qkv.weight", "core.1.mlp.fc.lora_a", "coda.0.mlp.proj.weight"} <= decay


def test_groups_carry_weight_decay_and_embedding_switch() -> None:
    model = full_model(tie_embeddings=False)
    groups = parameter_groups(model, 0.25)
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]
    assert all(len(g["params"]) == len(g["names"]) for g in groups)
    decay, no_decay = group_names(groups)
    assert "head.weight" in decay and "tok_emb.weight" in no_decay
    decay, no_decay = group_names(parameter_groups(model, 0.25, decay_embeddings=True))
    assert "tok_emb.weight" in decay and "tok_emb.weight" not in no_decay


def test_wrapper_prefixes_are_stripped() -> None:
    assert unwrap_name("module._orig_mod.tok_emb.weight") == "tok_emb.weight"
    assert unwrap_name("_orig_mod.module.core.0._fsdp_wrapped_module.attn.q_bias") == "core.0.attn.q_bias"
    wrapped = nn.Module()
    wrapped.module = full_model()  # what DDP looks like to named_parameters()
    decay, no_decay = group_names(parameter_groups(wrapped, 0.1))
    assert "tok_emb.weight" in no_decay and "core.0.attn.qkv.weight" in decay


def test_adamw_decays_only_the_decay_group() -> None:
    model = full_model()
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decay, no_decay = optimizer.param_groups
    for name in no_decay["names"]:
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name
    for name, param in zip(decay["names"], decay["params"], strict=True):
        assert torch.allclose(param, before[name] * (1 - 0.1 * 0.5)), name
    state = optimizer.state_dict()
    assert state["param_groups"][0]["names"] == decay["names"]
    fresh = build_optimizer(full_model(), lr=0.1, weight_decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.param_groups[1]["weight_decay"] == 0.0


def test_set_learning_rate_reaches_every_group() -> None:
    optimizer = build_optimizer(full_model(), lr=1.0)
    set_learning_rate(optimizer, 0.123)
    assert [g["lr"] for g in optimizer.param_groups] == [0.123, 0.123]


def lr(step: int, schedule: str, **kw: float) -> float:
    args = {"base_lr": 1.0, "total_steps": 101, "warmup_steps": 10, "min_lr": 0.1, "decay_fraction": 0.2}
    args.update(kw)
    return learning_rate(step, schedule=schedule, **args)


def test_warmup_is_linear_and_ends_at_base_lr() -> None:
    for schedule in SCHEDULES:
        assert lr(0, schedule) == pytest.approx(0.1)
        assert lr(4, schedule) == pytest.approx(0.5)
        assert lr(9, schedule) == pytest.approx(1.0)
        assert lr(10, schedule) == pytest.approx(1.0)


def test_constant_cosine_and_wsd_shapes() -> None:
    assert lr(100, "constant") == 1.0 and lr(500, "constant") == 1.0
    # cosine spans steps 10..100: midpoint 55 is halfway between base and min, the last step is min.
    assert lr(55, "cosine") == pytest.approx(0.55)
    assert lr(100, "cosine") == pytest.approx(0.1) and lr(200, "cosine") == pytest.approx(0.1)
    values = [lr(s, "cosine") for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    # wsd: 20 decay steps (81..100), stable before.
    assert all(lr(s, "wsd") == 1.0 for s in range(10, 81))
    assert lr(81, "wsd") == pytest.approx(1.0 - 0.9 / 20)
    assert lr(90, "wsd") == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr(100, "wsd") == pytest.approx(0.1)
    assert lr(5, "wsd", warmup_steps=0) == 1.0 and lr(0, "cosine", warmup_steps=0) == 1.0


def test_schedule_is_a_pure_function_and_validates() -> None:
    first = [lr(s, "cosine") for s in range(0, 101, 7)]
    lr(50, "wsd")
    assert first == [lr(s, "cosine") for s in range(0, 101, 7)]
    with pytest.raises(InputError, match="schedule"):
        lr(0, "linear")
    with pytest.raises(InputError, match="decay_fraction"):
        lr(0, "wsd", decay_fraction=1.5)


def test_ema_matches_a_hand_computation_and_round_trips() -> None:
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    ema.update(model)
    for name, param in model.named_parameters():
        x1 = start[name] + 1.0
        expected = 0.9 * (0.9 * start[name] + 0.1 * x1) + 0.1 * param.detach()
        assert torch.allclose(ema.state_dict()[name], expected, atol=1e-6)
        assert ema.state_dict()[name].dtype == torch.float32
    other = EMA(model, decay=0.9)
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ema.state_dict().items())
    with pytest.raises(InputError):
        other.load_state_dict({"weight": torch.zeros(2, 3)})


def test_ema_applied_swaps_in_and_restores() -> None:
    model = build_model(small_config(), seed=0).to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        for name, param in model.named_parameters():
            assert torch.equal(param, ema.state_dict()[name].to(torch.bfloat16))
            assert not torch.equal(param, trained[name])
    for name, param in model.named_parameters():
        assert torch.equal(param, trained[name])
    with pytest.raises(RuntimeError), ema.applied(model):
        raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert set(ema.state_dict()) == set(original)


def test_ema_warmup_forgets_the_initial_weights_in_short_runs() -> None:
    model = torch.nn.Linear(2, 2, bias=False)
    ema = EMA(model, decay=0.995)
    assert ema.decay_at(None) == 0.995 and ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10_000) == 0.995  # the warm-up only caps the decay early on
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = ema.state_dict()["weight"].clone()
    for updates in range(1, 301):
        ema.update(model, updates=updates)
    # the plain decay would keep 0.995**300 = 22% of the initial weights; the warm-up keeps far less
    remaining = (1.0 - ema.state_dict()["weight"]) / (1.0 - start)
    assert float(remaining.abs().max()) < 0.05
