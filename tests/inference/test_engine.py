"""Inference engine: cached decoding equals the full forward, batching equals single rows, exits, warm start,
stop conditions, streaming, sampling and input errors."""

from __future__ import annotations

import pytest
import torch

from loopformer.errors import InputError
from loopformer.inference.cache import cache_bytes
from loopformer.inference.engine import Engine, GenerationConfig, Session
from loopformer.inference.exits import ExitRule
from loopformer.inference.sampling import SamplingConfig
from loopformer.model import LoopLM, build_model
from loopformer.tokenizer import TextTokenizer
from support import generate_with_and_without_compaction, small_config

# prompts of different lengths (a batch of them is left-padded)
PROMPTS = [[5, 17, 3, 42, 8, 11], [9, 2], [33, 7, 21, 60], [14]]
ATTENTION = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "window": {"sliding_window": 3},
    "qk": {"qk_norm": True, "qk_bias": True},
}


def make_model(seed: int = 0, **changes: object) -> LoopLM:
    """A tiny untied model (a tied random model tends to repeat its input token)."""
    model = build_model(small_config(**{"tie_embeddings": False, **changes}), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.layers():
            if layer.attn.q_bias is not None:  # zero at init: give the biases something to do
                layer.attn.q_bias.copy_(0.5 * torch.randn(layer.attn.q_bias.shape, generator=generator))
                layer.attn.k_bias.copy_(0.5 * torch.randn(layer.attn.k_bias.shape, generator=generator))
    return model.eval()


def forward_log_probs(model: LoopLM, engine: Engine, ids: torch.Tensor, loops: int) -> torch.Tensor:
    """Log-probabilities of each next token from one full forward pass with the engine's initial states."""
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    with torch.no_grad():
        out = model(ids, loops=loops, initial_state=engine.initial_state(positions))
    return torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]


# ----- cached decoding == the full forward -------------------------------------------------------------
@pytest.mark.parametrize("state_init", ["zero", "like-init"])
@pytest.mark.parametrize("loops", [1, 4, 32])
@pytest.mark.parametrize("attention", list(ATTENTION))
@pytest.mark.parametrize("injection", ["concat", "add", "lti"])
def test_score_matches_the_full_forward(injection: str, attention: str, loops: int, state_init: str) -> None:
    model = make_model(injection=injection, state_init=state_init, **ATTENTION[attention])
    engine = Engine(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(loops))
    log_probs, steps, _ = engine.score(ids, GenerationConfig(loops=loops))
    assert log_probs.shape == (2, 7) and steps.shape == (2, 7)
    assert (steps == loops).all()
    expected = forward_log_probs(model, engine, ids, loops)
    torch.testing.assert_close(log_probs, expected, atol=1e-4, rtol=0)
    # the seeded start really is a random table (not zeros)
    start = engine.initial_state(torch.arange(8)[None])
    assert bool((start == 0).all()) == (state_init == "zero")


@pytest.mark.parametrize("kv", ["ring:4", "last", "ring:1"])
def test_score_with_shared_slots_is_exact_for_one_iteration(kv: str) -> None:
    model = make_model(sliding_window=4)
    engine = Engine(model)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    log_probs, _, _ = engine.score(ids, GenerationConfig(loops=1, kv=kv))
    torch.testing.assert_close(log_probs, forward_log_probs(model, engine, ids, 1), atol=1e-4, rtol=0)


