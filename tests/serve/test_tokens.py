"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (vLLM's tokenizer endpoints) on a live server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from loopformer.inference.chat import Message, encode_chat, encode_prompt
from loopformer.inference.engine import Engine
from serve.live import MODEL, LiveServer, live_server

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a loop?"}]


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[LiveServer]:
    with live_server(engine) as live:
        yield live


def post(server: LiveServer, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=10)


def test_tokenize_gives_the_ids_the_endpoints_feed(server: LiveServer, engine: Engine) -> None:
    tokenizer = engine.tokenizer
    prompt = post(server, "/tokenize", {"model": MODEL, "prompt": "loop é"}).json()
    assert prompt == {"tokens": encode_prompt(tokenizer, "loop é"), "count": 8, "max_model_len": 512}
    plain = post(server, "/tokenize", {"prompt": "loop é", "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer.encode("loop é")
    conversation = encode_chat(tokenizer, [Message(m["role"], m["content"]) for m in CHAT])
    chat = post(server, "/tokenize", {"messages": CHAT}).json()
    assert chat["tokens"] == conversation and chat["count"] == len(conversation)
    reply = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens == chat["count"]
    history = post(server, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()["tokens"]
    assert history + tokenizer.encode(tokenizer.roles.openings["assistant"]) == conversation
    tools = [{"type": "function", "function": {"name": "weather"}}]
    assert post(server, "/tokenize", {"messages": CHAT, "tools": tools}).json()["count"] > len(conversation)


def test_detokenize_inverts_tokenize(server: LiveServer) -> None:
    for text in ["loop é", "<|user|>hi", ""]:
        tokens = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
        assert post(server, "/detokenize", {"model": MODEL, "tokens": tokens}).json() == {"prompt": text}
    with_bos = post(server, "/tokenize", {"prompt": "hi"}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": with_bos}).json() == {"prompt": "<|bos|>hi"}


def test_tokenizer_info_names_the_special_tokens(server: LiveServer) -> None:
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|eos|>" and info["bos_token"] == "<|bos|>"
    assert info["vocab_size"] == 270 and info["model_max_length"] == 512
    eos = post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [1]  # what lm-eval's remote tokenizer reads the end-of-sequence id from


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/tokenize", {}, 400, "needs the field prompt or messages"),
        ("/tokenize", {"prompt": "x", "messages": CHAT}, 400, "not both"),
        ("/tokenize", {"prompt": ""}, 400, "the prompt is empty"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x", "add_generation_prompt": False}, 400, "add_generation_prompt goes with messages"),
        ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, 400, "add_special_tokens goes with prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text only"),
        ("/tokenize", {"prompt": "x", "text": "y"}, 400, "unknown field text"),
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "does not exist"),
        ("/detokenize", {"tokens": [5, 270]}, 400, "tokens[1] is outside the vocabulary 0..269"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens[0] is outside"),
        ("/detokenize", {"tokens": [2**80]}, 400, "tokens[0] is outside"),
        ("/detokenize", {"tokens": [1.0]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [True]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": "5"}, 400, "tokens"),
        ("/detokenize", {}, 400, "needs the field tokens"),
        ("/detokenize", {"tokens": [], "skip_special_tokens": True}, 400, "unknown field skip_special_tokens"),
    ],
)
def test_bad_tokenizer_requests(server: LiveServer, path: str, body: dict, status: int, needle: str) -> None:
    response = post(server, path, body)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]


def test_the_tokenizer_endpoints_are_behind_the_key_and_bounded(engine: Engine) -> None:
    with live_server(engine, api_key="s3cret", max_body_bytes=1000) as guarded:
        assert post(guarded, "/tokenize", {"prompt": "x"}).status_code == 401
        assert httpx.get(f"{guarded.url}/tokenizer_info").status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        large = httpx.post(f"{guarded.url}/detokenize", json={"tokens": [5] * 1000}, headers=headers, timeout=10)
        assert large.status_code == 413
        small = httpx.post(f"{guarded.url}/detokenize", json={"tokens": [14 + 65]}, headers=headers, timeout=10)
        assert small.json() == {"prompt": "A"}
