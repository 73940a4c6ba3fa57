"""Live servers for the serving tests: uvicorn on 127.0.0.1 (a free port), in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import torch
import uvicorn
from fastapi import FastAPI

from loopformer.inference.engine import Engine
from loopformer.model import LoopLM, build_model
from loopformer.serve.app import create_app
from loopformer.serve.settings import ServerSettings
from loopformer.tokenizer import TextTokenizer
from support import small_config

MODEL = "tiny"
MEMORY_DIM = 6
EFFORT = {"low": 1, "medium": 3, "high": 6}


def memory_model(tokenizer: TextTokenizer, max_seq_len: int = 512) -> LoopLM:
    """A random tiny model (3 loops by default) whose memory pathway is switched on."""
    config = small_config(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len, memory_dim=MEMORY_DIM)
    model = build_model(config, seed=0)
    with torch.no_grad():
        model.memory.out.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def settings(**changes: Any) -> ServerSettings:
    base: dict[str, Any] = {
        "model_name": MODEL,
        "max_loops": 8,
        "effort": EFFORT,
        "max_batch": 8,
        "max_queue": 8,
        "max_tokens": 300,
        "timeout": 30.0,
    }
    base.update(changes)
    return ServerSettings(**base)


@dataclass
class LiveServer:
    url: str
    app: FastAPI

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)

    def metrics(self) -> dict[str, float]:
        """The /metrics page as {series: value} (series with their labels, as written)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


@contextmanager
def live_server(engine: Engine, **changes: Any) -> Iterator[LiveServer]:
    """Serve ``engine`` until the block ends; ``changes`` override the test settings."""
    app = create_app(engine, settings(**changes))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
