"""The built-in reasoning tasks and the registry that names them."""

from __future__ import annotations

import itertools
import random

from loopformer.errors import InputError
from loopformer.tasks.base import Example, Task

_DIGITS = tuple("0123456789")


def _check_positive(task: str, field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{task}: {field} must be a positive integer, got {value!r}.")


class PrefixParity(Task):
    """Running parity of a bit string, one answer per position."""

    name = "prefix-parity"
    description = "At every position of a bit string, whether the bits so far hold an odd number of ones."
    difficulty_name = "length"
    train_difficulty = (16, 16)
    alphabet = ("0", "1")

    def sample(self, difficulty: int, rng: random.Random) -> Example:
        self.check_difficulty(difficulty)
        bits = tuple(rng.choice(self.alphabet) for _ in range(difficulty))
        return Example(bits, self.solve(bits), difficulty)

    def solve(self, input: tuple[str, ...]) -> tuple[str, ...]:
        if any(bit not in self.alphabet for bit in input):
            raise self._malformed(input, "a sequence of '0'/'1' bits")
        parities: list[str] = []
        parity = 0
        for bit in input:
            parity ^= int(bit)
            parities.append(str(parity))
        return tuple(parities)


class Addition(Task):
    """Column-wise addition of two n-digit numbers, least-significant digit first.

    With uniform digits a carry rarely travels more than a few columns. ``propagate`` is the probability that a
    column's digits sum to exactly 9 (so an incoming carry passes through it): with ``propagate=0.9``
    (``addition-carry``) carry chains span much of the number, and each answer digit depends on far-away columns.
    """

    name = "addition"
    description = "Add two numbers given as digit columns like '3+7', least-significant first, then '='."
    difficulty_name = "digits"
    train_difficulty = (1, 10)
    alphabet = (*(f"{a}+{b}" for a in _DIGITS for b in _DIGITS), "=", *_DIGITS)
    _columns = frozenset(alphabet[:100])

    def __init__(self, propagate: float = 0.0, name: str = "addition") -> None:
        if not 0.0 <= propagate <= 1.0:
            raise InputError(f"{name}: propagate must lie in [0, 1], got {propagate!r}.")
        self.propagate = propagate
        self.name = name
        if propagate > 0:
            self.description = f"Addition whose columns sum to 9 with probability {propagate} (long carry chains)."

    def _column(self, rng: random.Random) -> tuple[int, int]:
        if self.propagate and rng.random() < self.propagate:
            a = rng.randrange(10)
            return a, 9 - a
        return rng.randrange(10), rng.randrange(10)

    def sample(self, difficulty: int, rng: random.Random) -> Example:
        self.check_difficulty(difficulty)
        columns: list[str] = []
        digits: list[str] = []
        carry = 0
        for _ in range(difficulty):
            a, b = self._column(rng)
            carry, digit = divmod(a + b + carry, 10)
            columns.append(f"{a}+{b}")
            digits.append(str(digit))
        return Example((*columns, "="), (*digits, str(carry)), difficulty)

    def solve(self, input: tuple[str, ...]) -> tuple[str, ...]:
        columns = input[:-1]
        if not columns or input[-1] != "=" or any(c not in self._columns for c in columns):
            raise self._malformed(input, "digit columns like '3+7' followed by '='")
        a = int("".join(c[0] for c in reversed(columns)))
        b = int("".join(c[2] for c in reversed(columns)))
        return tuple(reversed(str(a + b).zfill(len(columns) + 1)))


class VectorParity(Task):
    """Parity of the '+' elements of a sparse vector (the ACT / PonderNet parity task).

    ``layout="dense"`` writes all ``size`` elements. ``layout="sparse"`` writes the same vector in coordinate
    form, as its non-zero entries in index order, each an index symbol ``@i`` followed by its sign: the input then
    grows with the number of non-zero elements, so a model that reads it sequentially does work proportional to
    the difficulty (the setting of a halting study; see docs/tasks.md).
    """

    difficulty_name = "non-zero elements"
    layouts = ("dense", "sparse")

    def __init__(self, size: int = 32, layout: str = "dense") -> None:
        _check_positive("vector-parity", "size", size)
        if layout not in self.layouts:
            raise InputError(f"vector-parity: layout must be one of {', '.join(self.layouts)}, got {layout!r}.")
        self.size = size
        self.layout = layout
        self.max_difficulty = size
        self.train_difficulty = (1, min(8, size))
        self._indices = tuple(f"@{i}" for i in range(size))
        self._position = {symbol: i for i, symbol in enumerate(self._indices)}
        if layout == "dense":
            self.name = "vector-parity"
            self.description = "Whether a vector of '+', '-' and '0' elements holds an odd number of '+' elements."
            self.alphabet = ("0", "+", "-", "1")
        else:
            self.name = "vector-parity-sparse"
            self.description = (
                "Vector parity with the vector written as its non-zero entries ('@5 + @9 -'): the input grows "
                "with the difficulty."
            )
            self.alphabet = ("0", "+", "-", "1", *self._indices)

    def sample(self, difficulty: int, rng: random.Random) -> Example:
        self.check_difficulty(difficulty)
        vector = ["0"] * self.size
        for i in rng.sample(range(self.size), difficulty):
            vector[i] = rng.choice("+-")
        if self.layout == "sparse":
            input = tuple(s for i, e in enumerate(vector) if e != "0" for s in (self._indices[i], e))
        else:
            input = tuple(vector)
        return Example(input, self.solve(input), difficulty)

    def solve(self, input: tuple[str, ...]) -> tuple[str, ...]:
        if self.layout == "sparse":
            indices = [self._position.get(s, -1) for s in input[::2]]
            signs = input[1::2]
            ordered = all(b > a for a, b in itertools.pairwise(indices))
            if not input or len(input) % 2 or min(indices) < 0 or not ordered or not set(signs) <= {"+", "-"}:
                raise self._malformed(
                    input, f"pairs of an index '@0'..'@{self.size - 1}' (increasing) and a sign '+' or '-'"
                )
        elif len(input) != self.size or any(e not in ("0", "+", "-") for e in input):
            raise self._malformed(input, f"{self.size} elements, each '0', '+' or '-'")
        return (str(input.count("+") % 2),)


class PointerChasing(Task):
    """Follow a random function table for p hops from a start node."""

    name = "pointer-chasing"
    description = "Given a table of node successors, a start node and p '?' symbols, name the node p hops away."
    difficulty_name = "hops"
    train_difficulty = (1, 4)

    def __init__(self, nodes: int = 8) -> None:
        _check_positive(self.name, "nodes", nodes)
        self.nodes = nodes
        self._index = {f"n{j}": j for j in range(nodes)}
        self.alphabet = (*self._index, ">", "?")

    def sample(self, difficulty: int, rng: random.Random) -> Example:
        self.check_difficulty(difficulty)
        symbols = self.alphabet[: self.nodes]
        table = tuple(rng.choice(symbols) for _ in range(self.nodes))
        input = (*table, ">", rng.choice(symbols), *("?",) * difficulty)
        return Example(input, self.solve(input), difficulty)

    def solve(self, input: tuple[str, ...]) -> tuple[str, ...]:
        n = self.nodes
        table, start, hops = input[:n], input[n + 1 : n + 2], input[n + 2 :]
        if len(input) < n + 3 or input[n] != ">" or set(hops) != {"?"} or not set(table + start) <= self._index.keys():
            raise self._malformed(input, f"a {n}-node table, '>', a start node and at least one '?'")
        node = start[0]
        for _ in hops:
            node = table[self._index[node]]
        return (node,)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        PrefixParity(),
        Addition(),
        Addition(0.9, "addition-carry"),
        VectorParity(),
        VectorParity(layout="sparse"),
        PointerChasing(),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}.") from None
