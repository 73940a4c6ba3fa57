"""Server metrics in the Prometheus text format (version 0.0.4), kept by hand: counters, gauges, histograms.

Counters and histograms are updated from the request handlers and the scheduler thread under one lock; gauges
(queue length, running rows, mean loops per token) are computed when the page is rendered.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

COUNTERS = {
    "loopformer_http_requests_total": "HTTP requests answered, by path and status",
    "loopformer_requests_rejected_total": "generation requests refused because the queue was full",
    "loopformer_requests_cancelled_total": "rows cancelled (client disconnected or timed out)",
    "loopformer_requests_finished_total": "rows finished, by reason",
    "loopformer_prompt_tokens_total": "prompt tokens prefilled",
    "loopformer_generated_tokens_total": "tokens generated",
    "loopformer_loops_total": "core iterations spent on generated tokens",
    "loopformer_decode_passes_total": "batched decoding passes",
    "loopformer_decode_rows_total": "rows fed by decoding passes (divide by passes: mean batch size)",
}
HISTOGRAMS = {
    "loopformer_request_seconds": "seconds from a row's arrival to its last token",
    "loopformer_time_to_first_token_seconds": "seconds from a row's arrival to its first token",
    "loopformer_queue_wait_seconds": "seconds a row waited in the queue",
}
GAUGES = {
    "loopformer_queue_length": "rows waiting for a place in the batch",
    "loopformer_running_rows": "rows in the running batch",
    "loopformer_mean_loops_per_token": "core iterations per generated token since the start",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class Metrics:
    """Thread-safe counters and histograms; :meth:`render` writes the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._buckets = {name: [0] * len(LATENCY_BUCKETS) for name in HISTOGRAMS}
        self._sums = dict.fromkeys(HISTOGRAMS, 0.0)
        self._counts = dict.fromkeys(HISTOGRAMS, 0)

    def count(self, name: str, value: float = 1, labels: dict[str, str] | None = None) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name}")
        with self._lock:
            self._counters[name][_labels(labels)] += value

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A counter's current value (0 before its first increment)."""
        with self._lock:
            return self._counters[name].get(_labels(labels), 0.0)

    def observe(self, name: str, seconds: float) -> None:
        """Add one observation to a histogram (buckets: :data:`LATENCY_BUCKETS`)."""
        with self._lock:
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self._buckets[name][i] += 1
                    break
            self._sums[name] += seconds
            self._counts[name] += 1

    def render(self, queue_length: int, running_rows: int) -> str:
        """The metrics page; the gauges are the values given now."""
        tokens = self.value("loopformer_generated_tokens_total")
        gauges = {
            "loopformer_queue_length": queue_length,
            "loopformer_running_rows": running_rows,
            "loopformer_mean_loops_per_token": self.value("loopformer_loops_total") / tokens if tokens else 0.0,
        }
        lines: list[str] = []
        with self._lock:
            for name, text in COUNTERS.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
                series = self._counters.get(name) or {"": 0.0}
                lines += [f"{name}{labels} {_number(value)}" for labels, value in sorted(series.items())]
            for name, text in HISTOGRAMS.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                cumulative = 0
                for bound, count in zip(LATENCY_BUCKETS, self._buckets[name], strict=True):
                    cumulative += count
                    lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
                total = self._counts[name]
                lines += [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {_number(self._sums[name])}"]
                lines.append(f"{name}_count {total}")
        for name, text in GAUGES.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {_number(gauges[name])}"]
        return "\n".join(lines) + "\n"
