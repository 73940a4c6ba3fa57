"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import write_corpus


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny text corpus in ``tmp_path``, with the data cache there too (child processes inherit it)."""
    monkeypatch.setenv("LOOPFORMER_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")
