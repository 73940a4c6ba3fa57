"""Streaming detokenization: text deltas that are safe to print as tokens arrive, cut at stop strings.

A token can end in the middle of a UTF-8 character (byte-level tokenizers decode the incomplete tail to U+FFFD)
and a stop string can span several tokens, so :class:`TextStream` holds text back until it is settled. It
decodes only a short window of ids: the tokens of the previous delta (as context, so that decoders that treat
the first token specially, such as SentencePiece's leading space, see the same text) plus the new ones.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

from loopformer.errors import InputError

REPLACEMENT = "\ufffd"  # what the decoder yields for an incomplete UTF-8 sequence
CONTEXT_TOKENS = 4  # prompt ids kept as decoding context before the first generated token


def _common_prefix(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


class TextStream:
    """Turns a growing list of token ids into text deltas safe to print, and detects stop strings.

    ``decode`` maps ids to text (e.g. ``tokenizer.decode``); ``prefix_ids`` are tokens already shown (the
    prompt), used only as decoding context and never emitted. :meth:`push` returns what can be printed now;
    :meth:`finish` flushes what was held back. Once a stop string appears, :attr:`stopped` is True, the text
    ends right before it (the stop string is never emitted) and later pushes return "".
    """

    def __init__(
        self, decode: Callable[[Sequence[int]], str], stop_strings: Sequence[str] = (), prefix_ids: Sequence[int] = ()
    ) -> None:
        if isinstance(stop_strings, str):
            raise InputError(f"stop_strings must be a list of strings, not the single string {stop_strings!r}.")
        stops = list(stop_strings)
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise InputError(f"every stop string must be a non-empty string, got {stop!r}.")
        self._decode = decode
        self._stops = tuple(dict.fromkeys(stops))
        self._ids = [self._token(i) for i in prefix_ids][-CONTEXT_TOKENS:]
        self._start = 0  # window start: decoding context only
        self._read = len(self._ids)  # ids before this are accounted for in the emitted + pending text
        self._pending = ""  # decoded but not emitted: it might be the start of a stop string
        self._text = ""
        self._stopped = False

    @staticmethod
    def _token(token_id: int) -> int:
        try:
            return operator.index(token_id)
        except TypeError:
            raise InputError(f"token ids must be integers, got {token_id!r}.") from None

    @property
    def stopped(self) -> bool:
        """Whether a stop string appeared; nothing more is emitted after it."""
        return self._stopped

    @property
    def text(self) -> str:
        """Everything emitted so far (the generated part only, without the stop string)."""
        return self._text

    def push(self, token_id: int) -> str:
        """Append one generated token; return the text that can be printed now (possibly "")."""
        token_id = self._token(token_id)
        if self._stopped:
            return ""
        self._ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """Flush everything held back (an incomplete character or a partial stop string) and return it."""
        if self._stopped:
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self._ids[self._start : self._read])
        after = self._decode(self._ids[self._start :])
        if after.endswith(REPLACEMENT) and not final:
            return ""  # the last character may still be incomplete; the pending text was already released
        # a window whose context ended inside a character may decode differently once it is complete
        self._pending += after[len(before) :] if after.startswith(before) else after[_common_prefix(before, after) :]
        # drop what no later window needs
        del self._ids[: self._read]
        self._start, self._read = 0, len(self._ids)
        return self._release(final)

    def _release(self, final: bool) -> str:
        """Emit the pending text up to a stop string, or up to a tail that could still become one."""
        pending = self._pending
        found = [i for i in (pending.find(stop) for stop in self._stops) if i >= 0]
        if found:
            cut = min(found)
            self._stopped = True
        elif final:
            cut = len(pending)
        else:
            cut = len(pending) - self._partial_stop(pending)
        delta, self._pending = pending[:cut], ("" if self._stopped else pending[cut:])
        self._text += delta
        return delta

    def _partial_stop(self, pending: str) -> int:
        """The length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
