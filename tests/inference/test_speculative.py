"""Self-speculative decoding: greedy output equals plain greedy decoding at the verify depth, the cache is rolled
back exactly, and sampled speculative decoding is reproducible and well-formed."""

from __future__ import annotations

import pytest
import torch

from loopformer.errors import InputError
from loopformer.inference.engine import Engine, GenerationConfig, Session
from loopformer.inference.sampling import SamplingConfig
from loopformer.model import LoopLM, build_model
from support import small_config

PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 2], [33, 7, 21, 60]]


def make_model(seed: int = 0, **changes: object) -> LoopLM:
    """A tiny untied model (a tied random model tends to repeat its input token)."""
    return build_model(small_config(**{"tie_embeddings": False, **changes}), seed=seed).eval()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(make_model())


def tokens_of(engine: Engine, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    return [o.tokens for o in engine.generate(prompts, config).outputs]


# ----- greedy: the output of plain decoding ------------------------------------------------------------
# (kv, loops): policies that keep every iteration's entries, so a multi-token pass is exact
EXACT = [("full", 4), ("full", 6), ("ring:3", 3), ("ring:8", 6)]


@pytest.mark.parametrize(("kv", "loops"), EXACT)
@pytest.mark.parametrize("speculative", [(1, 2), (2, 4), (4, 3), (1, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_equals_plain_greedy(
    engine: Engine, kv: str, loops: int, speculative: tuple[int, int], batch: int
) -> None:
    speculative = (min(speculative[0], loops), speculative[1])  # a draft never runs deeper than the target
    prompts = PROMPTS[:batch]
    # 11 new tokens: not a multiple of lookahead + 1 for any lookahead here
    plain = engine.generate(prompts, GenerationConfig(max_new_tokens=11, loops=loops, kv=kv))
    fast = engine.generate(prompts, GenerationConfig(max_new_tokens=11, loops=loops, kv=kv, speculative=speculative))
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in plain.outputs]
    for output in fast.outputs:
        assert len(output.tokens) == 11 and output.finish_reason == "length"
        assert output.loops == [loops] * 11  # every emitted token was verified at the full depth
    assert fast.acceptance_rate is not None and 0.0 <= fast.acceptance_rate <= 1.0
    assert plain.acceptance_rate is None


def test_a_lookahead_beyond_the_new_tokens_costs_no_more_than_they_need(engine: Engine, monkeypatch) -> None:
    """--speculative 1:100000 ran for minutes and allocated 100,000 cache columns per row: drafts past the tokens a
    row still needs are never made, and the cache is sized as for a lookahead of max_new_tokens."""
    passes = {"count": 0, "widest": 0}
    run = engine.passes.run

    def counted(cache, rows, ids, *args, **kwargs):
        passes["count"] += 1
        passes["widest"] = max(passes["widest"], ids.shape[1])
        return run(cache, rows, ids, *args, **kwargs)

    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=7, loops=4))
    monkeypatch.setattr(engine.passes, "run", counted)
    huge = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=7, loops=4, speculative=(1, 100_000)))
    assert [o.tokens for o in huge.outputs] == [o.tokens for o in plain.outputs]
    bounded = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=7, loops=4, speculative=(1, 7)))
    assert huge.cache_bytes == bounded.cache_bytes
    # a verify pass: the pending token + at most the 6 drafts a row can still use (unbounded: 100,001 columns)
    assert passes["widest"] <= 7 and passes["count"] < 60


@pytest.mark.parametrize(("kv", "loops"), EXACT)
def test_draft_at_the_full_depth_is_always_accepted(engine: Engine, kv: str, loops: int) -> None:
    config = GenerationConfig(max_new_tokens=13, loops=loops, kv=kv, speculative=(loops, 3))
    result = engine.generate(PROMPTS, config)
    assert result.acceptance_rate == 1.0
    assert [o.tokens for o in result.outputs] == tokens_of(
        engine, PROMPTS, GenerationConfig(max_new_tokens=13, loops=loops, kv=kv)
    )


def test_a_shallow_draft_is_sometimes_rejected(engine: Engine) -> None:
    result = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=16, loops=6, speculative=(1, 4)))
    assert 0.0 <= result.acceptance_rate < 1.0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5])
