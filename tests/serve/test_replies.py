"""``<think>`` and ``<tool_call>`` in replies, end to end: a scripted model emits chosen tokens, the server splits them.

See :mod:`serve.scripted` for how the model's greedy output is arranged. The reply of each conversation is fixed by
its prompt length, so the conversations below differ in length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from loopformer.inference.chat import encode_chat
from loopformer.inference.engine import Engine
from loopformer.serve.prompts import chat_messages
from loopformer.serve.schemas import ChatMessage, Tool
from loopformer.tokenizer import TextTokenizer
from serve.live import MODEL, LiveServer, live_server
from serve.scripted import scripted_model

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}]
CALL = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
REPLIES = {
    "think": "<think>plan: greet</think>Hello!<|end|>",
    "call": f"Checking.<tool_call>{CALL}</tool_call><|end|>",
    "broken": '<tool_call>{"name": "get_weather", "arguments": </tool_call><|end|>',
    "unknown": '<tool_call>{"name": "launch", "arguments": {}}</tool_call><|end|>',
}
QUESTIONS = {"think": "hi", "call": "weather in Oslo?", "broken": "w" * 100, "unknown": "r" * 180}
WITH_TOOLS = {"call", "broken", "unknown"}


def conversation(case: str) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[case]}]


def prompt_length(tokenizer: TextTokenizer, case: str) -> int:
    messages = [ChatMessage(**m) for m in conversation(case)]
    tools = [Tool(**tool) for tool in TOOLS] if case in WITH_TOOLS else None
    return len(encode_chat(tokenizer, chat_messages(messages, tools)))


@pytest.fixture(scope="module")
def scripted(tokenizer: TextTokenizer) -> Iterator[LiveServer]:
    replies = {prompt_length(tokenizer, case): reply for case, reply in REPLIES.items()}
    with live_server(Engine(scripted_model(tokenizer, replies), tokenizer)) as live:
        yield live


def ask(client: openai.OpenAI, case: str, **extra: object) -> object:
    tools = TOOLS if case in WITH_TOOLS else openai.NOT_GIVEN
    return client.chat.completions.create(
        model=MODEL, messages=conversation(case), tools=tools, max_tokens=80, temperature=0, **extra
    )


def test_think_is_returned_as_reasoning_content(scripted: LiveServer) -> None:
    result = ask(scripted.client(), "think")
    message = result.choices[0].message
    assert message.content == "Hello!"
    assert message.reasoning_content == "plan: greet"
    assert result.choices[0].finish_reason == "stop"


def test_streamed_reasoning_and_content_reassemble(scripted: LiveServer) -> None:
    chunks = list(ask(scripted.client(), "think", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "plan: greet"
    assert "".join(d.content or "" for d in deltas) == "Hello!"


def test_a_valid_tool_call_becomes_tool_calls(scripted: LiveServer) -> None:
    result = ask(scripted.client(), "call")
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}


def test_a_streamed_tool_call_arrives_whole(scripted: LiveServer) -> None:
    chunks = list(ask(scripted.client(), "call", stream=True))
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [(call.index, call.function.name, json.loads(call.function.arguments)) for call in calls] == [
        (0, "get_weather", {"city": "Oslo"})
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("case", ["broken", "unknown"])
def test_a_malformed_tool_call_is_returned_as_text(scripted: LiveServer, case: str) -> None:
    result = ask(scripted.client(), case)
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert choice.message.content == REPLIES[case].removesuffix("<|end|>")


def test_without_tools_a_tool_call_is_text(tokenizer: TextTokenizer) -> None:
    # the same conversation as "call" without declared tools is shorter: rebuild the model for that length
    replies = {prompt_length(tokenizer, "think"): REPLIES["call"]}
    with live_server(Engine(scripted_model(tokenizer, replies), tokenizer)) as live:
        result = ask(live.client(), "think")
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].message.content == REPLIES["call"].removesuffix("<|end|>")


def test_a_model_without_memory_pathway_refuses_memory(scripted: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError, match="no memory pathway"):
        ask(scripted.client(), "think", extra_body={"memory": [[0.0] * 4]})
