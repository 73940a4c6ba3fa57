"""Symbolic reasoning tasks: examples, the task interface and exact-match scoring."""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from loopformer.errors import InputError


@dataclass(frozen=True)
class Example:
    """One task instance: input symbols, target symbols and the difficulty it was generated at."""

    input: tuple[str, ...]
    target: tuple[str, ...]
    difficulty: int | None = None

    @property
    def per_position(self) -> bool:
        """True when ``target[i]`` answers input position ``i``; False when the target continues the input."""
        return len(self.target) == len(self.input)


def exact_match(predicted: Sequence[str], target: Sequence[str]) -> bool:
    """Whether the whole predicted sequence equals the target."""
    return tuple(predicted) == tuple(target)


def _seeded_rng(*parts: object) -> random.Random:
    """A generator seeded by a stable (unsalted) hash of ``parts``."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Task(ABC):
    """A generator of random instances with a difficulty knob, plus a reference solver."""

    name: str
    description: str
    difficulty_name: str
    train_difficulty: tuple[int, int]
    alphabet: tuple[str, ...]
    max_difficulty: int | None = None

    @abstractmethod
    def sample(self, difficulty: int, rng: random.Random) -> Example:
        """One random instance at ``difficulty``."""

    @abstractmethod
    def solve(self, input: tuple[str, ...]) -> tuple[str, ...]:
        """The correct target for ``input``, by a straightforward reference algorithm."""

    def check_difficulty(self, difficulty: int) -> None:
        """Raise InputError unless ``difficulty`` is an integer in the allowed range."""
        hi = self.max_difficulty
        ok = isinstance(difficulty, int) and not isinstance(difficulty, bool)
        if not ok or difficulty < 1 or (hi is not None and difficulty > hi):
            allowed = ">= 1" if hi is None else f"in [1, {hi}]"
            raise InputError(
                f"{self.name}: difficulty ({self.difficulty_name}) must be an integer {allowed}, got {difficulty!r}."
            )

    def generate(self, difficulty: int, count: int, seed: int) -> list[Example]:
        """``count`` instances at one difficulty; the same arguments always give the same list."""
        self.check_difficulty(difficulty)
        _check_count(count)
        rng = _seeded_rng(self.name, difficulty, seed)
        return [self.sample(difficulty, rng) for _ in range(count)]

    def generate_mixed(self, low: int, high: int, count: int, seed: int) -> list[Example]:
        """``count`` instances with difficulties drawn uniformly from ``[low, high]``, deterministically."""
        self.check_difficulty(low)
        self.check_difficulty(high)
        if low > high:
            raise InputError(f"{self.name}: difficulty range low={low} must not exceed high={high}.")
        _check_count(count)
        rng = _seeded_rng(self.name, "mixed", low, high, seed)
        return [self.sample(rng.randint(low, high), rng) for _ in range(count)]

    def _malformed(self, input: tuple[str, ...], expected: str) -> InputError:
        """The error for an input that does not have this task's structure."""
        return InputError(f"{self.name}: expected {expected}, got {' '.join(input)!r}.")


def _check_count(count: int) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise InputError(f"example count must be a non-negative integer, got {count!r}.")
