"""The OpenAI-compatible server through the real ``openai`` client against a live server on loopback.

The model is tiny and random: answers are compared with the engine's own generation of the same prompt (the
reference), never with fixed strings.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from loopformer.cli.generation_args import add_generation_arguments
from loopformer.inference.chat import Message, encode_chat, encode_prompt, reply_stop_tokens
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.sampling import SamplingConfig
from loopformer.serve.settings import default_effort
from serve.live import EFFORT, MEMORY_DIM, MODEL, LiveServer, live_server

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a loop?"}]


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("memories")
    vectors = torch.randn(2, MEMORY_DIM, generator=torch.Generator().manual_seed(4))
    save_file({"memory": vectors}, folder / "me.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(engine: Engine, memory_dir: Path) -> Iterator[LiveServer]:
    with live_server(engine, memory_dir=memory_dir) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


def reference(engine: Engine, prompt: list[int], memory: torch.Tensor | None = None, **changes: object) -> object:
    """The engine's greedy generation of ``prompt`` alone: the answer the server must give."""
    config = GenerationConfig(**{"max_new_tokens": 12, **changes})
    return engine.generate([prompt], config, memory=memory).outputs[0]


def chat_reference(engine: Engine, **changes: object) -> object:
    prompt = encode_chat(engine.tokenizer, [Message(m["role"], m["content"]) for m in CHAT])
    return reference(engine, prompt, stop_tokens=reply_stop_tokens(engine.tokenizer), **changes)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].loops == {"default": 3, "max": 8, "effort": EFFORT}
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_is_the_engines_generation(client: openai.OpenAI, engine: Engine) -> None:
    result = client.completions.create(model=MODEL, prompt="loop state", max_tokens=12, temperature=0)
    expected = reference(engine, encode_prompt(engine.tokenizer, "loop state"))
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == expected.finish_reason
    assert result.usage.prompt_tokens == len(encode_prompt(engine.tokenizer, "loop state"))
    assert result.usage.completion_tokens == len(expected.tokens)
    assert result.usage.mean_loops_per_token == pytest.approx(3.0)


