"""Token log-probabilities as the OpenAI API returns them: ``logprobs`` of completions and of chat.

A token's log-probability is the log-softmax of the model's logits at its position, at the loop count that produced
them: the model's own distribution, before the repetition penalty, temperature and top-k / top-p / min-p shape the
one the token is drawn from (what the OpenAI API reports). Ids the tokenizer cannot decode have no probability;
values below :data:`LOGPROB_FLOOR` (``-inf`` among them, which JSON cannot carry) are reported as the floor.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import decoders

from loopformer.inference.text import REPLACEMENT
from loopformer.tokenizer import TextTokenizer, byte_to_unicode

LOGPROB_FLOOR = -9999.0
ROWS_PER_CHUNK = 256  # prompt positions whose [rows, vocab] log-softmax is computed at once
UNICODE_TO_BYTE = {char: byte for byte, char in byte_to_unicode().items()}


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability (None for the first prompt token: nothing comes before it) and the ``top`` most
    likely ids at its position with theirs, most likely first (lower id first on ties)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """The log-probability of ``tokens[i]`` under ``logits[i]`` ([n, V]) and the ``top`` most likely ids there."""
    ids = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)
    entries = []
    for start in range(0, len(ids), ROWS_PER_CHUNK):
        part = slice(start, start + ROWS_PER_CHUNK)
        logp = torch.log_softmax(logits[part].float(), dim=-1).clamp_min(LOGPROB_FLOOR)
        chosen = logp.gather(1, ids[part, None])[:, 0].tolist()
        values, alternatives = logp.topk(min(top, logp.shape[-1]), dim=-1)
        for token, value, row_ids, row_values in zip(
            ids[part].tolist(), chosen, alternatives.tolist(), values.tolist(), strict=True
        ):
            ranked = sorted(zip(row_ids, row_values, strict=True), key=lambda pair: (-pair[1], pair[0]))
            entries.append(TokenLogprob(token, value, tuple(ranked)))
    return entries


class TokenText:
    """What single tokens look like in ``logprobs``: their UTF-8 bytes, and their text, which is ``bytes:\\xNN...``
    (OpenAI's form) for a token that holds part of a character. Looked up once per id."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = isinstance(tokenizer.inner.decoder, decoders.ByteLevel)
        self._known: dict[int, tuple[str, bytes]] = {}

    def _look_up(self, token: int) -> tuple[str, bytes]:
        if token not in self._known:
            text = self.tokenizer.decode([token])
            raw = text.encode()
            piece = self.tokenizer.inner.id_to_token(token)
            if REPLACEMENT in text and self.byte_level and piece and all(char in UNICODE_TO_BYTE for char in piece):
                raw = bytes(UNICODE_TO_BYTE[char] for char in piece)  # the decoder replaced an incomplete character
            try:
                shown = raw.decode()
            except UnicodeDecodeError:
                shown = "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
            self._known[token] = (shown, raw)
        return self._known[token]

    def text(self, token: int) -> str:
        return self._look_up(token)[0]

    def bytes(self, token: int) -> bytes:
        return self._look_up(token)[1]


class TextOffsets:
    """Where each token of a completion's text starts: the characters its bytes and the earlier tokens' decode to."""

    def __init__(self, texts: TokenText) -> None:
        self.texts = texts
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.length = 0

    def push(self, token: int, shown: bool = True) -> int:
        """The offset of the character that holds ``token``'s first byte; a token not ``shown`` in the text (the
        added ``<|bos|>``) takes no room. Bytes that an earlier token left incomplete and this one cuts off count as
        the earlier token's replacement character."""
        raw = self.texts.bytes(token)
        if not shown or not raw:
            return self.length
        first = self.decoder.decode(raw[:1])
        held = bool(self.decoder.getstate()[0])  # the first byte opens a character still incomplete
        offset = self.length + len(first) - (0 if held else 1)
        self.length += len(first) + len(self.decoder.decode(raw[1:]))
        return offset


def completion_logprobs(entries: Sequence[TokenLogprob], offsets: Sequence[int], texts: TokenText) -> dict[str, Any]:
    """The ``logprobs`` of a completion choice (or chunk); ``top_logprobs`` holds the chosen token too, as in OpenAI's
    legacy API (up to ``logprobs + 1`` entries)."""
    tops: list[dict[str, float] | None] = []
    for entry in entries:
        if entry.logprob is None:
            tops.append(None)
            continue
        top = {texts.text(token): value for token, value in entry.top}
        top.setdefault(texts.text(entry.token), entry.logprob)
        tops.append(top)
    return {
        "tokens": [texts.text(entry.token) for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": tops,
        "text_offset": list(offsets),
    }


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenText) -> dict[str, Any]:
    """The ``logprobs`` of a chat choice (or chunk): one entry per generated token, with ``top_logprobs`` of it."""

    def token(token_id: int, logprob: float | None) -> dict[str, Any]:
        return {"token": texts.text(token_id), "logprob": logprob, "bytes": list(texts.bytes(token_id))}

    content = [
        {**token(entry.token, entry.logprob), "top_logprobs": [token(*pair) for pair in entry.top]} for entry in entries
    ]
    return {"content": content, "refusal": None}
