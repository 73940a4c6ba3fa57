"""Training-run instrumentation: a quick matmul peak (for MFU), a terminal progress bar, a JSONL metrics log."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import torch

from loopformer.errors import InputError

# ----- matmul peak -----------------------------------------------------------------------------------------------
MATMUL_SIZES = (256, 512, 1024, 2048)
CUDA_MATMUL_SIZES = (*MATMUL_SIZES, 4096)
# The forward product of a linear layer (x @ W.T) and its input gradient (dy @ W).
_LAYOUTS = (lambda a, b: a @ b.T, lambda a, b: a @ b)
# One timed measurement runs back-to-back products for about this long (many tiny GPU kernels, one CPU product).
_MIN_TIMED_S = 0.002
_MAX_PRODUCTS = 64
# Timed measurements per size and layout (at most; fewer when the budget runs out).
_REPS = 3
# Share of the budget spent warming up at the first size.
_FIRST_WARMUP_FRACTION = 0.25


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", budget_s: float = 1.0
) -> float:
    """Best FLOP/s of square ``dtype`` matmuls on ``device``, measured within about ``budget_s`` seconds.

    Sizes 256..2048 (up to 4096 on CUDA) are tried in increasing order in two layouts (``a @ b.T``, ``a @ b``);
    each size and layout gets an untimed warm-up product (the first size: products for a quarter of the budget,
    as the first ones after a pause run slowly), then up to three timed measurements while the budget allows. A size
    whose predicted cost (cubic extrapolation from the previous one) would overrun the budget ends the
    measurement, so slow dtypes (bf16 on CPUs without bf16 instructions) stay bounded. The smallest size is
    always measured. Inputs come from a private generator: the global RNG is untouched.
    """
    device = torch.device(device)
    sizes = CUDA_MATMUL_SIZES if device.type == "cuda" else MATMUL_SIZES
    generator = torch.Generator().manual_seed(0)
    deadline = time.perf_counter() + budget_s
    # The first products after a pause run slowly (clocks, thread pool): warm up for a while at the first size.
    warm_until = min(time.perf_counter() + _FIRST_WARMUP_FRACTION * budget_s, deadline)
    best = 0.0
    per_product: float | None = None  # best seconds per product at the previous size
    previous_n = 0
    with torch.inference_mode():
        for n in sizes:
            if per_product is not None:
                predicted = per_product * (n / previous_n) ** 3
                if time.perf_counter() + 2 * len(_LAYOUTS) * predicted > deadline:
                    break  # not even a warm-up and one timed product per layout fit
            a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
            b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
            size_best = math.inf
            for product in _LAYOUTS:
                estimate = _timed(product, a, b, 1, device)  # warm-up, not counted
                while time.perf_counter() + estimate <= warm_until:
                    estimate = _timed(product, a, b, 1, device)
                count = max(1, min(_MAX_PRODUCTS, int(_MIN_TIMED_S / max(estimate, 1e-9))))
                for rep in range(_REPS):
                    if rep and time.perf_counter() + count * estimate > deadline:
                        break
                    estimate = _timed(product, a, b, count, device)
                    size_best = min(size_best, estimate)
            best = max(best, 2 * n**3 / size_best)
            per_product, previous_n = size_best, n
            del a, b
    return best


def _timed(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    count: int,
    device: torch.device,
) -> float:
    """Seconds per product over ``count`` back-to-back products, synchronised with ``device`` on both sides."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        product(a, b)
    _synchronize(device)
    return max((time.perf_counter() - start) / count, 1e-12)