def test_a_ring_as_deep_as_the_loops_is_exact_and_a_shorter_one_is_not() -> None:
    model = make_model()
    engine = Engine(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    expected = forward_log_probs(model, engine, ids, 5)
    ring5, _, _ = engine.score(ids, GenerationConfig(loops=5, kv="ring:5"))
    torch.testing.assert_close(ring5, expected, atol=1e-4, rtol=0)
    ring2, _, _ = engine.score(ids, GenerationConfig(loops=5, kv="ring:2"))
    last, _, _ = engine.score(ids, GenerationConfig(loops=5, kv="last"))
    assert (ring2 - expected).abs().max() > 1e-3  # sharing slots is an approximation at this depth
    assert (last - expected).abs().max() > 1e-3


@pytest.mark.parametrize(("kv", "loops"), [("full", 5), ("ring:5", 5), ("ring:8", 3), ("ring:3", 1), ("last", 1)])
@pytest.mark.parametrize("attention", ["mha", "window", "gqa"])
def test_left_padded_prefill_then_decode_matches_the_forward(kv: str, loops: int, attention: str) -> None:
    model = make_model(**ATTENTION[attention])
    engine = Engine(model)
    prompts = PROMPTS[:3]
    continuation = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(7))
    ids, real = engine.prepare(prompts)
    assert ids.shape == (3, 6) and real.sum(dim=1).tolist() == [6, 2, 4]
    rows = torch.arange(3)
    with torch.inference_mode():
        session = Session(engine.passes, ids, real, GenerationConfig(max_new_tokens=6, loops=loops, kv=kv))
        logits = [session.logits.clone()]
        for t in range(5):
            session.feed(rows, continuation[:, t])
            logits.append(session.logits.clone())
    got = torch.stack(logits, dim=1)  # [3, 6, V]: after the prompt, then after each continuation token
    for b, prompt in enumerate(prompts):
        full = torch.tensor([prompt + continuation[b].tolist()])
        positions = torch.arange(full.shape[1])[None]
        with torch.no_grad():
            out = model(full, loops=loops, initial_state=engine.initial_state(positions))
        torch.testing.assert_close(got[b], out.logits[0, len(prompt) - 1 :], atol=1e-4, rtol=0)


def test_initial_state_is_a_fixed_function_of_position() -> None:
    engine = Engine(make_model())
    positions = torch.tensor([[0, 1, 2], [2, 1, 0]])
    states = engine.initial_state(positions)
    assert states.shape == (2, 3, 32)
    torch.testing.assert_close(states[0], states[1].flip(0), rtol=0, atol=0)
    assert not torch.equal(states[0, 0], states[0, 1])
    assert torch.equal(engine.initial_state(positions, seed=0), Engine(make_model(seed=3)).initial_state(positions))
    assert not torch.equal(engine.initial_state(positions, seed=1), states)
    std = make_model().config.state_init_std
    assert states.abs().max() <= 3 * std  # truncated at three standard deviations
    assert (Engine(make_model(state_init="zero")).initial_state(positions) == 0).all()


# ----- batching ----------------------------------------------------------------------------------------
LATENT = ExitRule("latent-diff", 0.3)
# name: (model changes, generation config)
BATCH_CASES: dict[str, tuple[dict, dict]] = {
    "plain": ({}, {"loops": 4}),
    "deep": ({}, {"loops": 12}),
    "exit": ({}, {"loops": 8, "exit": LATENT}),
    "exit-check-every": ({}, {"loops": 9, "exit": ExitRule("kl", 0.01, min_loops=3, check_every=2)}),
    "exit-masked": ({}, {"loops": 8, "exit": LATENT, "compaction": False}),
    "exit-gqa": ({"n_kv_heads": 2}, {"loops": 8, "exit": LATENT}),
    "exit-window": ({"sliding_window": 4}, {"loops": 8, "exit": LATENT}),
    "warm-start": ({}, {"loops": 4, "warm_start": True}),
    "warm-start-exit": ({}, {"loops": 8, "warm_start": True, "exit": LATENT}),
    "ring": ({}, {"loops": 5, "kv": "ring:2"}),
    "ring-exit": ({}, {"loops": 6, "kv": "ring:2", "exit": LATENT}),
    "last-window": ({"sliding_window": 4}, {"loops": 3, "kv": "last"}),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batch_with_left_padding_equals_each_prompt_alone(case: str) -> None:
    changes, kwargs = BATCH_CASES[case]
    engine = Engine(make_model(**changes))
    config = GenerationConfig(max_new_tokens=10, **kwargs)
    batch = engine.generate(PROMPTS, config)
    assert len(batch.outputs) == len(PROMPTS)
    for prompt, output in zip(PROMPTS, batch.outputs, strict=True):
        alone = engine.generate([prompt], config).outputs[0]
        assert output.tokens == alone.tokens
        assert output.loops == alone.loops
        assert output.finish_reason == alone.finish_reason == "length"
        assert len(output.tokens) == 10
    if config.exit is not None:  # the rows really exited at different depths
        assert len({s for o in batch.outputs for s in o.loops}) > 2


def test_equal_length_tensor_prompts_equal_id_lists() -> None:
    engine = Engine(make_model())
    prompts = [[3, 4, 5, 6], [7, 8, 9, 10]]
    config = GenerationConfig(max_new_tokens=6, loops=3)
    from_lists = engine.generate(prompts, config)
    from_tensor = engine.generate(torch.tensor(prompts), config)
    assert [o.tokens for o in from_tensor.outputs] == [o.tokens for o in from_lists.outputs]


def test_left_padded_tensor_prompt_equals_the_unpadded_prompts() -> None:
    """A padded [B, T] tensor with its attention mask: the padding does not count as prompt tokens."""
    tokenizer = TextTokenizer.byte_level()
    engine = Engine(make_model(vocab_size=270), tokenizer)
    prompts = [[20, 21, 22, 23], [30, 31]]
    pad = tokenizer.pad_id
    padded = torch.tensor([[20, 21, 22, 23], [pad, pad, 30, 31]])
    config = GenerationConfig(max_new_tokens=8, loops=3, stop_tokens=())
    from_lists = engine.generate(prompts, config)
    from_tensor = engine.generate(padded, config, attention_mask=padded != pad)
    assert [o.tokens for o in from_tensor.outputs] == [o.tokens for o in from_lists.outputs]
    right_padded = torch.tensor([[20, 21, 22, 23], [30, 31, pad, pad]])
    from_right = engine.generate(right_padded, config, attention_mask=right_padded != pad)
    assert [o.tokens for o in from_right.outputs] == [o.tokens for o in from_lists.outputs]


def test_result_reports_the_cache_size() -> None:
    model = make_model()
    engine = Engine(model)
    sizes = {}
    for kv in ("full", "ring:2", "last"):
        result = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=5, loops=6, kv=kv))
        # capacity: the padded prompt width plus room for every new token
        assert result.cache_bytes == cache_bytes(model.config, kv, 6 + 5, 6, batch_size=len(PROMPTS))
        assert result.seconds >= 0 and result.acceptance_rate is None
        assert result.new_tokens == 5 * len(PROMPTS) and result.mean_loops == 6
        sizes[kv] = result.cache_bytes
    assert sizes["full"] > sizes["ring:2"] > sizes["last"]


