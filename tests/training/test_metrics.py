"""Training instrumentation: matmul peak, progress bar, ETA format, the JSONL metrics log."""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from loopformer.errors import InputError
from loopformer.training import metrics
from loopformer.training.metrics import MetricsLogger, ProgressBar, format_eta, measure_matmul_peak, read_metrics


# ----- matmul peak -----------------------------------------------------------------------------------------------
def test_matmul_peak_is_positive_and_bounded() -> None:
    state = torch.get_rng_state()
    start = time.perf_counter()
    peak = measure_matmul_peak(torch.float32, "cpu", budget_s=0.3)
    elapsed = time.perf_counter() - start
    assert peak > 0 and math.isfinite(peak)
    assert elapsed < 2.0
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched


# ----- ETA and progress bar --------------------------------------------------------------------------------------
def test_format_eta() -> None:
    assert format_eta(0) == "0:00"
    assert format_eta(245) == "4:05"
    assert format_eta(3723) == "1:02:03"
    assert format_eta(59.6) == "1:00"
    assert format_eta(math.inf) == "?" and format_eta(math.nan) == "?" and format_eta(-1) == "?"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(metrics, "_clock", fake)
    return fake


def test_progress_bar_draws_rate_eta_and_postfix(clock: FakeClock) -> None:
    stream = io.StringIO()
    bar = ProgressBar(100, initial=10, stream=stream, enabled=True)
    clock.now += 10.0
    bar.update(30, {"loss": 2.345678, "depth": 8})
    text = stream.getvalue()
    assert text.startswith("\r") and "\n" not in text
    # 20 steps in 10 s: 2 it/s, 70 steps left -> 35 s
    assert "30/100" in text and "2.00 it/s" in text and "ETA 0:35" in text
    assert "loss=2.346" in text and "depth=8" in text
    clock.now += 1.0
    bar.write("a message")
    assert "a message\n" in stream.getvalue()
    # redrawn after the line; the rate counts from construction: 20 steps in 11 s -> 70 / (20 / 11) s
    assert stream.getvalue().endswith("30/100  30% | 1.82 it/s | ETA 0:38 | loss=2.346 depth=8")
    clock.now += 35.0
    bar.update(100)
    bar.close()
    assert stream.getvalue().endswith("\n") and "100/100" in stream.getvalue().splitlines()[-1]
    bar.update(101)  # ignored after close
    bar.write("after close")
    assert stream.getvalue().endswith("after close\n")


def test_progress_bar_throttles(clock: FakeClock) -> None:
    stream = io.StringIO()
    bar = ProgressBar(1000, stream=stream, enabled=True)
    for step in range(1, 41):
        clock.now += 0.0625  # 16 updates a second
        bar.update(step)
    assert stream.getvalue().count("\r") == 10  # steps 1, 5, 9, ..., 37: at most 5 draws a second
    bar.update(41)
    assert stream.getvalue().count("\r") == 10
    bar.update(1000)  # the last step is always drawn
    assert stream.getvalue().count("\r") == 11


def test_progress_bar_slow_steps_and_shorter_redraw(clock: FakeClock) -> None:
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, enabled=True)
    clock.now += 4.0
    bar.update(1, {"note": "a long postfix value"})
    clock.now += 4.0
    bar.update(2, {})
    last = stream.getvalue().split("\r")[-1]
    assert "4.00 s/it" in last and "ETA 0:32" in last
    assert last.endswith(" ")  # padded to blank out the longer previous line


def test_progress_bar_disabled_prints_only_lines(clock: FakeClock) -> None:
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, enabled=False)
    for step in range(1, 11):
        clock.now += 1.0
        bar.update(step, {"loss": 1.0})
    bar.write("hello")
    bar.close()
    assert stream.getvalue() == "hello\n"


def test_progress_bar_plain_lines_every_n_steps(clock: FakeClock) -> None:
    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, enabled=False, every=4)
    for step in range(1, 11):
        clock.now += 1.0
        bar.update(step)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["4/10", "8/10", "10/10"]
    assert "\r" not in stream.getvalue()


def test_progress_bar_enabled_follows_isatty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert ProgressBar(5, stream=Tty()).enabled
    assert not ProgressBar(5, stream=io.StringIO()).enabled
    assert ProgressBar(5).stream is sys.stderr


# ----- metrics log -----------------------------------------------------------------------------------------------
def test_logger_writes_strict_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    logger = MetricsLogger(path)
    before = time.time()
    logger.log("train", 1, loss=2.5, lr=1e-3, depth=4, grad_norm=math.nan, mfu=math.inf, note="x")
    logger.log("eval", 2, loss=torch.tensor(1.25), sizes=[1, 2.0, -math.inf], path=Path("a/b"))
    # flushed at once: readable before close
    assert len(path.read_text().splitlines()) == 2
    logger.close()
    lines = path.read_text().splitlines()
    records = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) for line in lines
    ]
    first, second = records
    assert first["kind"] == "train" and first["step"] == 1 and first["time"] >= before - 1
    assert first["loss"] == 2.5 and first["depth"] == 4 and first["note"] == "x"
    assert first["grad_norm"] == "nan" and first["mfu"] == "inf"
    assert second["loss"] == 1.25 and second["sizes"] == [1, 2.0, "-inf"] and second["path"] == "a/b"
    assert read_metrics(path, "eval") == [second]
    assert read_metrics(path) == records


def test_logger_appends_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as logger:
        logger.log("train", 1, loss=1.0)
    with MetricsLogger(path) as logger:
        logger.log("train", 2, loss=0.5)
    assert [r["step"] for r in read_metrics(path, "train")] == [1, 2]


def test_torn_line_is_skipped_and_next_record_starts_fresh(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tra')  # a crash mid-line
    with MetricsLogger(path) as logger:
        logger.log("train", 2)
    with pytest.warns(UserWarning, match="not valid JSON"):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    logger = MetricsLogger(path, enabled=False)
    logger.log("train", 1, loss=1.0)
    logger.close()
    assert not path.exists() and not path.parent.exists()


def test_missing_tensorboard_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(InputError, match=r"pip install 'loopformer\[tensorboard\]'"):
        MetricsLogger(tmp_path / "metrics.jsonl", tmp_path / "tb")
    with pytest.raises(InputError, match="tensorboard"):  # on every rank alike
        MetricsLogger(tmp_path / "other.jsonl", tmp_path / "tb", enabled=False)
    MetricsLogger(tmp_path / "metrics.jsonl").close()  # without TensorBoard nothing is imported


def test_tensorboard_event_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path / "metrics.jsonl", tmp_path / "tb") as logger:
        logger.log("train", 1, loss=2.0, note="text is not a scalar")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_records_of_one_step_get_one_tensorboard_tag_per_series(tmp_path: Path) -> None:
    """Evaluation at several loop counts: ``eval/perplexity/loops_4`` etc., one curve per loop count, and no
    ``eval/loops`` curve; metrics.jsonl keeps ``loops`` as a field."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path / "metrics.jsonl", tmp_path / "tb") as logger:
        for step in (3, 6):
            for loops in (1, 4):
                logger.log("eval", step, series="loops", loops=loops, perplexity=10.0 / loops + step)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/perplexity/loops_1", "eval/perplexity/loops_4"]
    values = [(e.step, e.value) for e in events.Scalars("eval/perplexity/loops_4")]
    assert values == [(3, pytest.approx(5.5)), (6, pytest.approx(8.5))]
    assert [r["loops"] for r in read_metrics(tmp_path / "metrics.jsonl", "eval")] == [1, 4, 1, 4]
