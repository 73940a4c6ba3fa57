"""``loopformer serve``: its flags reach the server, mistakes exit with status 2, and the process serves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from loopformer.checkpoint import TrainingState, save_checkpoint
from loopformer.cli import main
from loopformer.model import build_model
from loopformer.tokenizer import TextTokenizer
from support import small_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: TextTokenizer) -> Path:
    run = tmp_path_factory.mktemp("serve-run")
    config = small_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    model = build_model(config, seed=0)
    save_checkpoint(
        run, TrainingState(step=0, model=model.state_dict(), config=config, tokenizer_json=tokenizer.to_json())
    )
    return run


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--effort", "low"], "NAME=LOOPS"),
        (["--max-loops", "2", "--effort", "low=1"], "below the model's default of 3"),
        (["--max-batch", "0"], "max_batch"),
        (["--max-loops", "0"], "--max-loops must be an integer >= 1, got 0"),  # 0 is not "the default"
        (["--port", "70000"], "--port"),
        (["--memory-dir", "/nonexistent/dir"], "not a directory"),
        (["--host", "999.999.1.1"], "cannot serve on 999.999.1.1:8000"),
        (["--host", "192.0.2.1"], "cannot serve on 192.0.2.1:8000: cannot assign requested address"),
    ],
)
def test_mistakes_exit_with_status_2(capsys: pytest.CaptureFixture[str], ckpt: Path, flags: list[str], message: str):
    assert main(["serve", "--ckpt", str(ckpt), *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_command_serves_until_interrupted(ckpt: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "loopformer", "serve", "--ckpt", str(ckpt), "--port", str(port)]
    command += ["--model-name", "m", "--effort", "quick=1,deep=5", "--no-continuous-batching", "--log-level", "warning"]
    env = {**os.environ, "LOOPFORMER_API_KEY": "k"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        (card,) = client.models.list().data
        assert card.id == "m" and card.loops == {"default": 3, "max": 6, "effort": {"quick": 1, "deep": 5}}
        result = client.completions.create(model="m", prompt="x", max_tokens=3, extra_body={"reasoning_effort": "deep"})
        assert result.usage.mean_loops_per_token == pytest.approx(5.0)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"on http://127.0.0.1:{port}/v1" in err and "continuous batching off" in err and "API key required" in err


def test_default_effort_levels_cover_openais_names() -> None:
    """``reasoning_effort`` "none" and "minimal" (OpenAI's lowest levels) are served by default too."""
    from loopformer.serve.settings import default_effort

    assert default_effort(8) == {"none": 1, "minimal": 2, "low": 4, "medium": 8, "high": 16}
    assert default_effort(1) == {"none": 1, "minimal": 1, "low": 1, "medium": 1, "high": 2}
