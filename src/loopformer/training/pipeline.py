"""From a data source to tokenised, packed training and validation rows (shared by train and eval-ppl).

Tokenizers and token files are cached under ``$LOOPFORMER_CACHE`` (default ``~/.cache/loopformer``),
keyed by content hash, so a second run on the same corpus starts at once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loopformer.tokenizer import TextTokenizer
from loopformer.training.config import TrainConfig
from loopformer.training.data import (
    Batch,
    BatchSampler,
    Document,
    PackedRows,
    fixed_eval_batches,
    load_documents,
    split_documents,
    tokenize_documents,
)

Log = Callable[[str], None]


def cache_dir() -> Path:
    """Where tokenizers and token files are cached: ``$LOOPFORMER_CACHE`` or ``~/.cache/loopformer``."""
    root = os.environ.get("LOOPFORMER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "loopformer"


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    train: PackedRows
    val: PackedRows
    stats: dict[str, int]

    @property
    def summary(self) -> str:
        return f"{self.stats['train_tokens']:,} training tokens"

    def sampler(self, rows: int, seed: int, rank: int, world_size: int) -> BatchSampler:
        """This rank's resumable sampler of ``rows`` packed rows per step."""
        return BatchSampler(self.train, rows, seed, rank, world_size)

    def eval_batches(self, batch_size: int, count: int) -> list[Batch]:
        """The fixed validation batches (the first ``count`` of the validation rows)."""
        return fixed_eval_batches(self.val, batch_size, count)


def tokenizer_sample(docs: list[Document], megabytes: float) -> list[str]:
    """The first ``megabytes`` of training text in document order (deterministic), for BPE training."""
    budget, texts = int(megabytes * 1e6), []
    for doc in docs:
        if budget <= 0:
            break
        texts.append(doc.prompt + doc.text)
        budget -= len(texts[-1])
    return texts


def build_tokenizer(spec: str, docs: list[Document], config: TrainConfig, log: Log) -> TextTokenizer:
    """``byte``, ``bpe`` (trained on the training split, cached) or a path to a ``tokenizer.json``."""
    if spec == "byte":
        return TextTokenizer.byte_level()
    if spec != "bpe":
        return TextTokenizer.load(Path(spec))
    sample = tokenizer_sample(docs, config.tokenizer_sample_mb)
    digest = hashlib.sha256(f"bpe:{config.tokenizer_vocab}".encode())
    for text in sample:
        digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    path = cache_dir() / "tokenizers" / f"bpe-{config.tokenizer_vocab}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return TextTokenizer.load(path)
    log(f"training a byte-level BPE tokenizer ({config.tokenizer_vocab} tokens) on {sum(map(len, sample)):,} chars")
    tokenizer = TextTokenizer.train_bpe(sample, vocab_size=config.tokenizer_vocab)
    tokenizer.save(path)
    return tokenizer


def prepare_data(
    config: TrainConfig,
    tokenizer: TextTokenizer | None,
    log: Log,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> PreparedData:
    """Load, split, tokenise (rank 0 first, the others then read its cache) and pack the corpus.

    ``tokenizer`` is given when resuming or fine-tuning (it comes with the checkpoint).
    """
    docs = load_documents(config.data)
    if config.val_data is not None:
        train_docs, val_docs = docs, load_documents(config.val_data)
    else:
        train_docs, val_docs = split_documents(docs, config.val_fraction)
    streams = {}
    for turn in ("main", "others"):
        if (turn == "main") == is_main:
            if tokenizer is None:
                tokenizer = build_tokenizer(config.tokenizer, train_docs, config, log)
            tokens_dir = cache_dir() / "tokens"
            streams = {
                name: tokenize_documents(d, tokenizer, tokens_dir)
                for name, d in (("train", train_docs), ("val", val_docs))
            }
        barrier()
    stats = {
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens": len(streams["train"]),
        "val_tokens": len(streams["val"]),
    }
    train = PackedRows(streams["train"], config.seq_len)
    val = PackedRows(streams["val"], config.seq_len)
    return PreparedData(tokenizer=tokenizer, train=train, val=val, stats=stats)
