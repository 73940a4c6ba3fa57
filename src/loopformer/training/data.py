"""Corpus -> documents -> a token file cached by content hash -> packed rows -> resumable, rank-sharded batches.

The default corpus is the running interpreter's own standard library (:func:`stdlib_documents`), so training
needs no download. Measured on Python 3.11.7: 598 documents, 11.07 MB (11,065,582 bytes of UTF-8, 10.6 MiB)
and 11,066,180 tokens with the byte-level tokenizer (one BOS per document included); tokenising it takes about
7 s on 2 CPU cores, reopening the cache about 10 ms. ``stdlib+topics`` adds 79 pydoc topics (677 documents,
11.53 MB).

Layout of the token cache (``<key>`` = first 16 hex digits of a sha256 over the tokenizer fingerprint and every
document): ``<key>.tokens.bin`` (uint16, or uint32 above 65,536 ids), ``<key>.mask.bin`` (uint8 loss mask),
``<key>.docs.bin`` (int32 document number), all raw little-endian arrays, and ``<key>.json``, written last,
whose presence marks the cache entry as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loopformer.config import atomic_write_text, read_jsonl_records, read_text_file
from loopformer.errors import ConfigError, InputError
from loopformer.filemode import as_created
from loopformer.tokenizer import TextTokenizer

STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
TEXT_SUFFIXES = (".txt", ".md", ".py")
IGNORE_INDEX = -100
_CACHE_VERSION = 1
_CHUNK_CHARS = 1 << 20  # characters tokenised per encode_batch call (bounds the Python-list memory)


@dataclass(frozen=True)
class Document:
    """One training document; ``prompt`` is a prefix the model sees but is not trained on."""

    name: str
    text: str
    prompt: str = ""


# -- corpora ------------------------------------------------------------------------------------------------


def stdlib_documents(include_topics: bool = False) -> list[Document]:
    """The interpreter's standard-library ``.py`` files, sorted by relative path.

    Directories named in :data:`STDLIB_EXCLUDED_DIRS` (site-packages, dist-packages, test, tests, idlelib,
    lib2to3, __pycache__) are skipped at any depth, as are empty, unreadable and non-UTF-8 files.
    ``include_topics`` appends the ``pydoc_data.topics`` help texts as ``pydoc_topics/<key>``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        relative = path.relative_to(root)
        if STDLIB_EXCLUDED_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            docs.append(Document(relative.as_posix(), text))
    if include_topics:
        from pydoc_data.topics import topics

        docs.extend(Document(f"pydoc_topics/{key}", topics[key]) for key in sorted(topics) if topics[key])
    return docs


def _read_text(path: Path) -> str:
    return read_text_file(path, "Corpus file", InputError)


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for number, record in read_jsonl_records(path, "Corpus file", InputError):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f'{where}: not a JSON object with a string "text" field.')
        prompt = record.get("prompt", "")
        if not isinstance(prompt, str):
            raise InputError(f'{where}: the "prompt" field is not a string.')
        docs.append(Document(f"{path.name}:{number}", record["text"], prompt))
    return docs


def load_documents(source: str) -> list[Document]:
    """Documents of ``source``: ``stdlib``, ``stdlib+topics``, a ``.jsonl`` file, a folder or one text file.

    JSONL: one object per non-blank line with a string ``text`` and an optional string ``prompt``, named
    ``<file>.jsonl:<line>``. Folder: every ``.txt`` / ``.md`` / ``.py`` file below it, sorted, named by relative
    path. Documents with empty ``text`` are dropped; an empty result is an ``InputError``.
    """
    if source == "stdlib":
        docs = stdlib_documents()
    elif source == "stdlib+topics":
        docs = stdlib_documents(include_topics=True)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise InputError(f"corpus {source} does not exist (expected stdlib, stdlib+topics, a file or a folder).")
        if path.is_dir():
            files = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            docs = [Document(p.relative_to(path).as_posix(), _read_text(p)) for p in files]
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path)
        else:
            docs = [Document(path.name, _read_text(path))]
    docs = [doc for doc in docs if doc.text]
    if not docs:
        raise InputError(f"corpus {source} contains no non-empty documents.")
    return docs


def _name_hash(name: str) -> int:
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16)


def split_documents(docs: list[Document], val_fraction: float = 0.02) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, validation) split by sha256 of each document's name; input order is kept.

    A document is held out iff ``int(sha256(name)[:8], 16) / 2**32 < val_fraction``. With >= 2 documents both
    sides are made non-empty (the smallest hash moves to validation, or the largest back to training). A single
    document is cut at ``1 - val_fraction`` of its characters into ``<name>#train`` and ``<name>#val``.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}.")
    if not docs:
        raise InputError("cannot split an empty list of documents.")
    if len(docs) == 1:
        doc = docs[0]
        if len(doc.text) < 2:
            raise InputError(f"document {doc.name} is too short to split into training and validation text.")
        cut = min(max(int(len(doc.text) * (1 - val_fraction)), 1), len(doc.text) - 1)
        return [Document(f"{doc.name}#train", doc.text[:cut], doc.prompt)], [
            Document(f"{doc.name}#val", doc.text[cut:], doc.prompt)
        ]
    hashes = [_name_hash(doc.name) for doc in docs]
    held = [h / 2**32 < val_fraction for h in hashes]
    if not any(held):
        held[min(range(len(docs)), key=lambda i: (hashes[i], i))] = True
    elif all(held):
        held[max(range(len(docs)), key=lambda i: (hashes[i], -i))] = False
    train = [doc for doc, h in zip(docs, held, strict=True) if not h]
    val = [doc for doc, h in zip(docs, held, strict=True) if h]
    return train, val


