"""Hostile request bodies against the OpenAI-compatible app, in process (``TestClient``, the scheduler running).

Two searches: bodies built by hand from the fields the endpoints know (values of each field's kind, edge cases and
junk), and schemathesis cases generated from the app's own OpenAPI schema (valid and invalid ones). The property:
no status >= 500, a 4xx carries the server's JSON error body, a 200 is a complete answer (a stream ends with
``[DONE]`` and holds no server error), and nothing is logged as a server fault. Runs are reproducible
(``derandomize=True``, no example database); the ``_thorough`` variants search longer and are marked slow.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import save_file

from loopformer.inference.engine import Engine
from loopformer.inference.session import Session
from loopformer.serve.app import create_app
from serve.live import MEMORY_DIM, MODEL
from serve.live import settings as server_settings
from support import profile

try:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
except ImportError:  # schemathesis 4.32 needs Python 3.11; the dev extra installs it only there
    schemathesis = None
needs_schemathesis = pytest.mark.skipif(schemathesis is None, reason="schemathesis is not installed")

# small limits: an accepted request generates at most 4 tokens for at most 4 choices at most 4 loops deep
LIMITS = {"max_loops": 4, "effort": {"low": 1, "medium": 3, "high": 4}, "max_tokens": 4, "max_choices": 4}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
TOKENIZE, DETOKENIZE = "/tokenize", "/detokenize"


class Faults(logging.Handler):
    """Collects the records of ERROR and above that the server logs (an unhandled error, a failed decoding pass)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def app(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    folder = tmp_path_factory.mktemp("memories")
    save_file(
        {"memory": torch.randn(2, MEMORY_DIM, generator=torch.Generator().manual_seed(4))}, folder / "me.safetensors"
    )
    (folder / "bad.safetensors").write_bytes(b"not a safetensors file")
    return create_app(engine, server_settings(**LIMITS, memory_dir=folder, timeout=60.0))


@pytest.fixture(scope="module")
def faults() -> Iterator[Faults]:
    handler = Faults()
    logger = logging.getLogger("loopformer")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def client(app: FastAPI, faults: Faults) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:  # runs the lifespan: the scheduler thread
        yield client


def check_response(response: httpx.Response, faults: Faults) -> None:
    """The property every answer must have (see the module docstring)."""
    logged = [record.getMessage() for record in faults.records]
    faults.records.clear()
    assert response.status_code < 500, response.text[:1000]
    assert not logged, f"the server logged a fault: {logged}"
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert error["type"] == "invalid_request_error", error
        return
    assert response.status_code == 200, response.status_code
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [chunk.removeprefix("data: ") for chunk in response.text.split("\n\n") if chunk]
        assert events and events[-1] == "[DONE]", events[-3:]
        for event in map(json.loads, events[:-1]):
            assert "error" not in event or event["error"]["type"] == "invalid_request_error", event
        return
    if response.request.url.path in (COMPLETIONS, CHAT):
        body = response.json()
        assert body["object"] in ("text_completion", "chat.completion") and body["choices"], body


def post(client: TestClient, path: str, body: Any) -> httpx.Response:
    """POST ``body``: bytes as they are, anything else as JSON (NaN and lone surrogates written the Python way)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


# ----- bodies built from the endpoints' fields ---------------------------------------------------------------

EDGE_NUMBERS = [0, -1, 1, 2, 3, 4, 5, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -0.0, 0.5, 1e-9, 1e-320, 5e-324, 1e308]
EDGE_NUMBERS += [math.inf, math.nan]
numbers = st.sampled_from(EDGE_NUMBERS) | st.integers(-3, 8) | st.floats()
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.lists(
    st.text(max_size=8) | surrogates | st.sampled_from(["<|bos|>", "<|end|>", "<tool_call>", "\x00", ""]), max_size=4
).map("".join)
words = st.text(min_size=1, max_size=8)  # mostly what a client sends: non-empty text
junk = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: usually of its kind, sometimes (about 1 in 8) anything."""
    return st.integers(0, 7).flatmap(lambda pick: junk if pick == 7 else plausible)  # hypothesis favours low picks


counts = st.integers(-1, 6) | st.sampled_from([0, 2**63, 10**30])
token_ids = st.lists(st.integers(-1, 300) | st.sampled_from([2**63, 270]), max_size=6)
memory = st.sampled_from(
    ["me.safetensors", "bad.safetensors", "missing", "../me.safetensors", ".hidden", ""]
) | st.lists(
    st.lists(st.floats(width=32) | st.sampled_from([0.0, math.nan, math.inf]), min_size=5, max_size=7), max_size=3
)
SHARED: dict[str, st.SearchStrategy] = {
    "max_tokens": counts,
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-320, -1.0, 2.5, math.nan]),
    "top_p": st.floats(0, 1) | st.sampled_from([0, 1, 1.5]),
    "top_k": counts,
    "min_p": st.floats(0, 1) | st.sampled_from([-0.5, 1.5]),
    "repetition_penalty": st.floats(0.5, 2) | st.sampled_from([0, 5e-324, -1.0, 1e308]),
    "seed": st.integers(-1, 5) | st.sampled_from([2**63 - 1, 2**63]),
    "stop": words | st.lists(words | texts, max_size=3),
    "n": counts,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "loops": counts,
    "reasoning_effort": st.sampled_from(["low", "medium", "high", "max", ""]),
    "exit": st.sampled_from(["kl:5e-4", "latent-diff:0.03", "act:0.99", "kl:nan", "kl:-1", "bogus", "kl", ""]),
    "kv": st.sampled_from(["full", "last", "ring:2", "ring:0", "ring:-1", "ring:99", "ring:x", ""]),
    "memory": memory,
    "presence_penalty": st.sampled_from([None, 0, 0.5]),
    "frequency_penalty": st.sampled_from([None, 0, -1.0]),
    "logit_bias": st.sampled_from([None, {}, {"5": 1.0}]),
    "user": texts,
}
COMPLETION_FIELDS = {
    **SHARED,
    "logprobs": st.sampled_from([None, False, 0, 1, 5, 20, 21, -1, True]),
    "echo": st.booleans(),
    "suffix": st.none() | texts,
    "best_of": st.sampled_from([None, 1, 2]),
}
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""])}, optional={"text": st.none() | texts}),
    max_size=3,
)
function = st.fixed_dictionaries(
    {"name": texts}, optional={"description": st.none() | texts, "parameters": st.none() | junk}
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"function": st.fixed_dictionaries({"name": texts}, optional={"arguments": texts})},
        optional={"id": texts, "type": st.sampled_from(["function", "other"])},
    ),
    max_size=2,
)
message = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))},
    optional={
        "content": field(st.none() | texts | content_parts),
        "tool_calls": field(st.none() | tool_calls),
        "tool_call_id": st.none() | texts,
        "name": st.none() | texts,
    },
)
CHAT_FIELDS = {
    **SHARED,
    "logprobs": st.sampled_from([None, False, True, 0, 5]),
    "top_logprobs": counts | st.sampled_from([20, 21]),
    "max_completion_tokens": counts,
    "tools": st.none()
    | st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": function}), max_size=2),
    "tool_choice": st.sampled_from([None, "auto", "none", "required", {"type": "function"}]),
}


