"""Depth evaluation: equal to separate forward calls, ignored labels, mode restored, the diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from loopformer.errors import InputError
from loopformer.evaluation.perplexity import (
    DepthResult,
    evaluate_loops,
    format_loops_table,
    relative_change,
    token_correlation,
)
from loopformer.model import build_model
from support import small_config


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor


def make_batches(vocab: int, count: int = 2, batch: int = 2, seq: int = 12) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        labels = ids.clone()
        labels[0, 3:6] = -100  # ignored targets
        batches.append(Batch(ids, labels))
    return batches


def reference(model: torch.nn.Module, batches: list[Batch], depth: int, seed: int) -> tuple[float, float, int]:
    """Loss and mean state change from separate forward calls and a hand-written shifted cross-entropy."""
    total, count, changes = 0.0, 0, []
    with torch.no_grad():
        for b in batches:
            out = model(b.input_ids, loops=depth, seed=seed, return_states=True)
            logits, targets = out.logits[:, :-1], b.labels[:, 1:]
            keep = targets != -100
            log_probs = F.log_softmax(logits.float(), dim=-1)
            nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            total += float(nll[keep].sum())
            count += int(keep.sum())
            e = model.embed(b.input_ids, model.context(b.input_ids))
            initial = model.init_state(e, torch.Generator().manual_seed(seed))
            previous = out.states[-2] if depth > 1 else initial
            changes.append(float((out.state - previous).norm() / out.state.norm()))
    return total / count, sum(changes) / len(changes), count


@pytest.mark.parametrize("injection", ["concat", "lti"])
def test_matches_separate_forward_calls(injection: str) -> None:
    config = small_config(injection=injection)
    model = build_model(config, seed=0)
    batches = make_batches(config.vocab_size)
    depths = [3, 1, 5, 2]
    results = evaluate_loops(model, batches, depths, seed=7)
    assert [r.loops for r in results] == depths
    for result in results:
        loss, change, count = reference(model, batches, result.loops, seed=7)
        assert result.tokens == count == 2 * (2 * 11 - 3)
        assert result.loss == pytest.approx(loss, abs=1e-5)
        assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
        assert result.state_change == pytest.approx(change, abs=1e-5)
        assert -1 <= result.token_correlation <= 1


def test_decoded_logits_equal_forward_logits() -> None:
    """The shortcut itself: decoding states[r - 1] of a deeper run gives forward's logits at depth r."""
    config = small_config()
    model = build_model(config, seed=0).eval()
    ids = make_batches(config.vocab_size, count=1)[0].input_ids
    with torch.no_grad():
        deep = model(ids, loops=4, seed=3, return_states=True)
        ctx = model.context(ids)
        for r in range(1, 5):
            torch.testing.assert_close(model.decode(deep.states[r - 1], ctx), model(ids, loops=r, seed=3).logits)


def test_ignored_labels_do_not_count() -> None:
    config = small_config(state_init="zero")  # a random initial state would differ between batch shapes
    model = build_model(config, seed=0)
    batches = make_batches(config.vocab_size, count=1)
    ids, labels = batches[0].input_ids, batches[0].labels.clone()
    labels[1] = -100  # the second row scores nothing: the loss is the first row's alone
    both = evaluate_loops(model, [Batch(ids, labels)], [2])[0]
    first = evaluate_loops(model, [Batch(ids[:1], labels[:1])], [2])[0]
    assert both.tokens == first.tokens == 11 - 3
    assert both.loss == pytest.approx(first.loss, abs=1e-5)
    changed = Batch(ids, labels)
    everything_ignored = Batch(changed.input_ids, torch.full_like(changed.labels, -100))
    with pytest.raises(InputError, match="no scored tokens"):
        evaluate_loops(model, [everything_ignored], [1])


def test_mode_restored_and_seed_matters() -> None:
    config = small_config()
    model = build_model(config, seed=0).train()
    batches = make_batches(config.vocab_size, count=1)
    first = evaluate_loops(model, batches, [2], seed=0)
    assert model.training
    model.eval()
    again = evaluate_loops(model, batches, [2], seed=0)
    other_seed = evaluate_loops(model, batches, [2], seed=1)
    assert not model.training
    assert first == again
    assert other_seed[0].loss != first[0].loss


