"""``--speculative auto``'s probe and the slower-than-plain notice: which settings are timed, what is chosen, and
that the choice never changes the tokens."""

from __future__ import annotations

import dataclasses

import pytest

from loopformer.inference.engine import Engine, GenerationConfig
from loopformer.inference.generation import GenerationResult
from loopformer.inference.speculative_probe import draft_candidates, probe_speculative, slower_than_plain
from loopformer.model import build_model
from support import small_config

PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 2]]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(build_model(small_config(tie_embeddings=False), seed=0).eval())


def test_the_candidates_draft_shallower_than_the_verify_depth() -> None:
    assert draft_candidates(32) == [(1, 4), (1, 8), (4, 4), (4, 8), (8, 4), (8, 8)]
    assert draft_candidates(2) == [(1, 4), (1, 8)]
    assert draft_candidates(1) == []


def test_the_probe_times_plain_and_every_candidate_and_keeps_the_fastest(engine: Engine) -> None:
    config = GenerationConfig(max_new_tokens=6, loops=8)
    probe = probe_speculative(engine, PROMPTS, config, tokens=4)
    assert [run.speculative for run in probe.runs] == [None, *draft_candidates(8)]
    assert probe.tokens == 4 and probe.reason == ""
    assert probe.best.tokens_per_s == max(run.tokens_per_s for run in probe.runs) > 0
    assert all((run.acceptance_rate is None) == (run.speculative is None) for run in probe.runs)
    assert probe.describe().startswith("speculative auto: ") and "plain " in probe.describe()
    chosen = dataclasses.replace(config, speculative=probe.best.speculative)
    plain = [o.tokens for o in engine.generate(PROMPTS, config).outputs]
    assert [o.tokens for o in engine.generate(PROMPTS, chosen).outputs] == plain  # only the speed changes


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"kv": "last"}, "shares KV slots"), ({"exit": "kl:1e-3"}, "exit rule"), ({"loops": 1}, "at 1 loop")],
)
def test_settings_where_speculation_is_not_exact_time_plain_only(engine: Engine, changes: dict, reason: str) -> None:
    probe = probe_speculative(engine, PROMPTS, GenerationConfig(max_new_tokens=3, **{"loops": 8, **changes}))
    assert [run.speculative for run in probe.runs] == [None] and reason in probe.reason
    assert probe.describe().startswith("speculative auto: plain decoding (")


def test_the_notice_appears_only_when_plain_decoding_is_faster(engine: Engine) -> None:
    config = GenerationConfig(max_new_tokens=4, loops=8, speculative=(1, 4))
    result = engine.generate(PROMPTS, config)
    slow = dataclasses.replace(result, seconds=1e9, acceptance_rate=0.25)  # a speculative run slower than anything
    notice = slower_than_plain(engine, PROMPTS, config, slow)
    assert notice is not None and "25% of the drafts accepted" in notice and "--speculative auto" in notice
    fast = dataclasses.replace(result, seconds=1e-9)
    assert slower_than_plain(engine, PROMPTS, config, fast) is None
    assert isinstance(fast, GenerationResult)
