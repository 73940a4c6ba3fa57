"""`loopformer train` / `eval-ppl` / `python -m loopformer.train`: flags, run files, errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopformer.checkpoint import load_checkpoint, resolve_checkpoint
from loopformer.cli import build_parser, main
from loopformer.cli.train import resolve_configs
from loopformer.errors import ConfigError
from loopformer.presets import get_preset
from loopformer.training.metrics import read_metrics
from support import FAST, TINY


def test_help_lists_every_field_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--batch-size", "--lr", "--eval-loops", "--dim", "--injection", "--mean-loops", "--backprop-loops"):
        assert flag in text
    assert "default: 8" in text and "default: 1,4,8,16,32" in text and "--no-doc-mask" in text


def test_settings_are_layered_preset_then_file_then_flags(tmp_path: Path) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "preset: anima-micro\nlr: 0.002\nbatch_size: 3\nmodel:\n  dim: 96\nrecurrence:\n  mean_loops: 5\n"
    )
    args = build_parser().parse_args(["train", "--config", str(run_file), "--batch-size", "4", "--no-qk-norm"])
    model, train = resolve_configs(args)
    assert (train.lr, train.batch_size) == (0.002, 4)
    assert model.dim == 96 and model.recurrence.mean_loops == 5 and model.qk_norm is False
    micro = get_preset("anima-micro")
    assert (model.n_heads, model.n_core, model.loop_embedding) == (micro.n_heads, micro.n_core, micro.loop_embedding)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    with pytest.raises(Exception, match="unknown field 'learning_rate'"):
        resolve_configs(build_parser().parse_args(["train", "--config", str(bad)]))
    bad.write_text("recurrence: [1]\n")  # a section that is not a mapping was reported as an unknown field
    with pytest.raises(ConfigError, match="section 'recurrence' must be a mapping of RecurrenceConfig field names"):
        resolve_configs(build_parser().parse_args(["train", "--config", str(bad)]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "/does/not/exist"], "does not exist"),
        (["--lr", "-1"], "lr"),
        (["--schedule", "linear"], "schedule"),
        (["--seq-len", "5000", "--max-seq-len", "512"], "max_seq_len"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = ["train", "--data", str(corpus), *TINY, *FAST, "--steps", "1", "--out", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_empty_data_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), *FAST, "--out", str(tmp_path / "o")]) == 2
    assert "loopformer: error:" in capsys.readouterr().err


def test_train_resume_and_eval_ppl(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "run")
    common = ["--data", str(corpus), *TINY, *FAST, "--eval-every", "0", "--no-progress", "--out", out]
    assert main(["train", *common, "--steps", "4", "--stop-at", "2"]) == 0
    assert main(["train", "--out", out, "--resume", "--no-progress"]) == 0  # settings come from the run itself
    assert load_checkpoint(resolve_checkpoint(Path(out))).step == 4
    capsys.readouterr()
    # the run names a corpus outside its folder: read only once the user names it too
    assert main(["eval-ppl", "--ckpt", out, "--loops", "1"]) == 2
    assert f"pass --data {corpus}" in capsys.readouterr().err
    data = ["--data", str(corpus)]
    assert main(["eval-ppl", "--ckpt", out, *data, "--loops", "1,2", "--batches", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["loops"] for r in report["results"]] == [1, 2] and report["step"] == 4
    # by default the run's own batch size and eval_batches: the end-of-training table's perplexities, exactly
    assert main(["eval-ppl", "--ckpt", out, *data, "--loops", "1,2", "--json"]) == 0
    defaults = json.loads(capsys.readouterr().out)["results"]
    final = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "eval" and r["step"] == 4]
    assert [r["perplexity"] for r in defaults] == pytest.approx([r["perplexity"] for r in final], rel=1e-6)
    assert main(["eval-ppl", "--ckpt", out, *data, "--loops", "1", "--batches", "1000", "--json"]) == 0
    assert "batches of 2 asked for" in capsys.readouterr().err  # fewer validation rows than asked: said so
    assert main(["eval-ppl", "--ckpt", str(tmp_path), "--loops", "1"]) == 2
    capsys.readouterr()
    assert (
        main(["eval-ppl", "--ckpt", out, *data, "--loops", "1", "--seq-len", "0"]) == 2
    )  # 0 is not "the run's length"
    assert "seq_len=0 is invalid" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_exits_0(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "loopformer.train", "--data", str(corpus), *TINY, *FAST]
    command += ["--steps", "100000", "--eval-every", "0", "--save-every", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and read_metrics(metrics, "train")):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    state = load_checkpoint(resolve_checkpoint(out))
    assert 1 <= state.step < 100000
    assert "stop requested" in stderr


def test_documented_run_file_loads() -> None:
    run_file = Path(__file__).resolve().parents[2] / "docs" / "examples" / "run.yaml"
    model, train = resolve_configs(build_parser().parse_args(["train", "--config", str(run_file), "--steps", "300"]))
    assert model.sliding_window == 128 and model.recurrence.mean_loops == 8 and model.dim == 192
    assert (train.steps, train.schedule, train.eval_loops) == (300, "wsd", (1, 2, 4, 8, 16, 32))


def test_eval_ppl_names_its_own_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["eval-ppl", "--ckpt", str(tmp_path), "--loops", "0"]) == 2
    assert "--loops '0' is invalid" in capsys.readouterr().err


def test_run_paths_are_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative --data would only resolve from the folder the run was started in."""
    from loopformer.training.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    config = TrainConfig.from_dict({"data": "corpus.txt", "val_data": "~/val.txt", "init_from": "runs/base"})
    assert config.data == str(tmp_path / "corpus.txt") and config.init_from == str(tmp_path / "runs" / "base")
    assert config.val_data == str(Path("~/val.txt").expanduser())
    assert TrainConfig.from_dict({"data": "stdlib"}).data == "stdlib"  # a built-in corpus is not a path
