"""Load on ``loopformer serve`` over loopback: many concurrent clients at mixed depths, continuous batching on vs off.

A small random model (byte-level tokenizer) is saved as a checkpoint and served by ``loopformer serve`` in a
subprocess, once with continuous batching and once with ``--no-continuous-batching`` (static batches: new requests
wait until the running batch is empty). ``--clients`` threads each send ``--requests`` completions with the
``openai`` client, one after another; request ``i`` of client ``c`` uses a prompt, a ``max_tokens`` in
[``--min-tokens``, ``--max-tokens``] and a depth drawn from a fixed seed: ``loops`` 1, 2, 4 or 8, and every fifth
request an early exit (``latent-diff:0.1`` under 8 loops). Reported per mode: failures, generated tokens per
second of wall time, request latency p50 / p99, the server's mean queue wait and time to first token (from its
/metrics, warm-up included), rows per decoding pass, and its resident memory after a warm-up and after the load
(its growth; the warm-up sends every client's first, second and fifth request at once, so the batch has been at full
width in both lanes). Greedy decoding, so both modes generate the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --json benchmarks/results/serve_load.json

The clients run on the same machine as the server and compete with it for the CPU; timings also depend on what
else runs there. The failure count and the token counts do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from loopformer.checkpoint import TrainingState, save_checkpoint
from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.model import build_model
from loopformer.table import format_table
from loopformer.tokenizer import TextTokenizer

MODEL = "bench"
SHAPE = {"dim": 128, "n_heads": 4, "n_prelude": 1, "n_core": 2, "n_coda": 1, "mlp_hidden": 256, "max_seq_len": 256}
WORDS = ["loop", "state", "depth", "token", "prelude", "coda", "core", "inject", "norm", "head", "attention", "window"]


def save_model(folder: Path) -> Path:
    tokenizer = TextTokenizer.byte_level()
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, recurrence=RecurrenceConfig(mean_loops=4, backprop_loops=2), **SHAPE
    )
    model = build_model(config, seed=0)
    state = TrainingState(step=0, model=model.state_dict(), config=config, tokenizer_json=tokenizer.to_json())
    save_checkpoint(folder, state)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def request_plan(clients: int, requests: int, low: int, high: int) -> list[list[dict[str, Any]]]:
    """What each client sends, in order (the same for both modes)."""
    rng = random.Random(0)
    plan = []
    for _ in range(clients):
        mine = []
        for index in range(requests):
            extra: dict[str, Any] = {"loops": rng.choice([1, 2, 4, 8])}
            if index % 5 == 4:
                extra = {"loops": 8, "exit": "latent-diff:0.1"}
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))
            mine.append({"prompt": prompt, "max_tokens": rng.randint(low, high), "extra_body": extra})
        plan.append(mine)
    return plan


def start_server(ckpt: Path, port: int, max_batch: int, continuous: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "loopformer", "serve", "--ckpt", str(ckpt), "--port", str(port)]
    command += ["--model-name", MODEL, "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "warning"]
    if not continuous:
        command.append("--no-continuous-batching")
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def send(client: openai.OpenAI, plan: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Each client's requests, one after another, all clients at once; latencies, tokens, failures, wall time."""
    latencies: list[float] = []
    tokens: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def work(requests: list[dict[str, Any]]) -> None:
        for request in requests:
            started = time.perf_counter()
            try:
                result = client.completions.create(model=MODEL, temperature=0, **request)
            except openai.OpenAIError as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens.append(result.usage.completion_tokens)

    threads = [threading.Thread(target=work, args=(requests,)) for requests in plan]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "tokens": sum(tokens), "failures": failures, "wall": time.perf_counter() - started}


def run_mode(ckpt: Path, plan: list[list[dict[str, Any]]], max_batch: int, continuous: bool) -> dict[str, Any]:
    port = free_port()
    process = start_server(ckpt, port, max_batch, continuous)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        # warm-up: every client's first two requests at once (the full batch width; one has an exit rule)
        send(client, [requests[:2] + requests[4:5] for requests in plan])
        rss_before = rss_mib(process.pid)
        load = send(client, plan)
        rss_after = rss_mib(process.pid)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        process.terminate()
        process.wait(timeout=60)
    latencies, failures, wall = load["latencies"], load["failures"], load["wall"]
    series = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))

    def mean(name: str) -> float:
        return float(series[f"{name}_sum"]) / max(float(series[f"{name}_count"]), 1.0)

    rows, passes = float(series["loopformer_decode_rows_total"]), float(series["loopformer_decode_passes_total"])
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "continuous_batching": continuous,
        "requests": sum(len(requests) for requests in plan),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "generated_tokens": load["tokens"],
        "wall_s": wall,
        "tokens_per_s": load["tokens"] / wall,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": quantiles[98],
        "mean_rows_per_pass": rows / passes if passes else None,
        "mean_queue_wait_s": mean("loopformer_queue_wait_seconds"),
        "mean_time_to_first_token_s": mean("loopformer_time_to_first_token_seconds"),
        "rss_after_warmup_mib": rss_before,
        "rss_after_load_mib": rss_after,
        "rss_growth_mib": rss_after - rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    plan = request_plan(args.clients, args.requests, args.min_tokens, args.max_tokens)
    with tempfile.TemporaryDirectory() as folder:
        ckpt = save_model(Path(folder) / "bench")
        modes = [run_mode(ckpt, plan, args.max_batch, continuous) for continuous in (False, True)]
    static, continuous = modes
    report = {
        "benchmark": "serve_load",
        "command": "OMP_NUM_THREADS=1 python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": {**SHAPE, "vocab_size": TextTokenizer.byte_level().vocab_size, "mean_loops": 4},
        "load": {
            "clients": args.clients,
            "requests_per_client": args.requests,
            "max_tokens": [args.min_tokens, args.max_tokens],
            "max_batch": args.max_batch,
            "depths": "loops 1/2/4/8; every 5th request latent-diff:0.1 under 8 loops",
        },
        "modes": modes,
        "throughput_ratio_continuous_over_static": continuous["tokens_per_s"] / static["tokens_per_s"],
    }
    print(json.dumps(report, indent=1))
    headers = [
        "batching",
        "failures",
        "tokens",
        "tok/s",
        "p50 s",
        "p99 s",
        "TTFT s",
        "rows/pass",
        "RSS MiB",
        "growth MiB",
    ]
    table = [
        [
            "continuous" if mode["continuous_batching"] else "static",
            mode["failures"],
            mode["generated_tokens"],
            round(mode["tokens_per_s"], 1),
            round(mode["latency_p50_s"], 2),
            round(mode["latency_p99_s"], 2),
            round(mode["mean_time_to_first_token_s"], 2),
            round(mode["mean_rows_per_pass"], 1),
            round(mode["rss_after_load_mib"], 1),
            round(mode["rss_growth_mib"], 1),
        ]
        for mode in modes
    ]
    print(format_table(headers, table), file=sys.stderr)
    print(
        f"throughput ratio continuous / static: {report['throughput_ratio_continuous_over_static']:.2f}",
        file=sys.stderr,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
