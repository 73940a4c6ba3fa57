"""`loopformer demo`: a reduced run in the default suite, the full 10-minute run with its targets behind `slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loopformer.cli import main
from loopformer.errors import InputError
from loopformer.presets import get_preset
from loopformer.tasks.recipes import TASK_FIELDS, get_recipe, with_architecture


def run_demo(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """The demo as a user runs it: a fresh process with the default threads (its budget is wall-clock time)."""
    out, results, plot = tmp_path / "runs", tmp_path / "results.json", tmp_path / "accuracy.png"
    argv = ["demo", "--out", str(out), "--json", str(results), "--plot", str(plot), "--no-progress", *args]
    done = subprocess.run([sys.executable, "-m", "loopformer", *argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for kind in ("looped", "param-matched", "compute-matched"):
        assert (out / kind / "checkpoints" / "latest").exists()
    return json.loads(results.read_text()), done.stdout


def test_reduced_demo_prints_the_table_and_the_looped_model_beats_chance(tmp_path) -> None:
    report, stdout = run_demo(tmp_path, "--budget-minutes", "2", "--eval-count", "128", "--loops", "1,8,32")
    assert report["task"] == "prefix-parity" and report["difficulties"] == [8, 16, 32, 64, 128]
    kinds = [m["kind"] for m in report["models"]]
    assert kinds == ["looped", "param-matched", "compute-matched"]
    looped, param, compute = report["models"]
    assert looped["loops"] == [1, 8, 32] and param["loops"] == compute["loops"] == [1]
    assert param["parameters"] == looped["parameters"] < compute["parameters"]
    for model in report["models"]:
        assert set(model["accuracy"]) == {"8", "16", "32", "64", "128"}
        assert all(len(row) == len(model["loops"]) for row in model["accuracy"].values())
    header = next(line for line in stdout.splitlines() if line.startswith("length"))
    assert header.split() == ["length", "r=1", "r=8", "r=32", "param-matched", "compute-matched"]
    rows = [line.split() for line in stdout.splitlines() if line.split()[:2] in (["8", "(1x)"], ["128", "(16x)"])]
    assert len(rows) == 2 and all(len(row) == 2 + 3 + 2 for row in rows)
    # exact match on 8 random bits by chance is 2^-8 = 0.4% (0.5 of 128 examples); 2.3% is 3 of them
    assert max(looped["accuracy"]["8"]) >= 2.3
    stability = report["stability"]
    assert stability["difficulty"] == 32 and stability["loops"] == 1024 and stability["state_rms"] > 0


def test_demo_trains_a_preset_architecture_on_the_task(tmp_path) -> None:
    report, _ = run_demo(
        tmp_path, "--preset", "mythos-tiny", "--budget-minutes", "0.5", "--eval-count", "16", "--loops", "1,4"
    )
    looped, param, compute = report["models"]
    assert looped["steps"] > 0 and param["parameters"] == looped["parameters"] < compute["parameters"]
    checkpoints = tmp_path / "runs" / "looped" / "checkpoints"
    model = json.loads((checkpoints / (checkpoints / "latest").read_text().strip() / "config.json").read_text())
    assert model["attention"] == "mla" and model["moe_routed"] == 8 and model["injection"] == "lti"
    assert model["sliding_window"] == 2 and model["vocab_size"] < 100  # the task keeps its window and alphabet


def test_with_architecture_keeps_the_task_fields() -> None:
    recipe = get_recipe("addition")
    mythos = with_architecture(recipe, get_preset("mythos-tiny"))
    for name in TASK_FIELDS:
        assert getattr(mythos.model, name) == getattr(recipe.model, name)
    assert mythos.model.dim == 128 and mythos.model.attention == "mla" and mythos.train == recipe.train


def test_demo_refuses_a_non_empty_out_directory(tmp_path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_without_out_the_demo_writes_runs_demo_or_the_next_free_folder(tmp_path, monkeypatch, capsys) -> None:
    """``loopformer demo`` keeps its runs in runs/demo (so the README's ``analyze --ckpt runs/demo/looped``
    works); an earlier demo there is kept and the new one goes to runs/demo-2."""
    import loopformer.tasks.extrapolation as extrapolation
    from loopformer.cli.demo import fresh_folder

    monkeypatch.chdir(tmp_path)
    used: list[Path] = []

    def recording(recipe: object, budget: float, out_dir: Path, **options: object) -> None:
        used.append(Path(out_dir))
        raise InputError("stopped after choosing the folder")

    monkeypatch.setattr(extrapolation, "run_demo", recording)
    assert main(["demo"]) == 2
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "results.json").write_text("{}")
    assert main(["demo"]) == 2
    assert used == [Path("runs/demo"), Path("runs/demo-2")]
    assert "runs/demo holds an earlier demo; this one goes to runs/demo-2" in capsys.readouterr().err
    assert fresh_folder(tmp_path / "runs" / "demo-2") == tmp_path / "runs" / "demo-2"


@pytest.mark.slow
def test_full_demo_meets_the_depth_extrapolation_targets(tmp_path) -> None:
    report, _ = run_demo(tmp_path)
    assert report["seconds"] <= 10 * 60 * 1.05
    looped, *baselines = report["models"]
    best = {int(d): max(row) for d, row in looped["accuracy"].items()}
    assert best[8] >= 99.0 and best[32] >= 95.0
    for baseline in baselines:
        assert all(row[0] <= 5.0 for d, row in baseline["accuracy"].items() if int(d) > 8)
    assert report["stability"]["accuracy"] >= report["stability"]["best_accuracy"] - 1.0
