"""Task examples as model batches, in the trainer's language-model convention.

A symbolic vocabulary (:meth:`TextTokenizer.symbolic`) gives every symbol one id. An example becomes one row:

* per-position (``len(target) == len(input)``): ``ids = [BOS] + input + [EOS]``,
  ``labels = [-100, -100] + target``, so the logits at the position of ``input[i]`` are scored against
  ``target[i]`` (the model shifts labels by one);
* continuation: ``ids = [BOS] + input + [EOS] + target``, ``labels = [-100] * (len(input) + 2) + target``:
  the target is predicted token by token after the end-of-input marker, teacher-forced.

The leading BOS gives the first input symbol a predecessor like every other symbol, so a model with a short
attention window sees the same kind of neighbourhood at every input position.

An example is solved when every labelled position's argmax equals its target. For a continuation this is
exactly greedy decoding: if every teacher-forced argmax is right, greedy generation reproduces the target,
and the first wrong argmax is where greedy generation would leave it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from loopformer.errors import InputError
from loopformer.tasks.base import Example
from loopformer.tokenizer import TextTokenizer
from loopformer.training.data import Batch

IGNORE_INDEX = -100


def task_tokenizer(alphabet: Iterable[str]) -> TextTokenizer:
    """The symbolic vocabulary of a task: the special tokens, then ``alphabet`` in order."""
    return TextTokenizer.symbolic(alphabet)


def alphabet_of(examples: Iterable[Example]) -> list[str]:
    """Every symbol of the inputs and targets of ``examples``, in first-seen order."""
    seen: dict[str, None] = {}
    for example in examples:
        seen.update(dict.fromkeys(example.input))
        seen.update(dict.fromkeys(example.target))
    return list(seen)


class TaskEncoder:
    """Turns :class:`Example` lists into padded :class:`Batch` rows (right padding, labels -100)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.symbols = tokenizer.symbol_ids()
        self.start_id = tokenizer.bos_id
        self.end_id = tokenizer.eos_id
        self.pad_id = tokenizer.pad_id

    def check(self, examples: Sequence[Example], source: str) -> None:
        """``InputError`` naming the first symbol of ``examples`` that the vocabulary lacks."""
        for number, example in enumerate(examples, start=1):
            for symbol in (*example.input, *example.target):
                if symbol not in self.symbols:
                    raise InputError(
                        f"{source}: example {number} uses the symbol {symbol!r}, which the training data never "
                        f"contained (the model knows {len(self.symbols)} symbols)."
                    )

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """Token ids and aligned labels of one example (see the module docstring)."""
        try:
            inputs = [self.symbols[s] for s in example.input]
            targets = [self.symbols[s] for s in example.target]
        except KeyError as exc:
            raise InputError(f"the symbol {exc.args[0]!r} is not in the task vocabulary.") from None
        if example.per_position:
            return [self.start_id, *inputs, self.end_id], [IGNORE_INDEX, IGNORE_INDEX, *targets]
        return [self.start_id, *inputs, self.end_id, *targets], [IGNORE_INDEX] * (len(inputs) + 2) + targets

    def batch(self, examples: Sequence[Example]) -> Batch:
        """One right-padded batch of ``examples``."""
        if not examples:
            raise InputError("a task batch needs at least one example.")
        encoded = [self.encode(example) for example in examples]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, targets) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(targets)] = torch.tensor(targets)
        return Batch(input_ids, labels, torch.zeros_like(input_ids))

    def batches(self, examples: Sequence[Example], batch_size: int) -> list[Batch]:
        """All ``examples`` in batches of at most ``batch_size``, grouped by length to limit padding."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}.")
        ordered = sorted(examples, key=lambda e: len(e.input) + len(e.target))
        return [self.batch(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
