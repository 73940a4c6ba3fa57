"""The command line: presets table and JSON, version, demo, and one-sentence errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loopformer import __version__
from loopformer.cli import main


def test_presets_json_lists_every_preset_with_counts(capsys) -> None:
    assert main(["presets", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["huginn-3.5b"]["params"] == 3_564_976_800
    assert rows["huginn-3.5b"]["effective_depth"] == 132
    assert rows["tiny"]["injection"] == "concat" and rows["tiny"]["attention"] == "MHA"
    assert {"anima-micro", "parcae-1.3b"} <= set(rows)


def test_presets_table(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["name", "params", "exact"]
    assert "3564976800" in out and "huginn-3.5b" in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"loopformer {__version__}"


def test_demo_prints_a_row_per_depth(capsys) -> None:
    assert main(["demo", "--steps", "1,3", "--batch", "1", "--seq-len", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line.split() for line in lines if line[:5].strip().isdigit()]
    assert [row[0] for row in table] == ["1", "3"]
    assert [row[1] for row in table] == ["4", "8"]  # effective depth 1 + 2r + 1


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["demo", "--steps", "0"], "every depth must be >= 1"),
        (["demo", "--steps", "two"], "comma-separated integers"),
        (["demo", "--preset", "nope"], "Unknown preset 'nope'"),
        (["demo", "--seq-len", "1"], "--seq-len must be >= 2"),
    ],
)
def test_user_errors_exit_2_with_one_sentence(capsys, argv: list[str], fragment: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    assert "presets" in capsys.readouterr().err


def test_entry_point_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loopformer", "demo", "--steps", "x"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "loopformer: error: --steps 'x' is invalid: expected comma-separated integers such as 1,2,4."
    )


def test_show_a_preset_then_run_the_demo_from_an_edited_config(capsys, tmp_path) -> None:
    assert main(["presets", "--show", "tiny"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["dim"] == 64 and config["recurrence"]["mean_steps"] == 4
    config["injection"] = "lti"
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(config))
    assert main(["demo", "--config", str(path), "--steps", "2", "--batch", "1", "--seq-len", "8"]) == 0
    assert "lti injection" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("dim: 63\nn_heads: 4\n", "n_heads=4 is invalid"), ("{oops", "not valid YAML"), (None, "does not exist")],
)
def test_demo_with_a_bad_config_file_exits_2(capsys, tmp_path, content: str | None, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_show_unknown_preset_exits_2(capsys) -> None:
    assert main(["presets", "--show", "nope"]) == 2
    assert "Unknown preset 'nope'" in capsys.readouterr().err
