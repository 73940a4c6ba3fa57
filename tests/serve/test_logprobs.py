"""Log-probabilities and ``echo`` through the real ``openai`` client against a live server on loopback.

The reference is independent of the engine's decoding: one full forward pass of the model over the prompt and the
returned tokens, at the request's loop count, and its log-softmax. The engine runs in fp32 so that the two agree to
1e-4 on any machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from loopformer.inference.chat import Message, encode_chat, encode_prompt
from loopformer.inference.engine import Engine
from loopformer.serve.logprobs import TextOffsets, TokenText
from loopformer.tokenizer import TextTokenizer
from serve.live import MODEL, LiveServer, live_server, memory_model

CHAT = [{"role": "user", "content": "what is a loop?"}]
TOLERANCE = 1e-4
BYTE_OFFSET = 14  # the byte-level tokenizer's id of byte b is 14 + b


@pytest.fixture(scope="module")
def engine(tokenizer: TextTokenizer) -> Engine:
    return Engine(memory_model(tokenizer), tokenizer, dtype="fp32")


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[LiveServer]:
    with live_server(engine) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def ids_of(engine: Engine) -> dict[str, int]:
    """Token text (as ``logprobs`` shows it) -> id; the texts of the byte-level vocabulary are all distinct."""
    texts = TokenText(engine.tokenizer)
    table = {texts.text(token): token for token in range(engine.tokenizer.vocab_size)}
    assert len(table) == engine.tokenizer.vocab_size
    return table


def full_forward(engine: Engine, ids: list[int], loops: int) -> torch.Tensor:
    """log-softmax [T, V] of one forward pass over ``ids`` at ``loops``, from the engine's initial states."""
    positions = torch.arange(len(ids))[None]
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids]), loops=loops, initial_state=engine.initial_state(positions)).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def check_top(top: list[tuple[int, float]], reference: torch.Tensor, count: int) -> None:
    """``top`` (id, logprob) pairs are the ``count`` most likely ids of ``reference`` [V], most likely first."""
    assert len(top) == count
    values = [value for _, value in top]
    assert values == sorted(values, reverse=True)
    expected = reference.topk(count)
    assert [token for token, _ in top] == expected.indices.tolist()
    assert values == pytest.approx(expected.values.tolist(), abs=TOLERANCE)


@pytest.mark.parametrize(("loops", "temperature"), [(1, 0.0), (5, 0.8)])
def test_completion_logprobs_are_the_full_forwards(
    client: openai.OpenAI, engine: Engine, ids_of: dict[str, int], loops: int, temperature: float
) -> None:
    """Sampled at temperature 0.8 too: the reported values are the model's distribution, before the temperature."""
    result = client.completions.create(
        model=MODEL,
        prompt="loop state",
        max_tokens=10,
        temperature=temperature,
        seed=3,
        logprobs=3,
        extra_body={"loops": loops},
    )
    logprobs = result.choices[0].logprobs
    generated = [ids_of[text] for text in logprobs.tokens]
    assert len(generated) == result.usage.completion_tokens >= 1
    prompt = encode_prompt(engine.tokenizer, "loop state")
    reference = full_forward(engine, prompt + generated, loops)
    for j, token in enumerate(generated):
        row = reference[len(prompt) - 1 + j]
        assert logprobs.token_logprobs[j] == pytest.approx(float(row[token]), abs=TOLERANCE)
        top = [(ids_of[text], value) for text, value in logprobs.top_logprobs[j].items()]
        check_top(top[:3], row, 3)
        chosen = (token, logprobs.token_logprobs[j])
        assert chosen in top and (len(top) == 3 or top[3] == chosen)  # the chosen token is added when not in the top
        if temperature == 0:
            assert top[0][0] == token
    text, offsets = result.choices[0].text, logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for offset, token_text in zip(offsets, logprobs.tokens, strict=True):
        if not token_text.startswith("bytes:"):
            assert text[offset : offset + len(token_text)] == token_text


@pytest.mark.parametrize("loops", [2, 6])
def test_echo_scores_the_prompt_like_the_full_forward(client: openai.OpenAI, engine: Engine, loops: int) -> None:
    """What lm-eval's local-completions sends for loglikelihood: the prompt's logprobs, the first one null."""
    ids = engine.tokenizer.encode("the loop state é")
    result = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0, extra_body={"loops": loops}
    )
    choice = result.choices[0]
    assert choice.text == "the loop state é" and choice.finish_reason == "length"
    assert result.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = full_forward(engine, ids, loops)
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=TOLERANCE)
    assert logprobs.text_offset == [*range(len(ids) - 1), len(ids) - 2]  # é is two byte tokens of one character


