"""What a server allows: limits, the names of the reasoning-effort levels, the served model's name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loopformer.errors import InputError


def parse_effort(text: str) -> dict[str, int]:
    """``"low=4,medium=16,high=32"`` -> {"low": 4, "medium": 16, "high": 32} (loop counts >= 1)."""
    levels: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"--effort {text!r} is invalid: write NAME=LOOPS pairs such as low=4,medium=16,high=32.")
        levels[name] = int(value)
    return levels


def default_effort(mean_loops: int) -> dict[str, int]:
    """OpenAI's effort names relative to the model's training depth: none = 1 loop, minimal = a quarter, low = half,
    medium = the mean, high = twice the mean."""
    return {
        "none": 1,
        "minimal": max(1, mean_loops // 4),
        "low": max(1, mean_loops // 2),
        "medium": mean_loops,
        "high": 2 * mean_loops,
    }


@dataclass(frozen=True)
class ServerSettings:
    """Limits and names of one server; every count is >= 1.

    ``max_batch``: rows decoded together; ``max_queue``: rows waiting for a place in the batch (more is a 503; every
    request waits there first, so it also bounds the rows of one request, as does ``max_choices``);
    ``max_tokens``: the default and the ceiling of a request's ``max_tokens``; ``max_loops``: the deepest a request
    may ask for (it sizes the KV cache); ``timeout``: seconds from arrival to the last token; ``effort``: loop
    counts of the ``reasoning_effort`` names; ``memory_dir``: where named memory files live (None: no files).
    """

    model_name: str
    max_loops: int
    effort: Mapping[str, int]
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int = 256
    timeout: float = 300.0
    continuous_batching: bool = True
    max_body_bytes: int = 1_000_000
    max_choices: int = 16
    max_memory_vectors: int = 256
    memory_dir: Path | None = None

    def __post_init__(self) -> None:
        counts = ("max_loops", "max_batch", "max_queue", "max_tokens", "max_body_bytes", "max_choices")
        for name in (*counts, "max_memory_vectors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"server setting {name} must be an integer >= 1, got {value!r}.")
        if not self.timeout > 0:
            raise InputError(f"the request timeout must be > 0 seconds, got {self.timeout!r}.")
        if not self.effort:
            raise InputError("give at least one reasoning-effort level, e.g. --effort low=2,medium=8,high=16.")
        deep = {name: loops for name, loops in self.effort.items() if loops > self.max_loops}
        if deep:
            name, loops = next(iter(deep.items()))
            raise InputError(f"effort level {name}={loops} asks for more than --max-loops {self.max_loops}.")
        if self.api_key is not None and not self.api_key:
            raise InputError("the API key must not be empty.")
