"""A thin wrapper over the Hugging Face ``tokenizers`` library: every run saves exactly one ``tokenizer.json``.

Three kinds of tokenizer, all with the :data:`SPECIAL_TOKENS` at ids ``0..13``:

* :meth:`TextTokenizer.byte_level`: the 256 bytes (ids ``14..269``) and no merges, so any text round-trips exactly;
* :meth:`TextTokenizer.train_bpe`: byte-level BPE trained on a corpus (the same texts give the same tokenizer);
* :meth:`TextTokenizer.symbolic`: one id per whitespace-separated symbol of a task alphabet (reasoning tasks).

Special token strings that occur inside the text passed to :meth:`TextTokenizer.encode` *are* recognised and
encoded as the single special id (the ``tokenizers`` default for added special tokens); a corpus that must keep
such strings literal has to escape them before tokenisation. Nothing is added automatically (no BOS / EOS):
the data pipeline places BOS itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from loopformer.config import atomic_write_text, read_text_file
from loopformer.errors import ConfigError, InputError

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<|memory|>",
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map that the ByteLevel pre-tokenizer and decoder use.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to ``chr(256 + k)``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class TextTokenizer:
    """A validated ``tokenizers.Tokenizer`` that holds every entry of :data:`SPECIAL_TOKENS`."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        missing = [token for token in SPECIAL_TOKENS if inner.token_to_id(token) is None]
        if missing:
            raise InputError(f"the tokenizer lacks the special tokens {', '.join(missing)}.")
        self.inner = inner

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def byte_level(cls) -> TextTokenizer:
        """The 14 specials (ids 0..13) and the 256 bytes (id ``14 + byte``), no merges: 270 ids."""
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for byte, char in _byte_to_unicode().items():
            vocab[char] = len(SPECIAL_TOKENS) + byte
        inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        cls._configure(inner)
        inner.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(inner)

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> TextTokenizer:
        """Byte-level BPE with at most ``vocab_size`` ids (specials first, then the 256 bytes, then merges).

        The result is deterministic: the same texts give the same ``to_json()``. A small corpus may stop short
        of ``vocab_size`` when no pair reaches ``min_frequency`` any more.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size!r}."
            )
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ConfigError(f"min_frequency must be an integer >= 1, got {min_frequency!r}.")
        inner = tokenizers.Tokenizer(models.BPE())
        cls._configure(inner)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        inner.train_from_iterator(texts, trainer=trainer)
        return cls(inner)

    @classmethod
    def symbolic(cls, symbols: Iterable[str]) -> TextTokenizer:
        """A word-level vocabulary: the specials, then each distinct symbol in first-seen order.

        Text is split on whitespace. :meth:`encode` maps a symbol outside the vocabulary to the pad id;
        task code encodes through :meth:`symbol_ids` instead, which names unknown symbols.
        """
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for symbol in symbols:
            if not symbol or any(ch.isspace() for ch in symbol):
                raise InputError(f"task symbol {symbol!r} is empty or contains whitespace.")
            if symbol in SPECIAL_TOKENS:
                raise InputError(f"task symbol {symbol!r} is reserved as a special token; rename it.")
            vocab.setdefault(symbol, len(vocab))
        inner = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
        inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        inner.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(inner)

    @property
    def is_symbolic(self) -> bool:
        """True for a :meth:`symbolic` (task) vocabulary."""
        return isinstance(self.inner.model, models.WordLevel)

    def symbol_ids(self) -> dict[str, int]:
        """Symbol -> id of a :meth:`symbolic` vocabulary, specials excluded."""
        if not self.is_symbolic:
            raise InputError("this tokenizer is not a task (symbolic) vocabulary.")
        return {
            token: i for token, i in self.inner.get_vocab(with_added_tokens=False).items() if i >= len(SPECIAL_TOKENS)
        }

    @staticmethod
    def _configure(inner: tokenizers.Tokenizer) -> None:
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Read a ``tokenizer.json`` (plain JSON; nothing is unpickled)."""
        path = Path(path)
        return cls.from_json(read_text_file(path, "Tokenizer file", InputError), source=str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "the text") -> TextTokenizer:
        """A tokenizer from the JSON of :meth:`to_json` (e.g. stored inside a checkpoint)."""
        try:
            inner = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{source} is not a tokenizer file ({reason}).") from exc
        return cls(inner)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically (temp file + rename)."""
        atomic_write_text(Path(path), self.to_json())

    def to_json(self) -> str:
        return self.inner.to_str()

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of :meth:`to_json` (a cache key for tokenised corpora)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.token_id("<|bos|>")

    @property
    def eos_id(self) -> int:
        return self.token_id("<|eos|>")

    @property
    def pad_id(self) -> int:
        return self.token_id("<|pad|>")

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry (``InputError`` if unknown)."""
        index = self.inner.token_to_id(token)
        if index is None:
            raise InputError(f"token {token!r} is not in the vocabulary.")
        return index

    # -- encoding -------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special token strings inside it become their special id; nothing is added."""
        return self.inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of many texts at once (parallel inside ``tokenizers``)."""
        return [enc.ids for enc in self.inner.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size} ids.")
        return self.inner.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"
