"""The built-in reasoning tasks: determinism, correctness against test-side brute force, validation."""

from __future__ import annotations

import random

import pytest

from loopformer.errors import InputError
from loopformer.tasks.base import Example, Task, exact_match
from loopformer.tasks.builtin import TASKS, Addition, PointerChasing, VectorParity, get_task


def _brute_prefix_parity(ex: Example) -> tuple[str, ...]:
    return tuple(str(ex.input[: i + 1].count("1") % 2) for i in range(len(ex.input)))


def _brute_addition(ex: Example) -> tuple[str, ...]:
    a = b = 0
    for place, column in enumerate(ex.input[:-1]):
        left, right = column.split("+")
        a += int(left) * 10**place
        b += int(right) * 10**place
    total = sum(int(d) * 10**place for place, d in enumerate(ex.target))
    assert total == a + b
    return ex.target


def _brute_vector_parity(ex: Example) -> tuple[str, ...]:
    plus = sum(1 for e in ex.input if e == "+")
    return ("1",) if plus % 2 else ("0",)


def _brute_pointer_chasing(ex: Example) -> tuple[str, ...]:
    arrow = ex.input.index(">")
    node = ex.input[arrow + 1]
    for _ in range(len(ex.input) - arrow - 2):
        node = ex.input[int(node.removeprefix("n"))]
    return (node,)


BRUTE = {
    "prefix-parity": _brute_prefix_parity,
    "addition": _brute_addition,
    "addition-carry": _brute_addition,
    "vector-parity": _brute_vector_parity,
    "vector-parity-sparse": _brute_vector_parity,
    "pointer-chasing": _brute_pointer_chasing,
}
PER_POSITION = {
    "prefix-parity": True,
    "addition": True,
    "addition-carry": True,
    "vector-parity": False,
    "vector-parity-sparse": False,
    "pointer-chasing": False,
}


def _expected_lengths(name: str, difficulty: int) -> tuple[int, int]:
    return {
        "prefix-parity": (difficulty, difficulty),
        "addition": (difficulty + 1, difficulty + 1),
        "addition-carry": (difficulty + 1, difficulty + 1),
        "vector-parity": (32, 1),
        "vector-parity-sparse": (2 * difficulty, 1),
        "pointer-chasing": (8 + 2 + difficulty, 1),
    }[name]


@pytest.fixture(params=sorted(TASKS))
def task(request: pytest.FixtureRequest) -> Task:
    return TASKS[request.param]


def test_registry_names_match() -> None:
    assert sorted(TASKS) == sorted(BRUTE)
    assert all(get_task(name) is t and t.name == name for name, t in TASKS.items())


def test_generate_is_deterministic(task: Task) -> None:
    first = task.generate(5, 20, seed=1)
    assert first == task.generate(5, 20, seed=1)
    assert first != task.generate(5, 20, seed=2)
    assert task.generate(5, 0, seed=1) == []


def test_generate_mixed_respects_range(task: Task) -> None:
    examples = task.generate_mixed(2, 6, 200, seed=3)
    assert examples == task.generate_mixed(2, 6, 200, seed=3)
    assert {ex.difficulty for ex in examples} == set(range(2, 7))
    for ex in examples:
        assert ex.difficulty is not None
        assert (len(ex.input), len(ex.target)) == _expected_lengths(task.name, ex.difficulty)


@pytest.mark.parametrize("difficulty", [1, 2, 7, 20])
def test_examples_are_correct_and_well_formed(task: Task, difficulty: int) -> None:
    for ex in task.generate(difficulty, 100, seed=difficulty):
        assert ex.difficulty == difficulty
        assert task.solve(ex.input) == ex.target
        assert BRUTE[task.name](ex) == ex.target
        assert ex.per_position is PER_POSITION[task.name]
        assert (len(ex.input), len(ex.target)) == _expected_lengths(task.name, difficulty)
        symbols = set(ex.input) | set(ex.target)
        assert symbols <= set(task.alphabet)
        assert all(s and not any(c.isspace() for c in s) for s in symbols)


def test_metadata(task: Task) -> None:
    lo, hi = task.train_difficulty
    task.check_difficulty(lo)
    task.check_difficulty(hi)
    assert lo <= hi
    assert task.description and task.difficulty_name
    assert len(set(task.alphabet)) == len(task.alphabet)
    assert all(s and not any(c.isspace() for c in s) for s in task.alphabet)


@pytest.mark.parametrize("bad", [0, -3, 2.0, "4", True, None])
def test_invalid_difficulty_names_the_task(task: Task, bad: object) -> None:
    with pytest.raises(InputError, match=task.name):
        task.generate(bad, 1, seed=0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=task.name):
        task.generate_mixed(1, bad, 1, seed=0)  # type: ignore[arg-type]


