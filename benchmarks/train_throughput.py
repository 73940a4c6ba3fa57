"""Training throughput of loopformer models, with model FLOP utilisation against a peak measured in the same run.

What one run does:

1. Measures the dense matmul peak in fp32 and bf16: square products of size n in the three layouts a linear
   layer uses (``nn``: ``a @ b``, the input gradient; ``nt``: ``a @ b.T``, the forward; ``tn``: ``a.T @ b``,
   the weight gradient), an untimed warm-up (at least 0.25 s) and then the best of a few repetitions. The peak
   of a dtype is the best over sizes and layouts. Each (layout, size) has a time budget: a size whose predicted
   time per product (cubic extrapolation from the previous size) exceeds it is skipped and reported as skipped.
   This keeps bf16 bounded on CPUs without native bf16 matmul instructions, where one 2048^3 bf16 product can
   take most of a minute.
2. Times full training steps, ``zero_grad -> forward (with loss) -> backward -> AdamW step``, for each case:
   ``model(ids, loops=r, labels=ids, backprop_loops=k)`` on a fixed batch of random tokens, the bf16 case
   under ``torch.autocast``; an ``auto`` case first resolves its dtype as the trainer does and says what it
   picked and why (``dtype_reason``). Warm-up steps are excluded; the reported step time is the median of the timed
   steps. Achieved FLOP/s is ``loopformer.flops.training_flops_per_token(config, r, k, seq_len) * tokens/s``;
   MFU is its ratio to the matmul peak of the case's dtype.

Every measurement also records the CPU use of this process and of all other processes (from /proc/stat), so
a run disturbed by other work on the machine shows it.

Examples::

    python benchmarks/train_throughput.py --json bench.json
    python benchmarks/train_throughput.py --cases anima-micro-fp32,huginn-ref-fp32 --compile
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import loopformer
from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.flops import training_flops_per_token
from loopformer.hardware import cpu_info, resolve_dtype
from loopformer.model import build_model
from loopformer.presets import get_preset

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The three products of a linear layer y = x W^T with W stored [out, in]: the forward x @ W^T ("nt"), the input
# gradient dy @ W ("nn") and the weight gradient dy^T @ x ("tn").
LAYOUTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "nn": lambda a, b: a @ b,
    "nt": lambda a, b: a @ b.T,
    "tn": lambda a, b: a.T @ b,
}

# Training throughput of the Huginn reference implementation at the "Huginn reference shape" (fp32, CPU), as
# quoted in the project's notes; not measured here. Its exact vocabulary and MLP width are not known.
HUGINN_REFERENCE_TOKENS_PER_S = 1400.0

# Above this fraction of all cores used by other processes during a measurement, the run counts as contended:
# its numbers understate the machine, since an OpenMP worker that loses its core stalls the others at barriers.
CONTENDED_OTHERS_CPU = 0.10

# Untimed matmul warm-up per (layout, size), in seconds: the first ~0.1 s of products after a pause run at about
# half speed on the machine these numbers were taken on (clock and thread-pool ramp-up).
MATMUL_WARMUP_S = 0.25

# CPU times come in clock ticks (usually 10 ms): shorter blocks are not metered.
MIN_METERED_WALL_S = 0.5


# ----- cases -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One training-throughput measurement: a model shape, its depth (r, k), the batch shape and the dtype."""

    name: str
    description: str
    config: ModelConfig
    dtype: str
    loops: int = 8
    backprop_loops: int = 4
    batch: int = 8
    seq_len: int = 256
    reference_tokens_per_s: float | None = None


def huginn_reference_config() -> ModelConfig:
    """The "Huginn reference shape": the huginn-3.5b preset's block design at h=256, layers 1/2/1, vocab 4096,
    MLP 688, r = 8 with k = 4; 4,348,160 parameters."""
    return get_preset("huginn-3.5b").replace(
        vocab_size=4096,
        dim=256,
        n_heads=4,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        mlp_hidden=688,
        max_seq_len=256,
        recurrence=RecurrenceConfig(mean_loops=8, sampler="fixed", backprop_loops=4),
    )