def test_speculative_respects_max_new_tokens(engine: Engine, max_new_tokens: int) -> None:
    config = GenerationConfig(max_new_tokens=max_new_tokens, loops=4, speculative=(2, 3))
    plain = tokens_of(engine, PROMPTS, GenerationConfig(max_new_tokens=max_new_tokens, loops=4))
    assert tokens_of(engine, PROMPTS, config) == plain
    assert all(len(t) == max_new_tokens for t in plain)


def test_speculative_stops_on_stop_tokens(engine: Engine) -> None:
    free = tokens_of(engine, PROMPTS, GenerationConfig(max_new_tokens=14, loops=4))
    stop = free[0][5]
    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=14, loops=4, stop_tokens=(stop,)))
    fast = engine.generate(
        PROMPTS, GenerationConfig(max_new_tokens=14, loops=4, stop_tokens=(stop,), speculative=(1, 3))
    )
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in plain.outputs]
    assert [o.finish_reason for o in fast.outputs] == [o.finish_reason for o in plain.outputs]
    assert fast.outputs[0].finish_reason == "stop" and stop not in fast.outputs[0].tokens


def test_speculative_with_repetition_penalty_equals_plain(engine: Engine) -> None:
    """The draft and the verification see the same history as plain decoding (prompt, emitted and drafted ids)."""
    sampling = SamplingConfig(repetition_penalty=3.0)
    plain = tokens_of(engine, PROMPTS, GenerationConfig(max_new_tokens=14, loops=4, sampling=sampling))
    assert plain != tokens_of(engine, PROMPTS, GenerationConfig(max_new_tokens=14, loops=4))  # the penalty acts
    for speculative in ((1, 3), (2, 2), (4, 4)):
        config = GenerationConfig(max_new_tokens=14, loops=4, sampling=sampling, speculative=speculative)
        assert tokens_of(engine, PROMPTS, config) == plain


def test_speculative_at_the_context_limit() -> None:
    engine = Engine(make_model(max_seq_len=12))
    prompts = [list(range(1, 10)), [1, 2, 3], list(range(20, 32))]
    plain = engine.generate(prompts, GenerationConfig(max_new_tokens=20, loops=3))
    fast = engine.generate(prompts, GenerationConfig(max_new_tokens=20, loops=3, speculative=(1, 4)))
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in plain.outputs]
    assert [len(o.tokens) for o in fast.outputs] == [3, 9, 1]
    assert all(o.finish_reason == "length" for o in fast.outputs)


def test_speculative_stream_matches_generate(engine: Engine) -> None:
    config = GenerationConfig(max_new_tokens=9, loops=4, speculative=(2, 3))
    stream = engine.stream(PROMPTS, config)
    events = list(stream)
    result = engine.generate(PROMPTS, config)
    for b, output in enumerate(result.outputs):
        assert [e.token for e in events if e.row == b] == output.tokens
    assert stream.result.acceptance_rate == result.acceptance_rate


# ----- the cache after rollback ------------------------------------------------------------------------
def run_session(engine: Engine, prompts: list[list[int]], config: GenerationConfig) -> Session:
    with torch.inference_mode():
        ids, real = engine.prepare(prompts)
        session = Session(engine.passes, ids, real, config)
        for _ in engine.events(session):
            pass
    return session


def assert_cache_of_plain_decoding(engine: Engine, config: GenerationConfig) -> None:
    """Run speculative ``config`` on PROMPTS; its cache must equal the one plain decoding builds from the same
    tokens (bookkeeping exactly, keys and values to rounding), row by row as far as each row got."""
    loops, new, lookahead = config.loops, config.max_new_tokens, config.speculative[1]
    fast = run_session(engine, PROMPTS, config)
    cache = fast.cache
    width = max(len(p) for p in PROMPTS)
    committed = (cache.lengths - width).tolist()
    # the last round may have committed accepted drafts past what was emitted: take them from a longer run
    plain_config = GenerationConfig(max_new_tokens=new + lookahead + 1, loops=loops, kv=config.kv)
    longer = tokens_of(engine, PROMPTS, plain_config)
    assert [t[:new] for t in longer] == fast.tokens
    assert all(new - 1 <= c <= new + lookahead for c in committed)

    # plain decoding fed the same tokens, each row as far as the speculative cache got
    ids, real = engine.prepare(PROMPTS)
    with torch.inference_mode():
        plain = Session(engine.passes, ids, real, plain_config)
        for t in range(max(committed)):
            rows = torch.tensor([b for b in range(len(PROMPTS)) if committed[b] > t])
            plain.feed(rows, torch.tensor([longer[b][t] for b in rows.tolist()]))
    reference = plain.cache
    assert reference.lengths.tolist() == cache.lengths.tolist()
    assert torch.equal(reference.valid, cache.valid)  # nothing valid past the rolled-back length
    for b, length in enumerate(cache.lengths.tolist()):
        assert reference.positions[b, :length].tolist() == cache.positions[b, :length].tolist()
        assert reference.depth[b, :length].tolist() == cache.depth[b, :length].tolist()
        for role in ("prelude", "core", "coda"):
            for mine, theirs in zip(cache.store[role], reference.store[role], strict=True):
                torch.testing.assert_close(
                    mine[..., b, :, :length, :], theirs[..., b, :, :length, :], atol=1e-5, rtol=0
                )