@st.composite
def bodies(draw: st.DrawFn, path: str) -> Any:
    """A request body for ``path``: mostly an object of its fields (the model usually the served one), now and then
    with a required field missing or an unknown one added, or not an object, or not JSON at all."""
    choice = draw(st.integers(0, 19))
    if choice == 0:
        return draw(junk)
    if choice == 1:
        return draw(st.binary(max_size=30) | st.sampled_from([b"", b"{", b"[" * 100_000, b'{"model": "tiny"']))
    fields = COMPLETION_FIELDS if path == COMPLETIONS else CHAT_FIELDS
    required = {
        "model": field(st.just(MODEL)),
        COMPLETIONS: {
            "prompt": field(words | texts | st.lists(words, max_size=3) | token_ids | st.lists(token_ids, max_size=2))
        },
        CHAT: {"messages": field(st.lists(message, min_size=1, max_size=3))},
    }
    body = draw(
        st.fixed_dictionaries(
            {"model": required["model"], **required[path]},
            optional={name: field(strategy) for name, strategy in fields.items()},
        )
    )
    if choice == 2:
        body.pop(draw(st.sampled_from(sorted(body))))
    if choice == 3:
        body[draw(st.text(max_size=6))] = draw(junk)
    return body


@profile(60)
@given(body=bodies(COMPLETIONS))
@example(body=b"[" * 100_000)  # nested deeper than Python's JSON reader recurses
@example(body={"model": MODEL, "prompt": "loop", "memory": "bad.safetensors"})
@example(body={"model": MODEL, "prompt": "\udcff"})  # a lone surrogate
@example(body={"model": MODEL, "prompt": [[]]})
@example(body={"model": MODEL, "prompt": "loop", "seed": 2**63 - 1, "n": 2})
def test_any_completion_body_is_answered_or_refused(client: TestClient, faults: Faults, body: Any) -> None:
    check_response(post(client, COMPLETIONS, body), faults)