def all_cases() -> dict[str, Case]:
    """The benchmark cases by name, all at r=8, k=4, batch 8 x 256."""
    micro = get_preset("anima-micro")
    cases = [
        Case("anima-micro-fp32", "anima-micro preset", micro, "fp32"),
        Case("anima-micro-bf16", "anima-micro preset, bf16 autocast", micro, "bf16"),
        Case("anima-micro-auto", "anima-micro preset, dtype auto (what training uses by default)", micro, "auto"),
        Case(
            "huginn-ref-fp32",
            "Huginn reference shape (h=256, 1/2/1, vocab 4096, MLP 688)",
            huginn_reference_config(),
            "fp32",
            reference_tokens_per_s=HUGINN_REFERENCE_TOKENS_PER_S,
        ),
    ]
    return {case.name: case for case in cases}


# ----- timing ----------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, synchronised with ``device`` on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def repeat_timed(fn: Callable[[], object], count: int, budget_s: float, device: torch.device) -> list[float]:
    """Time ``fn`` up to ``count`` times; the first call always runs (if ``count`` > 0).

    A further call is not started when the time spent so far plus the last call's time would exceed ``budget_s``.
    """
    times: list[float] = []
    while len(times) < count and (not times or sum(times) + times[-1] <= budget_s):
        times.append(timed(fn, device))
    return times


def _machine_busy_s() -> float | None:
    """CPU seconds spent by all processes on all cores since boot (/proc/stat), or None where unavailable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU use over a ``with`` block.

    ``own``: this process's CPU time / (wall time x torch threads); about 1 when every torch thread kept busy.
    ``others``: CPU time of all other processes (and hypervisor steal) / (wall time x logical cores), from
    /proc/stat; about 0 on a quiet machine. Both are None where they cannot be measured, or when the block
    took less than :data:`MIN_METERED_WALL_S` (too few clock ticks).
    """

    def __init__(self) -> None:
        self.own: float | None = None
        self.others: float | None = None

    def __enter__(self) -> CpuMeter:
        self._wall, self._own, self._busy = time.perf_counter(), _own_cpu_s(), _machine_busy_s()
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall = time.perf_counter() - self._wall
        own = _own_cpu_s() - self._own
        busy_end = _machine_busy_s()
        if wall < MIN_METERED_WALL_S:
            return
        self.own = own / (wall * torch.get_num_threads())
        if self._busy is not None and busy_end is not None:
            self.others = max(busy_end - self._busy - own, 0.0) / (wall * (os.cpu_count() or 1))


# ----- matmul peak -----------------------------------------------------------------------------------------------
@dataclass
class MatmulTiming:
    """Best time of one square product in one layout."""

    layout: str
    n: int
    reps: int
    best_s: float
    gflops: float
    own_cpu: float | None
    others_cpu: float | None


@dataclass
class MatmulPeak:
    """Best matmul GFLOP/s of one dtype over the measured layouts and sizes, with every timing."""

    dtype: str
    gflops: float
    layout: str
    n: int
    timings: list[MatmulTiming] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    own_cpu: float | None = None
    others_cpu: float | None = None


def time_layout(
    dtype: str, layout: str, sizes: Sequence[int], reps: int, budget_s: float, device: torch.device
) -> tuple[list[MatmulTiming], list[int]]:
    """Timings of one layout over ``sizes`` (increasing), and the sizes skipped as predicted to exceed the budget.

    Each size is first run untimed for at least :data:`MATMUL_WARMUP_S` (at least one product).
    """
    product = LAYOUTS[layout]
    generator = torch.Generator(device=device).manual_seed(0)
    timings: list[MatmulTiming] = []
    skipped: list[int] = []
    for n in sorted(set(sizes)):
        if timings and timings[-1].best_s * (n / timings[-1].n) ** 3 > budget_s:
            skipped.append(n)
            continue
        a = torch.randn(n, n, device=device, dtype=DTYPES[dtype], generator=generator)
        b = torch.randn(n, n, device=device, dtype=DTYPES[dtype], generator=generator)
        warm_s = 0.0
        while warm_s < MATMUL_WARMUP_S:
            warm_s += timed(lambda a=a, b=b: product(a, b), device)
        with CpuMeter() as cpu:
            times = repeat_timed(lambda a=a, b=b: product(a, b), reps, budget_s - warm_s, device)
        best = min(times)
        timings.append(MatmulTiming(layout, n, len(times), best, 2 * n**3 / best / 1e9, cpu.own, cpu.others))
    return timings, skipped


