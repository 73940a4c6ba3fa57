"""A thin wrapper over the Hugging Face ``tokenizers`` library: every run saves exactly one ``tokenizer.json``.

Three kinds of tokenizer, all with the :data:`SPECIAL_TOKENS` at ids ``0..13``:

* :meth:`TextTokenizer.byte_level`: the 256 bytes (ids ``14..269``) and no merges, so any text round-trips exactly;
* :meth:`TextTokenizer.train_bpe`: byte-level BPE trained on a corpus (the same texts give the same tokenizer);
* :meth:`TextTokenizer.symbolic`: one id per whitespace-separated symbol of a task alphabet (reasoning tasks).

Special token strings that occur inside the text passed to :meth:`TextTokenizer.encode` *are* recognised and
encoded as the single special id (the ``tokenizers`` default for added special tokens); a corpus that must keep
such strings literal has to escape them before tokenisation. Nothing is added automatically (no BOS / EOS):
the data pipeline places BOS itself.

An imported tokenizer (e.g. Huginn's) has other special tokens. :class:`TokenRoles` says which of its entries
play our roles (bos, eos, pad, end of turn) and how a chat message of each role opens; such a tokenizer need not
hold :data:`SPECIAL_TOKENS`, only the tokens its roles name. A checkpoint keeps the roles in ``token_roles.json``
beside ``tokenizer.json``; without that file the roles are ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class TokenRoles:
    """Which vocabulary entries play the roles the library relies on, and how a chat message opens.

    ``bos``, ``eos``, ``pad`` and ``end_of_turn`` name single tokens. ``openings[role]`` is the text that opens a chat
    message of each of :data:`CHAT_ROLES`; it is tokenized, so it may mix special tokens and plain text (Huginn:
    ``<|begin_header|>user<|end_header|>\\n\\n``). ``chat_template`` is an imported Hugging Face (Jinja) chat
    template, carried along unchanged so that an export can write it back; nothing here renders it.
    """

    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    pad: str = "<|pad|>"
    end_of_turn: str = "<|end|>"
    openings: Mapping[str, str] = field(
        default_factory=lambda: {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
    )
    chat_template: str | None = None

    def __post_init__(self) -> None:
        for name, value in self.single_tokens().items():
            if not isinstance(value, str) or not value:
                raise InputError(f"token role {name!r} must name a token (a non-empty string), got {value!r}.")
        if not isinstance(self.openings, Mapping) or sorted(self.openings) != sorted(CHAT_ROLES):
            raise InputError(f"token role 'openings' must map exactly the chat roles {', '.join(CHAT_ROLES)}.")
        bad = [role for role, text in self.openings.items() if not isinstance(text, str) or not text]
        if bad:
            raise InputError(f"the chat opening of role {bad[0]!r} must be a non-empty string.")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise InputError("token role 'chat_template' must be a string or null.")
        object.__setattr__(self, "openings", dict(self.openings))

    def single_tokens(self) -> dict[str, str]:
        """The roles that name one token each: bos, eos, pad, end_of_turn."""
        return {"bos": self.bos, "eos": self.eos, "pad": self.pad, "end_of_turn": self.end_of_turn}

    def to_dict(self) -> dict[str, Any]:
        return {**self.single_tokens(), "openings": dict(self.openings), "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, data: Any) -> TokenRoles:
        """Roles from :meth:`to_dict`'s JSON form; unknown or missing keys are an :class:`InputError`."""
        if not isinstance(data, Mapping):
            raise InputError(f"token roles must be a JSON object, got {type(data).__name__}.")
        names = {"bos", "eos", "pad", "end_of_turn", "openings", "chat_template"}
        unknown = sorted(k if isinstance(k, str) and k.isprintable() else repr(k) for k in set(data) - names)
        missing = sorted(names - {"chat_template"} - set(data))
        problems = []
        if unknown:
            problems.append(f"unknown key(s) {', '.join(unknown)}")
        if missing:
            problems.append(f"no {', '.join(missing)}")
        if problems:
            raise InputError(f"the token roles have {' and '.join(problems)}.")
        return cls(**data)


def byte_to_unicode() -> dict[int, str]:
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
    """A validated ``tokenizers.Tokenizer``: with our roles (``roles=None``) it holds every entry of
    :data:`SPECIAL_TOKENS`; with imported :class:`TokenRoles` it holds every token those roles name."""

    def __init__(self, inner: tokenizers.Tokenizer, roles: TokenRoles | None = None) -> None:
        if roles is None:
            missing = [token for token in SPECIAL_TOKENS if inner.token_to_id(token) is None]
            if missing:
                raise InputError(f"the tokenizer lacks the special tokens {', '.join(missing)}.")
        else:
            missing = [
                f"{role} ({token})" for role, token in roles.single_tokens().items() if inner.token_to_id(token) is None
            ]
            if missing:
                raise InputError(f"the tokenizer has no token for the role(s) {', '.join(missing)}.")
        self.inner = inner
        self.roles = roles or TokenRoles()

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def byte_level(cls) -> TextTokenizer:
        """The 14 specials (ids 0..13) and the 256 bytes (id ``14 + byte``), no merges: 270 ids."""
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for byte, char in byte_to_unicode().items():
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
    def from_json(
        cls, text: str, source: str = "the text", *, roles: TokenRoles | Mapping[str, Any] | None = None
    ) -> TextTokenizer:
        """A tokenizer from the JSON of :meth:`to_json` (e.g. stored inside a checkpoint).

        ``roles``: the tokenizer's :class:`TokenRoles` (or their :meth:`TokenRoles.to_dict` form); None means ours.
        """
        try:
            inner = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{source} is not a tokenizer file ({reason}).") from exc
        if roles is not None and not isinstance(roles, TokenRoles):
            roles = TokenRoles.from_dict(roles)
        return cls(inner, roles)

    def roles_dict(self) -> dict[str, Any] | None:
        """The roles to store beside the tokenizer (``token_roles.json``); None when they are ours."""
        return None if self.roles == TokenRoles() else self.roles.to_dict()

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
        return self.token_id(self.roles.bos)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.roles.eos)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.roles.pad)

    @property
    def end_of_turn_id(self) -> int:
        return self.token_id(self.roles.end_of_turn)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry (``InputError`` if unknown)."""
        index = self.inner.token_to_id(token)
        if index is None:
            raise InputError(f"token {token!r} is not in the vocabulary.")
        return index

    # -- encoding -------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special token strings inside it become their special id; nothing is added."""
        try:
            return self.inner.encode(text, add_special_tokens=False).ids
        except TypeError:  # not a str, or a str with lone surrogates (undecodable bytes read with surrogateescape)
            raise InputError(_not_text(text)) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of many texts at once (parallel inside ``tokenizers``)."""
        texts = list(texts)
        try:
            return [enc.ids for enc in self.inner.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            raise InputError(next(reason for reason in map(_not_text, texts) if reason)) from None

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size} ids.")
        return self.inner.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"


def _not_text(text: object) -> str:
    """Why ``text`` cannot be tokenized ("" when it can)."""
    if not isinstance(text, str):
        return f"text to tokenize must be a string, got {type(text).__name__}."
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"the text is not valid UTF-8 (undecodable bytes at character {exc.start}); send UTF-8 text."
    return ""
