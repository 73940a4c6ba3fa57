"""Continuous batching: one thread owns the model and runs every request's rows in shared decoding passes.

A request is one or more :class:`Job` s (rows). Jobs wait in one first-in-first-out queue of bounded length
(:class:`QueueFull` beyond it: the server answers 503). Each cycle of :meth:`Scheduler.step`:

1. **admit** queued jobs in arrival order while fewer than ``max_batch`` rows run: each joins the
   :class:`~loopformer.serve.lanes.Lane` of its settings (created on demand, dropped when empty) and its prompt is
   prefilled; with continuous batching off, jobs are admitted only when the batch is empty (static batches);
2. **choose** every running row's next token from its pending logits and hand it to the row (stop tokens, stop
   strings and lengths end rows); finished and cancelled rows leave;
3. **decode**: one pass per lane feeds the live rows their tokens.

So new requests join between decoding steps, and rows of any depth share a pass. Events go to each job's
``sink`` from the scheduler thread: :class:`Prompt` after the prefill (only for ``echo``), :class:`TextDelta` per
token (with its log-probabilities when the job asks for them), then :class:`Finished` or :class:`Failed`. A job
that does not ``generate`` finishes right after its prefill (scoring the prompt: ``echo`` with ``max_tokens`` 0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from loopformer.errors import LoopformerError
from loopformer.inference.engine import Engine, GenerationConfig, Session
from loopformer.nn.memory import Memory
from loopformer.serve.lanes import Lane, lane_key
from loopformer.serve.logprobs import TokenLogprob, token_logprobs
from loopformer.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A row's prompt was prefilled: the log-probabilities of its tokens (empty unless the job asked for them)."""

    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class TextDelta:
    """Printable text of a row; ``token`` is False for text held back until the row finished. ``logprob``: the
    token's, when the job asks for log-probabilities."""

    text: str
    token: bool
    loops: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    """A row ended: ``reason`` "stop" or "length", its token count and the core iterations they took."""

    reason: str
    tokens: int
    loops: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = Prompt | TextDelta | Finished | Failed


class QueueFull(Exception):
    """The queue cannot take the request's rows."""


@dataclass(eq=False)
class Job:
    """One row to generate and where its events go (called on the scheduler thread); ``logprobs``: alternatives per
    token to report (None: no log-probabilities), ``echo``: send a :class:`Prompt`, ``generate``: False to stop after
    the prefill."""

    prompt: list[int]
    config: GenerationConfig
    sink: Callable[[Event], None]
    memory: Memory | None = None
    logprobs: int | None = None
    echo: bool = False
    generate: bool = True
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    session: Session | None = None
    lane: Hashable | None = None
    first_token: float | None = None


