"""Splitting a reply as it streams: ``<think>...</think>`` is reasoning, ``<tool_call>{json}</tool_call>`` a tool call.

:class:`ReplyParser` takes text deltas (the detokenised stream, where the tags are the tokenizer's special tokens
written out) and returns :class:`Piece` s: content, reasoning, or a parsed tool call. A tag may arrive split over
deltas, so a tail that could be the start of a tag is held back until it is settled. A tool call is buffered until
its closing tag; one whose body is not a JSON object ``{"name": NAME, "arguments": {...}}`` naming a declared tool
is given back as content, tags included, never dropped. Feeding the same text in any split gives the same pieces
once merged, so a streamed reply reassembles to the non-streamed one.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for; ``arguments`` is JSON text, as in the OpenAI API."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Piece:
    """One settled part of a reply: ``kind`` is "content", "reasoning" or "tool_call" (then ``call`` is set)."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


def parse_tool_call(body: str, tools: Collection[str]) -> ToolCall | None:
    """The call in a ``<tool_call>`` body, or None when it is not valid JSON naming one of ``tools``."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in tools:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_tag(text: str, tags: Collection[str]) -> int:
    """The length of the longest tail of ``text`` that is a proper prefix of one of ``tags``."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:size]):
                longest = size
                break
    return longest


class ReplyParser:
    """Incremental split of a reply into content, reasoning and tool calls (see the module docstring).

    ``tools``: the names of the declared tools; without any, ``<tool_call>`` is plain content.
    """

    def __init__(self, tools: Collection[str] = ()) -> None:
        self.tools = frozenset(tools)
        self._mode = "content"  # "content", "reasoning" or "tool_call"
        self._buffer = ""

    def push(self, text: str) -> list[Piece]:
        """Add a delta; return the pieces that are settled now."""
        self._buffer += text
        pieces: list[Piece] = []
        while self._step(pieces):
            pass
        return pieces

    def finish(self) -> list[Piece]:
        """The reply ended: release what was held back (an unclosed tool call becomes content)."""
        rest, self._buffer = self._buffer, ""
        if not rest:
            return []
        if self._mode == "tool_call":
            return [Piece("content", TOOL_OPEN + rest)]
        return [Piece(self._mode, rest)]

    def _openings(self) -> tuple[str, ...]:
        return (THINK_OPEN, TOOL_OPEN) if self.tools else (THINK_OPEN,)

    def _step(self, pieces: list[Piece]) -> bool:
        """Consume the buffer up to the next tag; True when a tag was consumed (call again)."""
        buffer = self._buffer
        if self._mode == "tool_call":
            end = buffer.find(TOOL_CLOSE)
            if end < 0:
                return False
            body, self._buffer, self._mode = buffer[:end], buffer[end + len(TOOL_CLOSE) :], "content"
            call = parse_tool_call(body, self.tools)
            pieces.append(Piece("tool_call", call=call) if call else Piece("content", TOOL_OPEN + body + TOOL_CLOSE))
            return True
        tags = (THINK_CLOSE,) if self._mode == "reasoning" else self._openings()
        found = [(buffer.find(tag), tag) for tag in tags if tag in buffer]
        if found:
            start, tag = min(found)
            self._emit(pieces, buffer[:start])
            self._buffer = buffer[start + len(tag) :]
            self._mode = {THINK_OPEN: "reasoning", TOOL_OPEN: "tool_call", THINK_CLOSE: "content"}[tag]
            return True
        keep = _partial_tag(buffer, tags)
        self._emit(pieces, buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep :]
        return False

    def _emit(self, pieces: list[Piece], text: str) -> None:
        if text:
            pieces.append(Piece(self._mode, text))
