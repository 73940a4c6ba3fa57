"""lm-eval adapter: a looped checkpoint as the lm-evaluation-harness model ``loopformer`` (optional extra ``eval``).

Importing this module registers :class:`LoopformerLM`. It scores and generates through the inference
:class:`~loopformer.inference.engine.Engine`, so the depth settings mean what they mean for ``loopformer
generate``: ``loops`` (core iterations per token; the ceiling with an ``exit`` rule), ``exit`` (a per-token early
exit such as ``kl:5e-4``), ``kv`` (``full``, ``last`` or ``ring:K``). Log-likelihoods are teacher-forced token by
token (:meth:`Engine.score`), which is what makes ``exit`` and ``kv`` apply; rows of equal length are batched.

Model arguments (``--model_args`` / ``simple_evaluate(model_args=...)``): ``ckpt`` (a checkpoint or run directory,
quantized ones included), ``loops``, ``exit``, ``kv``, ``batch_size``, ``device``.

lm-eval's own command line does not discover models from other packages; ``loopformer-lm-eval`` is that same
command line with this model registered::

    loopformer-lm-eval run --model loopformer --model_args ckpt=runs/lm,loops=8 --tasks T --include_path DIR

:func:`sweep_loops` (``loopformer eval``) runs tasks at several depths and collects one table.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval.evaluator
import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from loopformer.errors import InputError
from loopformer.evaluation.lm_eval_tasks import TASKS_DIR
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.sampling import SamplingConfig
from loopformer.loading import load_trained_model
from loopformer.model import LoopLM
from loopformer.tokenizer import TextTokenizer

DEFAULT_MAX_GEN_TOKS = 256
LOG = logging.getLogger(__name__)


@register_model("loopformer")
class LoopformerLM(LM):
    """A :class:`LoopLM` and its tokenizer behind lm-eval's ``LM`` interface (see the module docstring).

    Pass ``ckpt``, or an already loaded ``model`` and ``tokenizer``. ``max_batch_size`` is accepted because
    lm-eval passes it to every model; batches are exactly ``batch_size`` rows. A CUDA ``device`` on a machine
    without one (lm-eval's command line asks for ``cuda`` by default) leaves the model on the CPU, with a warning.
    """

    def __init__(
        self,
        ckpt: str | None = None,
        loops: int | None = None,
        exit: str | None = None,
        kv: str = "full",
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        model: LoopLM | None = None,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        super().__init__()
        if (ckpt is None) == (model is None):
            raise InputError("LoopformerLM takes either ckpt=DIR or a loaded model (with its tokenizer).")
        if ckpt is not None:
            model, state, path = load_trained_model(Path(ckpt))
            if state.tokenizer_json is None:
                raise InputError(
                    f"{path} has no tokenizer.json; lm-eval passes text, so the model needs its tokenizer."
                )
            tokenizer = TextTokenizer.from_json(state.tokenizer_json)
        if tokenizer is None:
            raise InputError("LoopformerLM needs the model's tokenizer.")
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            LOG.warning("device %s requested (lm-eval's default) but CUDA is unavailable; running on the CPU", device)
        elif device is not None:
            model = model.to(device)
        self.engine = Engine(model, tokenizer)
        self.tokenizer = tokenizer
        self.batch_size = _positive(batch_size, "batch_size")
        self.set_depth(loops, exit, kv)

    def set_depth(self, loops: int | None, exit: str | None = None, kv: str = "full") -> None:
        """Change the depth settings (checked at once) for the following requests."""
        self.config = GenerationConfig(loops=None if loops is None else _positive(loops, "loops"), exit=exit, kv=kv)

    @property
    def max_length(self) -> int:
        return self.engine.model.config.max_seq_len

    # ----- scoring ------------------------------------------------------------------------
    def _progress(self, what: str, total: int, disable: bool) -> tqdm:
        """A progress bar over ``total`` rows of one request type at the current depth (on stderr)."""
        depth = "the model's loops" if self.config.loops is None else f"loops={self.config.loops}"
        return tqdm(total=total, desc=f"{what} ({depth})", unit="row", disable=disable, leave=False)

    def _score(
        self, rows: Sequence[list[int]], targets: Sequence[int], what: str, disable_tqdm: bool
    ) -> list[tuple[float, bool]]:
        """For each row, the summed log-probability of its last ``targets[i]`` tokens and whether each of them is
        the argmax prediction. Rows of one length are scored together, ``batch_size`` at a time."""
        by_length: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_length.setdefault(len(row), []).append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with self._progress(what, len(rows), disable_tqdm) as bar:
            for indices in by_length.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    ids = torch.tensor([rows[i] for i in chunk], dtype=torch.long, device=self.engine.device)
                    log_probs, _, predictions = self.engine.score(ids, self.config)
                    for j, i in enumerate(chunk):
                        n = targets[i]
                        greedy = bool((predictions[j, -n:] == ids[j, -n:]).all())
                        results[i] = (float(log_probs[j, -n:].double().sum()), greedy)
                    bar.update(len(chunk))
        return results

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """BOS + context and continuation ids, split as lm-eval's own models do: trailing spaces of the context
        move to the continuation, the whole text is encoded and cut after the context's tokens. Where a token
        spans the boundary (the whole text's tokens do not start with the context's), the two parts are encoded
        apart."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        head = self.tokenizer.encode(context) if context else []
        whole = self.tokenizer.encode(context + continuation)
        if whole[: len(head)] == head and len(whole) > len(head):
            return [self.tokenizer.bos_id, *head], whole[len(head) :]
        return [self.tokenizer.bos_id, *head], self.tokenizer.encode(continuation)

    def _truncated(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """``context + continuation`` cut from the left to the model's context plus the last token (a target that is
        never fed), and the number of targets."""
        if not continuation:
            raise InputError("lm-eval asked for the log-likelihood of an empty continuation.")
        row = (context + continuation)[-(self.max_length + 1) :]
        return row, min(len(continuation), len(row) - 1)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows, targets = [], []
        for request in requests:
            row, n = self._truncated(*self._pair(*request.args))
            rows.append(row)
            targets.append(n)
        results = self._score(rows, targets, "loglikelihood", disable_tqdm)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-probability from BOS, in disjoint windows of the model's context."""
        rows, targets, owner = [], [], []
        for index, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0])
            windows = get_rolling_token_windows(
                token_list=tokens, prefix_token=self.tokenizer.bos_id, max_seq_len=self.max_length, context_len=1
            )
            for context, continuation in map(make_disjoint_window, windows):
                row, n = self._truncated(context, continuation)
                rows.append(row)
                targets.append(n)
                owner.append(index)
        totals = [0.0] * len(requests)
        scored = self._score(rows, targets, "loglikelihood_rolling", disable_tqdm)
        for index, (log_prob, _) in zip(owner, scored, strict=True):
            totals[index] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ----- generation ---------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation until a stop string, the end-of-sequence token or ``max_gen_toks``; requests with the same
        generation settings run in batches of ``batch_size``."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        texts = [""] * len(requests)
        with self._progress("generate_until", len(requests), disable_tqdm) as bar:
            for indices in groups.values():
                config = self._generation_config(requests[indices[0]].args[1])
                room = max(self.max_length - config.max_new_tokens, 1)
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    bos = self.tokenizer.bos_id
                    prompts = [[bos, *self.tokenizer.encode(requests[i].args[0])][-room:] for i in chunk]
                    result = self.engine.generate(prompts, config)
                    for i, output in zip(chunk, result.outputs, strict=True):
                        texts[i] = output.text
                        self.cache_hook.add_partial("generate_until", requests[i].args, output.text)
                    bar.update(len(chunk))
        return texts

    def _generation_config(self, gen_kwargs: dict[str, Any]) -> GenerationConfig:
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        sampled = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0) > 0
        sampling = SamplingConfig(temperature=float(gen_kwargs["temperature"]), seed=0) if sampled else SamplingConfig()
        new_tokens = _positive(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS), "max_gen_toks")
        return GenerationConfig(
            max_new_tokens=min(new_tokens, self.max_length - 1),
            loops=self.config.loops,
            exit=self.config.exit,
            kv=self.config.kv,
            stop_strings=until,
            sampling=sampling,
        )