# ----- exits -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "loops", "allowed"),
    [
        (ExitRule("latent-diff", 0.3), 8, set(range(1, 9))),
        (ExitRule("latent-diff", 0.5, min_loops=3, check_every=2), 9, {4, 6, 8, 9}),
        (ExitRule("kl", 0.01, min_loops=2), 7, set(range(2, 8))),
        (ExitRule("argmax-stability", 1, check_every=3), 10, {3, 6, 9, 10}),
        (ExitRule("cosine", 0.02, min_loops=4), 8, set(range(4, 9))),
    ],
)
def test_exit_steps_respect_the_rule(rule: ExitRule, loops: int, allowed: set[int]) -> None:
    engine = Engine(make_model())
    result = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=12, loops=loops, exit=rule))
    steps = [s for o in result.outputs for s in o.loops]
    for output in result.outputs:
        assert len(output.loops) == len(output.tokens) == 12
        assert output.loops[0] == loops  # the first token comes from the prefill, at the full depth
        assert set(output.loops) <= allowed
    assert len(set(steps)) > 1 and min(steps) < loops  # some tokens exited early
    assert result.mean_loops == pytest.approx(sum(steps) / len(steps))


@pytest.mark.parametrize("rule", [ExitRule("kl", 0.0), ExitRule("latent-diff", 0.0), ExitRule("cosine", 0.0)])
def test_threshold_zero_never_exits(rule: ExitRule) -> None:
    engine = Engine(make_model())
    config = GenerationConfig(max_new_tokens=6, loops=5, exit=rule)
    result = engine.generate(PROMPTS, config)
    assert all(s == 5 for o in result.outputs for s in o.loops)
    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=6, loops=5))
    assert [o.tokens for o in result.outputs] == [o.tokens for o in plain.outputs]


def test_exit_max_steps_sets_the_default_depth() -> None:
    engine = Engine(make_model())
    config = GenerationConfig(max_new_tokens=6, exit=ExitRule("kl", 0.0, max_loops=5))
    result = engine.generate(PROMPTS, config)
    assert all(s == 5 for o in result.outputs for s in o.loops)
    assert engine.resolve_loops(GenerationConfig()) == 3  # the model's mean_loops