@pytest.mark.parametrize(("kv", "loops"), [("full", 4), ("ring:4", 4), ("full", 2)])
@pytest.mark.parametrize("speculative", [(1, 2), (2, 4), (2, 3)])
def test_rollback_leaves_the_cache_of_plain_decoding(
    engine: Engine, kv: str, loops: int, speculative: tuple[int, int]
) -> None:
    config = GenerationConfig(max_new_tokens=10, loops=loops, kv=kv, speculative=speculative)
    assert_cache_of_plain_decoding(engine, config)


@pytest.mark.parametrize(("kv", "loops"), [("ring:3", 4), ("last", 4), ("ring:2", 5)])
def test_speculative_with_shared_slots_is_refused(engine: Engine, kv: str, loops: int) -> None:
    """With slots shared across iterations (ring:k with k < loops, last) one verification pass cannot rebuild what
    token-by-token decoding stores (a token's slot holds the entry of its last iteration with that slot, which its
    successors in the same pass have not seen yet), so the engine refuses rather than diverge from plain decoding."""
    config = GenerationConfig(max_new_tokens=11, loops=loops, kv=kv, speculative=(loops, 3))
    with pytest.raises(InputError, match="shares slots"):
        engine.generate(PROMPTS, config)


def test_speculative_draft_deeper_than_the_verify_depth_is_refused(engine: Engine) -> None:
    with pytest.raises(InputError, match="more than the 3"):
        engine.generate(PROMPTS, GenerationConfig(max_new_tokens=4, loops=3, speculative=(4, 2)))


# ----- sampling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("speculative", [(1, 3), (2, 2)])
def test_sampled_speculative_is_reproducible_and_well_formed(engine: Engine, speculative: tuple[int, int]) -> None:
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, seed=5)
    config = GenerationConfig(max_new_tokens=12, loops=4, speculative=speculative, sampling=sampling)
    first = engine.generate(PROMPTS, config)
    again = engine.generate(PROMPTS, config)
    assert [o.tokens for o in first.outputs] == [o.tokens for o in again.outputs]
    assert first.acceptance_rate == again.acceptance_rate and 0.0 <= first.acceptance_rate <= 1.0
    for output in first.outputs:
        assert len(output.tokens) == 12 and output.finish_reason == "length"
        assert all(isinstance(t, int) and 0 <= t < 64 for t in output.tokens)
    other = GenerationConfig(
        max_new_tokens=12, loops=4, speculative=speculative, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=6)
    )
    assert [o.tokens for o in engine.generate(PROMPTS, other).outputs] != [o.tokens for o in first.outputs]
    greedy = tokens_of(engine, PROMPTS, GenerationConfig(max_new_tokens=12, loops=4))
    assert [o.tokens for o in first.outputs] != greedy


def test_sampled_speculative_with_a_full_depth_draft_accepts_almost_everything(engine: Engine) -> None:
    sampling = SamplingConfig(temperature=1.0, seed=3)
    config = GenerationConfig(max_new_tokens=15, loops=3, speculative=(3, 4), sampling=sampling)
    result = engine.generate(PROMPTS, config)
    assert result.acceptance_rate > 0.9  # p == q up to rounding: min(1, p/q) is 1 or a hair below


def test_speculative_config_errors() -> None:
    with pytest.raises(InputError, match="exit rule"):
        GenerationConfig(speculative=(1, 2), exit="latent-diff")
    with pytest.raises(InputError, match="warm start"):
        GenerationConfig(speculative=(1, 2), warm_start=True)
    with pytest.raises(InputError, match="lookahead"):
        GenerationConfig(speculative=(1, -1))
    with pytest.raises(InputError, match="draft loops"):
        GenerationConfig(speculative=(True, 2))