def corpus_stats(docs: list[Document]) -> dict[str, int]:
    """Counts over ``prompt + text`` of every document: documents, characters and UTF-8 bytes."""
    chars = sum(len(doc.prompt) + len(doc.text) for doc in docs)
    size = sum(len(doc.prompt.encode("utf-8")) + len(doc.text.encode("utf-8")) for doc in docs)
    return {"documents": len(docs), "characters": chars, "bytes": size}


# -- tokenisation and cache ---------------------------------------------------------------------------------


class TokenStream:
    """Memory-mapped tokens of a whole corpus split, BOS before each document, plus a loss mask.

    ``tokens`` (uint16 / uint32), ``loss_mask`` (uint8: 0 on BOS and prompt tokens, 1 on text tokens) and
    ``doc_index`` (int32: the position in the input document list of each token's document) share one length.
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, doc_index: np.ndarray) -> None:
        if not len(tokens) == len(loss_mask) == len(doc_index):
            raise InputError("tokens, loss_mask and doc_index must have the same length.")
        self.tokens = tokens
        self.loss_mask = loss_mask
        self.doc_index = doc_index

    def __len__(self) -> int:
        return len(self.tokens)


def _cache_key(docs: list[Document], tokenizer: TextTokenizer) -> str:
    digest = hashlib.sha256(f"loopformer-tokens-v{_CACHE_VERSION}\0{tokenizer.fingerprint}\0".encode())
    for doc in docs:
        for field in (doc.name, doc.prompt, doc.text):
            data = field.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _cache_files(cache_dir: Path, key: str) -> dict[str, Path]:
    stem = key[:16]
    return {name: cache_dir / f"{stem}.{name}.bin" for name in ("tokens", "mask", "docs")} | {
        "meta": cache_dir / f"{stem}.json"
    }


def _open_cached(files: dict[str, Path], key: str) -> TokenStream | None:
    """The cached stream if its meta marker exists and matches ``key`` and the file sizes; else None."""
    try:
        meta = json.loads(files["meta"].read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("version") != _CACHE_VERSION or meta.get("dtype") not in ("<u2", "<u4"):
            return None
        n = int(meta["tokens"])
        dtypes = {"tokens": np.dtype(meta["dtype"]), "mask": np.dtype("u1"), "docs": np.dtype("<i4")}
        if n < 1 or any(files[k].stat().st_size != n * d.itemsize for k, d in dtypes.items()):
            return None
        arrays = {k: np.memmap(files[k], dtype=d, mode="r", shape=(n,)) for k, d in dtypes.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenStream(arrays["tokens"], arrays["mask"], arrays["docs"])


def _chunks(docs: list[Document]) -> Iterator[list[tuple[int, Document]]]:
    chunk: list[tuple[int, Document]] = []
    chars = 0
    for index, doc in enumerate(docs):
        if not doc.text and not doc.prompt:
            continue
        chunk.append((index, doc))
        chars += len(doc.text) + len(doc.prompt)
        if chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def tokenize_documents(
    docs: list[Document],
    tokenizer: TextTokenizer,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> TokenStream:
    """Tokenise ``docs`` as ``BOS + prompt + text`` each, or reuse the cache entry for identical inputs.

    The prompt and the text are encoded separately so the loss mask falls exactly on the boundary. Documents
    with no text and no prompt are skipped. ``progress(done, total)`` is called with document counts.
    """
    cache_dir = Path(cache_dir)
    key = _cache_key(docs, tokenizer)
    files = _cache_files(cache_dir, key)
    cached = _open_cached(files, key)
    if cached is not None:
        return cached
    if len(docs) >= 2**31:
        raise InputError(f"too many documents ({len(docs)}) for an int32 document index.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    bos = tokenizer.bos_id
    temps = {k: tempfile.mkstemp(prefix=f".{files[k].name}.", dir=cache_dir) for k in ("tokens", "mask", "docs")}
    for fd, _ in temps.values():
        as_created(fd)
    handles = {k: os.fdopen(fd, "wb") for k, (fd, _) in temps.items()}
    total = 0
    try:
        done = 0
        for chunk in _chunks(docs):
            texts = tokenizer.encode_batch([doc.text for _, doc in chunk])
            prompted = [i for i, (_, doc) in enumerate(chunk) if doc.prompt]
            prompt_ids = dict(
                zip(prompted, tokenizer.encode_batch([chunk[i][1].prompt for i in prompted]), strict=True)
            )
            tokens, mask, owner = [], [], []
            for i, (index, _) in enumerate(chunk):
                prefix = [bos, *prompt_ids.get(i, [])]
                tokens.append(np.asarray(prefix + texts[i], dtype=dtype))
                mask.append(np.repeat(np.array([0, 1], dtype="u1"), [len(prefix), len(texts[i])]))
                owner.append(np.full(len(prefix) + len(texts[i]), index, dtype="<i4"))
            for k, parts in (("tokens", tokens), ("mask", mask), ("docs", owner)):
                handles[k].write(np.concatenate(parts).tobytes())
            total += sum(len(t) for t in tokens)
            done += len(chunk)
            if progress is not None:
                progress(done, len(docs))
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        if total == 0:
            raise InputError("the corpus has no non-empty documents to tokenise.")
        for k, (_, tmp) in temps.items():
            os.replace(tmp, files[k])
    except BaseException:
        for k, (_, tmp) in temps.items():
            handles[k].close()
            Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "version": _CACHE_VERSION,
        "key": key,
        "tokens": total,
        "dtype": dtype.str,
        "documents": len(docs),
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer.fingerprint,
    }
    atomic_write_text(files["meta"], json.dumps(meta, indent=2) + "\n")
    stream = _open_cached(files, key)
    if stream is None:  # pragma: no cover - only if another process corrupts the files in between
        raise InputError(f"the token cache in {cache_dir} could not be reopened after writing.")
    return stream


# -- rows and batches ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Model inputs; ``labels`` are aligned with ``input_ids`` (the model shifts them) and -100 where masked."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.doc_ids.to(device))


class PackedRows:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (the tail shorter than a row is dropped)."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len must be a positive integer, got {seq_len!r}.")
        n = len(stream) // seq_len
        if n == 0:
            raise InputError(f"the corpus has {len(stream)} tokens, fewer than one row of {seq_len}.")
        self.stream = stream
        self.seq_len = seq_len
        self._tokens = stream.tokens[: n * seq_len].reshape(n, seq_len)
        self._mask = stream.loss_mask[: n * seq_len].reshape(n, seq_len)
        self._docs = stream.doc_index[: n * seq_len].reshape(n, seq_len)

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def rows(self, indices: torch.Tensor) -> Batch:
        """The rows at ``indices`` (1-D) as a :class:`Batch` of int64 tensors ``[len(indices), seq_len]``."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise InputError(f"row indices must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}.")
        ids = torch.from_numpy(self._tokens[idx].astype(np.int64))
        mask = torch.from_numpy(self._mask[idx].astype(np.bool_))
        docs = torch.from_numpy(self._docs[idx].astype(np.int64))
        return Batch(ids, ids.masked_fill(~mask, IGNORE_INDEX), docs)


