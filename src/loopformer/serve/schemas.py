"""Request bodies of the OpenAI endpoints, with the loopformer extensions (depth, KV policy, memory).

Fields the OpenAI client may send but this server cannot honour (``suffix``, ``best_of``, presence penalties, ...)
are refused with a 400 when they ask for something, rather than silently ignored. The top level of a request is
strict: an unknown field (``loop``, ``response_format``) is a 400 naming it, and a value of the wrong type is not
coerced (``"stream": "yes"``, ``"loops": true``). Nested parts (messages, tools) ignore fields they do not use, since
clients send back what an earlier response held.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOP_LOGPROBS = 20  # alternatives per token: completions' ``logprobs``, chat's ``top_logprobs`` (as OpenAI's chat)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What the completion and chat endpoints share: sampling, stopping, depth, memory."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # depth and cache (loopformer extensions; reasoning_effort is also an OpenAI field)
    loops: int | None = Field(default=None, ge=1)
    reasoning_effort: str | None = None
    exit: str | None = None
    kv: str | None = None
    # memory pathway: vectors [M, memory_dim], or the name of a file in the server's --memory-dir
    memory: list[list[float]] | str | None = None
    # OpenAI fields refused when they ask for something
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an OpenAI field for the caller's own bookkeeping; accepted and not used

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def refused(self) -> str | None:
        """The name of a set field this server does not support, if any."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: one prompt or a list of prompts (text or token ids); ``logprobs`` is the number of
    alternatives per token (None: no log-probabilities); ``max_tokens`` 0 (with ``echo``) only scores the prompt."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refused(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().refused()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str = "{}"


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, sent back in the conversation."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def refused(self) -> str | None:
        if self.tool_choice is not None and self.tool_choice not in ("auto", "none"):
            return "tool_choice"
        return super().refused()


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: the ids of a ``prompt`` (``add_special_tokens``: with the ``<|bos|>`` that
    ``/v1/completions`` puts first) or of a conversation (``add_generation_prompt``: with the opening of the reply, as
    ``/v1/chat/completions`` feeds it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: the text of token ids."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]
