"""``loopformer serve`` under concurrent load, through benchmarks/serve_load.py: streamed and plain completions at
several depths and KV policies, with clients that leave mid-stream. No request fails, the server stays healthy and
drains, and its resident memory stays within 1.5x of its size after the warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
MIX = ["--modes", "continuous", "--stream-fraction", "0.5", "--kv", "full,last,ring:2", "--disconnect-fraction", "0.3"]


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(["--clients", "4", "--requests", "5", "--max-tokens", "24"], id="4x5"),
        pytest.param(["--clients", "32", "--requests", "20"], id="32x20", marks=pytest.mark.slow),
    ],
)
def test_mixed_load_fails_nothing_and_memory_stays_flat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: list[str]
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server shares the CPU with the clients
    serve_load = load_script(SCRIPT, "serve_load_benchmark")
    report = serve_load.main([*size, *MIX, "--json", str(tmp_path / "report.json")])
    (mode,) = report["modes"]
    outcomes = mode["outcomes"]
    assert len(outcomes) == mode["requests"] == report["load"]["clients"] * report["load"]["requests_per_client"]
    assert mode["failures"] == mode["warmup_failures"] == 0, mode["failure_examples"]
    for outcome in outcomes:
        if outcome["status"] == "disconnected":
            assert outcome["stream"] and outcome["disconnect"], outcome  # only the planned ones left
            continue
        assert outcome["status"] == "ok", outcome
        full = outcome["finish_reason"] == "length" and outcome["tokens"] == outcome["max_tokens"]
        stopped = outcome["finish_reason"] == "stop" and 0 <= outcome["tokens"] <= outcome["max_tokens"]
        assert full or stopped, outcome
    done = [outcome for outcome in outcomes if outcome["status"] == "ok"]
    # the mix really ran: both forms, every KV policy, several depths and the exit rule, clients leaving
    assert {outcome["stream"] for outcome in done} == {True, False}
    assert {outcome["kv"] for outcome in done} == {"full", "last", "ring:2"}
    assert len({outcome["loops"] for outcome in done}) >= 3 and any(outcome["exit"] for outcome in done)
    assert mode["disconnected"] >= 1 and mode["completed"] == len(done)

    assert mode["healthy_after"] and mode["queued_after"] == mode["running_after"] == 0
    assert mode["server_tracebacks"] == 0, mode["server_log_excerpt"]
    assert mode["rss_after_load_mib"] <= 1.5 * mode["rss_after_warmup_mib"], mode
    assert mode["tokens_per_s"] > 0 and 0 < mode["latency_p50_s"] <= mode["latency_p99_s"]
    written = json.loads((tmp_path / "report.json").read_text())
    assert "outcomes" not in written["modes"][0] and written["modes"][0]["disconnected"] == mode["disconnected"]
    assert written["load"]["kv_policies"] == ["full", "last", "ring:2"]
    print(
        f"{mode['requests']} requests: {mode['failures']} failed, {mode['disconnected']} disconnected "
        f"({mode['cancelled_by_server']:.0f} rows cancelled by the server, warm-up included); "
        f"p50 {mode['latency_p50_s']:.2f} s, p99 {mode['latency_p99_s']:.2f} s, {mode['tokens_per_s']:.0f} tok/s; "
        f"RSS {mode['rss_after_warmup_mib']:.0f} -> {mode['rss_after_load_mib']:.0f} MiB"
    )