@pytest.mark.parametrize("rule", [LATENT, ExitRule("kl", 0.01, min_loops=2), ExitRule("argmax-stability", 1)])
def test_compaction_changes_nothing_but_the_work(rule: ExitRule) -> None:
    model = make_model()
    engine = Engine(model)
    results, rows = generate_with_and_without_compaction(
        engine, PROMPTS, GenerationConfig(max_new_tokens=10, loops=8, exit=rule)
    )
    compact, masked = results[True].outputs, results[False].outputs
    assert [o.tokens for o in compact] == [o.tokens for o in masked]
    assert [o.loops for o in compact] == [o.loops for o in masked]
    # rows exited at different depths within a pass, so removing them saved work
    assert any(len({o.loops[t] for o in compact}) > 1 for t in range(1, 10))
    assert rows[True] < rows[False]
    # masking runs every row to the deepest exit of its pass: count that exactly
    prefill = len(PROMPTS) * 8
    deepest = sum(max(o.loops[t] for o in compact) for t in range(1, 10))
    assert rows[False] == model.config.n_core * (prefill + len(PROMPTS) * deepest)
    exact = sum(
        sum(sum(1 for o in compact if o.loops[t] > i) for i in range(max(o.loops[t] for o in compact)))
        for t in range(1, 10)
    )
    assert rows[True] == model.config.n_core * (prefill + exact)


@pytest.mark.parametrize("kv", ["ring:2", "last"])
def test_compaction_off_matches_compaction_with_shared_slots(kv: str) -> None:
    """compaction=False exists to measure what compaction saves, so it must compute the same thing. Masked rows
    that exited keep iterating and overwrite their shared (ring / last) slot with entries past their exit."""
    engine = Engine(make_model())
    outputs = {}
    for compaction in (True, False):
        config = GenerationConfig(
            max_new_tokens=10, loops=8, kv=kv, exit=ExitRule("argmax-stability", 1), compaction=compaction
        )
        outputs[compaction] = engine.generate(PROMPTS, config).outputs
    assert [o.tokens for o in outputs[False]] == [o.tokens for o in outputs[True]]
    assert [o.loops for o in outputs[False]] == [o.loops for o in outputs[True]]


def test_score_reports_the_steps_of_each_token() -> None:
    engine = Engine(make_model())
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(8))
    rule = ExitRule("latent-diff", 0.3)
    log_probs, steps, _ = engine.score(ids, GenerationConfig(loops=8, exit=rule))
    assert log_probs.shape == (3, 9) and bool((log_probs <= 0).all())
    assert (steps[:, 0] == 8).all() and bool((steps >= 1).all() and (steps <= 8).all())
    assert bool((steps[:, 1:] < 8).any())
    # each row scored alone gives the same numbers (rows do not interact)
    for b in range(3):
        alone_lp, alone_steps, _ = engine.score(ids[b : b + 1], GenerationConfig(loops=8, exit=rule))
        assert alone_steps[0].tolist() == steps[b].tolist()
        torch.testing.assert_close(alone_lp[0], log_probs[b], atol=1e-5, rtol=0)


def test_score_predictions_reproduce_greedy_decoding() -> None:
    engine = Engine(make_model())
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    generated = engine.generate(prompt, GenerationConfig(max_new_tokens=6, loops=5, stop_tokens=()))
    ids = torch.cat((prompt, torch.tensor([generated.outputs[0].tokens])), dim=1)
    _, steps, predictions = engine.score(ids, GenerationConfig(loops=5))
    assert predictions[0, 5:].tolist() == generated.outputs[0].tokens
    assert steps.shape == predictions.shape and bool((steps == 5).all())


