"""Offline lm-eval tasks shipped with loopformer (tag ``loopformer_examples``), found by ``loopformer eval`` and
:func:`loopformer.evaluation.lm_eval_model.task_manager` without an include path; see docs/evaluation.md."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
