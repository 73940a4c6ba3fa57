"""Reasoning tasks with a difficulty knob, for depth-extrapolation experiments (see docs/tasks.md).

A task generates symbolic examples (:class:`Example`: input symbols, target symbols); :mod:`.encoding` turns
them into batches for the ordinary trainer, :mod:`.evaluate` scores a model per loop count.
"""

from loopformer.lazy import lazy_exports

# Imported on first use, so that the task list (``loopformer.tasks.builtin``) loads without torch.
__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "Example": "loopformer.tasks.base",
        "Task": "loopformer.tasks.base",
        "exact_match": "loopformer.tasks.base",
        "TASKS": "loopformer.tasks.builtin",
        "get_task": "loopformer.tasks.builtin",
        "TaskEncoder": "loopformer.tasks.encoding",
        "task_tokenizer": "loopformer.tasks.encoding",
        "evaluate_task": "loopformer.tasks.evaluate",
        "format_accuracy_table": "loopformer.tasks.evaluate",
        "read_task_file": "loopformer.tasks.jsonl",
        "write_task_file": "loopformer.tasks.jsonl",
    },
)

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
