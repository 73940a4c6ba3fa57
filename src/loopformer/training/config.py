"""Training configuration: a frozen, validated dataclass with the same JSON/YAML form as the model config.

Every field is reachable from a YAML/JSON run file (a ``train:`` section) and from a CLI flag of the same
name (``--batch-size``); see ``loopformer train --help``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from loopformer.config import DTYPES, INT_LIMIT, _check, _check_choice, _check_types, known_fields
from loopformer.errors import ConfigError

SCHEDULES = ("constant", "cosine", "wsd")
BUILTIN_CORPORA = ("stdlib", "stdlib+topics")
PATH_FIELDS = ("data", "val_data", "task_data", "eval_data", "init_from")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    """What to train on and how. Model shape lives in :class:`~loopformer.config.ModelConfig`."""

    data: str = "stdlib"
    val_data: str | None = None
    task: str | None = None
    task_difficulty: str | None = None
    task_curriculum_steps: int = 0
    eval_difficulty: int | None = None
    task_data: str | None = None
    eval_data: str | None = None
    val_fraction: float = 0.02
    tokenizer: str = "bpe"
    tokenizer_vocab: int = 4096
    tokenizer_sample_mb: float = 8.0
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    grad_clip: float = 1.0
    dtype: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    ema_decay: float = 0.0
    doc_mask: bool = False
    eval_every: int = 200
    eval_loops: tuple[int, ...] = (1, 4, 8, 16, 32)
    eval_batches: int = 4
    save_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    max_bad_steps: int = 5
    time_limit_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    strategy: str = "ddp"
    tensorboard: bool = False
    init_from: str | None = None
    init_from_ema: bool = False
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        if isinstance(self.trainable, (list, str)):
            prefixes = self.trainable.split(",") if isinstance(self.trainable, str) else self.trainable
            object.__setattr__(self, "trainable", tuple(p.strip() if isinstance(p, str) else p for p in prefixes))
        _check(
            isinstance(self.trainable, tuple) and all(isinstance(p, str) and p for p in self.trainable),
            owner,
            "trainable",
            self.trainable,
            "expected comma-separated parameter-name prefixes such as halting",
        )
        _check(not self.init_from_ema or self.init_from, owner, "init_from_ema", True, "needs init_from")
        if isinstance(self.eval_loops, (list, str)):
            depths = self.eval_loops.split(",") if isinstance(self.eval_loops, str) else self.eval_loops
            # integers or their text only: a float would be truncated (1.5 -> 1) and a bool read as 0 or 1
            whole = all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in depths)
            try:
                object.__setattr__(self, "eval_loops", tuple(int(d) for d in depths))
            except (TypeError, ValueError, OverflowError):
                whole = False
            _check(whole, owner, "eval_loops", self.eval_loops, "expected integers such as 1,4,8")
        _check_types(self)
        _check(
            isinstance(self.eval_loops, tuple)
            and len(self.eval_loops) > 0
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d < INT_LIMIT for d in self.eval_loops),
            owner,
            "eval_loops",
            self.eval_loops,
            "expected a non-empty list of integers >= 1",
        )
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "keep_last", "log_every"):
            _check(getattr(self, name) >= 1, owner, name, getattr(self, name), "must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "max_bad_steps", "seed", "task_curriculum_steps"):
            _check(getattr(self, name) >= 0, owner, name, getattr(self, name), "must be >= 0 (0 turns it off)")
        _check(self.seq_len >= 2, owner, "seq_len", self.seq_len, "must be >= 2")
        _check(self.lr > 0, owner, "lr", self.lr, "must be > 0")
        for name in ("val_fraction", "min_lr_ratio", "decay_fraction", "ema_decay"):
            value = getattr(self, name)
            _check(0 <= value < 1 or (name == "min_lr_ratio" and value == 1), owner, name, value, "must lie in [0, 1)")
        _check(self.weight_decay >= 0, owner, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.grad_clip >= 0, owner, "grad_clip", self.grad_clip, "must be >= 0 (0 turns clipping off)")
        _check(self.tokenizer_sample_mb > 0, owner, "tokenizer_sample_mb", self.tokenizer_sample_mb, "must be > 0")
        if self.time_limit_minutes is not None:
            _check(self.time_limit_minutes > 0, owner, "time_limit_minutes", self.time_limit_minutes, "must be > 0")
        _check(
            self.task is None or self.task_data is None,
            owner,
            "task_data",
            self.task_data,
            "give either a built-in task or task_data, not both",
        )
        _check(
            self.eval_data is None or self.is_task,
            owner,
            "eval_data",
            self.eval_data,
            "needs a task (task or task_data); text runs take val_data",
        )
        for name in ("task_difficulty", "eval_difficulty", "task_curriculum_steps"):
            value = getattr(self, name)
            _check(value in (None, 0) or self.task is not None, owner, name, value, "applies to a built-in task only")
        if self.eval_difficulty is not None:
            _check(self.eval_difficulty >= 1, owner, "eval_difficulty", self.eval_difficulty, "must be >= 1")
        _check_choice(owner, "schedule", self.schedule, SCHEDULES)
        _check_choice(owner, "dtype", self.dtype, DTYPES)
        for name in PATH_FIELDS:  # stored absolute, so a run can be resumed or evaluated from any folder
            value = getattr(self, name)
            _check(value is None or value.strip() != "", owner, name, value, "an empty path; name a file or folder")
            object.__setattr__(self, name, absolute_source(value))
        _check_choice(owner, "strategy", self.strategy, STRATEGIES)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eval_loops"] = list(self.eval_loops)
        data["trainable"] = list(self.trainable)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"A training config must be a mapping, got {type(data).__name__}.")
        return cls(**known_fields(cls, data))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def is_task(self) -> bool:
        """A reasoning-task run (built-in generator or JSONL examples) rather than language modelling."""
        return self.task is not None or self.task_data is not None

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    def resolved_device(self) -> str:
        """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def absolute_source(source: str | None) -> str | None:
    """``source`` as an absolute path (``~`` expanded); None and the built-in corpora stay as they are."""
    if source is None or source in BUILTIN_CORPORA:
        return source
    return os.path.abspath(os.path.expanduser(source))
