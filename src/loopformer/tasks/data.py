"""Task training data for the trainer: a built-in generator or a user's JSONL files, behind the same surface as
:class:`~loopformer.training.pipeline.PreparedData` (``tokenizer``, ``stats``, ``summary``, ``sampler``,
``eval_batches``), so a task run goes through the ordinary training loop.

* Built-in task (``TrainConfig.task``): every step draws fresh examples with difficulties uniform in the
  training range; the examples of step i are a pure function of (seed, i), so a resumed run continues exactly.
  With ``task_curriculum_steps = C`` the range starts at its lowest difficulty and its upper end grows linearly
  to the hardest over the first C steps.
  Evaluation uses a fixed set at ``eval_difficulty`` (default twice the hardest training difficulty).
* User files (``task_data`` / ``eval_data``): the training examples are visited in a seeded order, one
  permutation per epoch; without ``eval_data`` a ``val_fraction`` share is held out.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from loopformer.errors import InputError
from loopformer.tasks.base import Example, Task
from loopformer.tasks.builtin import get_task
from loopformer.tasks.encoding import TaskEncoder, alphabet_of, task_tokenizer
from loopformer.tasks.jsonl import read_task_file
from loopformer.tokenizer import TextTokenizer
from loopformer.training.config import TrainConfig
from loopformer.training.data import Batch, BatchSampler


def parse_difficulty_range(text: str, what: str = "task_difficulty") -> tuple[int, int]:
    """``"16"`` -> (16, 16); ``"1-10"`` -> (1, 10)."""
    low, dash, high = text.partition("-")
    try:
        bounds = (int(low), int(high if dash else low))
    except ValueError:
        raise InputError(f"{what} {text!r} is invalid: expected N or LOW-HIGH, e.g. 16 or 1-10.") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise InputError(f"{what} {text!r} is invalid: expected 1 <= LOW <= HIGH.")
    return bounds


class GeneratedSampler:
    """Fresh examples every step; step i's global batch comes from seed (seed, i), this rank takes its slice."""

    def __init__(
        self,
        task: Task,
        bounds: tuple[int, int],
        encoder: TaskEncoder,
        rows: int,
        seed: int,
        rank: int,
        world: int,
        curriculum_steps: int = 0,
    ) -> None:
        self.task, self.bounds, self.encoder = task, bounds, encoder
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.curriculum_steps = curriculum_steps
        self.draws = 0

    def current_bounds(self) -> tuple[int, int]:
        """The difficulty range of the next batch: the curriculum's (see the module docstring) or the full one."""
        low, high = self.bounds
        if self.draws >= self.curriculum_steps:
            return low, high
        return low, low + math.ceil((high - low) * (self.draws + 1) / self.curriculum_steps)

    def next_batch(self) -> Batch:
        examples = self.task.generate_mixed(
            *self.current_bounds(), self.rows * self.world, seed=self.seed * 1_000_003 + self.draws
        )
        self.draws += 1
        return self.encoder.batch(examples[self.rank * self.rows : (self.rank + 1) * self.rows])

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        draws = state.get("draws")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise InputError(f"task sampler state needs a non-negative integer 'draws', got {state!r}.")
        self.draws = draws


class ExampleRows:
    """A fixed list of examples with the ``len`` / ``rows(indices)`` surface that :class:`BatchSampler` reads."""

    def __init__(self, examples: list[Example], encoder: TaskEncoder) -> None:
        self.examples, self.encoder = examples, encoder

    def __len__(self) -> int:
        return len(self.examples)

    def rows(self, indices: torch.Tensor) -> Batch:
        return self.encoder.batch([self.examples[int(i)] for i in indices])


@dataclass
class TaskData:
    """Training and evaluation data of a reasoning task (see the module docstring)."""

    tokenizer: TextTokenizer
    encoder: TaskEncoder
    eval_examples: list[Example]
    stats: dict[str, Any]
    task: Task | None = None
    bounds: tuple[int, int] | None = None
    curriculum_steps: int = 0
    train_examples: list[Example] = field(default_factory=list)

    @property
    def summary(self) -> str:
        if self.task is not None:
            low, high = self.bounds
            ramp = f", reached over {self.curriculum_steps} steps" if self.curriculum_steps else ""
            return f"task {self.task.name} ({self.task.difficulty_name} {low}-{high}{ramp}, fresh examples every step)"
        return f"{len(self.train_examples):,} task examples"

    def sampler(self, rows: int, seed: int, rank: int, world_size: int) -> GeneratedSampler | BatchSampler:
        if self.task is not None:
            return GeneratedSampler(
                self.task, self.bounds, self.encoder, rows, seed, rank, world_size, self.curriculum_steps
            )
        return BatchSampler(ExampleRows(self.train_examples, self.encoder), rows, seed, rank, world_size)

    def eval_batches(self, batch_size: int, count: int) -> list[Batch]:
        """Every evaluation example (built-in tasks generate ``batch_size * eval_batches`` of them)."""
        return self.encoder.batches(self.eval_examples, batch_size)


def _encoder_for(alphabet: list[str], tokenizer: TextTokenizer | None) -> TaskEncoder:
    if tokenizer is not None and not tokenizer.is_symbolic:
        raise InputError("the checkpoint's tokenizer is a text tokenizer, not a task vocabulary.")
    return TaskEncoder(tokenizer if tokenizer is not None else task_tokenizer(alphabet))


def prepare_task_data(config: TrainConfig, tokenizer: TextTokenizer | None = None) -> TaskData:
    """The task data a :class:`TrainConfig` names; ``tokenizer`` comes with a resumed or fine-tuned checkpoint."""
    if config.task is not None:
        task = get_task(config.task)
        bounds = parse_difficulty_range(config.task_difficulty) if config.task_difficulty else task.train_difficulty
        for difficulty in bounds:
            task.check_difficulty(difficulty)
        encoder = _encoder_for(list(task.alphabet), tokenizer)
        if config.eval_data is not None:
            eval_examples = read_task_file(config.eval_data)
        else:
            default = 2 * bounds[1] if task.max_difficulty is None else min(2 * bounds[1], task.max_difficulty)
            difficulty = config.eval_difficulty or default
            task.check_difficulty(difficulty)
            eval_examples = task.generate(difficulty, config.batch_size * config.eval_batches, seed=config.seed + 1)
        encoder.check(eval_examples, config.eval_data or f"{task.name} evaluation")
        stats = {"task": task.name, "train_difficulty": list(bounds), "eval_examples": len(eval_examples)}
        return TaskData(
            tokenizer=encoder.tokenizer,
            encoder=encoder,
            eval_examples=eval_examples,
            stats=stats,
            task=task,
            bounds=bounds,
            curriculum_steps=config.task_curriculum_steps,
        )
    examples = read_task_file(config.task_data)
    if config.eval_data is not None:
        train, held_out = examples, read_task_file(config.eval_data)
    else:
        shuffled = examples[:]
        random.Random(config.seed).shuffle(shuffled)
        cut = max(1, round(config.val_fraction * len(shuffled))) if len(shuffled) > 1 else 0
        train, held_out = shuffled[cut:], shuffled[:cut] or shuffled
    encoder = _encoder_for(alphabet_of(train), tokenizer)
    encoder.check(train, config.task_data)
    encoder.check(held_out, config.eval_data or config.task_data)
    stats = {"task_data": config.task_data, "train_examples": len(train), "eval_examples": len(held_out)}
    return TaskData(
        tokenizer=encoder.tokenizer, encoder=encoder, eval_examples=held_out, stats=stats, train_examples=train
    )