@profile(60)
@given(body=bodies(CHAT))
@example(body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2})
@example(body={"model": MODEL, "messages": [{"role": "tool", "content": [{"type": "text"}]}]})
@example(
    body={"model": MODEL, "messages": [{"role": "user"}], "tools": [{"type": "function", "function": {"name": ""}}]}
)
def test_any_chat_body_is_answered_or_refused(client: TestClient, faults: Faults, body: Any) -> None:
    check_response(post(client, CHAT, body), faults)


TOKENIZER_FIELDS = {
    "model": field(st.just(MODEL) | texts),
    "prompt": field(st.none() | texts),
    "add_special_tokens": field(st.booleans()),
    "messages": field(st.none() | st.lists(message, max_size=3)),
    "add_generation_prompt": field(st.booleans()),
    "tools": CHAT_FIELDS["tools"],
    "tokens": field(token_ids | st.lists(st.sampled_from([-(2**63), 2**64, 10**30, 269]), max_size=3)),
}


@profile(60)
@given(path=st.sampled_from([TOKENIZE, DETOKENIZE]), body=st.fixed_dictionaries({}, optional=TOKENIZER_FIELDS))
@example(path=TOKENIZE, body={"prompt": "\udcff"})
@example(path=TOKENIZE, body={"messages": [{"role": "user", "content": "\udcff"}], "add_generation_prompt": False})
@example(path=DETOKENIZE, body={"tokens": [2**64]})
def test_any_tokenizer_body_is_answered_or_refused(client: TestClient, faults: Faults, path: str, body: Any) -> None:
    check_response(post(client, path, body), faults)


def test_the_fuzzed_server_answers_a_plain_request(client: TestClient, faults: Faults) -> None:
    """The app under fuzz does serve: a valid request gets a 200 with a complete answer (the search is not only
    collecting refusals)."""
    response = post(client, COMPLETIONS, {"model": MODEL, "prompt": "loop", "max_tokens": 3, "temperature": 0})
    check_response(response, faults)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_a_request_that_once_stopped_the_scheduler_is_answered(client: TestClient, faults: Faults) -> None:
    """A repetition penalty of 5e-324 made the sampling distribution nan: the draw raised on the scheduler thread,
    which died, and every later request timed out (504)."""
    for changes in ({"repetition_penalty": 5e-324}, {"temperature": 1e-320}, {"repetition_penalty": 1e308}):
        body = {"model": MODEL, "prompt": "loop loop", "max_tokens": 3, "temperature": 1.0, **changes}
        response = post(client, COMPLETIONS, body)
        check_response(response, faults)
        assert response.status_code == 200
    plain = post(client, COMPLETIONS, {"model": MODEL, "prompt": "loop", "max_tokens": 2, "temperature": 0})
    assert plain.status_code == 200


