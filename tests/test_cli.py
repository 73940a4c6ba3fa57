"""The command line: presets table and JSON, version, demo, and one-sentence errors with exit code 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator

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


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_help_and_every_parser_are_built_without_importing_torch() -> None:
    """``--help`` and ``--version`` stay fast: the parsers, and ``import loopformer``, do not load torch."""
    result = _run_python(
        "import sys, loopformer, loopformer.tasks\n"
        "from loopformer.cli import build_parser\n"
        "build_parser()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'safetensors', 'fastapi'})\n"
        "print(heavy, loopformer.__version__)\n"
        "print(loopformer.LoopLM.__name__, loopformer.tasks.TASKS['addition'].name, 'torch' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == f"[] {__version__}"
    assert second == "LoopLM addition True"  # the lazy names still resolve, importing torch on use


def test_ctrl_c_while_the_command_line_is_imported_is_one_line_and_status_130() -> None:
    """A KeyboardInterrupt raised by an import inside the command line (as Ctrl-C during start-up does)."""
    result = _run_python(
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'loopformer.cli.train':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from loopformer.console import main\n"
        "sys.exit(main())\n"
    )
    assert (result.returncode, result.stderr, result.stdout) == (130, "loopformer: interrupted\n", "")


@pytest.mark.parametrize("delay", [0.05, 0.3, 1.0])
def test_ctrl_c_at_any_moment_of_start_up_prints_no_traceback(delay: float, tmp_path) -> None:
    """SIGINT to a real ``loopformer`` process early in its start-up (imports, torch, reading the corpus)."""
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "loopformer", "train", "--steps", "100000", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    # interrupted before training (130), or training stopped cleanly at the first step with a checkpoint (0)
    assert process.returncode in (0, 130), stderr
    assert process.returncode == 0 or stderr.rstrip().endswith("loopformer: interrupted"), stderr


def _parsers(
    parser: argparse.ArgumentParser, name: str = "loopformer"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_with_a_default_shows_it_once_and_choices_are_listed() -> None:
    """``--help`` of every command: an option with a default names it exactly once (never "default: None"),
    enum-valued config flags list their choices, exit criteria show their default thresholds."""
    from loopformer.cli import build_parser

    checked = 0
    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = " ".join(formatter._format_action(action).split())
            assert "default: None" not in text, (name, text)
            default = action.default
            silent = any(default is v for v in (None, False, True, argparse.SUPPRESS)) or default in ([], "")
            if not silent and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                assert text.count("default:") + text.count("(default)") == 1, (name, text)
                checked += 1
    assert checked > 50
    helps = {name: parser.format_help() for name, parser in _parsers(build_parser())}
    assert "--injection {concat,add,lti}" in helps["loopformer train"]
    assert "lti (Parcae's linear" in " ".join(helps["loopformer train"].split())
    assert "cosine 0.001, act 0.99" in " ".join(helps["loopformer generate"].split())
    assert "TCP port (default: 8000)" in " ".join(helps["loopformer serve"].split())


def test_the_act_threshold_in_help_is_the_halting_heads() -> None:
    from loopformer.inference.criteria import ACT_DEFAULT_THRESHOLD
    from loopformer.nn.halting import ACT_THRESHOLD

    assert ACT_DEFAULT_THRESHOLD == ACT_THRESHOLD