# ----- warm start --------------------------------------------------------------------------------------
def record_passes(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> list[dict[str, torch.Tensor]]:
    """Per pass: its rows and positions, the state its first iteration started from and the final states."""
    passes: list[dict[str, torch.Tensor]] = []
    model = engine.model
    original_step, original_pass = model.step, engine.passes.run

    def step(state, e, index, ctx):
        if index == 0:
            passes.append({"first": state.clone()})
        return original_step(state, e, index, ctx)

    def run_pass(cache, rows, ids, positions, **options):
        result = original_pass(cache, rows, ids, positions, **options)
        passes[-1].update(rows=rows.clone(), positions=positions.clone(), final=result.state.clone())
        return result

    monkeypatch.setattr(model, "step", step)
    monkeypatch.setattr(engine.passes, "run", run_pass)
    return passes


@pytest.mark.parametrize("rule", [None, LATENT])
@pytest.mark.parametrize("warm", [True, False])
def test_warm_start_starts_from_the_previous_final_state(
    monkeypatch: pytest.MonkeyPatch, warm: bool, rule: ExitRule | None
) -> None:
    engine = Engine(make_model())
    passes = record_passes(monkeypatch, engine)
    config = GenerationConfig(max_new_tokens=6, loops=6, warm_start=warm, exit=rule, stop_tokens=(0, 1))
    result = engine.generate(PROMPTS, config)
    # a prefill, then one pass per token that did not end its row (a stop token comes from the last pass)
    fed = [len(o.tokens) - (o.finish_reason == "length") for o in result.outputs]
    assert len(passes) == 1 + max(fed)
    latest: dict[int, torch.Tensor] = {}
    for index, record in enumerate(passes):
        rows = record["rows"].tolist()
        if index == 0:
            assert record["first"].shape[1] == max(len(p) for p in PROMPTS)
        else:
            assert record["first"].shape == (len(rows), 1, 32)
        fresh = engine.initial_state(record["positions"])
        if warm and index > 0:
            expected = torch.stack([latest[row] for row in rows])[:, None]
            assert not torch.equal(expected, fresh)
        else:
            expected = fresh
        torch.testing.assert_close(record["first"], expected, rtol=0, atol=0)
        for j, row in enumerate(rows):
            latest[row] = record["final"][j, -1]


def test_warm_start_changes_the_output() -> None:
    engine = Engine(make_model())
    cold = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=12, loops=3))
    warm = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=12, loops=3, warm_start=True))
    assert [o.tokens for o in cold.outputs] != [o.tokens for o in warm.outputs]


# ----- stopping ----------------------------------------------------------------------------------------
def test_stop_tokens_end_a_row_without_the_token() -> None:
    engine = Engine(make_model())
    config = GenerationConfig(max_new_tokens=16, loops=3)
    free = engine.generate(PROMPTS, config).outputs
    # for rows 0 and 2: the first token that is new at index >= 2 becomes a stop token
    cuts = {}
    for b in (0, 2):
        tokens = free[b].tokens
        cuts[b] = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    stops = tuple(free[b].tokens[cuts[b]] for b in cuts)
    stopped = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=16, loops=3, stop_tokens=stops)).outputs
    for b, output in enumerate(stopped):
        first = next((i for i, t in enumerate(free[b].tokens) if t in stops), None)
        if first is None:
            assert output.tokens == free[b].tokens and output.finish_reason == "length"
        else:
            assert output.tokens == free[b].tokens[:first]
            assert output.loops == free[b].loops[:first]
            assert output.finish_reason == "stop"
    assert all(stopped[b].finish_reason == "stop" for b in cuts)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_max_new_tokens_ends_with_length(max_new_tokens: int) -> None:
    engine = Engine(make_model())
    result = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=max_new_tokens, loops=2))
    longer = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=max_new_tokens + 3, loops=2))
    for output, reference in zip(result.outputs, longer.outputs, strict=True):
        assert len(output.tokens) == max_new_tokens and output.finish_reason == "length"
        assert output.tokens == reference.tokens[:max_new_tokens]
        assert all(0 <= t < 64 for t in output.tokens)


def test_the_context_limit_ends_a_row() -> None:
    engine = Engine(make_model(max_seq_len=12))
    prompts = [list(range(1, 10)), [1, 2, 3], list(range(20, 32))]
    result = engine.generate(prompts, GenerationConfig(max_new_tokens=20, loops=2))
    assert [len(o.tokens) for o in result.outputs] == [3, 9, 1]  # up to 12 tokens in all (a full prompt: one)
    assert all(o.finish_reason == "length" for o in result.outputs)
    for prompt, output in zip(prompts, result.outputs, strict=True):
        assert (
            engine.generate([prompt], GenerationConfig(max_new_tokens=20, loops=2)).outputs[0].tokens == output.tokens
        )


@pytest.fixture(scope="module")
def byte_engine() -> Engine:
    return Engine(make_model(vocab_size=270, seed=1), TextTokenizer.byte_level())


