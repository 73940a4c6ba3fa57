"""Sampling: config validation, the penalty and filters on hand examples, and the speculative acceptance rule."""

from __future__ import annotations

import math

import pytest
import torch

from loopformer.errors import InputError
from loopformer.inference.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    choose_tokens,
    greedy_accept,
    next_token_probs,
    speculative_accept,
)

# a hand-made distribution in shuffled order: id 1 (0.4) > id 3 (0.3) > id 0 (0.2) > id 2 (0.1)
PROBS = [0.2, 0.4, 0.1, 0.3]
LOGITS = torch.tensor([[math.log(p) for p in PROBS]])


def kept(config: SamplingConfig) -> tuple[set[int], torch.Tensor]:
    probs = next_token_probs(LOGITS, config)[0]
    return {i for i, p in enumerate(probs.tolist()) if p > 0}, probs


def renormalised(ids: set[int]) -> torch.Tensor:
    total = sum(PROBS[i] for i in ids)
    return torch.tensor([PROBS[i] / total if i in ids else 0.0 for i in range(len(PROBS))])


def total_variation(samples: torch.Tensor, probs: torch.Tensor) -> float:
    empirical = torch.bincount(samples, minlength=probs.numel()).double() / samples.numel()
    return 0.5 * (empirical - probs.double()).abs().sum().item()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", True),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.nan),
        ("seed", -1),
        ("seed", "7"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(InputError, match=field):
        SamplingConfig(**{field: value})


def test_config_accepts_limits_and_greedy_flag() -> None:
    assert SamplingConfig().greedy
    config = SamplingConfig(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.3, seed=0)
    assert not config.greedy


def test_repetition_penalty_hand_example() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [2.0, -1.0, 0.5, 3.0, 0.0]])
    history = torch.tensor([[0, 1, 0, -1, 4], [-1, -1, -1, -1, -1]])  # id 0 twice; -1 is padding
    out = apply_repetition_penalty(logits, history, 2.0)
    # id 0 penalised once (2 / 2, not 2 / 4); negative id 1 multiplied; 2 and 3 untouched; 0 stays 0
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, 0.0], [2.0, -1.0, 0.5, 3.0, 0.0]]
    assert logits[0, 0].item() == 2.0  # a new tensor
    assert torch.equal(apply_repetition_penalty(logits, None, 2.0), logits)
    with pytest.raises(InputError, match="outside"):
        apply_repetition_penalty(logits, torch.tensor([[5], [0]]), 2.0)


def test_greedy_is_argmax_after_penalty() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    config = SamplingConfig()
    expected = logits.argmax(dim=-1)
    assert torch.equal(choose_tokens(logits, config, None, None), expected)
    assert torch.equal(next_token_probs(logits, config), torch.nn.functional.one_hot(expected, 11).float())
    # a strong penalty on each row's argmax moves the choice to the runner-up
    penalised = SamplingConfig(repetition_penalty=1e6)
    history = expected.unsqueeze(1)
    runner_up = logits.topk(2, dim=-1).indices[:, 1]
    shifted = torch.where(logits.max(dim=-1).values > 0, runner_up, expected)  # x * r only lowers positive maxima
    assert torch.equal(choose_tokens(logits, penalised, history, None), shifted)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert choose_tokens(ties, config, None, None).tolist() == [1]


def test_temperature_matches_scaled_softmax() -> None:
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.25], [0.0, 0.0, 3.0, -3.0]])
    for temperature in (0.3, 1.0, 2.5):
        probs = next_token_probs(logits, SamplingConfig(temperature=temperature))
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, torch.softmax(logits / temperature, dim=-1))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"top_k": 2}, {1, 3}),
        ({"top_k": 1}, {1}),
        ({"top_k": 9}, {0, 1, 2, 3}),
        ({"top_p": 0.3}, {1}),  # the top token alone already reaches 0.3
        ({"top_p": 0.65}, {1, 3}),  # 0.4 < 0.65 <= 0.7
        ({"top_p": 0.75}, {0, 1, 3}),  # 0.7 < 0.75 <= 0.9
        ({"min_p": 0.6}, {1, 3}),  # >= 0.24
        ({"min_p": 0.4}, {0, 1, 3}),  # >= 0.16
        ({"top_k": 3, "top_p": 0.5}, {1, 3}),  # after top-k: 0.44, 0.33, 0.22
        ({"top_k": 3, "min_p": 0.6}, {1, 3}),
    ],
)
def test_filters_keep_expected_sets_and_renormalise(options: dict[str, float], expected: set[int]) -> None:
    ids, probs = kept(SamplingConfig(temperature=1.0, **options))
    assert ids == expected
    torch.testing.assert_close(probs, renormalised(expected))