def measure_matmul_peak(
    dtype: str, sizes: Sequence[int], reps: int, budget_s: float, device: torch.device
) -> MatmulPeak:
    """Best GFLOP/s of square products in ``dtype`` over every layout in :data:`LAYOUTS` and ``sizes``."""
    timings: list[MatmulTiming] = []
    skipped: dict[str, list[int]] = {}
    with CpuMeter() as cpu:
        for layout in LAYOUTS:
            measured, skipped[layout] = time_layout(dtype, layout, sizes, reps, budget_s, device)
            timings += measured
    top = max(timings, key=lambda t: t.gflops)
    return MatmulPeak(dtype, top.gflops, top.layout, top.n, timings, skipped, cpu.own, cpu.others)


# ----- training throughput ---------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    """Measured training throughput of one case (``error`` is set, and the numbers are absent, if it failed)."""

    name: str
    description: str
    dtype: str
    compiled: bool
    parameters: int
    loops: int
    backprop_loops: int
    batch: int
    seq_len: int
    config: dict[str, Any] = field(default_factory=dict)
    dtype_reason: str | None = None  # why ``dtype: auto`` resolved as it did (auto cases)
    warmup_steps: int = 0
    timed_steps: int = 0
    first_step_s: float | None = None
    compile_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    median_step_s: float | None = None
    mean_step_s: float | None = None
    tokens_per_s: float | None = None
    train_flops_per_token: float | None = None
    achieved_gflops: float | None = None
    mfu: float | None = None
    mfu_vs_fp32_peak: float | None = None
    reference_tokens_per_s: float | None = None
    ratio_to_reference: float | None = None
    final_loss: float | None = None
    own_cpu: float | None = None
    others_cpu: float | None = None
    error: str | None = None


@contextmanager
def autocast_for(dtype: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing for fp32."""
    with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        yield


@dataclass
class StepTimes:
    """Wall-clock seconds of the warm-up steps (the first one included) and of the timed steps."""

    warmup: list[float]
    timed: list[float]
    final_loss: float
    cpu: CpuMeter


def time_training(
    model: torch.nn.Module,
    case: Case,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    budget_s: float,
    compile_model: bool,
) -> StepTimes:
    """Time AdamW training steps of ``model`` on a fixed batch of random tokens (seed 0).

    One step is ``zero_grad -> forward with loss (under autocast for bf16) -> backward -> optimizer step``.
    With ``compile_model`` the model is wrapped in ``torch.compile`` first, so compilation falls in the
    first warm-up step. Warm-up and timed steps each stop early once ``budget_s`` would be exceeded.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, case.config.vocab_size, (case.batch, case.seq_len), device=device, generator=generator)
    losses: list[torch.Tensor] = []

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(case.dtype, device):
            out = forward(ids, loops=case.loops, labels=ids, backprop_loops=case.backprop_loops)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())

    warm = repeat_timed(train_step, warmup, budget_s, device)
    with CpuMeter() as cpu:
        times = repeat_timed(train_step, steps, budget_s, device)
    return StepTimes(warmup=warm, timed=times, final_loss=float(losses[-1]), cpu=cpu)


