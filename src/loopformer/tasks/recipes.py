"""The demo's recipes: how each built-in task is learned and probed (model, training, evaluation grid).

Plain configuration, importable without torch, so that ``loopformer demo --help`` can list the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.errors import InputError
from loopformer.training.config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """How one task is learned and probed. ``model.vocab_size`` is set by the trainer from the task alphabet."""

    task: str
    model: ModelConfig
    train: TrainConfig
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    loops: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    stability_loops: int = 1024
    stability_multiple: int = 4
    stability_count: int = 64  # examples run to stability_loops (a subset of the evaluation set)
    curriculum_fraction: float = 0.0  # share of the steps over which the difficulty range widens to its full width

    @property
    def train_difficulty(self) -> int:
        """The hardest training difficulty: the unit of the evaluation multiples."""
        from loopformer.tasks.data import parse_difficulty_range  # torch: not needed to list the recipes

        return parse_difficulty_range(self.train.task_difficulty)[1]


def _windowed_model(window: int, mean_loops: int, backprop_loops: int, n_core: int = 1) -> ModelConfig:
    """A small sandwich-norm model whose attention sees ``window`` positions, so information has to travel
    through the loop: each core pass moves it at most ``window - 1`` positions per core layer."""
    return ModelConfig(
        dim=64,
        n_heads=4,
        n_prelude=1,
        n_core=n_core,
        n_coda=1,
        sliding_window=window,
        max_seq_len=4096,
        recurrence=RecurrenceConfig(mean_loops=mean_loops, backprop_loops=backprop_loops),
    )


def _task_training(task: str, difficulty: str, **changes: Any) -> TrainConfig:
    base = TrainConfig(
        task=task,
        task_difficulty=difficulty,
        batch_size=128,
        lr=2e-3,
        warmup_steps=50,
        schedule="cosine",
        weight_decay=0.1,
        ema_decay=0.995,
        eval_every=0,
        eval_batches=1,
        save_every=0,
        keep_last=1,
        log_every=50,
        device="cpu",
    )
    return base.replace(**changes)


RECIPES: dict[str, Recipe] = {
    "prefix-parity": Recipe(
        task="prefix-parity",
        model=_windowed_model(window=2, mean_loops=6, backprop_loops=3, n_core=2),
        train=_task_training("prefix-parity", "8"),
    ),
    "addition": Recipe(
        task="addition",
        model=_windowed_model(window=2, mean_loops=8, backprop_loops=3, n_core=2),
        train=_task_training("addition", "1-10"),
        multiples=(1, 2, 4),
    ),
    "addition-carry": Recipe(
        task="addition-carry",
        model=_windowed_model(window=2, mean_loops=8, backprop_loops=3, n_core=2),
        train=_task_training("addition-carry", "1-10"),
        multiples=(1, 2, 4),
    ),
    "vector-parity": Recipe(
        task="vector-parity",
        model=_windowed_model(window=2, mean_loops=12, backprop_loops=3, n_core=2),
        train=_task_training("vector-parity", "1-8"),
        multiples=(1, 2, 4),
        stability_multiple=2,
    ),
    # A single answer bit per example: with every difficulty from the start, or with a window of 2, the model
    # learned one or two non-zero entries and stayed at chance on the rest (6-minute runs on 2 CPU cores); widening
    # 1 -> 8 over the first half of the run with a window of 3 (one entry per core layer) learns the scan.
    "vector-parity-sparse": Recipe(
        task="vector-parity-sparse",
        model=_windowed_model(window=3, mean_loops=12, backprop_loops=3, n_core=2),
        train=_task_training("vector-parity-sparse", "1-8"),
        multiples=(1, 2, 4),
        stability_multiple=2,
        curriculum_fraction=0.5,
    ),
    "pointer-chasing": Recipe(
        task="pointer-chasing",
        model=_windowed_model(window=4096, mean_loops=8, backprop_loops=4).replace(sliding_window=None),
        train=_task_training("pointer-chasing", "1-4"),
        multiples=(1, 2, 4),
    ),
}


TASK_FIELDS = ("vocab_size", "max_seq_len", "sliding_window", "recurrence")  # what a task fixes in a preset


def with_architecture(recipe: Recipe, architecture: ModelConfig) -> Recipe:
    """``recipe`` with the model shape and features of ``architecture`` (e.g. a preset); the task keeps its
    vocabulary, context, attention window and depth schedule (the fields in :data:`TASK_FIELDS`)."""
    return replace(recipe, model=architecture.replace(**{name: getattr(recipe.model, name) for name in TASK_FIELDS}))


def get_recipe(task: str) -> Recipe:
    if task not in RECIPES:
        raise InputError(f"no demo recipe for task {task!r}; recipes exist for {', '.join(RECIPES)}.")
    return RECIPES[task]