def test_vector_parity_limits() -> None:
    task = VectorParity(size=6)
    with pytest.raises(InputError, match=r"vector-parity.*\[1, 6\].*7"):
        task.check_difficulty(7)
    examples = task.generate(6, 50, seed=0)
    assert all(ex.input.count("0") == 0 for ex in examples)
    assert all(len(ex.input) - ex.input.count("0") == 3 for ex in task.generate(3, 50, seed=0))
    assert task.train_difficulty == (1, 6)
    with pytest.raises(InputError, match="vector-parity"):
        VectorParity(size=0)


@pytest.mark.parametrize("seed", range(5))
def test_sparse_vector_parity_writes_the_dense_vector_in_coordinate_form(seed: int) -> None:
    """The same random draws give the same vector in both layouts: the sparse input lists its non-zero entries."""
    dense = VectorParity(size=12).sample(5, random.Random(seed))
    sparse = VectorParity(size=12, layout="sparse").sample(5, random.Random(seed))
    entries = [(f"@{i}", e) for i, e in enumerate(dense.input) if e != "0"]
    assert sparse.input == tuple(s for entry in entries for s in entry)
    assert sparse.target == dense.target and sparse.difficulty == dense.difficulty == 5
    assert VectorParity(size=12, layout="sparse").name == "vector-parity-sparse"


@pytest.mark.parametrize(
    "bad",
    [(), ("@1",), ("@1", "+", "@1", "-"), ("@3", "+", "@1", "-"), ("@1", "0"), ("@6", "+"), ("+", "@1"), ("x", "+")],
)
def test_sparse_vector_parity_rejects_malformed_coordinates(bad: tuple[str, ...]) -> None:
    with pytest.raises(InputError, match="vector-parity-sparse: expected pairs of an index"):
        VectorParity(size=6, layout="sparse").solve(bad)
    assert VectorParity(size=6, layout="sparse").solve(("@0", "+", "@2", "-", "@5", "+")) == ("0",)
    with pytest.raises(InputError, match="layout must be one of dense, sparse"):
        VectorParity(layout="coo")


def test_addition_carries_and_columns() -> None:
    task = Addition()
    assert task.solve(("9+9", "9+9", "=")) == ("8", "9", "1")
    assert task.solve(("3+4", "0+0", "=")) == ("7", "0", "0")
    assert len(task.alphabet) == 111


def test_addition_carry_makes_long_carry_chains() -> None:
    """addition-carry columns mostly sum to 9, so carries travel far; uniform addition's rarely do."""

    def longest_chain(task: Addition) -> int:
        longest = 0
        for ex in task.generate(40, 200, seed=3):
            run = 0
            for column in ex.input[:-1]:
                run = run + 1 if int(column[0]) + int(column[2]) == 9 else 0
                longest = max(longest, run)
        return longest

    assert longest_chain(get_task("addition-carry")) >= 30 > 10 >= longest_chain(get_task("addition"))
    with pytest.raises(InputError, match="propagate must lie in"):
        Addition(1.5)


def test_pointer_chasing_custom_nodes() -> None:
    task = PointerChasing(nodes=3)
    assert task.solve(("n1", "n2", "n0", ">", "n0", "?", "?")) == ("n2",)
    ex = task.generate(4, 1, seed=0)[0]
    assert len(ex.input) == 3 + 2 + 4
    assert set(ex.input) | set(ex.target) <= set(task.alphabet)


@pytest.mark.parametrize(
    ("name", "bad_input"),
    [
        ("prefix-parity", ("0", "2")),
        ("addition", ("3+4",)),
        ("addition", ()),
        ("vector-parity", ("+",)),
        ("pointer-chasing", ("n0",) * 8 + (">", "n0")),
        ("pointer-chasing", ("n0",) * 8 + (">", "n9", "?")),
    ],
)
def test_solve_rejects_malformed_input(name: str, bad_input: tuple[str, ...]) -> None:
    with pytest.raises(InputError, match=name):
        TASKS[name].solve(bad_input)


def test_mixed_range_and_count_validation(task: Task) -> None:
    with pytest.raises(InputError, match=task.name):
        task.generate_mixed(3, 2, 1, seed=0)
    with pytest.raises(InputError, match="count"):
        task.generate(1, -1, seed=0)


def test_unknown_task_lists_names() -> None:
    with pytest.raises(InputError, match="nope") as info:
        get_task("nope")
    assert all(name in str(info.value) for name in TASKS)


def test_exact_match() -> None:
    assert exact_match(["1", "0"], ("1", "0"))
    assert not exact_match(["1"], ("1", "0"))
    assert not exact_match(["0", "1"], ("1", "0"))
