"""The FastAPI app: routes, error handlers, and the scheduler's lifetime.

Routes: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models`` (and ``/v1/models/{id}``),
``POST /v1/completions``, ``POST /v1/chat/completions``, and the tokenizer's ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info`` (:mod:`loopformer.serve.tokens`). Every error is an OpenAI-style
JSON body: 400 for a bad request (malformed JSON, a field out of range, too many tokens), 401 without the API key,
404 for an unknown model or path, 413 for a large body, 503 when the queue is full, 504 past the timeout, 500 with
one generic sentence for a server fault (the details go to the server's log, never to the client).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from loopformer.errors import InputError, LoopformerError
from loopformer.inference.engine import Engine
from loopformer.serve.errors import APIError, error_body
from loopformer.serve.guard import Guard
from loopformer.serve.logprobs import TokenText
from loopformer.serve.metrics import Metrics
from loopformer.serve.plans import chat_plan, check_model, completion_plan
from loopformer.serve.responses import ChatOutput, CompletionOutput
from loopformer.serve.runs import Run, respond, stream
from loopformer.serve.scheduler import Scheduler
from loopformer.serve.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from loopformer.serve.settings import ServerSettings
from loopformer.serve.tokens import detokenize, tokenize, tokenizer_info

log = logging.getLogger(__name__)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One sentence for the first problem pydantic found, and the field it concerns."""
    error = exc.errors()[0] if exc.errors() else {"type": "", "loc": (), "msg": "invalid request"}
    if error["type"] == "json_invalid":
        return "the request body is not valid JSON.", None
    where = [str(part) for part in error["loc"] if part != "body"]
    param = ".".join(where) or None
    if param is None and error["type"] in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (Content-Type: application/json).", None
    if error["type"] == "missing":
        return (f"the request needs the field {param}." if param else "the request needs a JSON body."), param
    if error["type"] == "extra_forbidden":  # the field is named as sent ('' for an empty key)
        name = ".".join(where) or repr("")
        return f"unknown field {name}: this server does not accept it (see docs/serving.md).", param
    return (f"{param}: {error['msg']}." if param else f"{error['msg']}."), param


def _model_card(engine: Engine, settings: ServerSettings, created: int) -> dict[str, Any]:
    config = engine.model.config
    return {
        "id": settings.model_name,
        "object": "model",
        "created": created,
        "owned_by": "loopformer",
        "max_model_len": config.max_seq_len,
        "loops": {"default": config.recurrence.mean_loops, "max": settings.max_loops, "effort": dict(settings.effort)},
        "memory_dim": config.memory_dim,
    }


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The server for ``engine`` (which needs its tokenizer); the scheduler thread runs while the app does."""
    if engine.tokenizer is None:
        raise InputError("the server needs the checkpoint's tokenizer.")
    mean = engine.model.config.recurrence.mean_loops
    if mean > settings.max_loops:
        raise InputError(f"--max-loops {settings.max_loops} is below the model's default of {mean} loops.")
    metrics = Metrics()
    scheduler = Scheduler(
        engine, settings.max_batch, settings.max_queue, settings.max_loops, settings.continuous_batching, metrics
    )
    created = int(time.time())
    texts = TokenText(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="loopformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(LoopformerError)
    async def user_error(_: Request, exc: LoopformerError) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = (
            f"there is no {request.method} {request.url.path} on this server."
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def fault(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_body(500, "the server failed to handle this request."), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queued": scheduler.queued, "running": scheduler.running}

    @app.get("/metrics")
    async def metrics_page() -> Response:
        text = metrics.render(queue_length=scheduler.queued, running_rows=scheduler.running)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine, settings, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, settings)
        return _model_card(engine, settings, created)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        plan = completion_plan(body, engine, settings)
        output = CompletionOutput(settings.model_name, plan, texts)
        run = Run(scheduler, plan, settings.timeout)
        if body.stream:
            return stream(run, output, body.stream_options is not None and body.stream_options.include_usage)
        return await respond(request, run, output)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        plan = chat_plan(body, engine, settings)
        output = ChatOutput(settings.model_name, plan, texts)
        run = Run(scheduler, plan, settings.timeout)
        if body.stream:
            return stream(run, output, body.stream_options is not None and body.stream_options.include_usage)
        return await respond(request, run, output)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        return tokenize(body, engine, settings)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, Any]:
        return detokenize(body, engine, settings)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> dict[str, Any]:
        return tokenizer_info(engine)

    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    return app