def test_echo_of_a_text_prompt_with_a_generated_token(client: openai.OpenAI, engine: Engine) -> None:
    """A text prompt starts with the server's <|bos|>, which the text does not show; the generated token follows."""
    result = client.completions.create(model=MODEL, prompt="loop", max_tokens=1, echo=True, logprobs=2, temperature=0)
    choice = result.choices[0]
    plain = client.completions.create(model=MODEL, prompt="loop", max_tokens=1, logprobs=2, temperature=0)
    assert choice.text == "loop" + plain.choices[0].text
    logprobs = choice.logprobs
    assert logprobs.tokens == ["<|bos|>", "l", "o", "o", "p", *plain.choices[0].logprobs.tokens]
    assert logprobs.text_offset == [0, 0, 1, 2, 3, 4]
    assert logprobs.token_logprobs[-1] == pytest.approx(plain.choices[0].logprobs.token_logprobs[0], abs=TOLERANCE)
    prompt = encode_prompt(engine.tokenizer, "loop")
    reference = full_forward(engine, prompt, 3)
    expected = [float(reference[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert logprobs.token_logprobs[1:-1] == pytest.approx(expected, abs=TOLERANCE)


def test_chat_logprobs_are_the_full_forwards(client: openai.OpenAI, engine: Engine, ids_of: dict[str, int]) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=4
    )
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens >= 1
    ids = [ids_of[entry.token] for entry in content]
    prompt = encode_chat(engine.tokenizer, [Message(m["role"], m["content"]) for m in CHAT])
    reference = full_forward(engine, prompt + ids, 3)
    for j, (entry, token) in enumerate(zip(content, ids, strict=True)):
        row = reference[len(prompt) - 1 + j]
        assert entry.logprob == pytest.approx(float(row[token]), abs=TOLERANCE)
        top = [(ids_of[alternative.token], alternative.logprob) for alternative in entry.top_logprobs]
        check_top(top, row, 4)
        assert top[0][0] == token  # greedy: the chosen token is the most likely one
        for shown, token_id in [(entry, token), *zip(entry.top_logprobs, [t for t, _ in top], strict=True)]:
            special = token_id < BYTE_OFFSET
            expected = engine.tokenizer.decode([token_id]).encode() if special else bytes([token_id - BYTE_OFFSET])
            assert shown.bytes == list(expected)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("chat", [False, True])
def test_stream_chunks_carry_the_logprobs_of_their_tokens(server: LiveServer, chat: bool) -> None:
    if chat:
        path, body = "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 2}
    else:
        path, body = "/v1/completions", {"prompt": "loop state", "logprobs": 2, "echo": True}
    body = {**body, "model": MODEL, "max_tokens": 12, "temperature": 0, "loops": 4}
    whole = httpx.post(f"{server.url}{path}", json=body, timeout=30).json()["choices"][0]["logprobs"]
    chunks = [event["choices"][0] for event in events(httpx.post(f"{server.url}{path}", json={**body, "stream": True}))]
    carried = [chunk["logprobs"] for chunk in chunks if chunk["logprobs"] is not None]
    assert len(carried) > 3
    if chat:
        assert [entry for part in carried for entry in part["content"]] == whole["content"]
    else:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [value for part in carried for value in part[key]] == whole[key]


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "goes with echo"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": 3}, "logprobs"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs goes with logprobs: true"),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_logprob_requests_are_400s(server: LiveServer, path: str, body: dict, needle: str) -> None:
    response = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=10)
    assert response.status_code == 400
    assert needle in response.json()["error"]["message"]


def test_text_offsets_place_each_token_at_the_character_of_its_first_byte(engine: Engine) -> None:
    """A byte that cuts off an incomplete character belongs after that character's replacement."""
    offsets = TextOffsets(TokenText(engine.tokenizer))
    pieces = [b"\xd4", b"P", b"\xc3", b"\xa9", b"x"]  # text: "\ufffdPéx"
    assert [offsets.push(BYTE_OFFSET + piece[0]) for piece in pieces] == [0, 1, 2, 2, 3]
    assert offsets.push(engine.tokenizer.bos_id, shown=False) == 4 == offsets.length
