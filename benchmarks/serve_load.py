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

Mixed mode: ``--stream-fraction`` of the requests stream (``stream_options.include_usage``, so the last chunk
carries the token count), ``--kv`` draws each request's KV policy from a list, and ``--disconnect-fraction`` of the
streaming requests are closed by their client after two chunks (the server cancels their rows). These draws come
from their own seeded generator, so the default plan is unchanged. A request fails unless it gets a 200 and
either ``max_tokens`` tokens (``finish_reason: length``) or a stop within them; disconnected requests count apart.
After the load the script waits for the server to drain, then reads /health and the resident memory, and counts
the tracebacks in the server's log. ``--modes continuous`` runs only the continuous-batching server.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --modes continuous --stream-fraction 0.5 \\
        --kv full,last,ring:2 --disconnect-fraction 0.25 --json benchmarks/results/serve_load_mixed.json

:func:`run_mode` is what the tests call: it returns the numbers above and each request's outcome.
"""

from __future__ import annotations

import argparse
import json
import math
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
from collections.abc import Sequence
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
DISCONNECT_AFTER = 2  # chunks a disconnecting client reads before it closes the stream
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


def request_plan(
    clients: int,
    requests: int,
    low: int,
    high: int,
    stream_fraction: float = 0.0,
    kv: Sequence[str] = (),
    disconnect_fraction: float = 0.0,
) -> list[list[dict[str, Any]]]:
    """What each client sends, in order (the same for both modes): the completion's arguments, and whether it
    streams and whether its client leaves after :data:`DISCONNECT_AFTER` chunks."""
    rng = random.Random(0)
    mix = random.Random(1)  # streaming, KV policy, disconnects: the rest of the plan stays what it always was
    plan = []
    for _ in range(clients):
        mine = []
        for index in range(requests):
            extra: dict[str, Any] = {"loops": rng.choice([1, 2, 4, 8])}
            if index % 5 == 4:
                extra = {"loops": 8, "exit": "latent-diff:0.1"}
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))
            request = {"prompt": prompt, "max_tokens": rng.randint(low, high), "extra_body": extra}
            if kv:
                extra["kv"] = mix.choice(list(kv))
            stream = mix.random() < stream_fraction
            request.update(stream=stream, disconnect=stream and mix.random() < disconnect_fraction)
            mine.append(request)
        plan.append(mine)
    return plan


def start_server(ckpt: Path, port: int, max_batch: int, continuous: bool, log: Path | None = None) -> subprocess.Popen:
    """``loopformer serve`` on ``port``, once /health answers; its stderr goes to ``log`` (or nowhere)."""
    command = [sys.executable, "-m", "loopformer", "serve", "--ckpt", str(ckpt), "--port", str(port)]
    command += ["--model-name", MODEL, "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "warning"]
    if not continuous:
        command.append("--no-continuous-batching")
    with open(log, "ab") if log is not None else open(os.devnull, "wb") as stderr:
        process = subprocess.Popen(command, stderr=stderr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def complete(client: openai.OpenAI, request: dict[str, Any]) -> dict[str, Any]:
    """Send one planned request; its outcome: status "ok", "disconnected" (the client left, as planned) or
    "failed" (an error, or a token count that is neither ``max_tokens`` nor a stop within it)."""
    body = {key: value for key, value in request.items() if key not in ("stream", "disconnect")}
    outcome: dict[str, Any] = {
        "stream": request.get("stream", False),
        "disconnect": request.get("disconnect", False),
        "loops": body["extra_body"].get("loops"),
        "exit": body["extra_body"].get("exit"),
        "kv": body["extra_body"].get("kv", "full"),
        "max_tokens": body["max_tokens"],
        "tokens": None,
        "finish_reason": None,
        "latency_s": None,
        "error": None,
    }
    started = time.perf_counter()
    try:
        if outcome["stream"]:
            chunks = client.completions.create(
                model=MODEL, temperature=0, stream=True, stream_options={"include_usage": True}, **body
            )
            try:
                for count, chunk in enumerate(chunks, 1):
                    if chunk.usage is not None:
                        outcome["tokens"] = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        outcome["finish_reason"] = choice.finish_reason or outcome["finish_reason"]
                    if outcome["disconnect"] and count == DISCONNECT_AFTER and outcome["finish_reason"] is None:
                        return {**outcome, "status": "disconnected"}
            finally:
                chunks.close()
        else:
            result = client.completions.create(model=MODEL, temperature=0, **body)
            outcome["tokens"], outcome["finish_reason"] = (
                result.usage.completion_tokens,
                result.choices[0].finish_reason,
            )
    except openai.OpenAIError as exc:
        return {**outcome, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    outcome["latency_s"] = time.perf_counter() - started
    tokens, reason, limit = outcome["tokens"], outcome["finish_reason"], outcome["max_tokens"]
    if (reason, tokens) != ("length", limit) and not (reason == "stop" and tokens is not None and tokens <= limit):
        return {**outcome, "status": "failed", "error": f"finish_reason {reason!r} after {tokens} of {limit} tokens"}
    return {**outcome, "status": "ok"}


def send(client: openai.OpenAI, plan: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Each client's requests, one after another, all clients at once: every request's outcome (with its client
    and index), latencies and tokens of the completed ones, failures, wall time."""
    outcomes: list[dict[str, Any]] = []
    lock = threading.Lock()

    def work(client_index: int, requests: list[dict[str, Any]]) -> None:
        for index, request in enumerate(requests):
            outcome = {"client": client_index, "index": index, **complete(client, request)}
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=work, args=(c, requests)) for c, requests in enumerate(plan)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [outcome for outcome in outcomes if outcome["status"] == "ok"]
    return {
        "outcomes": sorted(outcomes, key=lambda outcome: (outcome["client"], outcome["index"])),
        "latencies": [outcome["latency_s"] for outcome in done],
        "tokens": sum(outcome["tokens"] for outcome in done),
        "failures": [outcome["error"] for outcome in outcomes if outcome["status"] == "failed"],
        "wall": wall,
    }


