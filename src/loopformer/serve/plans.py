"""From a validated request body to what the scheduler runs: prompt ids and a :class:`GenerationConfig` per row.

Every check that can fail on user input happens here, before anything is queued, and fails with a 400 that names
the field: the model name, the depth (``loops`` or ``reasoning_effort``, an ``exit`` rule, a ``kv`` policy), the
sampling settings, ``max_tokens`` against the server's ceiling and the model's context, log-probabilities and
``echo``, and the memory vectors.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from loopformer.errors import LoopformerError
from loopformer.inference.cache import parse_slot_policy
from loopformer.inference.chat import encode_chat, encode_prompt, reply_stop_tokens
from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.exits import ExitRule, check_halting, parse_exit_rule
from loopformer.inference.memory_file import load_memory_file
from loopformer.inference.sampling import SamplingConfig
from loopformer.nn.memory import NO_PATHWAY
from loopformer.serve.errors import APIError
from loopformer.serve.prompts import chat_messages
from loopformer.serve.schemas import ChatRequest, CompletionRequest, GenerationRequest
from loopformer.serve.settings import ServerSettings

OPENAI_DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Row:
    """One choice to generate: its prompt ids and settings."""

    prompt: list[int]
    config: GenerationConfig


@dataclass(frozen=True)
class Echo:
    """A completion row's prompt as ``echo`` returns it: its text, and how many of its first tokens the server added
    and the text does not show (the ``<|bos|>`` before a text prompt)."""

    text: str
    added: int


@dataclass(frozen=True)
class Plan:
    """A request's rows (choice ``i`` is ``rows[i]``), its memory vectors [M, memory_dim], the prompt token count
    for ``usage``, the tools whose calls are parsed out of chat replies, the alternatives per token of its
    log-probabilities (None: none), each row's :class:`Echo` (None: no echo), and whether it generates at all
    (``max_tokens`` 0 only scores the prompt)."""

    rows: list[Row]
    memory: torch.Tensor | None
    prompt_tokens: int
    tools: frozenset[str] = frozenset()
    logprobs: int | None = None
    echo: tuple[Echo, ...] | None = None
    generate: bool = True


@contextmanager
def field_errors(param: str) -> Iterator[None]:
    """Turn a library :class:`LoopformerError` into a 400 that names ``param``."""
    try:
        yield
    except LoopformerError as exc:
        raise APIError(400, str(exc), param=param) from None


def check_model(name: str, settings: ServerSettings) -> None:
    if name != settings.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {settings.model_name!r}.",
            param="model",
            code="model_not_found",
        )


def depth(request: GenerationRequest, engine: Engine, settings: ServerSettings) -> tuple[int | None, ExitRule | None]:
    """The requested loop count (None: the model's default) and exit rule."""
    if request.loops is not None and request.reasoning_effort is not None:
        raise APIError(400, "give loops or reasoning_effort, not both.", param="loops")
    loops = request.loops
    if request.reasoning_effort is not None:
        if request.reasoning_effort not in settings.effort:
            known = ", ".join(f"{name} ({count} loops)" for name, count in settings.effort.items())
            raise APIError(
                400,
                f"unknown reasoning_effort {request.reasoning_effort!r}; this server has {known}.",
                param="reasoning_effort",
            )
        loops = settings.effort[request.reasoning_effort]
    rule = None
    if request.exit is not None:
        with field_errors("exit"):
            rule = parse_exit_rule(request.exit)
            check_halting(rule, engine.model.halting)
    resolved = loops if loops is not None else engine.model.config.recurrence.mean_loops
    if resolved > settings.max_loops:
        raise APIError(
            400,
            f"loops must be at most {settings.max_loops} on this server (its --max-loops), got {resolved}.",
            param="loops",
        )
    return loops, rule


def sampling(request: GenerationRequest, seed: int | None) -> SamplingConfig:
    temperature = OPENAI_DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    with field_errors("temperature"):
        return SamplingConfig(
            temperature=temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=request.min_p,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            seed=seed,
        )


def new_tokens(asked: int | None, prompt_length: int, engine: Engine, settings: ServerSettings) -> int:
    """``max_tokens`` checked against the server's ceiling and the room left in the model's context."""
    context = engine.model.config.max_seq_len
    room = context - prompt_length
    if asked is not None and asked > settings.max_tokens:
        raise APIError(
            400, f"max_tokens is {asked}; this server allows at most {settings.max_tokens}.", param="max_tokens"
        )
    if room < (1 if asked is None else asked):
        raise APIError(
            400,
            f"this model's context is {context} tokens; the prompt has {prompt_length} and max_tokens asks for "
            f"{asked if asked is not None else 'at least 1'} more.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return asked if asked is not None else min(settings.max_tokens, room)


def memory_vectors(request: GenerationRequest, engine: Engine, settings: ServerSettings) -> torch.Tensor | None:
    """The request's memory vectors [M, memory_dim] (inline, or a named file in the memory directory)."""
    if request.memory is None:
        return None
    memory_dim = engine.model.config.memory_dim
    if memory_dim == 0:
        raise APIError(400, NO_PATHWAY, param="memory")
    if isinstance(request.memory, str):
        name = request.memory
        if settings.memory_dir is None:
            raise APIError(400, "this server has no memory directory (--memory-dir); send the vectors.", param="memory")
        path = settings.memory_dir / name
        if not name or "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
            raise APIError(400, f"there is no memory file {name!r} on this server.", param="memory")
        with field_errors("memory"):
            vectors = load_memory_file(path)
        if vectors.dim() == 3:
            if vectors.shape[0] != 1:
                raise APIError(
                    400, f"memory file {name!r} holds vectors for {vectors.shape[0]} prompts.", param="memory"
                )
            vectors = vectors[0]
    else:
        if not request.memory:
            raise APIError(400, "memory must hold at least one vector.", param="memory")
        widths = {len(vector) for vector in request.memory}
        if widths != {memory_dim}:
            raise APIError(400, f"every memory vector must have {memory_dim} numbers.", param="memory")
        vectors = torch.tensor(request.memory, dtype=torch.float32)
    if vectors.shape[0] > settings.max_memory_vectors:
        raise APIError(
            400,
            f"memory holds {vectors.shape[0]} vectors; this server takes at most {settings.max_memory_vectors}.",
            param="memory",
        )
    if vectors.shape[-1] != memory_dim or not bool(torch.isfinite(vectors).all()):
        raise APIError(400, f"memory must be finite vectors of width {memory_dim}.", param="memory")
    return vectors


def _rows(
    request: GenerationRequest,
    prompts: list[list[int]],
    asked: int | None,
    stop_tokens: tuple[int, ...] | None,
    engine: Engine,
    settings: ServerSettings,
) -> list[Row]:
    refused = request.refused()
    if refused is not None:
        raise APIError(400, f"this server does not support {refused}.", param=refused)
    allowed = min(settings.max_choices, settings.max_queue)
    if len(prompts) * request.n > allowed:
        raise APIError(
            400, f"this request asks for {len(prompts) * request.n} choices; the server allows {allowed}.", param="n"
        )
    loops, rule = depth(request, engine, settings)
    with field_errors("kv"):
        kv = parse_slot_policy(request.kv or "full")
    if kv.kind == "ring" and kv.size > settings.max_loops:
        raise APIError(
            400,
            f"kv ring:{kv.size} is larger than this server's --max-loops {settings.max_loops}; a ring of at least "
            "the loop count is the full cache, so ask for full.",
            param="kv",
        )
    base_seed = request.seed if request.seed is not None else secrets.randbits(62)
    rows = []
    for prompt in prompts:
        limit = new_tokens(asked, len(prompt), engine, settings)
        for _ in range(request.n):
            config = GenerationConfig(
                max_new_tokens=max(limit, 1),  # a row of max_tokens 0 is prefilled and never decoded
                loops=loops,
                exit=rule,
                kv=kv,
                sampling=sampling(request, (base_seed + len(rows)) % 2**63),
                stop_tokens=stop_tokens,
                stop_strings=tuple(request.stop or ()),
                force=True,  # the server's own --max-loops bounds the depth
            )
            rows.append(Row(prompt, config))
    return rows


def completion_plan(request: CompletionRequest, engine: Engine, settings: ServerSettings) -> Plan:
    """Rows of ``/v1/completions``: each prompt (text after ``<|bos|>``, or token ids as given) ``n`` times."""
    check_model(request.model, settings)
    tokenizer = engine.tokenizer
    raw = request.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    prompts = []
    vocab = engine.model.config.vocab_size
    for item in raw:
        if isinstance(item, str):
            with field_errors("prompt"):
                prompts.append(encode_prompt(tokenizer, item))
        elif not item or any(not 0 <= token < vocab for token in item):
            raise APIError(400, f"token-id prompts must be non-empty lists of ids in 0..{vocab - 1}.", param="prompt")
        else:
            prompts.append(list(item))
    if not prompts:
        raise APIError(400, "give at least one prompt.", param="prompt")
    if request.max_tokens == 0 and not request.echo:
        raise APIError(
            400, "max_tokens 0 generates nothing; it goes with echo: true (to score the prompt).", param="max_tokens"
        )
    rows = _rows(request, prompts, request.max_tokens, None, engine, settings)
    echo = None
    if request.echo:  # a text prompt as sent, after the <|bos|> the server added; token ids decoded
        with field_errors("prompt"):
            echoes = [Echo(item, 1) if isinstance(item, str) else Echo(tokenizer.decode(item), 0) for item in raw]
        echo = tuple(echo for echo in echoes for _ in range(request.n))
    return Plan(
        rows,
        memory_vectors(request, engine, settings),
        sum(len(p) for p in prompts),
        logprobs=request.logprobs,
        echo=echo,
        generate=request.max_tokens != 0,
    )


def chat_plan(request: ChatRequest, engine: Engine, settings: ServerSettings) -> Plan:
    """Rows of ``/v1/chat/completions``: the rendered conversation ``n`` times, stopping at the end of the turn."""
    check_model(request.model, settings)
    tokenizer = engine.tokenizer
    with field_errors("messages"):
        prompt = encode_chat(tokenizer, chat_messages(request.messages, request.tools))
    asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs goes with logprobs: true.", param="top_logprobs")
    rows = _rows(request, [prompt], asked, reply_stop_tokens(tokenizer), engine, settings)
    parse_tools = request.tools and request.tool_choice != "none"
    tools = frozenset(tool.function.name for tool in request.tools) if parse_tools else frozenset()
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return Plan(rows, memory_vectors(request, engine, settings), len(prompt), tools, logprobs)