def _positive(value: object, name: str) -> int:
    """An integer >= 1 from an int or its decimal text (lm-eval passes model args as parsed strings)."""
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}.")
    return number


# ----- depth sweep ----------------------------------------------------------------------------
@dataclass
class SweepResult:
    """One metric of one task at one depth."""

    task: str
    metric: str
    loops: int
    value: float


def task_metrics(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """``(task, metric) -> value`` from ``simple_evaluate``'s output, standard errors left out."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, _ = key.partition(",")
            if "," in key and not metric.endswith("_stderr") and isinstance(value, int | float):
                metrics[(task, key)] = float(value)
    return metrics


def find_tasks(tasks: Sequence[str], include_path: str | None = None, builtin: bool = True) -> TaskManager:
    """A TaskManager that knows ``tasks``: the shipped example tasks (:data:`TASKS_DIR`) and ``include_path`` are
    indexed first; lm-eval's own ~15,000 task files (about 10 s) only when a task is not among them and ``builtin``
    allows. Unknown names are left for the caller to report."""
    paths = [str(TASKS_DIR), *([include_path] if include_path else [])]
    local = TaskManager(include_path=paths, include_defaults=False)
    if not builtin or all(task in local.all_tasks for task in tasks):
        return local
    return TaskManager(include_path=paths)


class _DropRepeatedNotices(logging.Filter):
    """Drops lm-eval's per-task, per-run notice about custom-dataset kwargs, which says nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet_git_hash() -> str | None:
    """lm-eval's ``git describe`` for its results, without git's "fatal: not a git repository" on stderr."""
    try:
        found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return found.stdout.strip() or None


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's noise that repeats at every depth (restored afterwards)."""
    notices = _DropRepeatedNotices()
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(notices)
    git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
        task_logger.removeFilter(notices)


def sweep_loops(
    lm: LoopformerLM,
    tasks: Sequence[str],
    loops: Sequence[int],
    task_manager: TaskManager,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> list[SweepResult]:
    """Run ``tasks`` with ``lm`` at each depth in ``loops`` (keeping its exit and KV settings)."""
    exit, kv = lm.config.exit, lm.config.kv
    found = []
    for depth in loops:
        lm.set_depth(depth, exit, kv)
        with _quiet_lm_eval():
            output = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=task_manager,
                limit=limit,
                num_fewshot=num_fewshot,
                bootstrap_iters=0,
                log_samples=False,
            )
        if output is None:
            raise InputError("lm-eval returned no results.")
        for (task, metric), value in sorted(task_metrics(output).items()):
            found.append(SweepResult(task, metric, depth, value))
    return found


def sweep_table(results: Sequence[SweepResult]) -> tuple[list[str], list[list[object]]]:
    """Headers and rows of a task x loops table: one row per (task, metric), one column per depth."""
    depths = sorted({r.loops for r in results})
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for r in results:
        cells.setdefault((r.task, r.metric), {})[r.loops] = r.value
    rows = [
        [task, metric, *(_rounded(values.get(d, math.nan)) for d in depths)]
        for (task, metric), values in sorted(cells.items())
    ]
    return ["task", "metric", *(f"r={d}" for d in depths)], rows


def _rounded(value: float) -> float | str:
    return round(value, 4) if math.isfinite(value) else "n/a"


def main() -> None:
    """``loopformer-lm-eval``: lm-eval's command line with the ``loopformer`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
