"""``loopformer convert to-hf``: a checkpoint as a transformers model directory that loads offline.

    config.json                 LoopformerConfig, with auto_map naming the two files below
    model.safetensors           the weights (save_pretrained)
    configuration_loopformer.py, modeling_loopformer.py
                                remote-code shims: they import the classes from the installed loopformer package
    tokenizer.json, tokenizer_config.json    when the checkpoint has a tokenizer; it adds the bos token before a
                                text, as our engine does, so tokenizer(text) gives the engine's prompt ids

The shims import ``loopformer`` rather than carry a copy of the model code: there stays one implementation, and a
machine without the package gets transformers' own message naming the missing package (``pip install
'loopformer[hf]'``). The loopformer version that wrote the export is recorded in config.json.
"""

from __future__ import annotations

from pathlib import Path

from loopformer import __version__
from loopformer.checkpoint import staged_directory
from loopformer.interop.hf import LoopformerForCausalLM
from loopformer.interop.tokenizer_files import bos_first, write_tokenizer_files
from loopformer.loading import load_trained_model
from loopformer.tokenizer import TextTokenizer

SHIMS = {
    "configuration_loopformer.py": "LoopformerConfig",
    "modeling_loopformer.py": "LoopformerForCausalLM",
}
AUTO_MAP = {
    "AutoConfig": "configuration_loopformer.LoopformerConfig",
    "AutoModelForCausalLM": "modeling_loopformer.LoopformerForCausalLM",
}


def _shim(name: str) -> str:
    return (
        f'"""transformers remote code for a loopformer export: {name} lives in the installed loopformer package\n'
        '(pip install \'loopformer[hf]\'); this file only points at it, so there is one implementation."""\n\n'
        f"from loopformer.interop.hf import {name}\n\n"
        f'__all__ = ["{name}"]\n'
    )


def export_hf(src: Path, dst: Path) -> Path:
    """Write the checkpoint ``src`` (or a run's latest) as the transformers model directory ``dst``."""
    model, state, _ = load_trained_model(Path(src))
    tokenizer = None
    token_ids = {}
    if state.tokenizer_json is not None:
        tokenizer = TextTokenizer.from_json(state.tokenizer_json, roles=state.token_roles)
        token_ids = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
    wrapper = LoopformerForCausalLM.wrap(model, auto_map=AUTO_MAP, loopformer_version=__version__, **token_ids)
    with staged_directory(Path(dst)) as tmp:
        wrapper.save_pretrained(str(tmp))
        for file, name in SHIMS.items():
            (tmp / file).write_text(_shim(name), encoding="utf-8")
        if tokenizer is not None:
            extra = {"model_max_length": model.config.max_seq_len, "add_bos_token": True, "add_eos_token": False}
            write_tokenizer_files(tmp, bos_first(tokenizer), tokenizer.roles, extra)
    return Path(dst)