def test_stop_strings_cut_the_text(byte_engine: Engine) -> None:
    tokenizer = byte_engine.tokenizer
    prompts = ["Hello", "ab"]
    config = GenerationConfig(max_new_tokens=24, loops=2, stop_tokens=())
    free = byte_engine.generate(prompts, config).outputs
    for output in free:
        assert output.text == tokenizer.decode(output.tokens)  # everything is flushed at the end
    # a character that first occurs after the start of row 0's text becomes the stop string
    text = free[0].text
    index = next(i for i in range(1, len(text)) if text[i] not in text[:i] and text[i] != "\ufffd")
    stop = text[index]
    stopped = byte_engine.generate(
        prompts, GenerationConfig(max_new_tokens=24, loops=2, stop_tokens=(), stop_strings=(stop,))
    ).outputs
    for output, reference in zip(stopped, free, strict=True):
        if stop in reference.text:
            assert output.finish_reason == "stop"
            assert output.text == reference.text[: reference.text.index(stop)]
            assert output.tokens == reference.tokens[: len(output.tokens)]
            assert stop in tokenizer.decode(output.tokens)  # the tokens include the one that completed it
        else:
            assert output.text == reference.text and output.finish_reason == "length"
    assert stopped[0].finish_reason == "stop" and len(stopped[0].tokens) < 24


def test_eos_is_the_default_stop_token() -> None:
    tokenizer = TextTokenizer.byte_level()
    engine = Engine(make_model(vocab_size=270, seed=1), tokenizer)
    config = GenerationConfig(max_new_tokens=12, loops=2, stop_tokens=())
    free = engine.generate(["Hi"], config).outputs[0]
    # swap the head rows of eos and the fourth generated token: eos now wins exactly where that token did
    favourite = free.tokens[3]
    first = free.tokens.index(favourite)
    assert tokenizer.eos_id not in free.tokens[: first + 1]
    with torch.no_grad():
        weight = engine.model.head.weight
        weight[[tokenizer.eos_id, favourite]] = weight[[favourite, tokenizer.eos_id]].clone()
    forced = engine.generate(["Hi"], config).outputs[0]
    assert forced.tokens[: first + 1] == [*free.tokens[:first], tokenizer.eos_id]
    default = engine.generate(["Hi"], GenerationConfig(max_new_tokens=12, loops=2)).outputs[0]
    assert default.tokens == free.tokens[:first] and default.finish_reason == "stop"
    assert default.text == tokenizer.decode(free.tokens[:first])


@pytest.mark.parametrize("stop_strings", [(), ("e",), ("zz", "\n")])
def test_stream_matches_generate(byte_engine: Engine, stop_strings: tuple[str, ...]) -> None:
    prompts = ["The loop", "x", "A longer prompt here"]
    config = GenerationConfig(max_new_tokens=16, loops=2, stop_tokens=(), stop_strings=stop_strings)
    result = byte_engine.generate(prompts, config)
    stream = byte_engine.stream(prompts, config)
    events = list(stream)
    assert stream.result is not None
    for b, output in enumerate(result.outputs):
        mine = [e for e in events if e.row == b]
        assert "".join(e.text for e in mine) == output.text == stream.result.outputs[b].text
        assert [e.token for e in mine if e.token is not None] == output.tokens
        assert [e.loops for e in mine if e.token is not None] == output.loops
        assert all(e.loops == 0 for e in mine if e.token is None)  # a held-back tail carries no token
    assert [o.tokens for o in stream.result.outputs] == [o.tokens for o in result.outputs]


def test_stream_yields_tokens_as_they_come() -> None:
    engine = Engine(make_model())
    stream = engine.stream(PROMPTS, GenerationConfig(max_new_tokens=5, loops=2))
    iterator = iter(stream)
    first = [next(iterator) for _ in range(len(PROMPTS))]
    assert stream.result is None  # nothing is summarised before the end
    assert sorted(e.row for e in first) == list(range(len(PROMPTS)))
    rest = list(iterator)
    assert len(first) + len(rest) == 5 * len(PROMPTS) and stream.result.new_tokens == 5 * len(PROMPTS)
    assert all(e.text == "" for e in first + rest)  # no tokenizer, no text


