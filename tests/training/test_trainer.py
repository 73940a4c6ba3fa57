"""The trainer end to end on a tiny model: bit-exact resume, metrics, bad steps, guards, fine-tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loopformer.model
from loopformer.checkpoint import load_checkpoint, resolve_checkpoint
from loopformer.errors import InputError, TrainingError
from loopformer.training.config import TrainConfig
from loopformer.training.metrics import read_metrics
from loopformer.training.trainer import Trainer
from support import WORDS, small_config


def train_config(corpus: Path, **changes: object) -> TrainConfig:
    base = {
        "data": str(corpus),
        "val_fraction": 0.2,
        "tokenizer": "byte",
        "seq_len": 32,
        "batch_size": 2,
        "grad_accum": 2,
        "steps": 12,
        "lr": 3e-3,
        "warmup_steps": 3,
        "eval_every": 6,
        "eval_loops": (1, 3),
        "eval_batches": 1,
        "save_every": 6,
        "log_every": 1,
        "ema_decay": 0.9,
    }
    base.update(changes)
    return TrainConfig(**base)


def run(corpus: Path, out: Path, model_changes: dict | None = None, **kwargs: object) -> Trainer:
    config = train_config(corpus, **kwargs.pop("train", {}))
    trainer = Trainer(small_config(**(model_changes or {})), config, out, progress=False, **kwargs)
    trainer.result = trainer.fit()
    return trainer


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    path = resolve_checkpoint(out)
    return {
        **load_file(path / "model.safetensors"),
        **{f"ema.{k}": v for k, v in load_file(path / "ema.safetensors").items()},
    }


def test_resume_continues_bit_exactly(corpus: Path, tmp_path: Path) -> None:
    straight = run(corpus, tmp_path / "straight").result
    first = run(corpus, tmp_path / "split", stop_at=5).result
    assert first.reason == "stop-at" and first.step == 5
    second = run(corpus, tmp_path / "split", resume=True).result
    assert second.step == straight.step == 12
    assert {**first.losses, **second.losses} == straight.losses
    want, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # every saved RNG state too, the global torch_cpu one included (building the model used to draw from it)
    rng_straight = load_checkpoint(resolve_checkpoint(tmp_path / "straight")).rng
    rng_split = load_checkpoint(resolve_checkpoint(tmp_path / "split")).rng
    assert rng_straight.keys() == rng_split.keys() >= {"depth", "torch_cpu"}
    for name in rng_straight:
        assert torch.equal(rng_straight[name], rng_split[name]), name


def test_metrics_log_and_evaluation(corpus: Path, tmp_path: Path) -> None:
    trainer = run(corpus, tmp_path / "run", train={"steps": 6, "eval_every": 3, "tensorboard": True})
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    for record in train:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "loops"):
            assert math.isfinite(record[key]), key
        assert 0 < record["mfu"] < 1
    assert train[-1]["loss"] < train[0]["loss"]
    evals = read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")
    assert {(r["step"], r["loops"]) for r in evals} == {(3, 1), (3, 3), (6, 1), (6, 3)}
    for record in evals:
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-6)
        assert record["state_change"] >= 0 and -1 <= record["token_correlation"] <= 1
    assert [r.loops for r in trainer.result.evaluation] == [1, 3]
    saved = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    assert saved.step == 6 and saved.meta["train_config"]["steps"] == 6
    assert saved.tokenizer_json and saved.config.vocab_size == 320  # 270 byte-level ids padded to 64


def test_non_finite_steps_are_skipped_then_training_stops(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = loopformer.model.lm_loss

    def poisoned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * math.nan if calls["n"] > 8 else loss  # micro-batches 9+ (step 5 on) are NaN

    monkeypatch.setattr(loopformer.model, "lm_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        run(corpus, out, train={"save_every": 4, "eval_every": 0, "max_bad_steps": 3})
    skipped = read_metrics(out / "metrics.jsonl", "skipped")
    assert [r["in_a_row"] for r in skipped] == [1, 2, 3]
    state = load_checkpoint(resolve_checkpoint(out))
    assert state.step == 4
    assert all(torch.isfinite(t).all() for t in state.model.values())


def test_incompatible_resume_is_refused_and_nothing_is_overwritten(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(corpus, out, train={"steps": 2, "eval_every": 0})
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(InputError, match="dim"):
        run(corpus, out, model_changes={"dim": 48}, resume=True)
    with pytest.raises(InputError, match="already holds a training run"):
        run(corpus, out)
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert before == after


def test_doc_mask_activation_checkpointing_and_bf16_train(corpus: Path, tmp_path: Path) -> None:
    plain = run(corpus, tmp_path / "a", train={"steps": 3, "eval_every": 0, "doc_mask": True}).result
    recomputed = run(
        corpus, tmp_path / "b", train={"steps": 3, "eval_every": 0, "doc_mask": True, "activation_checkpointing": True}
    ).result
    for step, loss in plain.losses.items():
        assert recomputed.losses[step] == pytest.approx(loss, rel=1e-5)
    bf16 = run(corpus, tmp_path / "c", train={"steps": 2, "eval_every": 0, "dtype": "bf16"}).result
    assert all(math.isfinite(v) for v in bf16.losses.values())


def test_fine_tuning_starts_from_a_checkpoint_with_prompt_masking(corpus: Path, tmp_path: Path) -> None:
    run(corpus, tmp_path / "base", train={"steps": 2, "eval_every": 0})
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"prompt": f"question {i}: ", "text": f"answer {' '.join(WORDS[: i % 5 + 3])}\n"} for i in range(40)]
    pairs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    base_weights = load_checkpoint(resolve_checkpoint(tmp_path / "base")).model
    tuned = run(
        corpus,
        tmp_path / "tuned",
        train={"data": str(pairs), "init_from": str(tmp_path / "base"), "steps": 2, "eval_every": 0, "lr": 1e-4},
    )
    assert tuned.result.step == 2
    state = load_checkpoint(resolve_checkpoint(tmp_path / "tuned"))
    moved = max(float((state.model[k] - base_weights[k]).abs().max()) for k in base_weights)
    assert 0 < moved < 1e-2  # started from the base weights, nudged by a small lr


@pytest.mark.slow
def test_compiled_layers_train_like_eager(corpus: Path, tmp_path: Path) -> None:
    eager = run(corpus, tmp_path / "eager", train={"steps": 3, "eval_every": 0}).result
    compiled = run(corpus, tmp_path / "compiled", train={"steps": 3, "eval_every": 0, "compile": True}).result
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-4)


def test_without_a_terminal_training_prints_a_line_every_log_every_steps(corpus: Path, tmp_path: Path) -> None:
    """Not a terminal (no progress bar): one line per log_every steps with loss, loops, tok/s and the ETA; an
    explicit progress=False stays quiet until the end."""
    import io
    import re

    config = train_config(corpus, steps=6, log_every=2, eval_every=0)
    stream = io.StringIO()
    Trainer(small_config(), config, tmp_path / "a", stream=stream).fit()
    lines = [line for line in stream.getvalue().splitlines() if re.match(r"step \d+/\d+ ", line)]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(" loss " in line and " loops " in line and " tok/s  ETA " in line for line in lines)
    quiet = io.StringIO()
    Trainer(small_config(), config, tmp_path / "b", stream=quiet, progress=False).fit()
    assert not [line for line in quiet.getvalue().splitlines() if re.match(r"step \d+/\d+ ", line)]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_after_the_step_and_a_second_one_aborts_saying_what_is_lost(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, presses: int
) -> None:
    """SIGINT during step 8 of 12 (checkpoint every 6): once -> a checkpoint at step 8 and reason "interrupted";
    twice -> KeyboardInterrupt after a line naming the step done since the checkpoint at step 6, which stays."""
    import io
    import os
    import signal

    original = Trainer.train_step

    def train_step(self: Trainer, stop: object) -> object:
        if self.step == 7:  # step 8 is about to run
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, stop)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    stream = io.StringIO()
    trainer = Trainer(small_config(), train_config(corpus, eval_every=0), tmp_path / "run", stream=stream)
    if presses == 1:
        result = trainer.fit()
        assert (result.reason, result.step) == ("interrupted", 8)
    else:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    said = stream.getvalue()
    assert "press Ctrl-C again to abort and lose the 1 step since the checkpoint at step 6)" in said
    aborted = "aborted without a checkpoint, losing the 1 step since the checkpoint at step 6"
    assert (aborted in said) == (presses == 2)
    assert load_checkpoint(resolve_checkpoint(tmp_path / "run")).step == (8 if presses == 1 else 6)


def test_an_abort_before_the_first_checkpoint_says_every_step_is_lost(corpus: Path, tmp_path: Path) -> None:
    trainer = Trainer(small_config(), train_config(corpus), tmp_path / "run")
    trainer.step, trainer.saved_step = 3, None
    assert trainer.unsaved_steps() == "all 3 steps of this run (no checkpoint yet)"
    trainer.saved_step = 2
    assert trainer.unsaved_steps() == "the 1 step since the checkpoint at step 2"
