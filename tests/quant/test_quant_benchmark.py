"""benchmarks/quantization.py --quick on tiny random checkpoints: every section runs and its numbers are sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import benchmark_checkpoints

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quantization.py"


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
    assert report["quick"] is True and report["machine"]["load_average_at_end"]

    lm = report["text_lm"]
    sizes = {r["scheme"]: r for r in lm["sizes"]}
    assert list(sizes) == ["fp32", "int8", "int4-g64"]
    assert sizes["fp32"]["bytes"] > sizes["int8"]["bytes"] > sizes["int4-g64"]["bytes"]
    # 32-wide rows: int4 groups of 64 are half padding here, so only the order is checked
    assert sizes["int4-g64"]["bits_per_parameter"] < sizes["int8"]["bits_per_parameter"] < 12
    depths = report["sizes"]["depths"]
    for label, entry in lm["schemes"].items():
        assert [r["loops"] for r in entry["perplexity"]] == depths, label
        assert all(r["perplexity"] > 1 for r in entry["perplexity"])
        assert all(r["tokens_per_s"] > 0 for r in entry["decode"])
        assert all(0 <= r["same_tokens_as_fp32"] <= len(r["tokens"]) for r in entry["decode"])
    assert all(r["same_tokens_as_fp32"] == len(r["tokens"]) for r in lm["schemes"]["fp32"]["decode"])

    rows = report["task"]["rows"]
    assert {r["scheme"] for r in rows} == {"fp32", "int8", "int4-g64"} and report["task"]["task"] == "prefix-parity"
    assert all(len(r["accuracy"]) == len(depths) and all(0 <= a <= 1 for a in r["accuracy"]) for r in rows)

    anima = {r["scheme"]: r for r in report["anima"]["rows"]}
    assert anima["int4-g64"]["bytes"] < anima["int4-g64, fp32 embedding"]["bytes"] < anima["fp32"]["bytes"]
    for heading in ("File size", "Perplexity vs depth", "Decode speed", "exact match", "ANIMA claims"):
        assert heading in done.stdout
