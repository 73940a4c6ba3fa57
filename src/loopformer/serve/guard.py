"""The outermost layer of the app (plain ASGI): API key, body size, and the HTTP request counter.

It runs before any route or body parsing, so a request without the key gets a 401 whatever its body, and a body
larger than the limit is refused with a 413 before it is parsed. The body is read here and handed on unchanged;
later ``receive`` calls go to the server again, which is how handlers learn that the client disconnected.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loopformer.serve.errors import error_body
from loopformer.serve.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})  # answered without the API key
KNOWN_PATHS = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
    }
)


class Guard:
    """ASGI middleware: Bearer ``api_key`` (None: open), ``max_body_bytes``, per-path status counts."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = path if path in KNOWN_PATHS else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count(
                    "loopformer_http_requests_total", labels={"path": label, "status": message["status"]}
                )
            await send(message)

        if self.api_key is not None and path not in OPEN_PATHS and not self._authorised(scope):
            await _reply(counted, 401, "invalid or missing API key; send the header Authorization: Bearer KEY.")
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(counted, 413, f"the request body is larger than {self.max_body_bytes} bytes.")
            return
        parts, size, complete = [], 0, False
        while not complete:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            complete = not message.get("more_body", False)
            if size > self.max_body_bytes:
                await _reply(counted, 413, f"the request body is larger than {self.max_body_bytes} bytes.")
                return
        body = b"".join(parts)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, counted)

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def _reply(send: Send, status: int, message: str) -> None:
    payload = json.dumps(error_body(status, message, code="invalid_api_key" if status == 401 else None)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
