"""Inference benchmark of a trained checkpoint: decode speed, zero-shot exits, KV policies, speculative decoding and
what compaction saves when a batch exits early.

Sections (every number comes from :class:`~loopformer.inference.engine.Engine` on the checkpoint's own weights):

1. **Decode speed**: greedy tokens/s at batch 1 and 8, loops 8 and 32, from prompts of real held-out text tokens,
   a fixed number of new tokens (no stop token), one warm-up call, then the median of the timed calls. tokens/s
   counts every row's new tokens; the time includes the prompt's prefill. The batch-1, 32-loop speed is compared
   with the Huginn reference figure :data:`HUGINN_REFERENCE_TOKENS_PER_S`.
2. **Exit criteria**: each criterion of ``EXIT_CRITERIA`` at its default threshold (plus ``--exit-thresholds``),
   teacher-forced over held-out rows with ``Engine.score`` at 32 loops: mean core iterations per token (the first,
   prefilled token excluded), perplexity and its change against no exit. The best rule saves the most iterations
   with a perplexity change of at most 1%. With ``--task-ckpt`` (a symbolic task checkpoint) the same rules are
   scored on generated task examples for exact-match accuracy.
3. **KV policies**: cache bytes for 1,024 tokens at 32 loops (``cache_bytes``) and the teacher-forced perplexity
   with that policy.
4. **Speculative decoding**: batch 1, 32 loops, greedy: plain against self-speculative (draft loops, lookahead),
   with the acceptance rate and whether the tokens equal plain greedy decoding.
5. **Compaction vs masking**: batch 8 at 32 loops with the best exit rule of (2): wall time, mean iterations and
   the core rows processed (a forward pre-hook on ``model.core[0]`` adds up ``x.shape[0]`` per call, which is
   proportional to core FLOPs in single-token passes).

Held-out text: the validation split of the corpus the checkpoint was trained on (its saved ``train_config``: the
same documents, split and token cache as training), else the standard library's ``textwrap.py``.

    python benchmarks/inference.py --ckpt runs/lm --task-ckpt runs/demo/looped --json benchmarks/results/inference.json

``--quick`` runs every section at tiny sizes (for the smoke test on a random checkpoint).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import torch

import loopformer
from loopformer.checkpoint import TrainingState
from loopformer.errors import LoopformerError
from loopformer.hardware import cpu_info
from loopformer.inference.cache import cache_bytes
from loopformer.inference.engine import Engine, GenerationConfig, GenerationResult, perplexity
from loopformer.inference.exits import EXIT_CRITERIA, ExitRule, parse_exit_rule
from loopformer.loading import load_trained_model
from loopformer.model import LoopLM
from loopformer.table import format_table
from loopformer.tasks.builtin import get_task
from loopformer.tasks.data import parse_difficulty_range
from loopformer.tasks.encoding import IGNORE_INDEX, TaskEncoder
from loopformer.tokenizer import TextTokenizer
from loopformer.training.data import load_documents, split_documents, tokenize_documents
from loopformer.training.metrics import measure_matmul_peak
from loopformer.training.pipeline import cache_dir

# The measured figure for the Huginn reference code at this shape (h=256, layers 1/2/1, vocab 4096,
# r=32, batch 1, greedy) on this machine (2 CPU cores): 18 new tokens/s.
HUGINN_REFERENCE_TOKENS_PER_S = 18.0
LOOPS = 32  # the depth of every section but the decode sweep
DECODE_BATCHES = (1, 8)
DECODE_LOOPS = (8, 32)
KV_POLICIES = ("full", "ring:4", "ring:8", "last")
KV_TOKENS = 1024
SPECULATIVE = ((2, 4), (4, 4), (4, 8), (8, 8))
COMPACTION_BATCH = 8
FALLBACK_RULE = "latent-diff:0.03"  # section 5 when no rule keeps perplexity within MAX_PPL_CHANGE
MAX_PPL_CHANGE = 0.01
TASK_BATCH = 64  # task examples scored per Engine pass


@dataclass(frozen=True)
class Sizes:
    prompt_tokens: int
    new_tokens: int
    warmup: int
    repeats: int
    score_rows: int
    score_tokens: int
    task_count: int


FULL = Sizes(prompt_tokens=32, new_tokens=64, warmup=1, repeats=3, score_rows=4, score_tokens=128, task_count=64)
QUICK = Sizes(prompt_tokens=16, new_tokens=8, warmup=1, repeats=1, score_rows=2, score_tokens=16, task_count=4)


def fail(message: str, script: str = "inference.py") -> NoReturn:
    print(f"{script}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    measure: Callable[[argparse.Namespace, Sequence[str]], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
    script: str,
) -> int:
    """A benchmark's ``main`` after parsing: measure, write ``--json``, print; a user error is one line, exit 2."""
    try:
        report = measure(args, argv)
    except LoopformerError as exc:
        fail(str(exc), script)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    show(report)
    return 0