def drained(port: int, seconds: float = 30.0) -> dict[str, Any]:
    """/health once no row is queued or running (cancelled rows leave at the next cycle), or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        body = health.json() if health.status_code == 200 else {}
        if (body.get("queued") == 0 and body.get("running") == 0) or time.monotonic() > deadline:
            return {"status_code": health.status_code, **body}
        time.sleep(0.05)


def run_mode(ckpt: Path, plan: list[list[dict[str, Any]]], max_batch: int, continuous: bool) -> dict[str, Any]:
    """Serve ``ckpt`` in a subprocess, warm it up, send ``plan``; the numbers of the report, plus ``outcomes`` (one
    per planned request, in plan order; the script leaves them out of its JSON)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "server.log"
        process = start_server(ckpt, port, max_batch, continuous, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        try:
            # warm-up: every client's first two requests at once (the full batch width; one has an exit rule)
            warmup = send(client, [requests[:2] + requests[4:5] for requests in plan])
            drained(port)
            rss_before = rss_mib(process.pid)
            load = send(client, plan)
            health = drained(port)
            rss_after = rss_mib(process.pid)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        finally:
            process.terminate()
            process.wait(timeout=60)
        server_log = log.read_text(errors="replace")
    latencies, failures, wall, outcomes = load["latencies"], load["failures"], load["wall"], load["outcomes"]
    series = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))

    def mean(name: str) -> float:
        return float(series[f"{name}_sum"]) / max(float(series[f"{name}_count"]), 1.0)

    rows, passes = float(series["loopformer_decode_rows_total"]), float(series["loopformer_decode_passes_total"])
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    tracebacks = server_log.count("Traceback (most recent call last)")
    return {
        "continuous_batching": continuous,
        "requests": sum(len(requests) for requests in plan),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "warmup_failures": len(warmup["failures"]),
        "completed": sum(outcome["status"] == "ok" for outcome in outcomes),
        "streamed": sum(outcome["stream"] for outcome in outcomes),
        "disconnected": sum(outcome["status"] == "disconnected" for outcome in outcomes),
        "cancelled_by_server": float(series.get("loopformer_requests_cancelled_total", 0.0)),
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
        "healthy_after": health["status_code"] == 200 and health.get("status") == "ok",
        "queued_after": health.get("queued"),
        "running_after": health.get("running"),
        "server_tracebacks": tracebacks,
        "server_log_excerpt": server_log[server_log.find("Traceback") :][:2000] if tracebacks else "",
        "outcomes": outcomes,
    }