# ----- sampling ----------------------------------------------------------------------------------------
def test_sampling_with_a_seed_is_reproducible() -> None:
    engine = Engine(make_model())
    sampling = SamplingConfig(temperature=1.0, top_k=20, seed=11)
    config = GenerationConfig(max_new_tokens=16, loops=3, sampling=sampling)
    first = [o.tokens for o in engine.generate(PROMPTS, config).outputs]
    again = [o.tokens for o in engine.generate(PROMPTS, config).outputs]
    assert first == again
    other = GenerationConfig(max_new_tokens=16, loops=3, sampling=SamplingConfig(temperature=1.0, top_k=20, seed=12))
    assert [o.tokens for o in engine.generate(PROMPTS, other).outputs] != first
    greedy = [o.tokens for o in engine.generate(PROMPTS, GenerationConfig(max_new_tokens=16, loops=3)).outputs]
    assert greedy != first
    assert all(0 <= t < 64 for row in first for t in row)


def test_top_k_one_is_greedy() -> None:
    engine = Engine(make_model())
    greedy = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=8, loops=3))
    top1 = engine.generate(
        PROMPTS, GenerationConfig(max_new_tokens=8, loops=3, sampling=SamplingConfig(temperature=2.0, top_k=1, seed=0))
    )
    assert [o.tokens for o in top1.outputs] == [o.tokens for o in greedy.outputs]


def test_repetition_penalty_reduces_repeats() -> None:
    engine = Engine(make_model(seed=2, tie_embeddings=True))
    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, loops=3)).outputs
    penalised = engine.generate(
        PROMPTS, GenerationConfig(max_new_tokens=20, loops=3, sampling=SamplingConfig(repetition_penalty=100.0))
    ).outputs

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    assert sum(repeats(o.tokens) for o in penalised) < sum(repeats(o.tokens) for o in plain)


# ----- input errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompts", "config", "fragment"),
    [
        ([[]], {}, "empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([], {}, "no prompts"),
        ([list(range(1, 40))], {}, "more than the context"),
        ([[1, 64]], {}, "outside the vocabulary"),
        ([[1, -1]], {}, "outside the vocabulary"),
        (torch.tensor([1, 2, 3]), {}, "shape"),
        ("some text", {}, "tokenizer"),
        ([[1, 2]], {"exit": "bogus"}, "unknown exit criterion"),
        ([[1, 2]], {"exit": "kl:abc"}, "not a number"),
        ([[1, 2]], {"kv": "ring"}, "KV slot policy"),
        ([[1, 2]], {"kv": "ring:0"}, "ring size"),
        ([[1, 2]], {"kv": "pyramid"}, "KV slot policy"),
        ([[1, 2]], {"loops": 0}, "loops"),
        ([[1, 2]], {"loops": -3}, "loops"),
        ([[1, 2]], {"loops": 2.5}, "loops"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1, 2]], {"speculative": (2, 3), "exit": "kl"}, "exit rule"),
        ([[1, 2]], {"speculative": (2, 3), "warm_start": True}, "warm start"),
        ([[1, 2]], {"speculative": (0, 3)}, "draft loops"),
        ([[1, 2]], {"speculative": (1, 0)}, "lookahead"),
        ([[1, 2]], {"speculative": (1,)}, "draft_loops, lookahead"),
        ([[1, 2]], {"stop_strings": ("x",)}, "tokenizer"),
        ([[1, 2]], {"sampling": {"temperature": 1.0}}, "SamplingConfig"),
    ],
)
def test_bad_input_raises_input_error(prompts: object, config: dict, fragment: str) -> None:
    engine = Engine(make_model(max_seq_len=32))
    with pytest.raises(InputError, match=fragment):
        engine.generate(prompts, GenerationConfig(**config))


def test_more_bad_input() -> None:
    engine = Engine(make_model())
    with pytest.raises(InputError, match="LoopLM"):
        Engine(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="seq >= 2"):
        engine.score(torch.tensor([[1]]))
    with pytest.raises(InputError, match="speculative"):
        engine.score(torch.tensor([[1, 2, 3]]), GenerationConfig(speculative=(1, 2)))
    with pytest.raises(InputError):  # drafting deeper than the verification does not fit a 'full' cache
        engine.generate([[1, 2]], GenerationConfig(loops=2, speculative=(3, 2)))
