"""OpenAI response bodies and stream chunks, built from the scheduler's events of a request's choices.

Both forms come from the same pieces (:class:`~loopformer.serve.parsing.Piece`): a chat choice's text goes through
a :class:`~loopformer.serve.parsing.ReplyParser` once, and the non-streaming body is the merge of exactly the
pieces a stream would have sent. ``usage`` carries ``mean_loops_per_token``: the core iterations behind the
generated tokens divided by their number. Log-probabilities (:mod:`loopformer.serve.logprobs`) travel with the first
chunk sent after their token, so a stream carries each token's exactly once and in order.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from loopformer.serve.logprobs import TextOffsets, TokenLogprob, TokenText, chat_logprobs, completion_logprobs
from loopformer.serve.parsing import Piece, ReplyParser
from loopformer.serve.plans import Echo, Plan
from loopformer.serve.scheduler import Event, Finished, Prompt, TextDelta


class Choice:
    """One choice's pieces so far, its finish reason, its token and loop counts, and its log-probabilities (with
    their text offsets when ``offsets`` is given: completions)."""

    def __init__(
        self, parser: ReplyParser | None, echo: Echo | None = None, offsets: TextOffsets | None = None
    ) -> None:
        self.parser, self.echo, self.offsets = parser, echo, offsets
        self.pieces: list[Piece] = []
        self.finish_reason: str | None = None
        self.tokens = 0
        self.loops = 0
        self.calls = 0  # tool calls streamed so far
        self.logprobs: list[TokenLogprob] = []
        self.text_offsets: list[int] = []
        self.sent = 0  # log-probabilities already in stream chunks

    def _log(self, entries: tuple[TokenLogprob, ...], hidden: int = 0) -> None:
        self.logprobs += entries
        if self.offsets is not None:
            self.text_offsets += [self.offsets.push(e.token, i >= hidden) for i, e in enumerate(entries)]

    def add(self, event: Event) -> list[Piece]:
        """The pieces ``event`` settles (a :class:`Finished` event flushes what was held back)."""
        if isinstance(event, Prompt):
            pieces = [Piece("content", self.echo.text)] if self.echo is not None and self.echo.text else []
            self._log(event.logprobs, self.echo.added if self.echo is not None else 0)
        elif isinstance(event, TextDelta):
            if event.logprob is not None:
                self._log((event.logprob,))
            if self.parser is not None:
                pieces = self.parser.push(event.text)
            else:
                pieces = [Piece("content", event.text)] if event.text else []
        elif isinstance(event, Finished):
            pieces = self.parser.finish() if self.parser is not None else []
            has_call = any(piece.kind == "tool_call" for piece in [*self.pieces, *pieces])
            self.finish_reason = "tool_calls" if has_call else event.reason
            self.tokens, self.loops = event.tokens, event.loops
        else:
            pieces = []
        self.pieces += pieces
        return pieces

    def text(self, kind: str) -> str:
        return "".join(piece.text for piece in self.pieces if piece.kind == kind)


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def tool_call(piece: Piece, index: int | None = None) -> dict[str, Any]:
    """An OpenAI tool call object (with ``index`` in stream chunks)."""
    call = {
        "id": _id("call"),
        "type": "function",
        "function": {"name": piece.call.name, "arguments": piece.call.arguments},
    }
    return call if index is None else {"index": index, **call}


class Output:
    """The response of one request (its :class:`Plan`); subclasses name the object types and fields.

    Completions leave the text as it is; chat splits out reasoning and calls to the plan's tools. ``texts`` shows
    the tokens of log-probabilities.
    """

    object_name = ""
    chunk_name = ""
    prefix = ""

    def __init__(self, model: str, plan: Plan, texts: TokenText) -> None:
        self.model, self.prompt_tokens = model, plan.prompt_tokens
        self.texts = texts if plan.logprobs is not None else None
        self.id, self.created = _id(self.prefix), int(time.time())
        self.choices = [self._choice(plan, index) for index in range(len(plan.rows))]

    def _choice(self, plan: Plan, index: int) -> Choice:
        raise NotImplementedError

    def usage(self) -> dict[str, Any]:
        tokens = sum(choice.tokens for choice in self.choices)
        loops = sum(choice.loops for choice in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": self.prompt_tokens + tokens,
            "mean_loops_per_token": loops / tokens if tokens else 0.0,
        }

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def chunks(self, index: int, event: Event) -> list[dict[str, Any]]:
        """The stream chunks for ``event`` of choice ``index``; the first carries the log-probabilities not sent yet."""
        choice = self.choices[index]
        chunks = [self._chunk(index, self._delta(choice, piece), None) for piece in choice.add(event)]
        if choice.finish_reason is not None and isinstance(event, Finished):
            chunks.append(self._chunk(index, self._end_delta(), choice.finish_reason))
        if chunks and choice.sent < len(choice.logprobs):
            chunks[0]["choices"][0]["logprobs"] = self._logprobs(choice, choice.sent)
            choice.sent = len(choice.logprobs)
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope(self.chunk_name, []), "usage": self.usage()}

    def body(self) -> dict[str, Any]:
        """The non-streaming response (after every choice finished)."""
        choices = [self._final(index, choice) for index, choice in enumerate(self.choices)]
        return {**self._envelope(self.object_name, choices), "usage": self.usage()}

    def _chunk(self, index: int, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _delta(self, choice: Choice, piece: Piece) -> Any:
        raise NotImplementedError

    def _end_delta(self) -> Any:
        raise NotImplementedError

    def _final(self, index: int, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def _logprobs(self, choice: Choice, start: int = 0) -> dict[str, Any] | None:
        """The ``logprobs`` of ``choice`` from entry ``start`` on (None when the request asked for none)."""
        raise NotImplementedError


class CompletionOutput(Output):
    object_name = chunk_name = "text_completion"
    prefix = "cmpl"

    def _choice(self, plan: Plan, index: int) -> Choice:
        echo = None if plan.echo is None else plan.echo[index]
        return Choice(None, echo, None if self.texts is None else TextOffsets(self.texts))

    def _chunk(self, index: int, delta: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_name, [choice])

    def _delta(self, choice: Choice, piece: Piece) -> str:
        return piece.text

    def _end_delta(self) -> str:
        return ""

    def _final(self, index: int, choice: Choice) -> dict[str, Any]:
        text = choice.text("content")
        return {"index": index, "text": text, "logprobs": self._logprobs(choice), "finish_reason": choice.finish_reason}

    def _logprobs(self, choice: Choice, start: int = 0) -> dict[str, Any] | None:
        if self.texts is None:
            return None
        return completion_logprobs(choice.logprobs[start:], choice.text_offsets[start:], self.texts)


class ChatOutput(Output):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    prefix = "chatcmpl"

    def _choice(self, plan: Plan, index: int) -> Choice:
        return Choice(ReplyParser(plan.tools))

    def opening_chunks(self) -> list[dict[str, Any]]:
        """The first chunk of each choice: the assistant role."""
        return [self._chunk(index, {"role": "assistant", "content": ""}, None) for index in range(len(self.choices))]

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(self.chunk_name, [choice])

    def _delta(self, choice: Choice, piece: Piece) -> dict[str, Any]:
        if piece.kind == "tool_call":
            choice.calls += 1
            return {"tool_calls": [tool_call(piece, choice.calls - 1)]}
        return {"reasoning_content" if piece.kind == "reasoning" else "content": piece.text}

    def _end_delta(self) -> dict[str, Any]:
        return {}

    def _final(self, index: int, choice: Choice) -> dict[str, Any]:
        calls = [tool_call(piece) for piece in choice.pieces if piece.kind == "tool_call"]
        content = choice.text("content")
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        reasoning = choice.text("reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        logprobs = self._logprobs(choice)
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    def _logprobs(self, choice: Choice, start: int = 0) -> dict[str, Any] | None:
        return None if self.texts is None else chat_logprobs(choice.logprobs[start:], self.texts)