def run_case(
    case: Case,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    budget_s: float,
    compile_model: bool,
    peaks: dict[str, MatmulPeak],
) -> CaseResult:
    """Build the case's model (seed 0), time its training steps and derive throughput, FLOP/s and MFU.

    A case at ``auto`` first resolves it as the trainer does (:func:`loopformer.hardware.resolve_dtype`, probed at the
    case's batch and widths), then runs as the dtype it picked."""
    reason = None
    if case.dtype == "auto":
        probe = (case.batch * case.seq_len, case.config.dim, case.config.mlp_hidden)
        choice = resolve_dtype("auto", device, probe)
        case, reason = replace(case, dtype=choice.name), choice.reason
        print(f"[{case.name}] dtype auto -> {choice.name}: {reason}", file=sys.stderr)
    config = case.config
    model = build_model(config, seed=0, device=device).train()
    result = CaseResult(
        name=case.name,
        description=case.description,
        dtype=case.dtype,
        compiled=compile_model,
        parameters=model.num_parameters(),
        loops=case.loops,
        backprop_loops=case.backprop_loops,
        batch=case.batch,
        seq_len=case.seq_len,
        config=config.to_dict(),
        reference_tokens_per_s=case.reference_tokens_per_s,
        dtype_reason=reason,
    )
    try:
        measured = time_training(
            model, case, device, warmup=warmup, steps=steps, budget_s=budget_s, compile_model=compile_model
        )
    except Exception as exc:  # a failed compile must not end the whole benchmark
        what = "torch.compile" if compile_model else "training step"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result.error = f"{what} failed: {type(exc).__name__}: {first_line}"
        hint = " (on CPU, inductor needs a working C++ compiler; run without --compile for eager numbers)"
        print(f"[{case.name}] {result.error}{hint if compile_model else ''}", file=sys.stderr)
        return result
    finally:
        del model
        gc.collect()

    median = statistics.median(measured.timed)
    flops_per_token = training_flops_per_token(config, case.loops, case.backprop_loops, case.seq_len)
    result.warmup_steps = len(measured.warmup)
    result.timed_steps = len(measured.timed)
    result.first_step_s = measured.warmup[0]
    result.compile_s = measured.warmup[0] - median if compile_model else None
    result.step_times_s = measured.timed
    result.median_step_s = median
    result.mean_step_s = statistics.fmean(measured.timed)
    result.tokens_per_s = case.batch * case.seq_len / median
    result.train_flops_per_token = flops_per_token
    achieved = flops_per_token * result.tokens_per_s
    result.achieved_gflops = achieved / 1e9
    if case.dtype in peaks:
        result.mfu = achieved / (peaks[case.dtype].gflops * 1e9)
    if "fp32" in peaks:
        result.mfu_vs_fp32_peak = achieved / (peaks["fp32"].gflops * 1e9)
    if case.reference_tokens_per_s:
        result.ratio_to_reference = result.tokens_per_s / case.reference_tokens_per_s
    result.final_loss = measured.final_loss
    result.own_cpu, result.others_cpu = measured.cpu.own, measured.cpu.others
    return result