# ----- progress bar ----------------------------------------------------------------------------------------------
def format_eta(seconds: float) -> str:
    """``"1:02:03"`` from an hour on, else ``"4:05"``; ``"?"`` for an unknown (negative or non-finite) time."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _clock() -> float:
    return time.monotonic()


def _format_value(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4g}"


class ProgressBar:
    """One-line progress with rate and ETA on a terminal (\\r updates to a stream, default sys.stderr); on a
    non-terminal stream prints nothing per update (the JSONL log is the record) -- or a plain line every
    ``every`` steps if requested.

    ``enabled`` None means ``stream.isatty()``. Redraws are throttled to one per ``min_interval`` seconds
    (about 5 a second), except that the last step is always drawn. The rate and ETA count from construction.
    :meth:`write` prints a full line above the bar, also when the bar is disabled or closed.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        *,
        every: int = 0,
        min_interval: float = 0.2,
    ) -> None:
        self.total = total
        self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = enabled
        self.every = every
        self.min_interval = min_interval
        self.step = initial
        self._start = _clock()
        self._last_draw: float | None = None
        self._last_line_step = initial
        self._text = ""  # the bar as last drawn ("" = nothing on screen)
        self._postfix: dict[str, Any] = {}
        self._closed = False

    def _render(self) -> str:
        elapsed = _clock() - self._start
        done = self.step - self.initial
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - self.step) / rate if rate > 0 else math.nan
        percent = 100 * self.step / self.total if self.total > 0 else 100.0
        rate_text = f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/it"
        parts = [f"{self.step}/{self.total} {percent:3.0f}%", rate_text, f"ETA {format_eta(eta)}"]
        if self._postfix:
            parts.append(" ".join(f"{k}={_format_value(v)}" for k, v in self._postfix.items()))
        return " | ".join(parts)

    def _draw(self) -> None:
        width = max(shutil.get_terminal_size().columns - 1, 20)
        text = self._render()[:width]
        padding = " " * max(len(self._text) - len(text), 0)  # blank out the rest of a longer previous line
        self.stream.write(f"\r{text}{padding}")
        self.stream.flush()
        self._text = text
        self._last_draw = _clock()

    def _clear(self) -> None:
        if self._text:
            self.stream.write("\r" + " " * len(self._text) + "\r")
            self._text = ""

    def update(self, step: int, postfix: Mapping[str, str | float] | None = None) -> None:
        """Record progress at ``step`` (absolute, not an increment) with optional ``key=value`` fields."""
        if self._closed:
            return
        self.step = step
        if postfix is not None:
            self._postfix = dict(postfix)
        if self.enabled:
            now = _clock()
            due = self._last_draw is None or now - self._last_draw >= self.min_interval
            if due or step >= self.total:
                self._draw()
        elif self.every > 0 and (step - self._last_line_step >= self.every or step >= self.total):
            self._last_line_step = step
            self.stream.write(self._render() + "\n")
            self.stream.flush()

    def write(self, line: str) -> None:
        """Print ``line`` (one full line) above the bar, then redraw the bar."""
        drawn = bool(self._text)
        self._clear()
        self.stream.write(line + "\n")
        if drawn:
            self._draw()
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the bar's line; later updates are ignored, :meth:`write` still prints."""
        if self._closed:
            return
        self._closed = True
        if self.enabled and self._last_draw is not None:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._text = ""


# ----- metrics log -----------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """``value`` made strict-JSON-safe: non-finite floats as "nan"/"inf"/"-inf", tensors and numpy scalars as
    Python numbers, paths as strings, containers converted element by element."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise InputError(
            "TensorBoard logging needs the `tensorboard` package: pip install 'loopformer[tensorboard]'."
        ) from exc
    return SummaryWriter


class MetricsLogger:
    """Appends one JSON object per record to <run_dir>/metrics.jsonl (flushed each time, so a crash keeps every
    line written); optionally mirrors scalars to TensorBoard.

    ``enabled=False`` (non-zero ranks) makes every method a no-op. The TensorBoard check runs on every rank,
    so a missing package stops all ranks alike rather than leaving the others waiting for rank 0.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir is not None else None
        self.enabled = enabled
        writer_class = _summary_writer_class() if self.tensorboard_dir is not None else None
        self._file: TextIO | None = None
        self._writer: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        if writer_class is not None:
            self._writer = writer_class(log_dir=str(self.tensorboard_dir))

    def _open(self) -> None:
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self._file = self.path.open("a", encoding="utf-8")
        if torn:  # a crash mid-line: end that line so the next record starts on its own
            self._file.write("\n")

    def log(self, kind: str, step: int, *, series: str | None = None, **values: Any) -> None:
        """Append ``{"kind", "step", "time" (unix seconds), **values}``; numeric scalars also go to TensorBoard as
        ``f"{kind}/{name}"``. Non-finite floats are written as the strings "nan", "inf", "-inf".

        ``series`` names the value that tells several records of one kind and step apart (the evaluation's
        ``loops``): their TensorBoard tags become ``f"{kind}/{name}/{series}_{value}"`` (``eval/perplexity/loops_4``)
        and that value is not plotted itself."""
        if not self.enabled:
            return
        if self._file is None or self._file.closed:
            self._open()
        record = _jsonable({"kind": kind, "step": step, "time": time.time(), **values})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            suffix = "" if series is None else f"/{series}_{values[series]}"
            for name, value in values.items():
                scalar = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if name != series and isinstance(scalar, int | float) and not isinstance(scalar, bool):
                    self._writer.add_scalar(f"{kind}/{name}{suffix}", scalar, step)

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file in order, only those of ``kind`` if given.

    Values logged as non-finite floats come back as the strings "nan"/"inf"/"-inf". A line that is not valid
    JSON (torn by a crash mid-write) is skipped with a warning.
    """
    records = []
    with Path(path).open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: skipped a line that is not valid JSON", stacklevel=2)
                continue
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records