class BatchSampler:
    """Deterministic, resumable order over rows: one seeded permutation per epoch; each draw takes the next
    ``batch_size * world_size`` rows and this rank keeps its slice (the rest of an epoch that is too short for a
    whole draw is dropped)."""

    def __init__(
        self,
        rows: PackedRows,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank must lie in [0, world_size), got rank {rank} of world_size {world_size}.")
        if batch_size * world_size > len(rows):
            raise InputError(
                f"batch_size {batch_size} x world_size {world_size} exceeds the {len(rows)} rows of the corpus."
            )
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.rows)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            else:
                order = torch.arange(n)
            self._order = (self.epoch, order)
        return self._order[1]

    def next_batch(self) -> Batch:
        step = self.batch_size * self.world_size
        if self.cursor + step > len(self.rows):
            self.epoch += 1
            self.cursor = 0
        draw = self._permutation()[self.cursor : self.cursor + step]
        self.cursor += step
        return self.rows.rows(draw[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (epoch, cursor)):
            raise InputError(f"sampler state needs integer epoch and cursor, got {state!r}.")
        if epoch < 0 or not 0 <= cursor <= len(self.rows):
            raise InputError(f"sampler state {state!r} is out of range for {len(self.rows)} rows.")
        self.epoch, self.cursor = epoch, cursor


def document_mask(doc_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Bool ``[B, 1, T, T]``, True where query i may attend key j: same document, ``j <= i`` and, with a
    ``window``, ``i - j < window``."""
    if doc_ids.dim() != 2:
        raise InputError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}.")
    if window is not None and window < 1:
        raise InputError(f"window must be a positive integer or None, got {window!r}.")
    t = doc_ids.shape[1]
    pos = torch.arange(t, device=doc_ids.device)
    distance = pos[:, None] - pos[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & allowed)[:, None]


def fixed_eval_batches(rows: PackedRows, batch_size: int, max_batches: int) -> list[Batch]:
    """The first ``min(max_batches, len(rows) // batch_size)`` batches in row order (one smaller batch of all
    rows if there are fewer than ``batch_size``)."""
    if batch_size < 1 or max_batches < 1:
        raise ConfigError(f"batch_size and max_batches must be positive, got {batch_size} and {max_batches}.")
    if len(rows) < batch_size:
        return [rows.rows(torch.arange(len(rows)))]
    count = min(max_batches, len(rows) // batch_size)
    return [rows.rows(torch.arange(i * batch_size, (i + 1) * batch_size)) for i in range(count)]
