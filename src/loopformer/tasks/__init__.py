"""Reasoning tasks with a difficulty knob, for depth-extrapolation experiments (see docs/tasks.md).

A task generates symbolic examples (:class:`Example`: input symbols, target symbols); :mod:`.encoding` turns
them into batches for the ordinary trainer, :mod:`.evaluate` scores a model per loop count.
"""

from loopformer.tasks.base import Example, Task, exact_match
from loopformer.tasks.builtin import TASKS, get_task
from loopformer.tasks.encoding import TaskEncoder, task_tokenizer
from loopformer.tasks.evaluate import evaluate_task, format_accuracy_table
from loopformer.tasks.jsonl import read_task_file, write_task_file

__all__ = [
    "TASKS",
    "Example",
    "Task",
    "TaskEncoder",
    "evaluate_task",
    "exact_match",
    "format_accuracy_table",
    "get_task",
    "read_task_file",
    "task_tokenizer",
    "write_task_file",
]