def test_several_prompts_and_choices(client: openai.OpenAI, engine: Engine) -> None:
    prompts = ["loop state", "depth"]
    result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for choice in result.choices:
        expected = reference(engine, encode_prompt(engine.tokenizer, prompts[choice.index // 2]), max_new_tokens=6)
        assert choice.text == expected.text


def test_chat_is_the_engines_generation(client: openai.OpenAI, engine: Engine) -> None:
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    expected = chat_reference(engine)
    message = result.choices[0].message
    assert message.role == "assistant"
    assert message.content == expected.text
    assert result.choices[0].finish_reason == expected.finish_reason
    assert result.object == "chat.completion"


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_reassembles_to_the_non_streaming_answer(client: openai.OpenAI, chat: bool) -> None:
    extra = {"loops": 5, "exit": "latent-diff:0.1"}
    if chat:
        create = client.chat.completions.create
        args = {"messages": CHAT, "max_tokens": 20, "temperature": 0, "extra_body": extra}
    else:
        create = client.completions.create
        args = {"prompt": "loop state", "max_tokens": 20, "temperature": 0, "extra_body": extra}
    whole = create(model=MODEL, **args)
    chunks = list(create(model=MODEL, stream=True, stream_options={"include_usage": True}, **args))
    if chat:
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert len([c for c in chunks if c.choices]) > 3  # streamed in pieces, not at once
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.mean_loops_per_token == whole.usage.mean_loops_per_token


def test_per_request_depth_changes_the_mean_loops_reported(client: openai.OpenAI, engine: Engine) -> None:
    def mean_loops(**extra: object) -> float:
        result = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=0, extra_body=extra or None
        )
        return result.usage.mean_loops_per_token

    assert mean_loops() == pytest.approx(3.0)
    assert mean_loops(loops=1) == pytest.approx(1.0)
    assert mean_loops(loops=7) == pytest.approx(7.0)
    assert mean_loops(reasoning_effort="high") == pytest.approx(EFFORT["high"])
    assert mean_loops(reasoning_effort="low") == pytest.approx(EFFORT["low"])
    early = chat_reference(engine, max_new_tokens=8, loops=8, exit="latent-diff:0.3")
    assert mean_loops(loops=8, exit="latent-diff:0.3") == pytest.approx(sum(early.loops) / len(early.loops))


def test_openais_lowest_effort_names_are_served_by_default(engine: Engine) -> None:
    levels = default_effort(3)
    with live_server(engine, effort=levels) as live:
        for name in ("none", "minimal"):
            result = live.client().chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=2, temperature=0, reasoning_effort=name
            )
            assert result.usage.mean_loops_per_token == pytest.approx(levels[name])


def test_omitted_sampling_fields_take_the_documented_defaults(client: openai.OpenAI, engine: Engine) -> None:
    """The server samples at temperature 1 (OpenAI's default), loopformer generate is greedy (docs/serving.md)."""
    prompt = encode_prompt(engine.tokenizer, "loop state")
    result = client.completions.create(model=MODEL, prompt="loop state", max_tokens=12, seed=7)
    sampled = reference(engine, prompt, sampling=SamplingConfig(temperature=1.0, seed=7))
    assert result.choices[0].text == sampled.text
    assert sampled.tokens != reference(engine, prompt).tokens  # so the default is not greedy
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    cli = parser.parse_args(["--ckpt", "lm"])
    assert (cli.temperature, cli.top_p, cli.top_k, cli.min_p, cli.repetition_penalty) == (0.0, None, None, None, 1.0)


def test_kv_policy_and_memory_per_request(client: openai.OpenAI, engine: Engine, memory_dir: Path) -> None:
    prompt = encode_prompt(engine.tokenizer, "loop state")
    ring = client.completions.create(
        model=MODEL, prompt="loop state", max_tokens=12, temperature=0, extra_body={"loops": 6, "kv": "ring:2"}
    )
    assert ring.choices[0].text == reference(engine, prompt, loops=6, kv="ring:2").text
    vectors = torch.randn(3, MEMORY_DIM, generator=torch.Generator().manual_seed(5))
    inline = client.completions.create(
        model=MODEL, prompt="loop state", max_tokens=12, temperature=0, extra_body={"memory": vectors.tolist()}
    )
    conditioned = reference(engine, prompt, memory=vectors)
    assert inline.choices[0].text == conditioned.text
    assert conditioned.tokens != reference(engine, prompt).tokens  # the memory changed the answer
    named = client.completions.create(
        model=MODEL, prompt="loop state", max_tokens=12, temperature=0, extra_body={"memory": "me.safetensors"}
    )
    stored = load_file(memory_dir / "me.safetensors")["memory"]
    assert named.choices[0].text == reference(engine, prompt, memory=stored).text


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 301}, 400, "at most 300"),
        ({"model": MODEL, "prompt": "x" * 500, "max_tokens": 100}, 400, "context"),
        ({"model": MODEL, "prompt": "x", "loops": 9}, 400, "at most 8 on this server (its --max-loops)"),
        ({"model": MODEL, "prompt": "x", "loops": 0}, 400, "loops"),
        ({"model": MODEL, "prompt": "x", "loops": 2, "reasoning_effort": "low"}, 400, "not both"),
        ({"model": MODEL, "prompt": "x", "reasoning_effort": "extreme"}, 400, "low (1 loops)"),
        ({"model": MODEL, "prompt": "x", "exit": "magic:1"}, 400, "unknown exit criterion"),
        ({"model": MODEL, "prompt": "x", "kv": "ring:x"}, 400, "ring size"),
        ({"model": MODEL, "prompt": "x", "kv": "ring:1000"}, 400, "--max-loops 8"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),  # strict types: no coercion
        ({"model": MODEL, "prompt": "x", "loops": True}, 400, "loops"),
        ({"model": MODEL, "prompt": "x", "loops": 2.0}, 400, "loops"),
        ({"model": MODEL, "prompt": "x", "loop": 4}, 400, "unknown field loop"),
        (
            {"model": MODEL, "prompt": "x", "response_format": {"type": "json_object"}},
            400,
            "unknown field response_format",
        ),
        ({"model": MODEL, "prompt": "x", "min_steps": 2}, 400, "unknown field min_steps"),
        ({"model": MODEL, "prompt": "x", "kv": "ring:99999999999999999999"}, 400, "above 1,000,000"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "does not support suffix"),
        ({"model": MODEL, "prompt": "x", "memory": [[1.0, 2.0]]}, 400, "6 numbers"),
        ({"model": MODEL, "prompt": "x", "memory": "../secret.npy"}, 400, "no memory file"),
        ({"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": [999999]}, 400, "ids in 0..269"),
        ({"model": MODEL, "prompt": ["a", "b", "c"], "n": 3}, 400, "allows 8"),
    ],
)
def test_bad_requests_get_openai_style_errors(server: LiveServer, body: dict, status: int, needle: str) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=10)
    assert response.status_code == status
    assert needle in error_of(response)["message"]


