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


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["demo", "--loops", "0"], "every entry must be an integer >= 1"),
        (["demo", "--loops", "two"], "comma-separated integers"),
        (["demo", "--budget-minutes", "0"], "the budget must be > 0 minutes"),
        (["eval-ppl", "--ckpt", "/nonexistent/run"], "/nonexistent/run"),
        (["presets", "--show", ""], "Unknown preset ''"),  # an empty name is not "list them all"
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
        [sys.executable, "-m", "loopformer", "demo", "--loops", "x"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "loopformer: error: --loops 'x' is invalid: expected comma-separated integers such as 1,2,4."
    )