# ----- machine info and report -----------------------------------------------------------------------------------
def git_revision() -> str | None:
    """``git describe --always --dirty`` of the checkout this script lives in, or None outside git."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def library_source_digest() -> str:
    """SHA-256 (first 12 hex digits) of the imported loopformer package's .py files: identifies uncommitted code."""
    digest = hashlib.sha256()
    root = Path(loopformer.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU (or GPU), core and thread counts, torch/Python versions, load."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_info().to_dict(),
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "library_revision": git_revision(),
        "library_source_sha256": library_source_digest(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def markdown_report(peaks: dict[str, MatmulPeak], results: list[CaseResult]) -> str:
    """Two markdown tables: matmul GFLOP/s per dtype and layout (the peak in bold), then one row per case."""
    lines = [
        "| dtype | layout | best GFLOP/s | at n | own CPU | others' CPU | all sizes: n (reps) GFLOP/s | skipped |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for peak in peaks.values():
        for layout in LAYOUTS:
            timings = [t for t in peak.timings if t.layout == layout]
            if not timings:
                continue
            top = max(timings, key=lambda t: t.gflops)
            best = f"{top.gflops:.1f}"
            if (layout, top.n) == (peak.layout, peak.n):
                best = f"**{best}**"
            sizes = ", ".join(f"{t.n} ({t.reps}) {t.gflops:.1f}" for t in timings)
            skipped = ", ".join(map(str, peak.skipped.get(layout, []))) or "-"
            lines.append(
                f"| {peak.dtype} | {layout} | {best} | {top.n} | {_fmt(top.own_cpu, '.2f')} "
                f"| {_fmt(top.others_cpu, '.2f')} | {sizes} | {skipped} |"
            )
    lines += [
        "",
        "| case | dtype | compiled | params | batch x seq | r / k | warm-up + timed | first step s | median step s "
        "| tokens/s | MFLOP/token | GFLOP/s | MFU | MFU vs fp32 peak | own CPU | others' CPU | compile s "
        "| vs reference |",
        "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        head = (
            f"| {r.name} | {r.dtype} | {'yes' if r.compiled else 'no'} | {r.parameters:,} | {r.batch} x {r.seq_len} "
            f"| {r.loops} / {r.backprop_loops} "
        )
        if r.error:
            lines.append(head + f"| {r.error} |")
            continue
        reference = "-"
        if r.ratio_to_reference is not None:
            reference = f"{r.ratio_to_reference:.2f}x of {r.reference_tokens_per_s:,.0f}"
        lines.append(
            head + f"| {r.warmup_steps} + {r.timed_steps} | {r.first_step_s:.2f} | {r.median_step_s:.3f} "
            f"| {r.tokens_per_s:,.0f} | {r.train_flops_per_token / 1e6:.1f} | {r.achieved_gflops:.1f} "
            f"| {_percent(r.mfu)} | {_percent(r.mfu_vs_fp32_peak)} | {_fmt(r.own_cpu, '.2f')} "
            f"| {_fmt(r.others_cpu, '.2f')} | {_fmt(r.compile_s, '.1f')} | {reference} |"
        )
    return "\n".join(lines)


# ----- command line ----------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    cases = all_cases()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(cases), help=f"comma-separated, from: {', '.join(cases)}")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per case (at most; >= 1 runs)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per case (at most; >= 1 runs)")
    parser.add_argument(
        "--case-budget", type=float, default=60.0, help="seconds; warm-up and timed steps each stop early past it"
    )
    parser.add_argument("--compile", action="store_true", help="wrap each model in torch.compile before timing")
    parser.add_argument(
        "--matmul-sizes", type=_int_list, default=[512, 1024, 1536, 2048], help="comma-separated square sizes"
    )
    parser.add_argument("--matmul-reps", type=int, default=5, help="timed products per layout and size (at most)")
    parser.add_argument("--matmul-budget", type=float, default=5.0, help="seconds per dtype, layout and size")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in cases]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(cases)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    if min(args.warmup, args.steps, args.matmul_reps, args.threads) < 1 or not args.matmul_sizes:
        parser.error("--warmup, --steps, --matmul-reps and --threads must be >= 1, --matmul-sizes non-empty")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    info = machine_info(device, torch.get_num_threads())
    cpu = info["cpu"]
    print(
        f"# {cpu['model']} ({cpu['torch_capability']}), {info['torch_threads']} threads, torch {info['torch']}, "
        f"device {device}",
        file=sys.stderr,
    )

    peaks: dict[str, MatmulPeak] = {}
    for dtype in DTYPES:
        start = time.perf_counter()
        peak = measure_matmul_peak(dtype, args.matmul_sizes, args.matmul_reps, args.matmul_budget, device)
        peaks[dtype] = peak
        print(
            f"# matmul {dtype}: {peak.gflops:.1f} GFLOP/s ({peak.layout}, n={peak.n}; "
            f"{time.perf_counter() - start:.1f} s, others' CPU {_fmt(peak.others_cpu, '.2f')})",
            file=sys.stderr,
        )

    cases = all_cases()
    results: list[CaseResult] = []
    for name in args.cases.split(","):
        start = time.perf_counter()
        result = run_case(
            cases[name],
            device,
            warmup=args.warmup,
            steps=args.steps,
            budget_s=args.case_budget,
            compile_model=args.compile,
            peaks=peaks,
        )
        results.append(result)
        status = result.error or (f"{result.tokens_per_s:,.0f} tokens/s, others' CPU {_fmt(result.others_cpu, '.2f')}")
        print(f"# {name}: {status} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)

    others = [p.others_cpu for p in peaks.values()] + [r.others_cpu for r in results]
    worst = max((x for x in others if x is not None), default=None)
    contended = device.type == "cpu" and worst is not None and worst > CONTENDED_OTHERS_CPU
    if contended:
        print(
            f"# WARNING: other processes used up to {worst:.0%} of the cores during some measurements; "
            "these numbers understate what this machine does alone.",
            file=sys.stderr,
        )
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "measured": "training step = zero_grad + forward with loss + backward + AdamW step; median of timed steps",
        "machine": info,
        "max_others_cpu": worst,
        "contended": contended,
        "matmul_peaks": {dtype: asdict(peak) for dtype, peak in peaks.items()},
        "cases": [asdict(r) for r in results],
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_report(peaks, results))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