def test_malformed_json_unknown_paths_and_large_bodies(server: LiveServer) -> None:
    bad = httpx.post(
        f"{server.url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and "not valid JSON" in error_of(bad)["message"]
    form = httpx.post(f"{server.url}/v1/completions", content=b"prompt=hi", headers={"content-type": "text/plain"})
    assert form.status_code == 400 and "must be a JSON object" in error_of(form)["message"]
    empty = httpx.post(f"{server.url}/v1/completions", content=b"", headers={"content-type": "application/json"})
    assert empty.status_code == 400 and "None" not in error_of(empty)["message"]
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405
    huge = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x" * 1_100_000}, timeout=10)
    assert huge.status_code == 413 and error_of(huge)["type"] == "invalid_request_error"


def test_client_errors_through_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="at most 300"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1000)


def test_tool_messages_render_into_the_prompt(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    plain = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=2, temperature=0)
    full = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=2, temperature=0)
    assert full.usage.prompt_tokens > plain.usage.prompt_tokens + len("sunny")


def test_api_key_when_set_and_open_when_not(engine: Engine, server: LiveServer) -> None:
    assert server.client(api_key="anything").models.list().data  # no key configured: any key works
    with live_server(engine, api_key="s3cret") as guarded:
        with pytest.raises(openai.AuthenticationError):
            guarded.client(api_key="wrong").models.list()
        missing = httpx.post(f"{guarded.url}/v1/completions", content=b"{broken")
        assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
        assert httpx.get(f"{guarded.url}/metrics").status_code == 401
        assert httpx.get(f"{guarded.url}/health").status_code == 200
        result = guarded.client(api_key="s3cret").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert result.usage.completion_tokens <= 2


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


LONG = {"model": MODEL, "prompt": "loop", "max_tokens": 300, "loops": 8, "temperature": 0}


def test_client_disconnect_cancels_generation(server: LiveServer) -> None:
    before = server.metrics()
    cancelled = "loopformer_requests_cancelled_total"
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}, timeout=10) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    wait_for(lambda: server.metrics()[cancelled] == before[cancelled] + 1)
    generated = server.metrics()["loopformer_generated_tokens_total"] - before["loopformer_generated_tokens_total"]
    assert generated < LONG["max_tokens"]
    # a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.3))
    wait_for(lambda: server.metrics()[cancelled] == before[cancelled] + 2)
    wait_for(lambda: server.metrics()["loopformer_running_rows"] == 0)


def test_a_full_queue_answers_503(engine: Engine) -> None:
    with live_server(engine, max_batch=1, max_queue=1) as small:
        client = httpx.Client(timeout=10)
        body = {**LONG, "stream": True}
        url = f"{small.url}/v1/completions"
        with client.stream("POST", url, json=body) as first, client.stream("POST", url, json=body) as second:
            assert first.status_code == second.status_code == 200
            wait_for(lambda: small.metrics()["loopformer_queue_length"] == 1)
            refused = httpx.post(url, json=LONG, timeout=10)
            assert refused.status_code == 503 and error_of(refused)["code"] == "queue_full"
        assert small.metrics()["loopformer_requests_rejected_total"] == 1
        wait_for(lambda: small.metrics()["loopformer_running_rows"] == 0)


def test_timeout_ends_the_request(engine: Engine) -> None:
    with live_server(engine, timeout=0.2) as hasty:
        response = httpx.post(f"{hasty.url}/v1/completions", json=LONG, timeout=10)
        assert response.status_code == 504 and "0.2 s" in error_of(response)["message"]
        streamed = httpx.post(f"{hasty.url}/v1/completions", json={**LONG, "stream": True}, timeout=10)
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert "error" in events[-1]
        wait_for(lambda: hasty.metrics()["loopformer_running_rows"] == 0)


def test_metrics_page(server: LiveServer, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0, extra_body={"loops": 2})
    metrics = server.metrics()
    assert metrics["loopformer_generated_tokens_total"] >= 1
    assert metrics["loopformer_mean_loops_per_token"] > 0
    assert metrics['loopformer_http_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert metrics['loopformer_request_seconds_bucket{le="+Inf"}'] == metrics["loopformer_request_seconds_count"]
    assert metrics["loopformer_queue_length"] == 0
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE loopformer_request_seconds histogram" in text


def test_concurrent_requests_all_succeed(client: openai.OpenAI, engine: Engine) -> None:
    results: dict[int, str] = {}

    def ask(index: int) -> None:
        result = client.completions.create(
            model=MODEL, prompt="loop state", max_tokens=10, temperature=0, extra_body={"loops": 1 + index % 4}
        )
        results[index] = result.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    prompt = encode_prompt(engine.tokenizer, "loop state")
    for index, text in results.items():
        assert text == reference(engine, prompt, max_new_tokens=10, loops=1 + index % 4).text
    assert len(results) == 8


def test_a_server_fault_is_a_500_without_details(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("loopformer.serve.app.completion_plan", broken)
    response = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
    assert response.status_code == 500
    assert error_of(response)["message"] == "the server failed to handle this request."
    assert "secret" not in response.text
