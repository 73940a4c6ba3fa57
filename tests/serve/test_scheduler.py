"""Continuous batching without HTTP: every row of a shared batch generates exactly what it generates alone.

The scheduler is stepped by hand (no thread), so joins, cancellations and the queue are observed between cycles.
"""

from __future__ import annotations

import pytest
import torch

from loopformer.inference.cache import KVCache
from loopformer.inference.chat import encode_prompt
from loopformer.inference.engine import Engine, GenerationConfig, Session
from loopformer.inference.sampling import SamplingConfig
from loopformer.model import build_model
from loopformer.nn.memory import Memory
from loopformer.serve.lanes import stack_memory
from loopformer.serve.scheduler import Failed, Finished, Job, QueueFull, Scheduler, TextDelta
from loopformer.tokenizer import TextTokenizer
from serve.live import MEMORY_DIM
from support import small_config

TEXTS = ["loop state", "a longer prompt about depth and tokens", "x", "the core iterates"]


class Collector:
    """A job's sink: keeps its events."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def __call__(self, event: object) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def end(self) -> object:
        return self.events[-1] if self.events else None


def make_job(engine: Engine, text: str, memory: torch.Tensor | None = None, **changes: object) -> tuple[Job, Collector]:
    config = GenerationConfig(**{"max_new_tokens": 10, **changes})
    sink = Collector()
    wrapped = None if memory is None else Memory(memory[None])
    return Job(encode_prompt(engine.tokenizer, text), config, sink, wrapped), sink


def drain(scheduler: Scheduler, limit: int = 500) -> None:
    with torch.inference_mode():
        for _ in range(limit):
            if not (scheduler.queued or scheduler.running):
                return
            scheduler.step()
    raise AssertionError("the scheduler did not finish")


def assert_alone(engine: Engine, job: Job, sink: Collector) -> None:
    """The row's events equal a generation of its prompt alone with its settings."""
    alone = engine.generate([job.prompt], job.config, memory=None if job.memory is None else job.memory.vectors)
    output = alone.outputs[0]
    assert sink.text == output.text
    assert sink.end == Finished(output.finish_reason, len(output.tokens), sum(output.loops))
    assert [e.loops for e in sink.events if isinstance(e, TextDelta) and e.token] == output.loops


@pytest.fixture()
def scheduler(engine: Engine) -> Scheduler:
    return Scheduler(engine, max_batch=6, max_queue=8, max_loops=8)


def test_rows_of_different_depths_exits_kv_and_memory_share_a_batch(engine: Engine, scheduler: Scheduler) -> None:
    memory = torch.randn(3, MEMORY_DIM, generator=torch.Generator().manual_seed(2))
    jobs = [
        make_job(engine, TEXTS[0], loops=1),
        make_job(engine, TEXTS[1], loops=5),
        make_job(engine, TEXTS[2]),  # the model's 3 loops
        make_job(engine, TEXTS[3], loops=6, exit="latent-diff:0.2"),
        make_job(engine, TEXTS[0], loops=4, kv="ring:2", memory=memory),
        make_job(engine, TEXTS[1], loops=2, sampling=SamplingConfig(temperature=0.9, top_k=20, seed=7)),
    ]
    scheduler.submit([job for job, _ in jobs])
    drain(scheduler)
    for job, sink in jobs:
        assert_alone(engine, job, sink)
    # rows decoded together: fewer passes than rows fed
    metrics = scheduler.metrics
    assert metrics.value("loopformer_decode_rows_total") > metrics.value("loopformer_decode_passes_total")


def test_rows_joining_a_running_batch_generate_what_they_generate_alone(engine: Engine, scheduler: Scheduler) -> None:
    first, first_sink = make_job(engine, TEXTS[1], loops=3, max_new_tokens=16)
    scheduler.submit([first])
    with torch.inference_mode():
        for _ in range(4):
            scheduler.step()
    late = [make_job(engine, TEXTS[0], loops=6), make_job(engine, TEXTS[3], loops=1, exit="kl:1e-3")]
    scheduler.submit([job for job, _ in late])
    with torch.inference_mode():
        scheduler.step()
    assert scheduler.running == 3  # they joined between decoding steps, while the first row runs
    assert not isinstance(first_sink.end, Finished)
    drain(scheduler)
    for job, sink in [(first, first_sink), *late]:
        assert_alone(engine, job, sink)


def test_static_batching_admits_only_into_an_empty_batch(engine: Engine) -> None:
    scheduler = Scheduler(engine, max_batch=6, max_queue=8, max_loops=8, continuous=False)
    first, first_sink = make_job(engine, TEXTS[0], max_new_tokens=8)
    scheduler.submit([first])
    with torch.inference_mode():
        scheduler.step()
        second, second_sink = make_job(engine, TEXTS[1], max_new_tokens=4)
        scheduler.submit([second])
        while first_sink.end is None:
            assert scheduler.queued == 1 and not second_sink.events
            scheduler.step()
    drain(scheduler)
    assert_alone(engine, second, second_sink)


