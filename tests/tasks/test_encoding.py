"""Task vocabularies and the example -> batch layout: ids, shifted labels, padding, grouping, unknown symbols."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loopformer.errors import InputError
from loopformer.tasks.base import Example
from loopformer.tasks.encoding import IGNORE_INDEX, TaskEncoder, alphabet_of, task_tokenizer
from loopformer.tokenizer import SPECIAL_TOKENS, TextTokenizer

FIRST = len(SPECIAL_TOKENS)  # the id of the first symbol


def example(inp: str, target: str) -> Example:
    return Example(tuple(inp.split()), tuple(target.split()))


@pytest.fixture
def encoder() -> TaskEncoder:
    return TaskEncoder(task_tokenizer(["a", "b", "c", "=", "x"]))


def test_symbolic_vocabulary_ids_and_json_round_trip() -> None:
    tokenizer = TextTokenizer.symbolic(["b", "a", "b", "<>", "a"])
    assert tokenizer.is_symbolic
    assert tokenizer.symbol_ids() == {"b": FIRST, "a": FIRST + 1, "<>": FIRST + 2}
    assert tokenizer.vocab_size == FIRST + 3
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.encode("a <> b") == [FIRST + 1, FIRST + 2, FIRST]
    assert tokenizer.decode([FIRST, FIRST + 1]) == "b a"
    again = TextTokenizer.from_json(tokenizer.to_json())
    assert again.is_symbolic
    assert again.symbol_ids() == tokenizer.symbol_ids()
    assert again.vocab_size == tokenizer.vocab_size
    assert again.to_json() == tokenizer.to_json()


def test_text_tokenizers_are_not_symbolic() -> None:
    byte = TextTokenizer.byte_level()
    assert not byte.is_symbolic
    with pytest.raises(InputError, match="not a task"):
        byte.symbol_ids()
    with pytest.raises(InputError, match="not a task"):
        TaskEncoder(byte)


@pytest.mark.parametrize("bad", ["a b", "", "tab\there", "new\nline"])
def test_symbol_with_whitespace_or_empty_is_rejected(bad: str) -> None:
    with pytest.raises(InputError, match="empty or contains whitespace") as info:
        TextTokenizer.symbolic(["ok", bad])
    assert repr(bad) in str(info.value)


def test_per_position_layout(encoder: TaskEncoder) -> None:
    a, b, c = (encoder.symbols[s] for s in "abc")
    ids, labels = encoder.encode(example("a b c", "c a b"))
    # ids = [BOS] + input + [EOS]; labels = [-100, -100] + target: logits at input[i] are scored against target[i]
    assert ids == [encoder.start_id, a, b, c, encoder.end_id]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, c, a, b]
    assert encoder.end_id == 1


def test_continuation_layout(encoder: TaskEncoder) -> None:
    a, b, c, eq, x = (encoder.symbols[s] for s in ["a", "b", "c", "=", "x"])
    ids, labels = encoder.encode(example("a b =", "x c"))
    # ids = [BOS] + input + [EOS] + target; labels = [-100] * (len(input) + 2) + target
    assert ids == [encoder.start_id, a, b, eq, encoder.end_id, x, c]
    assert labels == [IGNORE_INDEX] * 5 + [x, c]
    assert len(ids) == len(labels)
    ids, labels = encoder.encode(example("a", "b c"))
    assert ids == [encoder.start_id, a, encoder.end_id, b, c]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, b, c]


def test_shifted_labels_pair_each_target_with_the_right_position(encoder: TaskEncoder) -> None:
    """Under the model's shift (labels[t + 1] is the target of position t) the scored pairs are as documented."""
    per_position = example("a b c", "b c a")
    ids, labels = encoder.encode(per_position)
    pairs = [(ids[t], labels[t + 1]) for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
    symbols = encoder.symbols
    assert pairs == [(symbols[i], symbols[o]) for i, o in zip(per_position.input, per_position.target, strict=True)]
    continuation = example("a b", "c x c")
    ids, labels = encoder.encode(continuation)
    scored = [t for t in range(len(ids) - 1) if labels[t + 1] != IGNORE_INDEX]
    # the first target token is predicted at the end-of-input marker, each later one at the previous target token
    assert [ids[t] for t in scored] == [encoder.end_id, symbols["c"], symbols["x"]]
    assert [labels[t + 1] for t in scored] == [symbols[s] for s in continuation.target]


def test_batch_is_right_padded_with_pad_id_and_ignored_labels(encoder: TaskEncoder) -> None:
    examples = [example("a b", "x"), example("a b c a", "c c c c"), example("c", "a b c")]
    batch = encoder.batch(examples)
    assert batch.input_ids.dtype == torch.long and batch.labels.dtype == torch.long
    width = max(len(encoder.encode(e)[0]) for e in examples)
    assert batch.input_ids.shape == batch.labels.shape == (3, width) == (3, 6)
    assert torch.equal(batch.doc_ids, torch.zeros_like(batch.input_ids))
    for row, ex in enumerate(examples):
        ids, labels = encoder.encode(ex)
        n = len(ids)
        assert batch.input_ids[row, :n].tolist() == ids
        assert batch.labels[row, :n].tolist() == labels
        assert batch.input_ids[row, n:].tolist() == [encoder.pad_id] * (width - n)
        assert batch.labels[row, n:].tolist() == [IGNORE_INDEX] * (width - n)
    with pytest.raises(InputError, match="at least one example"):
        encoder.batch([])


def test_batches_group_by_length_and_cover_every_example_once(encoder: TaskEncoder) -> None:
    generator = torch.Generator().manual_seed(3)
    symbols = ["a", "b", "c", "=", "x"]
    examples = []
    for _ in range(23):
        n_in, n_out = (int(v) for v in torch.randint(1, 7, (2,), generator=generator))
        picks = torch.randint(0, len(symbols), (n_in + n_out,), generator=generator).tolist()
        examples.append(Example(tuple(symbols[i] for i in picks[:n_in]), tuple(symbols[i] for i in picks[n_in:])))
    assert any(e.per_position for e in examples) and not all(e.per_position for e in examples)
    size_of = {}
    for e in examples:
        ids, labels = encoder.encode(e)
        size_of[(tuple(ids), tuple(labels))] = len(e.input) + len(e.target)
    batches = encoder.batches(examples, batch_size=5)
    assert [b.input_ids.shape[0] for b in batches] == [5, 5, 5, 5, 3]
    rows = []
    for batch in batches:
        for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
            while ids and ids[-1] == encoder.pad_id:  # the pad id is never a symbol id
                ids.pop()
            assert all(label == IGNORE_INDEX for label in labels[len(ids) :])
            rows.append((tuple(ids), tuple(labels[: len(ids)])))
    expected = Counter((tuple(ids), tuple(labels)) for ids, labels in map(encoder.encode, examples))
    assert Counter(rows) == expected
    sizes = [size_of[row] for row in rows]  # len(input) + len(target) of each row's example, in batch order
    assert sizes == sorted(sizes)
    with pytest.raises(InputError, match="batch_size"):
        encoder.batches(examples, 0)


def test_unknown_symbol_is_named_by_check_and_encode(encoder: TaskEncoder) -> None:
    good = example("a b", "x")
    bad_input = example("a q", "x")
    bad_target = example("a b", "b zz")
    encoder.check([good], "train.jsonl")
    with pytest.raises(InputError, match=r"eval\.jsonl: example 2 uses the symbol 'q'"):
        encoder.check([good, bad_input], "eval.jsonl")
    with pytest.raises(InputError, match="example 3 uses the symbol 'zz'"):
        encoder.check([good, good, bad_target], "eval.jsonl")
    with pytest.raises(InputError, match="'q' is not in the task vocabulary"):
        encoder.encode(bad_input)
    with pytest.raises(InputError, match="'zz' is not in the task vocabulary"):
        encoder.batch([good, bad_target])


def test_alphabet_of_keeps_first_seen_order() -> None:
    examples = [example("c a c", "z"), example("a b", "y b"), example("z", "c q")]
    assert alphabet_of(examples) == ["c", "a", "z", "b", "y", "q"]
    assert alphabet_of([]) == []
    tokenizer = task_tokenizer(alphabet_of(examples))
    by_id = sorted(tokenizer.symbol_ids(), key=tokenizer.symbol_ids().get)
    assert by_id == ["c", "a", "z", "b", "y", "q"]
    assert tokenizer.symbol_ids()["c"] == FIRST
