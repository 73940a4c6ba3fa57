"""User task files: JSON lines of ``{"input": "a b c", "target": "x y z"}``.

``input`` and ``target`` are whitespace-separated symbols (a list of symbol strings is accepted too). A target
with as many symbols as the input is scored per position; otherwise it is a continuation generated after the
input. Blank lines are skipped; anything else that is not such an object is an error naming file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from loopformer.config import read_jsonl_records
from loopformer.errors import InputError
from loopformer.tasks.base import Example


def _symbols(value: object, field: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        symbols = tuple(value.split())
    elif isinstance(value, list) and all(isinstance(v, str) and v and not any(c.isspace() for c in v) for v in value):
        symbols = tuple(value)
    else:
        raise InputError(f"{where}: {field!r} must be a string of whitespace-separated symbols.")
    if not symbols:
        raise InputError(f"{where}: {field!r} is empty.")
    return symbols


def read_task_file(path: str | Path) -> list[Example]:
    """The examples of a task JSONL file, in file order (at least one)."""
    path = Path(path)
    examples = []
    for number, record in read_jsonl_records(path, "Task file", InputError):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or "input" not in record or "target" not in record:
            raise InputError(f'{where}: expected an object with "input" and "target".')
        examples.append(Example(_symbols(record["input"], "input", where), _symbols(record["target"], "target", where)))
    if not examples:
        raise InputError(f"{path} holds no examples.")
    return examples


def write_task_file(path: str | Path, examples: list[Example]) -> None:
    """Write ``examples`` in the format :func:`read_task_file` reads (space-separated symbols)."""
    lines = [json.dumps({"input": " ".join(e.input), "target": " ".join(e.target)}) for e in examples]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
