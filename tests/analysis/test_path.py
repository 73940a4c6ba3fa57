"""path_independence: ~1 for a contractive core, clearly lower when the state has not forgotten its start."""

from __future__ import annotations

import pytest
import torch

from loopformer import InputError, build_model
from loopformer.analysis.path import NOISE_ULPS, final_states, noise_floor, path_independence
from support import small_config

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def contractive_model() -> torch.nn.Module:
    """LTI injection (A_bar = sqrt(1/5) < 1) and a pre-norm core whose weights are scaled down to 10%."""
    model = build_model(small_config(injection="lti", norm_layout="pre"), seed=0)
    with torch.no_grad():
        for layer in model.core:
            for p in layer.parameters():
                if p.dim() > 1:
                    p.mul_(0.1)
    return model


def test_final_states_equal_the_forward(ids) -> None:
    model = build_model(small_config(), seed=0).eval()
    finals = final_states(model, ids, 3, SEEDS)
    assert finals.shape == (len(SEEDS), 2, 6, 32)
    with torch.inference_mode():
        for index, seed in enumerate(SEEDS):
            torch.testing.assert_close(finals[index], model(ids, loops=3, seed=seed).state)


def test_contractive_model_is_path_independent(ids) -> None:
    result = path_independence(contractive_model(), ids, 24, SEEDS)
    assert result.per_token.shape == result.spread.shape == (2, 6)
    assert result.overall > 0.99
    assert (result.per_token > 0.99).all() and (result.per_token <= 1).all()
    assert (result.spread < 1e-3).all()
    assert result.noise_floor == noise_floor(torch.float32) == NOISE_ULPS * torch.finfo(torch.float32).eps
    assert result.within_noise and result.max_spread == float(result.spread.max()) and result.dtype == "float32"


def test_unconverged_state_depends_on_the_seed(ids) -> None:
    model = build_model(small_config(state_init_std=5.0), seed=0)
    result = path_independence(model, ids, 1, SEEDS)
    assert result.overall < 0.5
    assert (result.spread > 0.5).all()
    assert not result.within_noise
    assert result.overall == pytest.approx(float(result.per_token.mean()))
    more_loops = path_independence(contractive_model(), ids, 24, SEEDS)
    assert more_loops.overall - result.overall > 0.4


def test_attention_mask_is_passed_through(ids) -> None:
    model = build_model(small_config(), seed=0)
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6).clone()
    mask[..., 3:, :3] = False
    masked = final_states(model, ids, 2, (0, 1), attention_mask=mask)
    plain = final_states(model, ids, 2, (0, 1))
    torch.testing.assert_close(masked[..., :3, :], plain[..., :3, :])
    assert not torch.allclose(masked[..., 3:, :], plain[..., 3:, :])


def test_bad_input(ids) -> None:
    model = build_model(small_config(), seed=0)
    with pytest.raises(InputError, match="at least 2 distinct seeds"):
        path_independence(model, ids, 4, seeds=(7,))
    with pytest.raises(InputError, match="at least 2 distinct seeds"):
        path_independence(model, ids, 4, seeds=(1, 1))
    with pytest.raises(InputError, match="loops must be an integer >= 1"):
        path_independence(model, ids, 0)
    with pytest.raises(InputError, match="starts from zero"):
        path_independence(build_model(small_config(state_init="zero"), seed=0), ids, 4)
