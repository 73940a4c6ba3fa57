"""Multi-Latent Attention with the KV cache: only the latent and the shared RoPE key are stored, incremental
decoding (absorbed projections) equals the full forward, and batching, exits, compaction, the early-exit fallback
and rollback (speculative decoding) behave as with multi-head attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loopformer.cli import main
from loopformer.inference.cache import KVCache, cache_bytes, cache_entry, parse_slot_policy
from loopformer.inference.engine import Engine, GenerationConfig, Session
from loopformer.inference.exits import ExitRule
from loopformer.model import LoopLM, build_model
from loopformer.nn.mla import MLA
from support import small_config

SHORT = [[5, 17, 3, 42, 8, 11], [9, 2], [33, 7, 21, 60]]  # a prefill of <= 16 tokens: absorbed path
LONG = [[(7 * i + 3) % 64 for i in range(20)], [9, 2], [(5 * i + 1) % 64 for i in range(17)]]  # naive prefill
VARIANTS = {
    "plain": {},
    "low-rank-q-lora": {"mla_q_rank": 12, "lora_rank": 2},
    "window": {"sliding_window": 4, "mla_kv_rank": 4, "mla_rope_dim": 2},
}
LATENT = ExitRule("latent-diff", 0.3)


def make_model(seed: int = 0, **changes: object) -> LoopLM:
    """A tiny untied MLA model; per-loop LoRA adapters (when present) are given nonzero values."""
    config = small_config(**{"tie_embeddings": False, "attention": "mla", **changes})
    model = build_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each MLA attention path ran, counted in the query tokens it served."""
    counts = {"naive": 0, "absorbed": 0}
    for name in counts:
        original = getattr(MLA, name)

        def counted(self: MLA, q_c: torch.Tensor, *args: object, _name: str = name, _f=original, **kw: object):
            counts[_name] += q_c.shape[1]
            return _f(self, q_c, *args, **kw)

        monkeypatch.setattr(MLA, name, counted)
    return counts


# ----- what the cache stores ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["full", "ring:4", "last"])
def test_the_cache_stores_only_the_latent_and_the_rope_key(policy: str) -> None:
    config = small_config(attention="mla", mla_kv_rank=6, mla_rope_dim=2, n_core=3)
    cache = KVCache(config, 2, 11, policy, max_loops=5)
    slots = parse_slot_policy(policy).slots(5)
    latent, rope_key = cache.store["core"]
    assert latent.shape == (3, slots, 2, 1, 11, 6) and rope_key.shape == (3, slots, 2, 1, 11, 2)
    for role in ("prelude", "coda"):
        assert [t.shape for t in cache.store[role]] == [(1, 2, 1, 11, 6), (1, 2, 1, 11, 2)]
    assert cache_entry(config) == ((1, 6), (1, 2))
    layers = 1 + 1 + 3 * slots
    assert cache_bytes(config, policy, 11, 5, batch_size=2) == cache.nbytes() == layers * (6 + 2) * 4 * 11 * 2
    mha = small_config(n_core=3)  # the same width with 4 heads of 8: keys and values of every head
    assert cache_bytes(mha, policy, 11, 5, batch_size=2) == layers * 2 * 32 * 4 * 11 * 2
    cache.reserve(20)  # the transformers adapter's growth keeps the per-role widths
    assert cache.store["core"][0].shape[-2:] == (20, 6) and cache.nbytes() == cache_bytes(config, policy, 20, 5, 2)


def test_a_decode_step_writes_one_latent_and_one_rope_key_per_layer() -> None:
    model = make_model()
    engine = Engine(model)
    ids, real = engine.prepare([[4, 8, 15, 16]])
    with torch.inference_mode():
        session = Session(engine.passes, ids, real, GenerationConfig(max_new_tokens=2, loops=2))
        session.feed(torch.tensor([0]), torch.tensor([23]))
    latent, rope_key = session.cache.store["core"]
    written = latent[:, :, 0, 0, :5].abs().sum(-1) > 0  # [core layers, slots, columns]
    assert bool(written.all()) and not bool(latent[:, :, 0, 0, 5:].any())
    assert bool((rope_key[:, :, 0, 0, :5].abs().sum(-1) > 0).all())
    # what was cached is the normalised latent (unit RMS times the norm weight, which is one at init)
    rms = latent[0, 0, 0, 0, :5].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(5), atol=1e-4, rtol=0)


