"""Shared test helpers: a small config that runs in milliseconds on a CPU, a tiny text corpus, random checkpoints."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import hypothesis
import pytest
import torch

from loopformer.checkpoint import TrainingState, save_checkpoint
from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.inference.compiled import has_cxx_compiler
from loopformer.inference.engine import Engine, GenerationConfig, GenerationResult
from loopformer.model import build_model
from loopformer.tasks.builtin import get_task
from loopformer.tasks.encoding import task_tokenizer
from loopformer.tokenizer import TextTokenizer

needs_compiler = pytest.mark.skipif(not has_cxx_compiler(), reason="compiled decoding needs a C++ compiler")


def small_config(**changes: object) -> ModelConfig:
    """A 32-wide model with layers 1/2/1 and a 64-token vocabulary; ``changes`` override fields."""
    base = {
        "vocab_size": 64,
        "dim": 32,
        "n_heads": 4,
        "n_prelude": 1,
        "n_core": 2,
        "n_coda": 1,
        "mlp_hidden": 64,
        "max_seq_len": 256,
        "recurrence": RecurrenceConfig(mean_loops=3, backprop_loops=2),
    }
    base.update(changes)
    return ModelConfig(**base)


# `loopformer train` flags of a tiny, fast run: the model (TINY), the data and evaluation (FAST)
TINY = ["--preset", "tiny", "--dim", "32", "--n-heads", "4", "--mlp-hidden", "64", "--mean-loops", "2"]
FAST = ["--tokenizer", "byte", "--seq-len", "32", "--batch-size", "2", "--eval-loops", "1,2", "--eval-batches", "1"]

WORDS = ["loop", "state", "depth", "token", "prelude", "coda", "core", "inject", "norm", "head", "attention", "window"]


def write_corpus(folder: Path, documents: int = 24, words: int = 120) -> Path:
    """A folder of small text files with a learnable pattern, deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for d in range(documents):
        picks = torch.randint(0, len(WORDS), (words,), generator=generator).tolist()
        (folder / f"doc{d:02d}.txt").write_text(" ".join(WORDS[i] for i in picks) + "\n")
    return folder


def load_script(path: Path, name: str) -> ModuleType:
    """A script (``benchmarks/*.py``) as the module ``name``, registered before it runs (its dataclasses look their
    module up) and loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def save_random_checkpoint(run: Path, config: ModelConfig, tokenizer: TextTokenizer, train_config: dict) -> Path:
    """A randomly initialised model saved as a checkpoint with its tokenizer and the training run's settings."""
    state = TrainingState(
        step=0,
        model=build_model(config, seed=0).state_dict(),
        config=config,
        tokenizer_json=tokenizer.to_json(),
        meta={"train_config": train_config},
    )
    save_checkpoint(run, state)
    return run


def benchmark_checkpoints(folder: Path) -> tuple[Path, Path]:
    """A random byte-level text LM (with its corpus) and a random prefix-parity task model: the ``--ckpt`` and
    ``--task-ckpt`` of a ``--quick`` benchmark run."""
    corpus = write_corpus(folder / "corpus")
    text = save_random_checkpoint(
        folder / "text",
        small_config(vocab_size=320, max_seq_len=128),
        TextTokenizer.byte_level(),
        {"data": str(corpus), "val_fraction": 0.25},
    )
    task = save_random_checkpoint(
        folder / "task",
        small_config(max_seq_len=64),
        task_tokenizer(get_task("prefix-parity").alphabet),
        {"task": "prefix-parity", "task_difficulty": "4"},
    )
    return text, task


def generate_with_and_without_compaction(
    engine: Engine, prompts: list[list[int]], config: GenerationConfig
) -> tuple[dict[bool, GenerationResult], dict[bool, int]]:
    """``config`` run with compaction on (True) and off (False): the results, and the rows every core layer call
    processed in each run (the sum of the batch sizes)."""
    results, rows = {}, {}
    total = [0]

    def count(module: torch.nn.Module, args: tuple) -> None:
        total[0] += args[0].shape[0]

    hooks = [layer.register_forward_pre_hook(count) for layer in engine.model.core]
    try:
        for compaction in (True, False):
            total[0] = 0
            results[compaction] = engine.generate(prompts, replace(config, compaction=compaction))
            rows[compaction] = total[0]
    finally:
        for handle in hooks:
            handle.remove()
    return results, rows


def profile(examples: int) -> hypothesis.settings:
    """Reproducible hypothesis settings: a fixed example sequence, no example database, no per-example deadline."""
    health = hypothesis.HealthCheck
    checks = [health.too_slow, health.data_too_large, health.filter_too_much]
    return hypothesis.settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=checks
    )