def test_sampling_is_reproducible_with_a_seed() -> None:
    logits = torch.randn(1, 9, generator=torch.Generator().manual_seed(3)).expand(512, 9)
    config = SamplingConfig(temperature=1.0, top_p=0.9, seed=5)
    first = choose_tokens(logits, config, None, torch.Generator().manual_seed(config.seed))
    second = choose_tokens(logits, config, None, torch.Generator().manual_seed(config.seed))
    other = choose_tokens(logits, config, None, torch.Generator().manual_seed(6))
    assert first.dtype == torch.int64 and first.shape == (512,)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    allowed = next_token_probs(logits[:1], config)[0] > 0
    assert bool(allowed[first].all())


def test_speculative_accept_reduces_to_greedy_with_one_hot() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, n, vocab = 64, 4, 5
    seen: set[int] = set()
    for _ in range(5):
        target_tokens = torch.randint(vocab, (batch, n + 1), generator=gen)
        # drafts that agree with the target for a random prefix, then at random
        draft = torch.where(
            torch.rand(batch, n, generator=gen) < 0.7,
            target_tokens[:, :n],
            torch.randint(vocab, (batch, n), generator=gen),
        )
        target_probs = torch.nn.functional.one_hot(target_tokens, vocab).float()
        draft_probs = torch.nn.functional.one_hot(draft, vocab).float()
        accepted, token = speculative_accept(draft, draft_probs, target_probs, gen)
        want_accepted, want_token = greedy_accept(draft, target_tokens)
        assert torch.equal(accepted, want_accepted) and torch.equal(token, want_token)
        assert accepted.dtype == torch.int64 and token.dtype == torch.int64
        seen.update(accepted.tolist())
    assert seen == set(range(n + 1))  # every prefix length, from a rejection at once to the bonus token, occurs


def test_greedy_accept_hand_example() -> None:
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 2, 3]])
    target = torch.tensor([[1, 2, 3, 7], [1, 5, 3, 7], [1, 2, 3, 7]])
    accepted, token = greedy_accept(draft, target)
    assert accepted.tolist() == [3, 1, 0]
    assert token.tolist() == [7, 5, 1]


def test_speculative_accept_preserves_the_target_distribution() -> None:
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 40_000, 4
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.05, 0.3, 0.4], [0.6, 0.1, 0.1, 0.2]])  # positions 0, 1, bonus
    q = torch.tensor([[0.4, 0.2, 0.1, 0.3], [0.1, 0.6, 0.2, 0.1]])
    draft = torch.stack([torch.multinomial(q[j], rows, replacement=True, generator=gen) for j in range(2)], dim=1)
    accepted, token = speculative_accept(draft, q.expand(rows, 2, vocab), p.expand(rows, 3, vocab), gen)
    # first emitted token: the draft if position 0 was accepted, else the resampled token
    first = torch.where(accepted >= 1, draft[:, 0], token)
    assert total_variation(first, p[0]) < 0.02
    # acceptance at position 0 happens with probability sum(min(p, q))
    assert abs((accepted >= 1).double().mean().item() - torch.minimum(p[0], q[0]).sum().item()) < 0.02
    # given the first was a kept draft, the second emitted token follows p_1; given both kept, the bonus follows p_2
    second = torch.where(accepted >= 2, draft[:, 1], token)[accepted >= 1]
    assert total_variation(second, p[1]) < 0.02
    assert total_variation(token[accepted == 2], p[2]) < 0.03
    # q far from p must not pass by luck: the raw draft tokens do not follow p_0
    assert total_variation(draft[:, 0], p[0]) > 0.2


def test_speculative_accept_residual_falls_back_to_target() -> None:
    # a draft token that q gives no mass is rejected; with p == q the residual max(p - q, 0) is all zero
    draft = torch.tensor([[2]])
    q = torch.tensor([[[0.0, 1.0, 0.0]]])
    p = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    accepted, token = speculative_accept(draft, q, p, None)
    assert accepted.tolist() == [0] and token.tolist() == [1]


def test_speculative_accept_validates_shapes() -> None:
    with pytest.raises(InputError, match="target_probs"):
        speculative_accept(torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3, 4), torch.rand(2, 3, 4), None)
    with pytest.raises(InputError, match="draft_probs"):
        speculative_accept(torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3, 5), torch.rand(2, 4, 4), None)
