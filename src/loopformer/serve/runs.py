"""One request's rows in the scheduler, seen from the event loop; the streaming and non-streaming answers.

A :class:`Run` turns a :class:`~loopformer.serve.plans.Plan` into scheduler jobs whose events arrive on an asyncio
queue. The answer ends the run in every case: when the client disconnects (a streaming response is cancelled by
the server; a non-streaming one watches for the disconnect), when the request's time is up, and on errors, the
rows still queued or running are cancelled, so no generation outlives its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loopformer.nn.memory import Memory
from loopformer.serve.errors import APIError
from loopformer.serve.plans import Plan
from loopformer.serve.responses import ChatOutput, Output
from loopformer.serve.scheduler import Event, Failed, Finished, Job, QueueFull, Scheduler

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody reads it


class Run:
    """The jobs of one request; :meth:`events` yields ``(choice, event)`` until every choice has ended."""

    def __init__(self, scheduler: Scheduler, plan: Plan, timeout: float) -> None:
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout
        self.timeout = timeout
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        memory = None if plan.memory is None else Memory(plan.memory[None].to(scheduler.engine.device))
        echo = plan.echo is not None
        self.jobs = [
            Job(row.prompt, row.config, partial(self._deliver, index), memory, plan.logprobs, echo, plan.generate)
            for index, row in enumerate(plan.rows)
        ]
        self.open = set(range(len(self.jobs)))

    def _deliver(self, index: int, event: Event) -> None:
        """Called on the scheduler thread."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def start(self) -> None:
        try:
            self.scheduler.submit(self.jobs)
        except QueueFull:
            raise APIError(503, "the server is busy (its queue is full); retry later.", code="queue_full") from None

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Events in arrival order; raises :class:`APIError` 504 at the deadline."""
        while self.open:
            remaining = self.deadline - self.loop.time()
            try:
                index, event = await asyncio.wait_for(self.queue.get(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise APIError(504, f"the request did not finish within {self.timeout:g} s.", code="timeout") from None
            if isinstance(event, Finished | Failed):
                self.open.discard(index)
            yield index, event

    def cancel(self) -> None:
        """Cancel every choice that has not ended."""
        for index in sorted(self.open):
            self.scheduler.cancel(self.jobs[index])


async def _collect(run: Run, output: Output) -> dict[str, Any]:
    async for index, event in run.events():
        if isinstance(event, Failed):
            raise APIError(event.status, event.message)
        output.choices[index].add(event)
    return output.body()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond(request: Request, run: Run, output: Output) -> Response:
    """The whole answer as one JSON body; the run is cancelled if the client leaves first."""
    run.start()
    collect = asyncio.ensure_future(_collect(run, output))
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if collect.done():
            return JSONResponse(collect.result())
        return Response(status_code=CLIENT_CLOSED)
    finally:
        collect.cancel()
        gone.cancel()
        run.cancel()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def stream(run: Run, output: Output, include_usage: bool) -> StreamingResponse:
    """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``; errors after the start are
    sent as an ``error`` event (the status line has gone out)."""
    run.start()

    async def events() -> AsyncIterator[str]:
        try:
            if isinstance(output, ChatOutput):
                for chunk in output.opening_chunks():
                    yield _sse(chunk)
            async for index, event in run.events():
                if isinstance(event, Failed):
                    raise APIError(event.status, event.message)
                for chunk in output.chunks(index, event):
                    yield _sse(chunk)
            if include_usage:
                yield _sse(output.usage_chunk())
        except APIError as error:
            yield _sse(error.body())
        finally:
            run.cancel()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