def rounded(value: float | None, digits: int) -> float | str:
    return "-" if value is None or math.isnan(value) else round(value, digits)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report (each mode with its ``outcomes``, which the JSON leaves out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--stream-fraction", type=fraction, default=0.0, help="of the requests, streamed")
    parser.add_argument("--kv", default="", help="KV policies to draw from, e.g. full,last,ring:2 (default: none sent)")
    parser.add_argument(
        "--disconnect-fraction", type=fraction, default=0.0, help="of the streamed requests, left after two chunks"
    )
    parser.add_argument("--modes", default="static,continuous", help="static, continuous or both (comma-separated)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    kv = [policy.strip() for policy in args.kv.split(",") if policy.strip()]
    names = [name.strip() for name in args.modes.split(",")]
    if not names or any(name not in ("static", "continuous") for name in names):
        parser.error(f"--modes {args.modes!r}: give static, continuous or both")
    plan = request_plan(
        args.clients,
        args.requests,
        args.min_tokens,
        args.max_tokens,
        args.stream_fraction,
        kv,
        args.disconnect_fraction,
    )
    with tempfile.TemporaryDirectory() as folder:
        ckpt = save_model(Path(folder) / "bench")
        modes = [run_mode(ckpt, plan, args.max_batch, name == "continuous") for name in names]
    by_name = dict(zip(names, modes, strict=True))
    report = {
        "benchmark": "serve_load",
        "command": "OMP_NUM_THREADS=1 python benchmarks/serve_load.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "model": {**SHAPE, "vocab_size": TextTokenizer.byte_level().vocab_size, "mean_loops": 4},
        "load": {
            "clients": args.clients,
            "requests_per_client": args.requests,
            "max_tokens": [args.min_tokens, args.max_tokens],
            "max_batch": args.max_batch,
            "depths": "loops 1/2/4/8; every 5th request latent-diff:0.1 under 8 loops",
            "stream_fraction": args.stream_fraction,
            "kv_policies": kv or ["full (not sent)"],
            "disconnect_fraction_of_streams": args.disconnect_fraction,
            "disconnect_after_chunks": DISCONNECT_AFTER,
        },
        "modes": modes,
    }
    if set(by_name) == {"static", "continuous"}:
        ratio = by_name["continuous"]["tokens_per_s"] / by_name["static"]["tokens_per_s"]
        report["throughput_ratio_continuous_over_static"] = ratio
    written = {**report, "modes": [{k: v for k, v in mode.items() if k != "outcomes"} for mode in modes]}
    print(json.dumps(written, indent=1))
    headers = [
        "batching",
        "failures",
        "disconnected",
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
            mode["disconnected"],
            mode["generated_tokens"],
            rounded(mode["tokens_per_s"], 1),
            rounded(mode["latency_p50_s"], 2),
            rounded(mode["latency_p99_s"], 2),
            rounded(mode["mean_time_to_first_token_s"], 2),
            rounded(mode["mean_rows_per_pass"], 1),
            rounded(mode["rss_after_load_mib"], 1),
            rounded(mode["rss_growth_mib"], 1),
        ]
        for mode in modes
    ]
    print(format_table(headers, table), file=sys.stderr)
    if "throughput_ratio_continuous_over_static" in report:
        ratio = report["throughput_ratio_continuous_over_static"]
        print(f"throughput ratio continuous / static: {ratio:.2f}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(written, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
