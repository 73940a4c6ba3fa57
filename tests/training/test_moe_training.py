"""Mixture-of-experts core layers through the model, the trainer and the inference engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loopformer.checkpoint import load_checkpoint, resolve_checkpoint
from loopformer.config import ModelConfig
from loopformer.errors import ConfigError
from loopformer.flops import core_step_flops
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.model import build_model
from loopformer.nn.moe import MoE
from loopformer.training.config import TrainConfig
from loopformer.training.metrics import read_metrics
from loopformer.training.trainer import Trainer
from support import small_config

MOE = {"moe_routed": 4, "moe_top_k": 2, "moe_shared": 1, "moe_hidden": 16}


def test_config_validates_and_derives_the_expert_width() -> None:
    config = small_config(moe_routed=8)
    assert config.moe_hidden == config.mlp_hidden // (config.moe_shared + config.moe_top_k)
    with pytest.raises(ConfigError, match="moe_top_k"):
        small_config(moe_routed=2, moe_top_k=3)
    with pytest.raises(ConfigError, match="moe_routed"):
        small_config(moe_routed=-1)
    assert ModelConfig.from_dict(small_config(**MOE).to_dict()) == small_config(**MOE)


def test_only_core_layers_use_experts_and_the_parameters_are_counted() -> None:
    dense = build_model(small_config(), seed=0)
    model = build_model(small_config(**MOE), seed=0)
    assert all(isinstance(layer.mlp, MoE) for layer in model.core)
    assert not any(isinstance(layer.mlp, MoE) for layer in [*model.prelude, *model.coda])
    cfg = model.config
    per_layer_moe = (
        cfg.moe_routed * 3 * cfg.moe_hidden * cfg.dim  # routed experts (fc: 2h x d, proj: d x h)
        + cfg.moe_shared * 3 * cfg.moe_hidden * cfg.dim  # the shared expert
        + cfg.moe_routed * cfg.dim  # router
        + cfg.per_loop_slots * cfg.moe_routed  # per-loop router bias
    )
    per_layer_dense = 3 * cfg.mlp_hidden * cfg.dim
    expected = dense.num_parameters() + cfg.n_core * (per_layer_moe - per_layer_dense)
    assert model.num_parameters() == expected
    # the FLOPs count the active experts only
    active = (cfg.moe_shared + cfg.moe_top_k) * cfg.moe_hidden
    mlp_delta = 2 * 3 * cfg.dim * (active - cfg.mlp_hidden) + 2 * cfg.dim * cfg.moe_routed
    assert core_step_flops(cfg, 16) - core_step_flops(dense.config, 16) == cfg.n_core * mlp_delta


def test_training_forward_records_loads_per_loop_and_adds_the_aux_loss() -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = build_model(small_config(**MOE), seed=0).train()
    out = plain(ids, loops=3, labels=ids, seed=0)
    loads = plain.moe_loads()
    assert loads.shape == (3, plain.config.n_core, 4)
    torch.testing.assert_close(loads.sum(-1), torch.ones(3, plain.config.n_core))
    weighted = build_model(small_config(**MOE, moe_aux_weight=0.5), seed=0).train()
    out_aux = weighted(ids, loops=3, labels=ids, seed=0)
    aux = torch.stack([record[3] for record in weighted.moe_records]).mean()
    torch.testing.assert_close(out_aux.loss, out.loss + 0.5 * aux)
    out_aux.loss.backward()
    assert weighted.core[0].mlp.router.weight.grad.abs().sum() > 0
    assert weighted.core[0].mlp.loop_bias.grad[:3].abs().sum() > 0  # the router sees the loop slot
    plain.eval()
    plain(ids, loops=3)
    assert plain.moe_records is None  # nothing is recorded outside training


def test_trainer_balances_experts_logs_loads_and_checkpoints_the_bias(corpus: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        data=str(corpus),
        val_fraction=0.2,
        tokenizer="byte",
        seq_len=32,
        batch_size=2,
        grad_accum=2,
        steps=6,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        save_every=0,
        log_every=1,
        eval_loops=(1, 3),
        eval_batches=1,
    )
    trainer = Trainer(small_config(**MOE, moe_bias_rate=0.01), config, tmp_path / "run", progress=False)
    trainer.fit()
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    for record in train:
        assert record["moe_imbalance"] >= 1.0
        assert len(record["moe_imbalance_by_loop"]) >= 1 and min(record["moe_imbalance_by_loop"]) >= 1.0
    bias = trainer.model.core[0].mlp.balance_bias
    assert bias.abs().sum() > 0  # the aux-loss-free update acted
    assert bias.abs().max() <= 6 * 0.01 + 1e-6  # one signed step of bias_rate per optimizer step
    saved = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    torch.testing.assert_close(saved.model["core.0.mlp.balance_bias"], bias)


def test_engine_decodes_a_moe_model_exactly() -> None:
    model = build_model(small_config(**MOE, state_init="zero", tie_embeddings=False), seed=0).eval()
    engine = Engine(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    log_probs, _, _ = engine.score(ids, GenerationConfig(loops=4))
    with torch.no_grad():
        full = torch.log_softmax(model(ids, loops=4).logits[:, :-1].float(), -1)
    torch.testing.assert_close(log_probs, full.gather(2, ids[:, 1:, None])[..., 0], atol=1e-4, rtol=0)
    batched = engine.generate([[1, 2, 3], [4, 5]], GenerationConfig(loops=4, max_new_tokens=5, stop_tokens=()))
    alone = engine.generate([[4, 5]], GenerationConfig(loops=4, max_new_tokens=5, stop_tokens=()))
    assert batched.outputs[1].tokens == alone.outputs[0].tokens
