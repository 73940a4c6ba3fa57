"""Loading a checkpoint for use: :func:`load` (model and tokenizer) and :func:`load_trained_model`.

Every kind of checkpoint directory loopformer writes loads the same way: a ``loopformer train`` run (its latest
checkpoint) or one of its ``step-*`` checkpoints, a ``loopformer quantize`` copy (integer weights) and a
``loopformer convert`` import. Only files of the named directory are read (safetensors and JSON).
"""

from __future__ import annotations

from pathlib import Path

from loopformer.checkpoint import (
    TrainingState,
    check_layer_count,
    check_state_dict,
    load_checkpoint,
    resolve_checkpoint,
)
from loopformer.model import LoopLM, build_model, meta_model
from loopformer.quant.checkpoint import build_quantized_model
from loopformer.tokenizer import TextTokenizer


def load(path: str | Path, *, ema: bool = False) -> tuple[LoopLM, TextTokenizer | None]:
    """The model (eval mode) and tokenizer of the checkpoint at ``path``; the tokenizer is None when the checkpoint
    has none. ``ema`` takes the EMA weights where the checkpoint has them.

    >>> model, tokenizer = loopformer.load("runs/lm")  # doctest: +SKIP
    """
    model, state, _ = load_trained_model(path, use_ema=ema)
    if state.tokenizer_json is None:
        return model, None
    return model, TextTokenizer.from_json(state.tokenizer_json, roles=state.token_roles)


def load_trained_model(path: str | Path, use_ema: bool = False) -> tuple[LoopLM, TrainingState, Path]:
    """The model of a checkpoint (or of a run directory's latest) in eval mode, its state and its directory.

    ``use_ema`` takes the EMA weights when the checkpoint has them.
    """
    directory = resolve_checkpoint(path)
    state = load_checkpoint(directory, load_optimizer=False)
    check_layer_count(state, directory)
    if "quantization" in state.meta:  # written by `loopformer quantize`: integer weights, no EMA
        return build_quantized_model(state, str(directory)).eval(), state, directory
    weights = state.ema if use_ema and state.ema is not None else state.model
    expected = {name: tensor.shape for name, tensor in meta_model(state.config).state_dict().items()}
    check_state_dict(expected, {name: tensor.shape for name, tensor in weights.items()}, str(directory))
    model = build_model(state.config)  # only once its config and its tensors agree
    model.load_state_dict(weights)
    return model.eval(), state, directory