def progress(section: str, message: str) -> None:
    print(f"[{section}] {message}", file=sys.stderr, flush=True)


def rounded(value: float, digits: int = 4) -> float | None:
    """``value`` rounded for the report; None for NaN / infinity (JSON has no such numbers)."""
    return round(value, digits) if math.isfinite(value) else None


# ----- inputs ------------------------------------------------------------------------------------------------------
def held_out_stream(state: TrainingState, tokenizer: TextTokenizer) -> tuple[torch.Tensor, str]:
    """A 1-D int64 stream of held-out tokens for ``tokenizer`` and a description of where it comes from.

    The validation documents of the checkpoint's training run (``train_config``: ``val_data``, else the
    ``val_fraction`` hash split of ``data``) tokenised like training (BOS before each document, the same token
    cache); the standard library's ``textwrap.py`` when the checkpoint does not say or its corpus is unavailable.
    """
    train = state.meta.get("train_config") or {}
    data = train.get("data")
    if data and not train.get("task") and not train.get("task_data"):
        try:
            if train.get("val_data"):
                docs, where = load_documents(train["val_data"]), f"validation data {train['val_data']}"
            else:
                _, docs = split_documents(load_documents(data), float(train.get("val_fraction", 0.02)))
                where = f"validation split of {data}"
            stream = tokenize_documents(docs, tokenizer, cache_dir() / "tokens")
            tokens = torch.from_numpy(stream.tokens[:].astype("int64"))
            return tokens, f"{where} ({len(docs)} documents, {len(tokens):,} tokens)"
        except LoopformerError as exc:
            progress("data", f"the training corpus is unavailable ({exc}); using textwrap.py")
    path = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    ids = [tokenizer.bos_id, *tokenizer.encode(path.read_text(encoding="utf-8"))]
    return torch.tensor(ids, dtype=torch.long), f"{path} ({len(ids):,} tokens)"


