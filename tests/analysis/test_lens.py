"""logit_lens: agreement with separate forward calls, the final argmax, first_hit, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopformer import InputError, build_model
from loopformer.analysis.lens import LogitLens, first_stable_hit, logit_lens
from support import small_config

LOOPS = 6
SEED = 3


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(small_config(), seed=0).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def lens(model, ids) -> LogitLens:
    return logit_lens(model, ids, LOOPS, k=4, seed=SEED)


def test_shapes_and_probabilities(lens: LogitLens) -> None:
    assert lens.loops == LOOPS
    assert lens.top_ids.shape == (LOOPS, 2, 9, 4) and lens.top_ids.dtype == torch.long
    assert lens.top_probs.shape == (LOOPS, 2, 9, 4) and lens.top_probs.dtype == torch.float32
    assert lens.entropy.shape == (LOOPS, 2, 9)
    assert lens.final_ids.shape == lens.first_hit.shape == (2, 9)
    assert (lens.top_probs.diff(dim=-1) <= 0).all(), "most likely first"
    assert (lens.top_probs > 0).all() and (lens.top_probs.sum(-1) <= 1 + 1e-5).all()
    assert (lens.entropy >= 0).all() and (lens.entropy <= torch.log(torch.tensor(64.0)) + 1e-4).all()


def test_every_iteration_matches_a_separate_forward(model, ids, lens: LogitLens) -> None:
    with torch.inference_mode():
        for depth in range(1, LOOPS + 1):
            log_probs = F.log_softmax(model(ids, loops=depth, seed=SEED).logits.float(), dim=-1)
            values, indices = log_probs.topk(4, dim=-1)
            assert torch.equal(lens.top_ids[depth - 1], indices)
            torch.testing.assert_close(lens.top_probs[depth - 1], values.exp())
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            torch.testing.assert_close(lens.entropy[depth - 1], entropy)


def test_last_iteration_is_the_forward_argmax(model, ids, lens: LogitLens) -> None:
    with torch.inference_mode():
        logits = model(ids, loops=LOOPS, seed=SEED).logits
    assert torch.equal(lens.final_ids, logits.argmax(-1))
    assert torch.equal(lens.top_ids[-1, ..., 0], lens.final_ids)
    # another seed starts elsewhere: the lens follows the seed it was given
    other = logit_lens(model, ids, LOOPS, k=4, seed=SEED + 1)
    assert not torch.equal(other.top_probs, lens.top_probs)


def test_first_hit_is_where_the_final_prediction_settles(lens: LogitLens) -> None:
    top1 = lens.top_ids[..., 0]
    assert ((lens.first_hit >= 1) & (lens.first_hit <= LOOPS)).all()
    for b in range(top1.shape[1]):
        for t in range(top1.shape[2]):
            column = top1[:, b, t].tolist()
            expected = LOOPS
            while expected > 1 and column[expected - 2] == column[-1]:
                expected -= 1
            assert int(lens.first_hit[b, t]) == expected


def test_first_stable_hit_by_hand() -> None:
    per_position = [[1, 3, 3, 3], [3, 2, 3, 3], [3, 3, 3, 3], [3, 3, 1, 3], [1, 1, 1, 3]]  # iterations 1..4
    predictions = torch.tensor(per_position).T  # [R=4, positions=5]
    assert first_stable_hit(predictions, predictions[-1]).tolist() == [2, 3, 1, 4, 4]


def test_mode_is_restored_and_masks_are_used(model, ids) -> None:
    model.train()
    try:
        logit_lens(model, ids, 2, k=1)
        assert model.training
    finally:
        model.eval()
    causal = torch.ones(9, 9, dtype=torch.bool).tril().view(1, 1, 9, 9)
    lens = logit_lens(model, ids, 3, k=2, attention_mask=causal)
    assert torch.equal(lens.top_ids, logit_lens(model, ids, 3, k=2).top_ids)
    diagonal = torch.eye(9, dtype=torch.bool).view(1, 1, 9, 9)
    assert not torch.equal(logit_lens(model, ids, 3, k=2, attention_mask=diagonal).top_probs, lens.top_probs)


@pytest.mark.parametrize(
    ("loops", "k", "match"),
    [(0, 5, "loops"), (2.5, 5, "loops"), (3, 0, "k must"), (3, 65, "k must"), (3, True, "k must")],
)
def test_bad_arguments(model, ids, loops, k, match) -> None:
    with pytest.raises(InputError, match=match):
        logit_lens(model, ids, loops, k=k)


def test_bad_ids(model) -> None:
    with pytest.raises(InputError, match="ids"):
        logit_lens(model, torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(InputError, match="ids"):
        logit_lens(model, torch.zeros(1, 5), 2)