# ----- incremental decoding == the full forward --------------------------------------------------------
@pytest.mark.parametrize(("kv", "loops"), [("full", 1), ("ring:1", 1), ("last", 1), ("full", 4), ("ring:4", 4)])
@pytest.mark.parametrize("prompts", [SHORT, LONG], ids=["short", "long"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_decode_matches_the_forward(
    variant: str, prompts: list[list[int]], kv: str, loops: int, calls: dict[str, int]
) -> None:
    """A left-padded batch: prefill, then five tokens one at a time, against one full forward per row."""
    model = make_model(**VARIANTS[variant])
    engine = Engine(model)
    continuation = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(7))
    ids, real = engine.prepare(prompts)
    rows = torch.arange(3)
    with torch.inference_mode():
        session = Session(engine.passes, ids, real, GenerationConfig(max_new_tokens=6, loops=loops, kv=kv))
        logits = [session.logits.clone()]
        for t in range(5):
            session.feed(rows, continuation[:, t])
            logits.append(session.logits.clone())
    decoding = dict(calls)  # before the reference forwards below (which take the naive path)
    got = torch.stack(logits, dim=1)
    for b, prompt in enumerate(prompts):
        full = torch.tensor([prompt + continuation[b].tolist()])
        with torch.no_grad():
            out = model(full, loops=loops, initial_state=engine.initial_state(torch.arange(full.shape[1])[None]))
        torch.testing.assert_close(got[b], out.logits[0, len(prompt) - 1 :], atol=1e-4, rtol=0)
    # decoding ran on the absorbed path (every layer, every iteration, 5 tokens x 3 rows)
    layers = model.config.n_prelude + model.config.n_coda + model.config.n_core * loops
    prefill = layers * ids.shape[1]
    long_prefill = ids.shape[1] > 16
    assert decoding == {
        "naive": prefill if long_prefill else 0,
        "absorbed": layers * 5 + (0 if long_prefill else prefill),
    }


def test_shared_slots_are_an_approximation_beyond_one_iteration() -> None:
    """The exactness above is not vacuous: with 4 loops, ring:2 and last differ from the forward."""
    model = make_model()
    engine = Engine(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids, loops=4, initial_state=engine.initial_state(torch.arange(9).expand(2, 9)))
    expected = torch.log_softmax(out.logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    for kv, exact in (("full", True), ("ring:4", True), ("ring:2", False), ("last", False)):
        log_probs, _, _ = engine.score(ids, GenerationConfig(loops=4, kv=kv))
        assert ((log_probs - expected).abs().max() < 1e-4) == exact, kv


# ----- batching, exits, compaction, rollback -----------------------------------------------------------
BATCH_CASES: dict[str, tuple[dict, dict]] = {
    "plain": ({}, {"loops": 4}),
    "exit": ({}, {"loops": 8, "exit": LATENT}),
    "exit-lora": ({"lora_rank": 2, "mla_q_rank": 12}, {"loops": 8, "exit": LATENT}),
    "exit-masked": ({}, {"loops": 8, "exit": LATENT, "compaction": False}),
    "ring-exit": ({}, {"loops": 6, "kv": "ring:2", "exit": LATENT}),
    "last-window": ({"sliding_window": 4}, {"loops": 3, "kv": "last"}),
    "speculative": ({}, {"loops": 3, "speculative": (1, 3)}),
}


@pytest.mark.parametrize("case", list(BATCH_CASES))
def test_batch_with_left_padding_equals_each_prompt_alone(case: str) -> None:
    changes, kwargs = BATCH_CASES[case]
    engine = Engine(make_model(**changes))
    config = GenerationConfig(max_new_tokens=8, **kwargs)
    prompts = [*SHORT, [14]]
    batch = engine.generate(prompts, config)
    for prompt, output in zip(prompts, batch.outputs, strict=True):
        alone = engine.generate([prompt], config).outputs[0]
        assert (output.tokens, output.loops) == (alone.tokens, alone.loops)
        assert len(output.tokens) == 8
    if config.exit is not None:  # rows really exited at different depths, so the fallback was read
        assert len({s for o in batch.outputs for s in o.loops}) > 2


@pytest.mark.parametrize("kv", ["full", "ring:2", "last"])
def test_compaction_changes_nothing_but_the_work(kv: str) -> None:
    engine = Engine(make_model(mla_q_rank=12, lora_rank=2))
    outputs = {}
    for compaction in (True, False):
        config = GenerationConfig(
            max_new_tokens=10, loops=8, kv=kv, exit=ExitRule("argmax-stability", 1), compaction=compaction
        )
        outputs[compaction] = engine.generate(SHORT, config).outputs
    assert [o.tokens for o in outputs[False]] == [o.tokens for o in outputs[True]]
    assert [o.loops for o in outputs[False]] == [o.loops for o in outputs[True]]
    assert any(len({o.loops[t] for o in outputs[True]}) > 1 for t in range(1, 10))  # rows left the batch


@pytest.mark.parametrize(("kv", "loops"), [("full", 4), ("ring:3", 3)])
def test_greedy_speculative_equals_plain_greedy(kv: str, loops: int) -> None:
    """Verification passes roll rejected tokens back (a length change): the output is plain greedy decoding's."""
    engine = Engine(make_model())
    plain = engine.generate(SHORT, GenerationConfig(max_new_tokens=11, loops=loops, kv=kv))
    fast = engine.generate(SHORT, GenerationConfig(max_new_tokens=11, loops=loops, kv=kv, speculative=(1, 3)))
    assert [o.tokens for o in fast.outputs] == [o.tokens for o in plain.outputs]
    assert fast.acceptance_rate is not None and fast.acceptance_rate < 1.0  # something was rolled back


def test_fallback_reads_the_latest_latent_of_a_shallow_token() -> None:
    """A token that exited after 2 iterations gives its iteration-1 latent and RoPE key to a query at iteration 4."""
    config = small_config(attention="mla")
    cache = KVCache(config, 1, 4, "full", max_loops=6)
    generator = torch.Generator().manual_seed(0)
    for tensor in cache.store["core"]:
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    rows = torch.tensor([0])
    cache.begin(rows, torch.tensor([[0, 1]]))
    cache.commit(rows, torch.tensor([2]), torch.tensor([[6, 2]]))
    kv = cache.begin(rows, torch.tensor([[2]]))
    new_latent = torch.randn(1, 1, 1, config.mla_kv_rank, generator=generator)
    new_rope = torch.randn(1, 1, 1, config.mla_rope_dim, generator=generator)
    latent, rope_key = kv.exchange("core", 1, 4, new_latent, new_rope)
    assert latent.shape == (1, 1, 3, config.mla_kv_rank) and rope_key.shape == (1, 1, 3, config.mla_rope_dim)
    store_latent, store_rope = cache.store["core"]
    torch.testing.assert_close(latent[0, 0, 0], store_latent[1, 4, 0, 0, 0], rtol=0, atol=0)  # deep: its own
    torch.testing.assert_close(latent[0, 0, 1], store_latent[1, 1, 0, 0, 1], rtol=0, atol=0)  # shallow: iteration 1
    torch.testing.assert_close(rope_key[0, 0, 1], store_rope[1, 1, 0, 0, 1], rtol=0, atol=0)
    torch.testing.assert_close(latent[0, 0, 2], new_latent[0, 0, 0], rtol=0, atol=0)


# ----- kv-size -----------------------------------------------------------------------------------------
def test_kv_size_reports_an_mla_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = small_config(attention="mla", mla_kv_rank=6)
    path = tmp_path / "config.json"
    config.save(path)
    assert main(["kv-size", "--ckpt", str(path), "--tokens", "100", "--loops", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention"].startswith("MLA")
    per_token = {row["policy"]: row["bytes_per_token"] for row in report["rows"]}
    # prelude + coda + core x slots layers, each one latent (6) and one RoPE key (4) of fp32
    assert per_token == {"full": (2 + 2 * 8) * 10 * 4, "ring:4": (2 + 2 * 4) * 10 * 4, "last": (2 + 2) * 10 * 4}
    assert main(["kv-size", "--ckpt", str(path)]) == 0
    assert "attention: MLA latent 6 + RoPE key 4" in capsys.readouterr().out


def test_an_int8_quantized_mla_model_decodes_close_to_its_forward() -> None:
    """Absorbed decoding takes per-head views of the (dequantized) up-projection of a quantized model."""
    from loopformer.quant.model import quantize_model
    from loopformer.quant.scheme import QuantScheme

    model = make_model(dim=64, mlp_hidden=128, mla_q_rank=16, lora_rank=2)
    names = quantize_model(model, QuantScheme(8))
    assert "core.0.attn.kv_up.weight" in names
    engine = Engine(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    log_probs, _, _ = engine.score(ids, GenerationConfig(loops=3))
    with torch.no_grad():
        out = model(ids, loops=3, initial_state=engine.initial_state(torch.arange(9).expand(2, 9)))
    expected = torch.log_softmax(out.logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(log_probs, expected, atol=2e-2, rtol=0)