def test_queue_is_first_in_first_out_and_bounded(engine: Engine) -> None:
    scheduler = Scheduler(engine, max_batch=1, max_queue=2, max_loops=8)
    order: list[int] = []
    jobs = []
    for index in range(3):
        job, _ = make_job(engine, TEXTS[index], max_new_tokens=3)
        job.sink = lambda event, index=index: order.append(index) if isinstance(event, Finished) else None
        jobs.append(job)
    scheduler.submit(jobs[:2])
    with pytest.raises(QueueFull):
        scheduler.submit([jobs[2]])
    with torch.inference_mode():
        scheduler.step()  # the first job runs, the queue has room again
    scheduler.submit([jobs[2]])
    drain(scheduler)
    assert order == [0, 1, 2]
    assert scheduler.metrics.value("loopformer_requests_rejected_total") == 1


def test_a_cancelled_row_leaves_the_batch_and_a_cancelled_waiting_row_never_runs(engine: Engine) -> None:
    scheduler = Scheduler(engine, max_batch=1, max_queue=2, max_loops=8)
    running, running_sink = make_job(engine, TEXTS[0], max_new_tokens=50)
    waiting, waiting_sink = make_job(engine, TEXTS[1], max_new_tokens=50)
    scheduler.submit([running, waiting])
    with torch.inference_mode():
        for _ in range(3):
            scheduler.step()
    scheduler.cancel(waiting)
    scheduler.cancel(running)
    count = len(running_sink.events)
    drain(scheduler)
    assert len(running_sink.events) == count and not isinstance(running_sink.end, Finished)
    assert waiting_sink.events == []
    assert scheduler.metrics.value("loopformer_requests_cancelled_total") == 2
    assert scheduler._lanes == {}  # the lane was dropped with its last row


def test_a_prompt_longer_than_the_context_fails_its_row_only(engine: Engine, scheduler: Scheduler) -> None:
    too_long, too_long_sink = make_job(engine, "x" * 600)
    fine, fine_sink = make_job(engine, TEXTS[0])
    scheduler.submit([too_long, fine])
    drain(scheduler)
    assert isinstance(too_long_sink.end, Failed) and too_long_sink.end.status == 400
    assert_alone(engine, fine, fine_sink)


def test_act_models_without_an_exit_rule_batch_each_depth_separately(tokenizer: TextTokenizer) -> None:
    config = small_config(vocab_size=tokenizer.vocab_size, halting="act")
    model = build_model(config, seed=0)
    with torch.no_grad():
        model.halting.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    engine = Engine(model.eval(), tokenizer)
    scheduler = Scheduler(engine, max_batch=4, max_queue=4, max_loops=8)
    jobs = [make_job(engine, TEXTS[0], loops=2), make_job(engine, TEXTS[1], loops=5)]
    scheduler.submit([job for job, _ in jobs])
    drain(scheduler)
    for job, sink in jobs:
        assert_alone(engine, job, sink)


def test_stacked_memory_pads_and_masks_rows(engine: Engine) -> None:
    a = Memory(torch.randn(1, 2, MEMORY_DIM))
    b = Memory(torch.randn(1, 3, MEMORY_DIM))
    stacked = stack_memory([a, None, b], MEMORY_DIM)
    assert stacked.vectors.shape == (3, 3, MEMORY_DIM)
    assert stacked.mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    torch.testing.assert_close(stacked.vectors[0, :2], a.vectors[0])
    assert stack_memory([None, None], MEMORY_DIM) is None
    # a row without vectors reads nothing: the same logits as no memory at all
    ids = torch.tensor([encode_prompt(engine.tokenizer, TEXTS[0])])
    config = GenerationConfig(max_new_tokens=4)
    masked = Memory(torch.randn(1, 2, MEMORY_DIM), torch.zeros(1, 2, dtype=torch.bool))
    assert (
        engine.generate(ids, config, memory=masked).outputs[0].tokens == engine.generate(ids, config).outputs[0].tokens
    )


def test_a_cache_grows_rows_in_place_keeping_the_old_ones(engine: Engine) -> None:
    ids = torch.tensor([encode_prompt(engine.tokenizer, TEXTS[1])])
    config = GenerationConfig(max_new_tokens=6, loops=4)
    alone = engine.generate(ids, config).outputs[0].tokens
    cache = KVCache(engine.model.config, 1, 64, "full", max_loops=4)
    with torch.inference_mode():
        real = torch.ones_like(ids, dtype=torch.bool)
        session = Session(engine.passes, ids, real, config, cache=cache, slots=torch.tensor([0]))
        before = {role: (k.clone(), v.clone()) for role, (k, v) in cache.store.items()}
        cache.reserve_rows(3)
        assert cache.batch_size == 3 and cache.lengths.tolist() == [ids.shape[1], 0, 0]
        for role, (k, v) in cache.store.items():
            assert torch.equal(k[..., :1, :, :, :], before[role][0]) and not k[..., 1:, :, :, :].any()
            assert torch.equal(v[..., :1, :, :, :], before[role][1])
        tokens = list(engine.events(session))
    assert [event.token for event in tokens if event.token is not None] == alone