class Scheduler:
    """Runs jobs on ``engine`` in batches of at most ``max_batch`` rows with up to ``max_queue`` waiting."""

    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        max_queue: int,
        max_loops: int,
        continuous: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine, self.max_batch, self.max_queue, self.max_loops = engine, max_batch, max_queue, max_loops
        self.continuous = continuous
        self.metrics = metrics or Metrics()
        self.capacity = engine.model.config.max_seq_len
        self._queue: deque[Job] = deque()
        self._lanes: dict[Hashable, Lane] = {}
        self._running: list[Job] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----- called from request handlers (any thread) -----------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none (:class:`QueueFull`)."""
        with self._wake:
            if self._stopping or len(self._queue) + len(jobs) > self.max_queue:
                self.metrics.count("loopformer_requests_rejected_total")
                raise QueueFull
            self._queue.extend(jobs)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (the client went away or its time ran out): it leaves the queue or the batch."""
        with self._wake:
            if job.cancelled:
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.count("loopformer_requests_cancelled_total")
            self._wake.notify()

    # ----- the scheduler thread -----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loopformer-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the current cycle, fail what is left (503) and join the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for job in [*self._queue, *self._running]:
            job.sink(Failed(503, "the server is shutting down."))
        self._queue.clear()
        self._running.clear()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._queue and not self._running:
                        self._wake.wait()
                    if self._stopping:
                        return
                self.step()

    def step(self) -> None:
        """One cycle: admit, choose, decode (see the module docstring)."""
        self._admit()
        self._choose()
        self._decode()

    def _admit(self) -> None:
        if not self.continuous and self._running:
            return
        while len(self._running) < self.max_batch:
            with self._wake:
                if not self._queue:
                    return
                job = self._queue.popleft()
            if job.cancelled:
                self.metrics.count("loopformer_requests_cancelled_total")
                continue
            self.metrics.observe("loopformer_queue_wait_seconds", time.perf_counter() - job.submitted)
            key = lane_key(self.engine, job.config)
            scored = job.echo and job.logprobs is not None  # keep the prefill's logits to score the prompt
            try:
                lane = self._lanes.get(key) or Lane(self.engine, job.config, self.capacity, self.max_loops)
                job.session = lane.join(job.prompt, job.config, job.memory, keep_prompt_logits=scored)
            except LoopformerError as exc:
                self._fail([job], 400, str(exc))
                continue
            except Exception:
                log.exception("prefill failed")
                self._fail([job], 500, "the server failed to process the prompt.")
                continue
            self._lanes[key], job.lane = lane, key
            self._running.append(job)
            self.metrics.count("loopformer_prompt_tokens_total", len(job.prompt))
            if job.echo:
                self._echo(job)
            if not job.generate and job.session is not None:
                self._finish(job)

    def _echo(self, job: Job) -> None:
        """Send the prompt's log-probabilities (the first token has none) and drop the prefill's logits."""
        session = job.session
        logits, session.prompt_logits = session.prompt_logits, None
        if logits is None:
            job.sink(Prompt(()))
            return
        try:
            scored = token_logprobs(logits[0], job.prompt[1:], job.logprobs)
        except Exception:
            log.exception("scoring the prompt failed")
            self._leave(job)
            self._fail([job], 500, "the server failed to process the prompt.")
            return
        job.sink(Prompt((TokenLogprob(job.prompt[0], None), *scored)))

    def _choose(self) -> None:
        first = torch.zeros(1, dtype=torch.long, device=self.engine.device)
        for job in list(self._running):
            if job.cancelled:
                self._leave(job)
                self.metrics.count("loopformer_requests_cancelled_total")
                continue
            session = job.session
            try:
                token = int(session.choose(first)[0])
                logprob = None if job.logprobs is None else token_logprobs(session.logits[:1], [token], job.logprobs)[0]
                events = session.accept(0, token, int(session.pending_steps[0]))
            except Exception:  # this row fails; the scheduler thread (and every other request) goes on
                log.exception("choosing a token failed")
                self._leave(job)
                self._fail([job], 500, "the server failed while generating.")
                continue
            for event in events:
                if event.token is not None:
                    if job.first_token is None:
                        job.first_token = time.perf_counter()
                        self.metrics.observe("loopformer_time_to_first_token_seconds", job.first_token - job.submitted)
                    self.metrics.count("loopformer_generated_tokens_total")
                    self.metrics.count("loopformer_loops_total", event.loops)
                generated = event.token is not None
                job.sink(TextDelta(event.text, generated, event.loops, logprob if generated else None))
            if not bool(session.alive[0]):
                self._finish(job)

    def _decode(self) -> None:
        by_lane: dict[Hashable, list[Job]] = {}
        for job in self._running:
            by_lane.setdefault(job.lane, []).append(job)
        for key, jobs in by_lane.items():
            sessions = [job.session for job in jobs]
            tokens = torch.tensor([session.tokens[0][-1] for session in sessions], device=self.engine.device)
            try:
                self._lanes[key].decode(sessions, tokens)
            except Exception:
                log.exception("a decoding pass failed")
                self._fail(jobs, 500, "the server failed while generating.")
                self._lanes.pop(key, None)
                continue
            self.metrics.count("loopformer_decode_passes_total")
            self.metrics.count("loopformer_decode_rows_total", len(jobs))

    def _finish(self, job: Job) -> None:
        """``job``'s row ended: it leaves, and its sink hears why, with its token and loop counts."""
        session = job.session
        self._leave(job)
        reason = session.finish[0]
        self.metrics.count("loopformer_requests_finished_total", labels={"reason": reason})
        self.metrics.observe("loopformer_request_seconds", time.perf_counter() - job.submitted)
        job.sink(Finished(reason, len(session.tokens[0]), sum(session.row_loops[0])))

    def _leave(self, job: Job) -> None:
        self._running.remove(job)
        session, job.session = job.session, None  # the request may outlive its row: free the cache now
        lane = self._lanes.get(job.lane)
        if lane is None:
            return
        lane.leave(session)
        if lane.empty:
            del self._lanes[job.lane]

    def _fail(self, jobs: list[Job], status: int, message: str) -> None:
        for job in jobs:
            if job in self._running:
                self._running.remove(job)
            self.metrics.count("loopformer_requests_finished_total", labels={"reason": "error"})
            job.sink(Failed(status, message))