def test_a_failing_draw_fails_its_request_only(
    client: TestClient, faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error while choosing a token fails that request with a 500; the scheduler thread goes on serving."""

    def broken(self: Session, rows: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a fault in the draw")

    monkeypatch.setattr(Session, "choose", broken)
    response = post(client, COMPLETIONS, {"model": MODEL, "prompt": "loop", "max_tokens": 2})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "the server failed while generating."
    assert [record.getMessage() for record in faults.records] == ["choosing a token failed"]
    faults.records.clear()
    monkeypatch.undo()
    check_response(post(client, COMPLETIONS, {"model": MODEL, "prompt": "loop", "max_tokens": 2}), faults)


def test_an_empty_unknown_key_is_named(client: TestClient, faults: Faults) -> None:
    """A body with the key "" was refused as "unknown field None"."""
    response = post(client, COMPLETIONS, {"model": MODEL, "prompt": "loop", "": 1})
    check_response(response, faults)
    assert response.json()["error"]["message"].startswith("unknown field '': ")


@pytest.mark.slow
@profile(1500)
@given(body=bodies(COMPLETIONS))
def test_any_completion_body_is_answered_or_refused_thorough(client: TestClient, faults: Faults, body: Any) -> None:
    check_response(post(client, COMPLETIONS, body), faults)


@pytest.mark.slow
@profile(1500)
@given(body=bodies(CHAT))
def test_any_chat_body_is_answered_or_refused_thorough(client: TestClient, faults: Faults, body: Any) -> None:
    check_response(post(client, CHAT, body), faults)


# ----- schemathesis: cases from the app's own OpenAPI schema -------------------------------------------------


@pytest.fixture(scope="module")
def schema(app: FastAPI) -> Any:
    """The app's own OpenAPI schema, loaded by schemathesis."""
    return schemathesis.openapi.from_dict(app.openapi())


# (method, path, mode): the bodies valid and invalid by the schema; a GET has no input the schema can refuse
CASES = [
    (method, path, mode)
    for method, path in [("POST", COMPLETIONS), ("POST", CHAT), ("POST", TOKENIZE), ("POST", DETOKENIZE)]
    for mode in ("positive", "negative")
]
CASES += [("GET", "/v1/models/{model_id}", "positive"), ("GET", "/health", "positive")]
CASES += [("GET", "/tokenizer_info", "positive")]


def check_schema_cases(
    client: TestClient, faults: Faults, schema: Any, method: str, path: str, mode: str, examples: int
) -> None:
    """``examples`` schemathesis cases of one operation (the model name set to the served one half the time), sent
    through ``client`` and checked by schemathesis's ``not_a_server_error`` and by :func:`check_response`."""
    strategy = st.tuples(schema[path][method].as_strategy(generation_mode=GenerationMode(mode)), st.booleans())

    @profile(examples)
    @given(strategy)
    def run(drawn: tuple[Any, bool]) -> None:
        case, served = drawn
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        if served and isinstance(kwargs.get("json"), dict):
            kwargs["json"] = {**kwargs["json"], "model": MODEL}
        kwargs.pop("cookies", None)
        url = kwargs.pop("url").removeprefix("http://testserver")
        if "json" in kwargs:
            kwargs["content"] = json.dumps(kwargs.pop("json")).encode()
        elif "data" in kwargs:  # a negative case's body that is not JSON
            data = kwargs.pop("data")
            kwargs["content"] = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        response = client.request(url=url, **kwargs)
        case.validate_response(response, checks=[not_a_server_error])
        check_response(response, faults)

    run()


@needs_schemathesis
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_schema_cases_are_answered_or_refused(
    client: TestClient, faults: Faults, schema: Any, method: str, path: str, mode: str
) -> None:
    check_schema_cases(client, faults, schema, method, path, mode, 8 if method == "POST" else 3)


@pytest.mark.slow
@needs_schemathesis
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_schema_cases_are_answered_or_refused_thorough(
    client: TestClient, faults: Faults, schema: Any, method: str, path: str, mode: str
) -> None:
    check_schema_cases(client, faults, schema, method, path, mode, 400 if method == "POST" else 50)
