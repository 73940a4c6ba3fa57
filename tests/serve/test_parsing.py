"""Splitting replies into content, reasoning and tool calls; rendering chat messages and tools into prompts."""

from __future__ import annotations

import json
import random

import pytest

from loopformer.inference.chat import Message
from loopformer.serve.errors import APIError
from loopformer.serve.parsing import Piece, ReplyParser, ToolCall, parse_tool_call
from loopformer.serve.prompts import TOOLS_PREAMBLE, chat_messages
from loopformer.serve.schemas import ChatMessage, Tool

TOOLS = frozenset({"add"})
REPLIES = [
    "plain text with < and <th and </ signs",
    "<think>step one</think>The answer is 4.",
    'Let me add.<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call>',
    '<think>hmm</think><tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>done',
    '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
    "<tool_call>not json</tool_call><think>unclosed",
    '<tool_call>{"name": "add"',
]


def merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent text pieces of one kind joined (how a client reassembles a stream)."""
    out: list[Piece] = []
    for piece in pieces:
        if out and piece.kind == out[-1].kind and piece.kind != "tool_call":
            out[-1] = Piece(piece.kind, out[-1].text + piece.text)
        else:
            out.append(piece)
    return out


def parse(parts: list[str], tools: frozenset[str] = TOOLS) -> list[Piece]:
    parser = ReplyParser(tools)
    pieces = [piece for part in parts for piece in parser.push(part)]
    return merged(pieces + parser.finish())


@pytest.mark.parametrize("reply", REPLIES)
def test_pieces_do_not_depend_on_how_the_text_is_split(reply: str) -> None:
    whole = parse([reply])
    assert parse(list(reply)) == whole
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(reply)), min(4, len(reply) - 1)))
        assert parse([reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]) == whole


def test_reasoning_content_and_calls_are_separated() -> None:
    assert parse([REPLIES[1]]) == [Piece("reasoning", "step one"), Piece("content", "The answer is 4.")]
    call = ToolCall("add", json.dumps({"a": 2, "b": 2}))
    assert parse([REPLIES[2]]) == [Piece("content", "Let me add."), Piece("tool_call", call=call)]
    assert parse([REPLIES[3]]) == [
        Piece("reasoning", "hmm"),
        Piece("tool_call", call=ToolCall("add", '{"a": 1}')),
        Piece("content", "done"),
    ]


def test_malformed_or_unclosed_calls_stay_text() -> None:
    assert parse([REPLIES[4]]) == [Piece("content", REPLIES[4])]
    assert parse([REPLIES[5]]) == [Piece("content", "<tool_call>not json</tool_call>"), Piece("reasoning", "unclosed")]
    assert parse([REPLIES[6]]) == [Piece("content", REPLIES[6])]
    assert parse([REPLIES[2]], tools=frozenset()) == [Piece("content", REPLIES[2])]  # no tools declared


def test_parse_tool_call_needs_a_declared_name_and_object_arguments() -> None:
    assert parse_tool_call('{"name": "add", "arguments": {"a": 1}}', TOOLS) == ToolCall("add", '{"a": 1}')
    assert parse_tool_call('{"name": "add"}', TOOLS) == ToolCall("add", "{}")
    assert parse_tool_call('{"name": "sub", "arguments": {}}', TOOLS) is None
    assert parse_tool_call('{"name": "add", "arguments": "[1]"}', TOOLS) is None
    assert parse_tool_call("[1, 2]", TOOLS) is None


def chat(*messages: dict) -> list[ChatMessage]:
    return [ChatMessage(**m) for m in messages]


def test_chat_messages_map_roles_tool_calls_and_results() -> None:
    messages = chat(
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "4"},
    )
    assert chat_messages(messages) == [
        Message("system", "be terse"),
        Message("user", "2+2?"),
        Message("assistant", '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'),
        Message("user", "<tool_response>4</tool_response>"),
    ]


def test_tools_are_declared_in_the_system_message() -> None:
    tools = [Tool(type="function", function={"name": "add", "description": "sum", "parameters": {"type": "object"}})]
    with_system = chat_messages(chat({"role": "system", "content": "hi"}, {"role": "user", "content": "x"}), tools)
    assert with_system[0].role == "system" and with_system[0].content.startswith("hi\n\n" + TOOLS_PREAMBLE)
    declared = with_system[0].content.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(declared)["function"]["name"] == "add"
    without = chat_messages(chat({"role": "user", "content": "x"}), tools)
    assert [m.role for m in without] == ["system", "user"]


def test_non_text_parts_are_refused() -> None:
    with pytest.raises(APIError, match="text only"):
        chat_messages(chat({"role": "user", "content": [{"type": "image_url"}]}))