def take(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` consecutive rows of ``length`` tokens from the start of ``stream`` (repeated if it is too short):
    the first rows :class:`~loopformer.training.data.PackedRows` would cut from it."""
    need = count * length
    if len(stream) < need:
        progress("data", f"only {len(stream)} held-out tokens for {need}; repeating them")
        stream = stream.repeat(math.ceil(need / len(stream)))
    return stream[:need].reshape(count, length).clone()


# ----- helpers -----------------------------------------------------------------------------------------------------
def timed_generate(
    engine: Engine, prompts: list[list[int]], config: GenerationConfig, sizes: Sizes
) -> tuple[list[float], GenerationResult]:
    """Warm-up calls, then the wall time of each timed call and the last call's result."""
    for _ in range(sizes.warmup):
        engine.generate(prompts, config)
    seconds, result = [], None
    for _ in range(sizes.repeats):
        start = time.perf_counter()
        result = engine.generate(prompts, config)
        seconds.append(time.perf_counter() - start)
    return seconds, result


def teacher_forced(engine: Engine, ids: torch.Tensor, config: GenerationConfig) -> tuple[float, float]:
    """Perplexity and mean core iterations per token (the prefilled first token excluded) from ``Engine.score``."""
    log_probs, steps, _ = engine.score(ids, config)
    return perplexity(log_probs), float(steps[:, 1:].double().mean())


class CoreRowCounter:
    """Adds up ``x.shape[0]`` (rows) and ``x.shape[0] * x.shape[1]`` (row-tokens) of every call of a core layer."""

    def __init__(self, model: LoopLM) -> None:
        self.model = model
        self.rows = self.row_tokens = 0

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.rows += x.shape[0]
        self.row_tokens += x.shape[0] * x.shape[1]

    def count(self, run: Callable[[], Any]) -> Any:
        handle = self.model.core[0].register_forward_pre_hook(self.hook)
        try:
            return run()
        finally:
            handle.remove()


def parse_rules(text: str | None) -> list[ExitRule]:
    if not text:
        return []
    return [parse_exit_rule(part) for part in text.split(",") if part.strip()]


# ----- 1. decode speed ---------------------------------------------------------------------------------------------
def measure_decode(engine: Engine, prompts: list[list[int]], sizes: Sizes) -> dict[str, Any]:
    rows = []
    for batch in DECODE_BATCHES:
        for loops in DECODE_LOOPS:
            config = GenerationConfig(max_new_tokens=sizes.new_tokens, loops=loops, stop_tokens=())
            seconds, result = timed_generate(engine, prompts[:batch], config, sizes)
            median = statistics.median(seconds)
            speed = result.new_tokens / median
            rows.append(
                {
                    "batch": batch,
                    "loops": loops,
                    "new_tokens": result.new_tokens,
                    "seconds_median": round(median, 4),
                    "seconds": [round(s, 4) for s in seconds],
                    "tokens_per_s": round(speed, 2),
                    "tokens_per_s_per_row": round(speed / batch, 2),
                }
            )
            progress("decode", f"batch {batch}, r={loops}: {speed:.1f} tok/s ({speed / batch:.1f} per row)")
    reference = next(r for r in rows if r["batch"] == 1 and r["loops"] == LOOPS)
    return {
        "prompt_tokens": len(prompts[0]),
        "new_tokens_per_row": sizes.new_tokens,
        "rows": rows,
        "huginn_reference_tokens_per_s": HUGINN_REFERENCE_TOKENS_PER_S,
        "ratio_batch1_r32_vs_huginn": round(reference["tokens_per_s"] / HUGINN_REFERENCE_TOKENS_PER_S, 3),
    }


# ----- 2. exit criteria --------------------------------------------------------------------------------------------
def measure_exits(engine: Engine, ids: torch.Tensor, rules: list[ExitRule]) -> tuple[dict[str, Any], float]:
    """The exit section, and the no-exit perplexity (the full-cache perplexity of the KV section)."""
    base_ppl, base_steps = teacher_forced(engine, ids, GenerationConfig(loops=LOOPS))
    progress("exits", f"no exit, r={LOOPS}: ppl {base_ppl:.3f}")
    rows = []
    for rule in rules:
        ppl, steps = teacher_forced(engine, ids, GenerationConfig(loops=LOOPS, exit=rule))
        change = ppl / base_ppl - 1
        warm_ppl, warm_steps = teacher_forced(engine, ids, GenerationConfig(loops=LOOPS, exit=rule, warm_start=True))
        rows.append(
            {
                "rule": rule.label,
                "criterion": rule.criterion,
                "threshold": rule.threshold,
                "default_threshold": rule.threshold == EXIT_CRITERIA[rule.criterion],
                "mean_loops": round(steps, 3),
                "steps_saved": round(1 - steps / LOOPS, 4),
                "perplexity": rounded(ppl),
                "ppl_change": rounded(change, 5),
                "warm_start_mean_steps": round(warm_steps, 3),
                "warm_start_ppl_change": rounded(warm_ppl / base_ppl - 1, 5),
            }
        )
        progress(
            "exits",
            f"{rule.label}: {steps:.2f} iterations/token, ppl {ppl:.3f} ({change:+.2%}); "
            f"warm start {warm_steps:.2f} iterations/token ({warm_ppl / base_ppl - 1:+.2%})",
        )
    within = [r for r in rows if r["ppl_change"] is not None and r["ppl_change"] <= MAX_PPL_CHANGE]
    best = max(within, key=lambda r: r["steps_saved"], default=None)
    section = {
        "loops": LOOPS,
        "rows_scored": ids.shape[0],
        "tokens_per_row": ids.shape[1],
        "no_exit": {"perplexity": rounded(base_ppl), "mean_loops": round(base_steps, 3)},
        "max_ppl_change": MAX_PPL_CHANGE,
        "rows": rows,
        "best": best["rule"] if best else None,
    }
    return section, base_ppl


def task_difficulties(state: TrainingState, task_name: str, requested: str | None, quick: bool) -> list[int]:
    """``--task-difficulty`` (comma-separated), else the training difficulty and 4x it (quick: the first only)."""
    if requested:
        try:
            return [int(d) for d in requested.split(",")]
        except ValueError:
            raise LoopformerError(
                f"--task-difficulty {requested!r} is not a comma-separated list of integers."
            ) from None
    spec = (state.meta.get("train_config") or {}).get("task_difficulty")
    high = parse_difficulty_range(spec)[1] if spec else get_task(task_name).train_difficulty[1]
    return [high] if quick else [high, 4 * high]


def measure_task(path: Path, args: argparse.Namespace, sizes: Sizes, rules: list[ExitRule]) -> dict[str, Any]:
    model, state, directory = load_trained_model(path, use_ema=args.ema)
    if state.tokenizer_json is None or not TextTokenizer.from_json(state.tokenizer_json).is_symbolic:
        raise LoopformerError(f"{directory} is not a task checkpoint (it has no symbolic task vocabulary).")
    tokenizer = TextTokenizer.from_json(state.tokenizer_json)
    name = args.task or (state.meta.get("train_config") or {}).get("task") or "prefix-parity"
    task = get_task(name)
    engine = Engine(model)
    encoder = TaskEncoder(tokenizer)
    configs = [("no exit", GenerationConfig(loops=LOOPS))]
    configs += [(rule.label, GenerationConfig(loops=LOOPS, exit=rule)) for rule in rules]
    results = []
    for difficulty in task_difficulties(state, name, args.task_difficulty, args.quick):
        examples = task.generate(difficulty, sizes.task_count, seed=args.seed)
        encoder.check(examples, f"{name} at {task.difficulty_name} {difficulty}")
        groups: dict[int, list[tuple[list[int], list[int]]]] = {}
        for example in examples:
            ids, labels = encoder.encode(example)
            groups.setdefault(len(ids), []).append((ids, labels))
        if max(groups) > model.config.max_seq_len:
            progress("task", f"{task.difficulty_name} {difficulty}: rows exceed the context; skipped")
            continue
        baseline = None
        for label, config in configs:
            correct = scored = 0
            step_sum = step_count = 0
            for items in groups.values():
                for start in range(0, len(items), TASK_BATCH):
                    chunk = items[start : start + TASK_BATCH]
                    ids = torch.tensor([i for i, _ in chunk], dtype=torch.long)
                    targets = torch.tensor([t for _, t in chunk], dtype=torch.long)[:, 1:]
                    _, steps, predictions = engine.score(ids, config)
                    labelled = targets != IGNORE_INDEX
                    solved = ((predictions == targets) | ~labelled).all(dim=1) & labelled.any(dim=1)
                    correct += int(solved.sum())
                    scored += int(labelled.any(dim=1).sum())
                    step_sum += int(steps[:, 1:].sum())
                    step_count += steps[:, 1:].numel()
            accuracy = correct / scored if scored else math.nan
            mean_loops = step_sum / step_count
            baseline = accuracy if baseline is None else baseline
            results.append(
                {
                    "difficulty": difficulty,
                    "rule": label,
                    "accuracy": rounded(accuracy),
                    "accuracy_change": rounded(accuracy - baseline),
                    "mean_loops": round(mean_loops, 3),
                    "steps_saved": round(1 - mean_loops / LOOPS, 4),
                }
            )
            progress("task", f"{task.difficulty_name} {difficulty}, {label}: {accuracy:.1%} at {mean_loops:.2f} it/tok")
    return {
        "checkpoint": str(directory),
        "parameters": model.num_parameters(),
        "task": name,
        "difficulty_name": task.difficulty_name,
        "examples_per_difficulty": sizes.task_count,
        "loops": LOOPS,
        "rows": results,
    }


# ----- 3. KV policies ----------------------------------------------------------------------------------------------
def measure_kv(engine: Engine, ids: torch.Tensor, full_ppl: float) -> dict[str, Any]:
    config = engine.model.config
    full_bytes = cache_bytes(config, "full", KV_TOKENS, LOOPS)
    rows = []
    for policy in KV_POLICIES:
        size = cache_bytes(config, policy, KV_TOKENS, LOOPS)
        if policy == "full":
            ppl = full_ppl  # the no-exit score of section 2 is this very configuration
        else:
            ppl, _ = teacher_forced(engine, ids, GenerationConfig(loops=LOOPS, kv=policy))
        change = ppl / full_ppl - 1
        rows.append(
            {
                "policy": policy,
                "cache_bytes": size,
                "cache_mib": round(size / 2**20, 3),
                "ratio_full_over_policy": round(full_bytes / size, 3),
                "perplexity": rounded(ppl),
                "ppl_change": rounded(change, 5),
            }
        )
        progress("kv", f"{policy}: {size / 2**20:.2f} MiB per 1,024 tokens, ppl {ppl:.3f} ({change:+.2%})")
    return {"tokens": KV_TOKENS, "loops": LOOPS, "element_bytes": 4, "rows": rows}


# ----- 4. speculative decoding -------------------------------------------------------------------------------------
def measure_speculative(engine: Engine, prompt: list[int], sizes: Sizes) -> dict[str, Any]:
    plain_config = GenerationConfig(max_new_tokens=sizes.new_tokens, loops=LOOPS, stop_tokens=())
    seconds, plain = timed_generate(engine, [prompt], plain_config, sizes)
    plain_seconds = statistics.median(seconds)
    plain_speed = plain.new_tokens / plain_seconds
    progress("speculative", f"plain: {plain_speed:.1f} tok/s")
    rows = []
    for draft, lookahead in SPECULATIVE:
        config = replace(plain_config, speculative=(draft, lookahead))
        seconds, result = timed_generate(engine, [prompt], config, sizes)
        median = statistics.median(seconds)
        speed = result.new_tokens / median
        identical = result.outputs[0].tokens == plain.outputs[0].tokens
        rows.append(
            {
                "draft_loops": draft,
                "lookahead": lookahead,
                "seconds_median": round(median, 4),
                "tokens_per_s": round(speed, 2),
                "speedup": round(speed / plain_speed, 3),
                "acceptance_rate": round(result.acceptance_rate, 4),
                "identical": identical,
            }
        )
        progress(
            "speculative",
            f"draft {draft}, lookahead {lookahead}: {speed:.1f} tok/s ({speed / plain_speed:.2f}x), "
            f"acceptance {result.acceptance_rate:.0%}, identical {identical}",
        )
    return {
        "batch": 1,
        "loops": LOOPS,
        "new_tokens": sizes.new_tokens,
        "plain": {"seconds_median": round(plain_seconds, 4), "tokens_per_s": round(plain_speed, 2)},
        "rows": rows,
    }


# ----- 5. compaction vs masking ------------------------------------------------------------------------------------
def measure_compaction(engine: Engine, prompts: list[list[int]], rule: ExitRule, sizes: Sizes) -> dict[str, Any]:
    prompts = prompts[:COMPACTION_BATCH]
    counter = CoreRowCounter(engine.model)
    base = GenerationConfig(max_new_tokens=sizes.new_tokens, loops=LOOPS, stop_tokens=())
    variants = [
        ("compaction", replace(base, exit=rule, compaction=True)),
        ("masking", replace(base, exit=rule, compaction=False)),
        ("no exit", base),
    ]
    rows, tokens = [], {}
    for name, config in variants:
        seconds, result = timed_generate(engine, prompts, config, sizes)
        counter.rows = counter.row_tokens = 0
        counted = counter.count(lambda config=config: engine.generate(prompts, config))
        median = statistics.median(seconds)
        tokens[name] = [o.tokens for o in counted.outputs]
        rows.append(
            {
                "mode": name,
                "seconds_median": round(median, 4),
                "seconds": [round(s, 4) for s in seconds],
                "tokens_per_s": round(result.new_tokens / median, 2),
                "mean_loops": round(counted.mean_loops, 3),
                "core_rows": counter.rows,
                "core_row_tokens": counter.row_tokens,
            }
        )
        progress(
            "compaction",
            f"{name}: {median:.3f} s, {counted.mean_loops:.2f} iterations/token, {counter.rows:,} core rows",
        )
    compact, masked = rows[0], rows[1]
    return {
        "batch": len(prompts),
        "loops": LOOPS,
        "new_tokens_per_row": sizes.new_tokens,
        "rule": rule.label,
        "rows": rows,
        "core_rows_saved": round(1 - compact["core_rows"] / masked["core_rows"], 4),
        "time_saved": round(1 - compact["seconds_median"] / masked["seconds_median"], 4),
        "identical_tokens": tokens["compaction"] == tokens["masking"],
    }


# ----- report ------------------------------------------------------------------------------------------------------
def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2%}"


def show(report: dict[str, Any]) -> None:
    """The markdown tables of a report."""
    ckpt = report["checkpoint"]
    print(f"## Inference benchmark: {ckpt['path']} ({ckpt['parameters']:,} params)\n")
    decode = report["decode"]
    print(f"### Decode speed (greedy, {decode['prompt_tokens']}-token prompts, {decode['new_tokens_per_row']} new)\n")
    rows = [
        [r["batch"], r["loops"], r["tokens_per_s"], r["tokens_per_s_per_row"], r["seconds_median"]]
        for r in decode["rows"]
    ]
    print(format_table(["batch", "loops", "tok/s", "tok/s per row", "median s"], rows))
    print(
        f"\nbatch 1, r={LOOPS}: {decode['ratio_batch1_r32_vs_huginn']}x the Huginn reference "
        f"({decode['huginn_reference_tokens_per_s']:g} tok/s)\n"
    )
    exits = report["exits"]
    print(f"### Exit criteria (teacher-forced, {exits['rows_scored']} x {exits['tokens_per_row']} tokens, r={LOOPS})\n")
    rows = [["none", exits["no_exit"]["mean_loops"], "0.0%", exits["no_exit"]["perplexity"], "", "", "", ""]]
    for r in exits["rows"]:
        best = "best" if r["rule"] == exits["best"] else ""
        rows.append(
            [
                r["rule"],
                r["mean_loops"],
                f"{r['steps_saved']:.1%}",
                r["perplexity"],
                percent(r["ppl_change"]),
                r["warm_start_mean_steps"],
                percent(r["warm_start_ppl_change"]),
                best,
            ]
        )
    headers = ["rule", "mean steps", "steps saved", "ppl", "ppl change", "warm: steps", "warm: ppl change", ""]
    print(format_table(headers, rows))
    print(f"\nbest (most steps saved with ppl change <= {MAX_PPL_CHANGE:.0%}): {exits['best']}\n")
    task = report.get("task")
    if task:
        print(f"### Exit criteria on {task['task']} ({task['checkpoint']}, r={LOOPS}, exact match)\n")
        rows = [
            [
                r["difficulty"],
                r["rule"],
                "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
                percent(r["accuracy_change"]),
                r["mean_loops"],
                f"{r['steps_saved']:.1%}",
            ]
            for r in task["rows"]
        ]
        print(format_table([task["difficulty_name"], "rule", "accuracy", "vs no exit", "mean steps", "saved"], rows))
        print()
    kv = report["kv"]
    print(f"### KV policies (r={LOOPS}, {kv['tokens']} tokens, fp32)\n")
    rows = [
        [r["policy"], r["cache_mib"], r["ratio_full_over_policy"], r["perplexity"], percent(r["ppl_change"])]
        for r in kv["rows"]
    ]
    print(format_table(["policy", "MiB", "full / policy", "ppl", "ppl change"], rows))
    spec = report["speculative"]
    print(f"\n### Speculative decoding (batch 1, r={LOOPS}, greedy, {spec['new_tokens']} tokens)\n")
    rows = [["plain", "", spec["plain"]["tokens_per_s"], 1.0, "", ""]]
    rows += [
        [
            f"draft {r['draft_loops']}",
            r["lookahead"],
            r["tokens_per_s"],
            r["speedup"],
            f"{r['acceptance_rate']:.1%}",
            str(r["identical"]).lower(),
        ]
        for r in spec["rows"]
    ]
    print(format_table(["", "lookahead", "tok/s", "speedup", "acceptance", "identical"], rows))
    comp = report["compaction"]
    print(f"\n### Early exit at batch {comp['batch']}: compaction vs masking ({comp['rule']}, r={LOOPS})\n")
    rows = [[r["mode"], r["seconds_median"], r["tokens_per_s"], r["mean_loops"], r["core_rows"]] for r in comp["rows"]]
    print(format_table(["mode", "median s", "tok/s", "mean steps", "core rows"], rows))
    print(
        f"\ncompaction saves {comp['core_rows_saved']:.1%} of the core rows and {comp['time_saved']:.1%} of the time "
        f"of masking; identical tokens: {str(comp['identical_tokens']).lower()}"
    )


def machine(threads: int) -> dict[str, Any]:
    """What decode numbers depend on: versions, the CPU (model, bf16-relevant flags, torch's kernel capability),
    cores, threads, load, and the fp32 and bf16 matmul peaks measured now (about 1 s each; bf16 is bounded on CPUs
    that emulate it)."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "loopformer": loopformer.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info().to_dict(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "matmul_peak_gflops": {
            name: round(measure_matmul_peak(dtype) / 1e9, 1)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        },
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def measure(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/inference.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(threads),
        "sizes": asdict(sizes),
    }
    model, state, directory = load_trained_model(Path(args.ckpt), use_ema=args.ema)
    if state.tokenizer_json is None:
        raise LoopformerError(f"{directory} has no tokenizer.json; the benchmark needs the checkpoint's tokenizer.")
    tokenizer = TextTokenizer.from_json(state.tokenizer_json)
    cfg = model.config
    report["checkpoint"] = {
        "path": str(directory),
        "step": state.step,
        "parameters": model.num_parameters(),
        "dim": cfg.dim,
        "layers": [cfg.n_prelude, cfg.n_core, cfg.n_coda],
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
        "ema": bool(args.ema and state.ema is not None),
    }
    # no tokenizer in the engine: the timings leave out incremental detokenisation, and a model whose vocabulary is
    # padded past the tokenizer's (byte-level: 270 ids in 320 rows) cannot fail to decode a padding id it picks
    engine = Engine(model)
    stream, source = held_out_stream(state, tokenizer)
    score_tokens = min(sizes.score_tokens, cfg.max_seq_len)
    prompt_tokens = min(sizes.prompt_tokens, cfg.max_seq_len - sizes.new_tokens)
    if prompt_tokens < 1:
        raise LoopformerError(f"the context of {cfg.max_seq_len} tokens has no room for {sizes.new_tokens} new ones.")
    ids = take(stream, sizes.score_rows, score_tokens)
    prompts = take(stream, max(*DECODE_BATCHES, COMPACTION_BATCH), prompt_tokens).tolist()
    report["held_out"] = {"source": source, "score_rows": list(ids.shape), "prompt_tokens": prompt_tokens}
    progress("data", f"held-out text: {source}")
    rules = [parse_exit_rule(name) for name in EXIT_CRITERIA] + parse_rules(args.exit_thresholds)

    report["decode"] = measure_decode(engine, prompts, sizes)
    report["exits"], full_ppl = measure_exits(engine, ids, rules)
    report["task"] = measure_task(Path(args.task_ckpt), args, sizes, rules) if args.task_ckpt else None
    report["kv"] = measure_kv(engine, ids, full_ppl)
    report["speculative"] = measure_speculative(engine, prompts[0], sizes)
    best = report["exits"]["best"]
    rule = parse_exit_rule(best) if best else parse_exit_rule(FALLBACK_RULE)
    report["compaction"] = measure_compaction(engine, prompts, rule, sizes)
    report["compaction"]["rule_source"] = "best criterion of the exit section" if best else "fallback"
    report["seconds"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="text LM checkpoint (a checkpoint or run directory)")
    parser.add_argument("--task-ckpt", help="a reasoning-task checkpoint: exact match with exits")
    parser.add_argument("--task", help="built-in task of --task-ckpt (default: the one it was trained on)")
    parser.add_argument("--task-difficulty", help="comma-separated difficulties (default: training and 4x training)")
    parser.add_argument(
        "--exit-thresholds", metavar="RULES", help="extra exit rules, comma-separated CRITERION:THR (e.g. kl:1e-3)"
    )
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when a checkpoint has them")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task examples")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    try:
        parse_rules(args.exit_thresholds)
    except LoopformerError as exc:
        fail(str(exc))
    return run_report(args, argv, measure, show, "inference.py")


if __name__ == "__main__":
    sys.exit(main())
