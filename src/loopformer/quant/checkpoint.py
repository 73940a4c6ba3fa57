"""Quantized checkpoints: an ordinary checkpoint directory whose ``model.safetensors`` holds integer weights.

A quantized weight ``NAME`` is stored as ``NAME.qweight`` (int8, or uint8 with two int4 values a byte),
``NAME.scale`` and, for int4, ``NAME.zero`` (see :mod:`loopformer.quant.scheme`); every other tensor keeps its
name and dtype. ``trainer.json`` notes the scheme under ``meta["quantization"]``::

    {"scheme": {"bits": 4, "group_size": 64, "embedding": true}, "tensors": [...names...], "source": "..."}

:func:`loopformer.loading.load_trained_model` sees the note and calls :func:`build_quantized_model`,
so every command that loads a checkpoint (generate, chat, eval-ppl, eval-task, eval, serve) takes a quantized one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from loopformer.checkpoint import TrainingState, check_state_dict, write_checkpoint_dir
from loopformer.errors import InputError
from loopformer.model import LoopLM, build_model, meta_model
from loopformer.quant.model import install, quantizable_names, quantize_model, quantized_state
from loopformer.quant.scheme import QuantScheme, from_tensors, stored_shapes

QUANTIZATION_KEY = "quantization"


def quantization_note(state: TrainingState) -> dict[str, Any] | None:
    """The quantization note of a loaded checkpoint (None for a full-precision one)."""
    return state.meta.get(QUANTIZATION_KEY)


def save_quantized(
    directory: Path, model: LoopLM, state: TrainingState, scheme: QuantScheme, source: str
) -> tuple[Path, list[str]]:
    """Quantize ``model`` (the weights of ``state``) in place and write it as the checkpoint ``directory``.

    Keeps the config, tokenizer, token roles, step and metadata of ``state``; drops optimizer, EMA and RNG
    state. Returns the directory and the names of the quantized weights.
    """
    names = quantize_model(model, scheme)
    note = {"scheme": scheme.to_dict(), "tensors": names, "source": source}
    quantized = dataclasses.replace(
        state,
        model=quantized_state(model),
        optimizer=None,
        ema=None,
        rng=None,
        meta={**state.meta, QUANTIZATION_KEY: note},
    )
    return write_checkpoint_dir(Path(directory), quantized), names


def build_quantized_model(state: TrainingState, source: str) -> LoopLM:
    """The model of a quantized checkpoint's ``state`` (its tensors checked by name, shape and dtype)."""
    note = quantization_note(state)
    if not isinstance(note, dict) or not isinstance(note.get("tensors"), list):
        raise InputError(f"{source} has a malformed quantization note in trainer.json.")
    scheme = QuantScheme.from_dict(note.get("scheme"))
    skeleton = meta_model(state.config)  # names and shapes are checked before any memory is allocated
    names = note["tensors"]
    if sorted(map(str, names)) != sorted(quantizable_names(skeleton, scheme)):
        raise InputError(
            f"{source}: the quantized tensors listed in trainer.json do not match the {scheme.label} scheme."
        )
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    expected = {name: shape for name, shape in shapes.items() if name not in names}
    for name in names:
        parts = stored_shapes(shapes[name], scheme.bits, scheme.group_size)
        expected.update({f"{name}.{part}": shape for part, shape in parts.items()})
    check_state_dict(expected, {name: tensor.shape for name, tensor in state.model.items()}, source)
    model = build_model(state.config)
    plain = {name: tensor for name, tensor in state.model.items() if name in shapes}
    for name in names:
        parts = {
            part: state.model[f"{name}.{part}"] for part in stored_shapes(shapes[name], scheme.bits, scheme.group_size)
        }
        install(model, name, from_tensors(parts, shapes[name], scheme.bits, scheme.group_size, name))
    # every key was checked above: the only keys the model still misses are the quantized ones, installed as buffers
    result = model.load_state_dict(plain, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(names):
        raise InputError(f"{source} does not fit the model ({result}).")
    return model


def directory_bytes(directory: Path) -> int:
    """Total size of the files in a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
