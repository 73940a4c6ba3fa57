"""The one vocabulary ("loops"): old names keep working for one release, each with a deprecation warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loopformer.cli import build_parser, main
from loopformer.cli.train import resolve_configs
from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.deprecation import LoopformerDeprecationWarning
from loopformer.errors import ConfigError, InputError
from loopformer.model import LoopLM
from loopformer.training.config import TrainConfig

SMALL = ModelConfig(vocab_size=32, dim=16, n_heads=2, mlp_hidden=32, max_seq_len=16)


def test_a_config_written_with_the_old_keys_loads_with_a_warning() -> None:
    data = SMALL.to_dict()
    data["recurrence"] = {"mean_steps": 3, "backprop_depth": 2, "max_steps": 6}
    with pytest.warns(LoopformerDeprecationWarning) as caught:
        config = ModelConfig.from_json(json.dumps(data))
    assert [str(w.message).split(" is ")[0] for w in caught] == [
        f"The RecurrenceConfig field {name!r}" for name in ("mean_steps", "backprop_depth", "max_steps")
    ]
    assert "use 'mean_loops'" in str(caught[0].message)
    assert config.recurrence == RecurrenceConfig(mean_loops=3, backprop_loops=2, max_loops=6)
    with pytest.warns(LoopformerDeprecationWarning, match="eval_depths"):
        assert TrainConfig.from_dict({"eval_depths": [1, 2]}).eval_loops == (1, 2)


def test_old_and_new_name_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="both 'mean_steps' and its new name 'mean_loops'"):
        ModelConfig.from_dict({**SMALL.to_dict(), "recurrence": {"mean_steps": 3, "mean_loops": 4}})
    with pytest.raises(ConfigError, match="Unknown RecurrenceConfig field"):
        SMALL.replace(recurrence={"mean_step": 3})


def test_old_flags_and_run_file_keys_reach_the_new_fields(tmp_path: Path) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text("backprop_depth: 2\ntrain:\n  eval_depths: [1, 3]\n")
    argv = ["train", "--config", str(run_file), "--mean-steps", "5", "--out", str(tmp_path / "run")]
    with pytest.warns(LoopformerDeprecationWarning) as caught:
        model, train = resolve_configs(build_parser().parse_args(argv))
    assert (model.recurrence.mean_loops, model.recurrence.backprop_loops, train.eval_loops) == (5, 2, (1, 3))
    messages = " ".join(str(w.message) for w in caught)
    assert "--mean-steps is deprecated" in messages and "use --mean-loops" in messages
    assert "'backprop_depth'" in messages and "'eval_depths'" in messages
    with pytest.warns(LoopformerDeprecationWarning, match="--min-steps is deprecated"):
        args = build_parser().parse_args(["generate", "--ckpt", "x", "--exit", "kl", "--min-steps", "3"])
    assert args.min_loops == 3


def test_the_cli_prints_one_warning_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval-ppl", "--ckpt", str(tmp_path), "--depths", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "loopformer: warning: The flag --depths is deprecated and will be removed in the next release; use --loops.",
        "loopformer: error: --loops '0' is invalid: every entry must be an integer >= 1.",
    ]


def test_model_keywords_and_result_fields() -> None:
    model = LoopLM(SMALL, torch.Generator().manual_seed(0)).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    new = model(ids, loops=3, seed=0)
    with pytest.warns(LoopformerDeprecationWarning, match="num_steps= is deprecated"):
        old = model(ids, num_steps=3, seed=0)
    assert torch.equal(old.logits, new.logits)
    with pytest.warns(LoopformerDeprecationWarning, match="LoopOutput.steps"):
        assert old.steps == old.loops == 3
    with pytest.raises(InputError, match="pass loops= only"):
        model(ids, loops=3, num_steps=3)
