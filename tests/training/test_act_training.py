"""ACT halting through configuration, training (ponder metrics, checkpoints), evaluation and ``eval-task --exit``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from loopformer.checkpoint import load_checkpoint, resolve_checkpoint
from loopformer.cli import main
from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.errors import ConfigError, InputError
from loopformer.evaluation.perplexity import evaluate_loops
from loopformer.flops import core_step_flops
from loopformer.loading import load_trained_model
from loopformer.model import build_model
from loopformer.training.config import TrainConfig
from loopformer.training.data import Batch
from loopformer.training.metrics import read_metrics
from loopformer.training.trainer import Trainer
from support import small_config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"halting": "pondernet"}, "halting"),
        ({"ponder_cost": -0.1}, "ponder_cost"),
        ({"halting_kl_weight": float("nan")}, "halting_kl_weight"),
        ({"halting_prior": 0.0}, "halting_prior"),
        ({"halting_prior": 1.0}, "halting_prior"),
        ({"halting_bias_init": float("inf")}, "halting_bias_init"),
        ({"halting": True}, "halting"),
        ({"halting_warmup_steps": -1}, "halting_warmup_steps"),
        ({"halting_input": "change"}, "halting_input"),
    ],
)
def test_config_names_the_bad_halting_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}="):
        small_config(**changes)


def test_config_round_trips_and_counts_the_head() -> None:
    config = small_config(halting="act", halting_prior=0.2, ponder_cost=0.01)
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    assert build_model(config).num_parameters() == build_model(small_config()).num_parameters() + config.dim + 1
    assert core_step_flops(config, 16) - core_step_flops(small_config(), 16) == 2 * config.dim
    change = config.replace(halting_input="state+change")
    assert ModelConfig.from_dict(json.loads(change.to_json())) == change
    assert build_model(change).num_parameters() == build_model(config).num_parameters() + 1
    assert core_step_flops(change, 16) - core_step_flops(config, 16) == 4 * config.dim


def test_evaluation_at_each_depth_equals_separate_forwards() -> None:
    """One deep pass decodes the ACT mixture capped at each depth: exactly what an r-iteration forward gives."""
    model = build_model(small_config(halting="act"), seed=0)
    with torch.no_grad():
        model.halting.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        model.halting.bias.fill_(-1.0)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    batch = Batch(ids, ids, torch.zeros_like(ids))
    results = evaluate_loops(model, [batch], [1, 3, 6], seed=0)
    for result in results:
        with torch.no_grad():
            out = model(ids, loops=result.loops, labels=ids, seed=0)
        lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        assert result.loss == pytest.approx(float(lm), rel=1e-5)
    assert len({round(r.loss, 6) for r in results}) == 3


def corpus_training(corpus: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        data=str(corpus),
        val_fraction=0.2,
        tokenizer="byte",
        seq_len=32,
        batch_size=2,
        grad_accum=2,
        steps=steps,
        lr=3e-3,
        warmup_steps=1,
        eval_every=0,
        save_every=0,
        log_every=1,
        eval_loops=(1, 3),
        eval_batches=1,
    )


def test_trainer_logs_ponder_and_checkpoints_the_head(corpus: Path, tmp_path: Path) -> None:
    config = corpus_training(corpus, steps=5)
    model_config = small_config(halting="act", ponder_cost=0.01, halting_prior=0.3)
    trainer = Trainer(model_config, config, tmp_path / "run", progress=False, stream=io.StringIO())
    trainer.fit()
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert len(train) == 5
    for record in train:
        assert 1 <= record["halt_steps"] <= record["loops"]
        assert record["halt_steps"] < record["ponder"] <= record["halt_steps"] + 1
        assert 1 <= record["expected_loops"] <= record["halt_steps"]
        assert record["halt_kl"] >= 0
    assert float(trainer.model.halting.bias.detach()) != model_config.halting_bias_init  # the head was trained
    model, _, _ = load_trained_model(tmp_path / "run")
    torch.testing.assert_close(model.halting.weight, trainer.model.halting.weight)
    with pytest.raises(InputError, match="halting='act'"):
        Trainer(small_config(), config, tmp_path / "run", resume=True, progress=False).fit()


def test_the_trainer_delays_the_ponder_cost(corpus: Path, tmp_path: Path) -> None:
    """A ponder cost of 10 per iteration would dominate the loss; during the warm-up it is not applied."""
    runs = {}
    for warmup in (0, 100):
        model_config = small_config(halting="act", ponder_cost=10.0, halting_warmup_steps=warmup)
        Trainer(model_config, corpus_training(corpus, steps=2), tmp_path / str(warmup), progress=False).fit()
        runs[warmup] = read_metrics(tmp_path / str(warmup) / "metrics.jsonl", "train")[0]
    assert runs[0]["loss"] > 10 * runs[0]["ponder"] > 10
    assert runs[100]["loss"] < 10


TASK_MODEL = ModelConfig(
    dim=32,
    n_heads=2,
    n_prelude=1,
    n_core=1,
    n_coda=1,
    halting="act",
    recurrence=RecurrenceConfig(mean_loops=3, backprop_loops=2),
)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("act-task") / "run"
    config = TrainConfig(
        task="vector-parity",
        task_difficulty="1-4",
        steps=4,
        batch_size=16,
        eval_loops=(2,),
        eval_every=0,
        save_every=0,
        eval_batches=1,
        device="cpu",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(TASK_MODEL, config, out, progress=False, stream=io.StringIO()).fit()
    finally:
        torch.set_num_threads(threads)
    return out


def test_eval_task_scores_with_the_act_exit(task_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval-task", "--ckpt", str(task_run), "--difficulty", "4", "--count", "12", "--loops", "2,5"]
    assert main([*args, "--exit", "act", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in report["results"]] == [2, 5]
    for result in report["results"]:
        assert result["exit"] == "act:0.99" and 0 <= result["exact_match"] <= 1
        assert 1 <= result["answer_loops"] <= result["loops"] and 1 <= result["mean_loops"] <= result["loops"]
        assert result["tokens"] == 12  # one answer symbol per example
    assert main([*args, "--exit", "act"]) == 0
    assert "loops at answers" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--exit", "act", "--min-loops", "2"], "min_loops and check_every must be 1"), (["--exit", "nope"], "unknown")],
)
def test_eval_task_exit_errors_exit_2(
    task_run: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["eval-task", "--ckpt", str(task_run), "--difficulty", "4", "--count", "4", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def task_training(**changes: object) -> TrainConfig:
    base = {"task": "vector-parity", "task_difficulty": "1-4", "steps": 4, "batch_size": 16, "eval_loops": (2,)}
    return TrainConfig(**{**base, "eval_every": 0, "save_every": 0, "eval_batches": 1, "device": "cpu", **changes})


def quiet_fit(model: ModelConfig, config: TrainConfig, out: Path) -> Trainer:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(model, config, out, progress=False, stream=io.StringIO())
        trainer.fit()
        return trainer
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def headless_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task model without a halting head, trained with an EMA."""
    out = tmp_path_factory.mktemp("headless") / "run"
    quiet_fit(TASK_MODEL.replace(halting="none"), task_training(ema_decay=0.5), out)
    return out


