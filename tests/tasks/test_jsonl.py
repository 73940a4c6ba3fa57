"""Task JSONL files: parsing strings and lists, blank lines, one-line errors naming file:line, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopformer.errors import InputError
from loopformer.tasks.base import Example
from loopformer.tasks.builtin import TASKS, VectorParity
from loopformer.tasks.jsonl import read_task_file, write_task_file


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_strings_and_lists_are_parsed_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "tasks.jsonl",
        [
            json.dumps({"input": "a  b\tc", "target": " x y z "}),
            "",
            "   ",
            json.dumps({"input": ["3+7", "="], "target": ["0", "1"], "note": "extra keys are ignored"}),
            json.dumps({"input": "n1 > n0 ? ?", "target": "n1"}),
        ],
    )
    examples = read_task_file(path)
    assert examples == [
        Example(("a", "b", "c"), ("x", "y", "z")),
        Example(("3+7", "="), ("0", "1")),
        Example(("n1", ">", "n0", "?", "?"), ("n1",)),
    ]
    assert [e.per_position for e in examples] == [True, True, False]
    assert all(e.difficulty is None for e in examples)
    assert read_task_file(str(path)) == examples  # a str path works too


def test_windows_line_endings_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"input": "a b", "target": "b a"}\r\n\r\n{"input": "c", "target": "d e"}\r\n')
    assert read_task_file(path) == [Example(("a", "b"), ("b", "a")), Example(("c",), ("d", "e"))]


GOOD = json.dumps({"input": "a b", "target": "b a"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"input": "a b", "target": ', "not valid JSON"),
        ("not json at all", "not valid JSON"),
        (json.dumps({"input": "a b"}), 'expected an object with "input" and "target"'),
        (json.dumps({"target": "a b"}), 'expected an object with "input" and "target"'),
        (json.dumps(["a b", "b a"]), 'expected an object with "input" and "target"'),
        (json.dumps("a b"), 'expected an object with "input" and "target"'),
        (json.dumps({"input": "", "target": "x"}), "'input' is empty"),
        (json.dumps({"input": "a", "target": "  \t "}), "'target' is empty"),
        (json.dumps({"input": [], "target": "x"}), "'input' is empty"),
        (json.dumps({"input": 3, "target": "x"}), "'input' must be a string"),
        (json.dumps({"input": "a", "target": None}), "'target' must be a string"),
        (json.dumps({"input": "a", "target": {"x": 1}}), "'target' must be a string"),
        (json.dumps({"input": ["a", 1], "target": "x"}), "'input' must be a string"),
        (json.dumps({"input": ["a b"], "target": "x"}), "'input' must be a string"),
        (json.dumps({"input": ["a", ""], "target": "x"}), "'input' must be a string"),
    ],
)
def test_malformed_line_is_an_error_naming_path_and_line(tmp_path: Path, bad: str, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(InputError) as info:
        read_task_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"])
def test_file_without_examples_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="holds no examples") as info:
        read_task_file(path)
    assert str(path) in str(info.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as info:
        read_task_file(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    examples = [
        *TASKS["addition"].generate(3, 4, seed=1),
        *TASKS["prefix-parity"].generate(5, 4, seed=1),
        *VectorParity(size=6).generate(2, 4, seed=1),
        *TASKS["pointer-chasing"].generate(2, 4, seed=1),
    ]
    path = tmp_path / "all.jsonl"
    write_task_file(path, examples)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(examples)
    assert json.loads(lines[0]) == {"input": " ".join(examples[0].input), "target": " ".join(examples[0].target)}
    back = read_task_file(path)
    # the difficulty is not part of the file format
    assert [(e.input, e.target) for e in back] == [(e.input, e.target) for e in examples]
    assert [e.per_position for e in back] == [e.per_position for e in examples]
    write_task_file(path, back)
    assert read_task_file(path) == back
