"""benchmarks/inference.py --quick on tiny random checkpoints: every section runs and its numbers are sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from loopformer.inference.exits import EXIT_CRITERIA
from support import benchmark_checkpoints, load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


def test_quick_benchmark_reports_every_section(tmp_path: Path) -> None:
    text, task = benchmark_checkpoints(tmp_path)
    out = tmp_path / "out.json"
    argv = ["--ckpt", str(text), "--task-ckpt", str(task), "--quick", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "LOOPFORMER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["quick"] is True and "--quick" in report["command"]
    assert report["machine"]["torch"] and report["machine"]["platform"] and report["machine"]["cpu_count"] >= 1
    assert report["date"] and report["checkpoint"]["parameters"] > 0
    assert report["checkpoint"]["path"].startswith(str(text))
    assert "validation split" in report["held_out"]["source"]

    decode = report["decode"]
    assert {(r["batch"], r["loops"]) for r in decode["rows"]} == {(1, 8), (1, 32), (8, 8), (8, 32)}
    for row in decode["rows"]:
        assert row["tokens_per_s"] > 0 and row["tokens_per_s_per_row"] > 0
        assert row["new_tokens"] == row["batch"] * decode["new_tokens_per_row"]
    assert decode["ratio_batch1_r32_vs_huginn"] > 0

    exits = report["exits"]
    assert [r["criterion"] for r in exits["rows"]] == list(EXIT_CRITERIA)
    assert exits["no_exit"]["mean_loops"] == 32
    for row in exits["rows"]:
        assert 1 <= row["warm_start_mean_steps"] <= 32 and row["warm_start_ppl_change"] is not None
        assert 1 <= row["mean_loops"] <= 32 and row["perplexity"] > 0
        assert row["steps_saved"] == round(1 - row["mean_loops"] / 32, 4)
    assert exits["best"] is None or exits["best"] in {r["rule"] for r in exits["rows"]}

    task_rows = report["task"]["rows"]
    assert report["task"]["task"] == "prefix-parity"
    assert {r["rule"] for r in task_rows} == {"no exit", *(r["rule"] for r in exits["rows"])}
    for row in task_rows:
        assert 0 <= row["accuracy"] <= 1 and 1 <= row["mean_loops"] <= 32

    kv = {r["policy"]: r for r in report["kv"]["rows"]}
    assert set(kv) == {"full", "ring:4", "ring:8", "last"}
    assert kv["full"]["ratio_full_over_policy"] == 1 and kv["full"]["ppl_change"] == 0
    assert kv["last"]["ratio_full_over_policy"] > kv["ring:8"]["ratio_full_over_policy"] > 1
    assert all(r["perplexity"] > 0 for r in kv.values())

    speculative = report["speculative"]
    assert speculative["plain"]["tokens_per_s"] > 0
    assert [(r["draft_loops"], r["lookahead"]) for r in speculative["rows"]] == [(2, 4), (4, 4), (4, 8), (8, 8)]
    for row in speculative["rows"]:
        assert row["identical"] is True, row
        assert 0 <= row["acceptance_rate"] <= 1 and row["tokens_per_s"] > 0

    compaction = {r["mode"]: r for r in report["compaction"]["rows"]}
    assert compaction["compaction"]["core_rows"] <= compaction["masking"]["core_rows"]
    assert compaction["masking"]["core_rows"] <= compaction["no exit"]["core_rows"]
    assert 1 <= compaction["compaction"]["mean_loops"] <= 32
    assert compaction["compaction"]["mean_loops"] == compaction["masking"]["mean_loops"]
    assert report["compaction"]["identical_tokens"] is True

    for heading in ("Decode speed", "Exit criteria", "KV policies", "Speculative decoding", "compaction vs masking"):
        assert heading in done.stdout


def load_benchmark() -> ModuleType:
    """benchmarks/inference.py as a module."""
    return load_script(SCRIPT, "inference_benchmark")
