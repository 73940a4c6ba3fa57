"""Loads the example tasks' JSONL files from data/ beside this file (no network, no Hugging Face hub).

The task YAMLs name it with ``custom_dataset: !function loopformer_data.load`` and pass the file's stem as
``dataset_kwargs: {name: ...}``; a path in ``data_files`` would be read relative to the working directory instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets


def load(name: str, **_: object) -> datasets.DatasetDict:
    """The rows of ``data/<name>.jsonl`` as the ``test`` split."""
    path = Path(__file__).parent / "data" / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