def test_a_halting_head_fine_tunes_onto_a_frozen_trained_model(headless_run: Path, tmp_path: Path) -> None:
    """init_from a model without a head, adding one: the head starts fresh, the rest is the checkpoint's EMA
    weights, and with trainable=halting only the head moves."""
    base = load_checkpoint(resolve_checkpoint(headless_run))
    assert base.ema is not None and any(not torch.equal(base.ema[k], base.model[k]) for k in base.model)
    model = TASK_MODEL.replace(halting_input="state+change", recurrence=RecurrenceConfig(sampler="fixed", mean_loops=4))
    config = task_training(init_from=str(headless_run), init_from_ema=True, trainable=("halting",), lr=1e-2)
    trainer = quiet_fit(model, config, tmp_path / "head")
    assert (
        "the halting head (halting.weight, halting.bias, halting.change_weight) starts fresh"
        in trainer.stream.getvalue()
    )
    tuned = load_checkpoint(resolve_checkpoint(tmp_path / "head"))
    assert sorted(set(tuned.model) - set(base.model)) == ["halting.bias", "halting.change_weight", "halting.weight"]
    for name, tensor in base.ema.items():
        assert torch.equal(tuned.model[name], tensor), name
    fresh = build_model(tuned.config).halting
    assert all(not torch.equal(tuned.model[f"halting.{n}"], p.detach()) for n, p in fresh.named_parameters())
    assert tuned.meta["train_config"]["trainable"] == ["halting"]


@pytest.mark.parametrize(
    ("model", "changes", "message"),
    [
        ({}, {"trainable": ("nope",)}, "trainable prefix 'nope' names no parameter; the model has coda, core"),
        ({"dim": 64}, {}, "The checkpoint has dim=32"),
        ({"halting": "none"}, {"trainable": ("halting",)}, "prefix 'halting' names no"),
    ],
)
def test_fine_tune_errors_name_the_problem(
    headless_run: Path, tmp_path: Path, model: dict, changes: dict, message: str
) -> None:
    config = task_training(init_from=str(headless_run), **changes)
    with pytest.raises(InputError, match=message):
        quiet_fit(TASK_MODEL.replace(**model), config, tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_init_from_ema_needs_an_ema_and_a_head_is_not_dropped(task_run: Path, tmp_path: Path) -> None:
    config = task_training(init_from=str(task_run), init_from_ema=True)
    with pytest.raises(InputError, match="holds no EMA weights"):
        quiet_fit(TASK_MODEL, config, tmp_path / "a")
    with pytest.raises(InputError, match="halting='act'"):
        quiet_fit(TASK_MODEL.replace(halting="none"), task_training(init_from=str(task_run)), tmp_path / "b")
    with pytest.raises(ConfigError, match="init_from_ema=True is invalid: needs init_from"):
        task_training(init_from_ema=True)
    with pytest.raises(ConfigError, match=r"TrainConfig\.trainable="):
        task_training(trainable="halting,")
