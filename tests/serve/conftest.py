"""Fixtures of the serving tests: the byte-level tokenizer and an engine with a tiny memory-pathway model."""

from __future__ import annotations

import pytest

from loopformer.inference.engine import Engine
from loopformer.tokenizer import TextTokenizer
from serve.live import memory_model


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.byte_level()


@pytest.fixture(scope="module")
def engine(tokenizer: TextTokenizer) -> Engine:
    return Engine(memory_model(tokenizer), tokenizer)
