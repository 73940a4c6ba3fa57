"""``loopformer.load``: one call loads every kind of checkpoint directory, with its tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import loopformer
from loopformer.checkpoint import TrainingState, load_checkpoint, resolve_checkpoint, save_checkpoint
from loopformer.errors import InputError
from loopformer.model import build_model
from loopformer.quant.checkpoint import save_quantized
from loopformer.quant.model import is_quantized
from loopformer.quant.scheme import QuantScheme
from loopformer.tokenizer import TextTokenizer
from support import small_config

CONFIG = small_config(vocab_size=320)


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 40, 41, 42, 43]])


def test_load_takes_a_run_directory_and_gives_the_model_in_eval_mode_and_its_tokenizer(tmp_path) -> None:
    model = build_model(CONFIG, seed=3)
    tokenizer = TextTokenizer.byte_level()
    save_checkpoint(
        tmp_path / "run",
        TrainingState(step=5, model=model.state_dict(), config=CONFIG, tokenizer_json=tokenizer.to_json()),
    )
    loaded, loaded_tokenizer = loopformer.load(tmp_path / "run")
    assert not loaded.training and loaded_tokenizer is not None
    assert loaded_tokenizer.encode("def main(") == tokenizer.encode("def main(")
    torch.testing.assert_close(loaded(_ids(), 3, seed=0).logits, model.eval()(_ids(), 3, seed=0).logits, rtol=0, atol=0)
    again, _ = loopformer.load(str(resolve_checkpoint(tmp_path / "run")))  # the step directory, as a string
    torch.testing.assert_close(again(_ids(), 3, seed=0).logits, loaded(_ids(), 3, seed=0).logits, rtol=0, atol=0)


def test_load_without_a_tokenizer_gives_none_and_ema_takes_the_ema_weights(tmp_path) -> None:
    model, other = build_model(CONFIG, seed=3), build_model(CONFIG, seed=4)
    save_checkpoint(
        tmp_path / "run", TrainingState(step=1, model=model.state_dict(), config=CONFIG, ema=other.state_dict())
    )
    plain, tokenizer = loopformer.load(tmp_path / "run")
    ema, _ = loopformer.load(tmp_path / "run", ema=True)
    assert tokenizer is None
    torch.testing.assert_close(plain(_ids(), 2, seed=0).logits, model.eval()(_ids(), 2, seed=0).logits, rtol=0, atol=0)
    torch.testing.assert_close(ema(_ids(), 2, seed=0).logits, other.eval()(_ids(), 2, seed=0).logits, rtol=0, atol=0)


def test_load_reads_a_quantized_copy_with_integer_weights(tmp_path) -> None:
    model = build_model(CONFIG, seed=3).eval()
    source = save_checkpoint(tmp_path / "run", TrainingState(step=1, model=model.state_dict(), config=CONFIG))
    state = load_checkpoint(source, load_optimizer=False)
    out, names = save_quantized(tmp_path / "q", model, dataclasses.replace(state), QuantScheme(8), str(source))
    loaded, _ = loopformer.load(out)  # save_quantized quantized `model` in place: the two must agree exactly
    assert is_quantized(loaded)
    assert names and loaded(_ids(), 2, seed=0).logits.shape == (1, 5, CONFIG.vocab_size)
    torch.testing.assert_close(loaded(_ids(), 2, seed=0).logits, model(_ids(), 2, seed=0).logits, rtol=0, atol=0)


def test_load_names_a_directory_that_holds_no_checkpoint(tmp_path) -> None:
    with pytest.raises(InputError, match="checkpoint"):
        loopformer.load(tmp_path)


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'lode'"):
        loopformer.lode  # noqa: B018
