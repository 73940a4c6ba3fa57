"""Data pipeline: corpora, split, token cache, packed rows, sampler, document mask, eval batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loopformer.errors import ConfigError, InputError
from loopformer.tokenizer import TextTokenizer
from loopformer.training import data
from loopformer.training.data import (
    BatchSampler,
    Document,
    PackedRows,
    TokenStream,
    corpus_stats,
    document_mask,
    fixed_eval_batches,
    load_documents,
    split_documents,
    stdlib_documents,
    tokenize_documents,
)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.byte_level()


def synthetic_docs(n: int = 40) -> list[Document]:
    return [Document(f"doc{i}.txt", f"document {i}: " + "abcdefghij"[: 1 + i % 10] * (1 + i % 5)) for i in range(n)]


def make_rows(tok: TextTokenizer, tmp_path: Path, n_docs: int = 40, seq_len: int = 8) -> PackedRows:
    return PackedRows(tokenize_documents(synthetic_docs(n_docs), tok, tmp_path / "cache"), seq_len)


# -- corpora ------------------------------------------------------------------------------------------------


def test_stdlib_documents() -> None:
    docs = stdlib_documents()
    names = [d.name for d in docs]
    assert len(docs) > 100 and all(d.text for d in docs)
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "json/decoder.py" in names and "os.py" in names
    for name in names:
        parts = name.split("/")[:-1]
        assert not {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"} & set(parts), name
    with_topics = load_documents("stdlib+topics")  # a second listing: also checks it is deterministic
    extra = with_topics[len(docs) :]
    assert with_topics[: len(docs)] == docs and extra and all(d.name.startswith("pydoc_topics/") for d in extra)


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [{"text": "first"}, {"text": "answer", "prompt": "question? "}, {"text": ""}]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    docs = load_documents(str(path))
    assert docs == [Document("data.jsonl:1", "first"), Document("data.jsonl:2", "answer", "question? ")]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "bad.jsonl:2: not valid JSON"),
        ('["text"]', 'bad.jsonl:2: .* string "text" field'),
        ('{"prompt": "x"}', 'bad.jsonl:2: .* string "text" field'),
        ('{"text": 3}', 'bad.jsonl:2: .* string "text" field'),
        ('{"text": "a", "prompt": 1}', 'bad.jsonl:2: .* "prompt" field'),
    ],
)
def test_load_jsonl_bad_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(InputError, match=match):
        load_documents(str(path))


def test_load_folder_and_single_file(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.md").write_text("bee")
    (root / "a.txt").write_text("ay")
    (root / "sub" / "c.py").write_text("x = 1\n")
    (root / "skip.bin").write_bytes(b"\x00\x01")
    (root / "empty.txt").write_text("")
    docs = load_documents(str(root))
    assert [(d.name, d.text) for d in docs] == [("a.txt", "ay"), ("b.md", "bee"), ("sub/c.py", "x = 1\n")]
    assert load_documents(str(root / "skip.bin")) == [Document("skip.bin", "\x00\x01")]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_documents(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(InputError, match="no non-empty documents"):
        load_documents(str(tmp_path / "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(InputError, match="not UTF-8"):
        load_documents(str(tmp_path / "latin1.txt"))


def test_corpus_stats() -> None:
    docs = [Document("a", "héllo", "p"), Document("b", "x")]
    assert corpus_stats(docs) == {"documents": 2, "characters": 7, "bytes": 8}


# -- split --------------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    docs = synthetic_docs(200)
    train, val = split_documents(docs, 0.1)
    assert split_documents(docs, 0.1) == (train, val)
    assert val and train
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert sorted(d.name for d in train + val) == sorted(d.name for d in docs)
    assert 5 <= len(val) <= 40  # about 10 % of 200
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))  # by name, not by position


def test_split_small_corpora() -> None:
    docs = synthetic_docs(3)
    train, val = split_documents(docs, 1e-6)
    assert len(val) == 1 and len(train) == 2
    train, val = split_documents(docs, 0.999999)
    assert len(train) == 1 and len(val) == 2
    train, val = split_documents([Document("one", "0123456789", "p")], 0.2)
    assert train == [Document("one#train", "01234567", "p")]
    assert val == [Document("one#val", "89", "p")]
    with pytest.raises(InputError):
        split_documents([Document("x", "a")], 0.5)
    with pytest.raises(ConfigError):
        split_documents(docs, 0.0)


# -- tokenisation -------------------------------------------------------------------------------------------


def test_tokenize_layout_bos_and_prompt_mask(tok: TextTokenizer, tmp_path: Path) -> None:
    docs = [Document("a", "hi"), Document("empty", ""), Document("b", "yo!", "Q: "), Document("c", "z")]
    stream = tokenize_documents(docs, tok, tmp_path)
    bos = tok.bos_id
    expected = [bos, *tok.encode("hi"), bos, *tok.encode("Q: "), *tok.encode("yo!"), bos, *tok.encode("z")]
    assert isinstance(stream, TokenStream) and len(stream) == len(expected)
    assert stream.tokens.dtype == np.uint16 and stream.loss_mask.dtype == np.uint8
    assert stream.tokens.tolist() == expected
    assert stream.loss_mask.tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1]
    assert stream.doc_index.tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 3, 3]  # positions in the input list


def test_tokenize_cache_is_reused(tok: TextTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = synthetic_docs(10)
    calls: list[tuple[int, int]] = []
    first = tokenize_documents(docs, tok, tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (10, 10)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 4 and not any(name.startswith(".") for name in files)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tokenizer was called on a cache hit")

    monkeypatch.setattr(TextTokenizer, "encode_batch", fail)
    monkeypatch.setattr(TextTokenizer, "encode", fail)
    second = tokenize_documents(docs, tok, tmp_path)
    assert second.tokens.tolist() == first.tokens.tolist()
    assert second.loss_mask.tolist() == first.loss_mask.tolist()
    with pytest.raises(AssertionError, match="cache hit"):  # any change of content is a new key
        tokenize_documents([*docs[:-1], Document(docs[-1].name, docs[-1].text + ".")], tok, tmp_path)


def test_tokenize_in_chunks(tok: TextTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [Document(f"d{i}", "text " * (i + 1), "p: " if i % 2 else "") for i in range(12)]
    whole = tokenize_documents(docs, tok, tmp_path / "whole")
    monkeypatch.setattr(data, "_CHUNK_CHARS", 16)
    calls: list[tuple[int, int]] = []
    chunked = tokenize_documents(docs, tok, tmp_path / "chunked", progress=lambda *p: calls.append(p))
    assert len(calls) > 3 and calls[-1] == (12, 12)
    for name in ("tokens", "loss_mask", "doc_index"):
        assert getattr(chunked, name).tolist() == getattr(whole, name).tolist()


def test_tokenize_rebuilds_incomplete_cache(tok: TextTokenizer, tmp_path: Path) -> None:
    docs = synthetic_docs(5)
    first = tokenize_documents(docs, tok, tmp_path).tokens.tolist()
    (meta,) = tmp_path.glob("*.json")
    meta.unlink()  # an interrupted write never produced the marker
    assert tokenize_documents(docs, tok, tmp_path).tokens.tolist() == first
    assert meta.exists()


def test_tokenize_empty_corpus(tok: TextTokenizer, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no non-empty"):
        tokenize_documents([Document("a", "")], tok, tmp_path)
    assert not list(tmp_path.iterdir())  # temp files cleaned up


# -- rows and sampling --------------------------------------------------------------------------------------


def test_packed_rows_match_stream(tok: TextTokenizer, tmp_path: Path) -> None:
    rows = make_rows(tok, tmp_path, seq_len=8)
    stream = rows.stream
    assert len(rows) == len(stream) // 8
    batch = rows.rows(torch.tensor([3, 0, len(rows) - 1]))
    assert batch.input_ids.dtype == batch.labels.dtype == batch.doc_ids.dtype == torch.int64
    for b, r in enumerate([3, 0, len(rows) - 1]):
        window = slice(r * 8, (r + 1) * 8)
        assert batch.input_ids[b].tolist() == stream.tokens[window].tolist()
        assert batch.doc_ids[b].tolist() == stream.doc_index[window].tolist()
        expected = [
            t if m else -100 for t, m in zip(stream.tokens[window].tolist(), stream.loss_mask[window], strict=True)
        ]
        assert batch.labels[b].tolist() == expected
    with pytest.raises(InputError, match="row indices"):
        rows.rows(torch.tensor([len(rows)]))


def test_packed_rows_too_short(tok: TextTokenizer, tmp_path: Path) -> None:
    stream = tokenize_documents([Document("a", "abc")], tok, tmp_path)
    with pytest.raises(InputError, match="has 4 tokens, fewer than one row of 16"):
        PackedRows(stream, 16)


def index_rows(n_rows: int, seq_len: int = 4) -> PackedRows:
    """Rows over tokens 0, 1, 2, ...: row r starts with token r * seq_len (uint32 keeps large ids exact)."""
    n = n_rows * seq_len + 1
    return PackedRows(TokenStream(np.arange(n, dtype=np.uint32), np.ones(n, np.uint8), np.zeros(n, np.int32)), seq_len)


def drain(sampler: BatchSampler, steps: int) -> list[list[int]]:
    """The row numbers of the next ``steps`` batches."""
    seq_len = sampler.rows.seq_len
    return [(sampler.next_batch().input_ids[:, 0] // seq_len).tolist() for _ in range(steps)]


def test_sampler_epochs_are_seeded_permutations() -> None:
    rows = index_rows(10)
    batches = drain(BatchSampler(rows, 3, seed=5), 6)  # 3 draws per epoch, the 10th row of each epoch dropped
    for epoch in range(2):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        assert [r for batch in batches[3 * epoch : 3 * epoch + 3] for r in batch] == perm[:9]
    assert drain(BatchSampler(rows, 3, seed=5, shuffle=False), 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_sampler_deterministic_and_resumable() -> None:
    rows = index_rows(23)
    steps = 12  # 5 draws per epoch: crosses two epoch boundaries
    reference = drain(BatchSampler(rows, 4, seed=7), steps)
    assert drain(BatchSampler(rows, 4, seed=7), steps) == reference
    assert drain(BatchSampler(rows, 4, seed=8), steps) != reference
    first = BatchSampler(rows, 4, seed=7)
    head = drain(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"epoch": 1, "cursor": 8}
    resumed = BatchSampler(rows, 4, seed=7)
    resumed.load_state_dict(state)
    assert head + drain(resumed, steps - 7) == reference
    assert resumed.state_dict()["epoch"] == 2
    with pytest.raises(InputError):
        resumed.load_state_dict({"epoch": 0})
    with pytest.raises(InputError):
        resumed.load_state_dict({"epoch": 0, "cursor": 24})


def test_sampler_ranks_partition_the_global_batch() -> None:
    rows = index_rows(25)
    steps = 7  # 4 draws of 6 per epoch
    whole = drain(BatchSampler(rows, 6, seed=3), steps)
    rank0 = drain(BatchSampler(rows, 3, seed=3, rank=0, world_size=2), steps)
    rank1 = drain(BatchSampler(rows, 3, seed=3, rank=1, world_size=2), steps)
    for w, a, b in zip(whole, rank0, rank1, strict=True):
        assert not set(a) & set(b)
        assert a + b == w
    with pytest.raises(InputError, match="exceeds"):
        BatchSampler(rows, 13, seed=0, world_size=2)
    with pytest.raises(InputError, match="rank"):
        BatchSampler(rows, 1, seed=0, rank=2, world_size=2)


# -- masks and evaluation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 1, 3])
def test_document_mask_matches_naive_loop(window: int | None) -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 6, 6, 6]])
    mask = document_mask(doc_ids, window)
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(9):
            for j in range(9):
                ok = doc_ids[b, i] == doc_ids[b, j] and j <= i and (window is None or i - j < window)
                assert bool(mask[b, 0, i, j]) == bool(ok)


def test_fixed_eval_batches(tok: TextTokenizer, tmp_path: Path) -> None:
    rows = make_rows(tok, tmp_path)
    batches = fixed_eval_batches(rows, 4, max_batches=2)
    assert len(batches) == 2
    assert torch.equal(torch.cat([b.input_ids for b in batches]), rows.rows(torch.arange(8)).input_ids)
    assert len(fixed_eval_batches(rows, 4, max_batches=10**6)) == len(rows) // 4
    (small,) = fixed_eval_batches(rows, len(rows) + 5, max_batches=3)
    assert small.input_ids.shape == (len(rows), rows.seq_len)