def test_forward_kwargs_reach_the_forward_call_and_the_decoded_depths() -> None:
    config = small_config()
    model = build_model(config, seed=0)
    batches = make_batches(config.vocab_size, count=1)
    t = batches[0].input_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    plain = evaluate_loops(model, batches, [1, 3])
    same = evaluate_loops(model, batches, [1, 3], forward_kwargs=lambda b: {"attention_mask": causal})
    for a, b in zip(plain, same, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-6)
    diagonal = torch.eye(t, dtype=torch.bool)[None, None]  # every token sees only itself
    isolated = evaluate_loops(model, batches, [1, 3], forward_kwargs=lambda b: {"attention_mask": diagonal})
    assert isolated[1].loss != pytest.approx(plain[1].loss, abs=1e-4)
    # the decoded depth (1) uses the same mask as the forward call (3): compare with a direct call
    with torch.no_grad():
        out = model(batches[0].input_ids, loops=1, seed=0, attention_mask=diagonal)
    targets = batches[0].labels[:, 1:]
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert isolated[0].loss == pytest.approx(float(loss), abs=1e-5)


def test_bad_arguments() -> None:
    model = build_model(small_config(), seed=0)
    batches = make_batches(64, count=1)
    with pytest.raises(InputError, match="depths"):
        evaluate_loops(model, batches, [0])
    with pytest.raises(InputError, match="at least one depth"):
        evaluate_loops(model, batches, [])
    with pytest.raises(InputError, match="no batches"):
        evaluate_loops(model, [], [1])


def test_token_correlation() -> None:
    one = torch.randn(1, 1, 16)
    collapsed = one.expand(3, 10, 16) * torch.rand(3, 10, 1).add(0.5)  # same direction, different lengths
    assert token_correlation(collapsed) == pytest.approx(1.0, abs=1e-6)
    random = torch.randn(4, 32, 4096)
    assert abs(token_correlation(random)) < 0.01
    opposite = torch.stack([one[0, 0], -one[0, 0]])[None]
    assert token_correlation(opposite) == pytest.approx(-1.0, abs=1e-6)
    assert math.isnan(token_correlation(torch.randn(2, 1, 8)))
    # equal to the mean off-diagonal entry of the cosine-similarity matrix
    state = torch.randn(2, 5, 8)
    units = F.normalize(state, dim=-1)
    gram = units @ units.transpose(1, 2)
    off = gram[:, ~torch.eye(5, dtype=torch.bool)].mean()
    assert token_correlation(state) == pytest.approx(float(off), abs=1e-6)


def test_relative_change() -> None:
    new = torch.tensor([[3.0, 4.0]])
    assert relative_change(new, new) == 0.0
    assert relative_change(new, torch.zeros(1, 2)) == pytest.approx(1.0)
    assert relative_change(new, torch.tensor([[3.0, 3.0]])) == pytest.approx(0.2)


def test_format_loops_table() -> None:
    results = [
        DepthResult(loops=1, loss=4.1234, perplexity=61.77, state_change=0.5, token_correlation=0.25, tokens=10),
        DepthResult(loops=16, loss=2.5, perplexity=12.18, state_change=1.5e-3, token_correlation=0.875, tokens=10),
    ]
    table = format_loops_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["loops", "loss", "ppl", "state", "change", "token", "corr."]
    assert len(lines) == 4
    for text in ("4.1234", "61.77", "5.00e-01", "0.25", "16", "2.5", "12.18", "1.50e-03", "0.875"):
        assert text in table


def test_deepest_depth_runs_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_config()
    model = build_model(config, seed=0)
    calls = {"n": 0}
    real_step = model.step

    def counting_step(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(model, "step", counting_step)
    evaluate_loops(model, make_batches(config.vocab_size, count=2), [1, 2, 3, 4, 5, 6])
    assert calls["n"] == 2 * 6  # not 2 * (1 + 2 + ... + 6)


def test_autocast_close_to_fp32() -> None:
    config = small_config()
    model = build_model(config, seed=0)
    batches = make_batches(config.vocab_size, count=1)
    full = evaluate_loops(model, batches, [1, 3])
    half = evaluate_loops(model, batches, [1, 3], autocast_dtype=torch.bfloat16)
    for a, b in zip(full, half, strict=True):
        assert math.isfinite(b.loss) and b.loss == pytest.approx(a.loss, abs=0.05)
