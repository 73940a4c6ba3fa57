"""TextStream: incomplete UTF-8 is held back, stop strings are cut exactly, and the deltas add up to .text."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from loopformer.errors import InputError
from loopformer.inference.text import TextStream
from loopformer.tokenizer import TextTokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.byte_level()


def stream_all(stream: TextStream, ids: Sequence[int]) -> list[str]:
    """Every delta of pushing ``ids`` one at a time, then the flush."""
    deltas = [stream.push(i) for i in ids]
    return [*deltas, stream.finish()]


def test_multibyte_characters_reassemble_without_replacement_chars(tok: TextTokenizer) -> None:
    text = "héllo 世界 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # several byte tokens per character
    stream = TextStream(tok.decode)
    deltas = stream_all(stream, ids)
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == text == stream.text
    assert deltas[-1] == ""  # nothing was left to flush
    # the first byte of "é" alone prints nothing; the second completes it
    assert deltas[1:3] == ["", "é"]
    # the four bytes of the emoji give nothing, nothing, nothing, then the whole character
    emoji = text.index("🙂")
    start = len(tok.encode(text[:emoji]))
    assert deltas[start : start + 4] == ["", "", "", "🙂"]


def test_prompt_is_context_only(tok: TextTokenizer) -> None:
    prompt, answer = "Q: 世界? A:", " 世界 is world"
    stream = TextStream(tok.decode, prefix_ids=tok.encode(prompt))
    assert "".join(stream_all(stream, tok.encode(answer))) == answer == stream.text


def test_window_matches_full_decoding_and_stays_short(tok: TextTokenizer) -> None:
    text = "A longer answer with ünïcödé, 漢字 and emoji 🙂🙃 spread over many byte tokens. " * 3
    windows: list[int] = []

    def decode(ids: Sequence[int]) -> str:
        windows.append(len(ids))
        return tok.decode(ids)

    stream = TextStream(decode, prefix_ids=tok.encode("prompt text"))
    assert "".join(stream_all(stream, tok.encode(text))) == text
    assert max(windows) <= 8  # a 4-byte character plus its context, never the whole sequence


def test_sentencepiece_like_leading_space_uses_context() -> None:
    # a decoder that drops the leading space of the text, as SentencePiece does for the first piece
    pieces = {0: " Hello", 1: " world", 2: "!", 3: " Say"}

    def decode(ids: Sequence[int]) -> str:
        return "".join(pieces[i] for i in ids).removeprefix(" ")

    with_prompt = TextStream(decode, prefix_ids=[3])
    assert "".join(stream_all(with_prompt, [0, 1, 2])) == " Hello world!"
    without_prompt = TextStream(decode)
    assert stream_all(without_prompt, [0, 1, 2]) == ["Hello", " world", "!", ""]


def test_stop_string_across_tokens_is_cut_exactly(tok: TextTokenizer) -> None:
    stream = TextStream(tok.decode, stop_strings=["<END>"])
    deltas = [stream.push(i) for i in tok.encode("Hello world<E")]
    assert "".join(deltas) == "Hello world"  # "<E" could start the stop string: held back
    assert not stream.stopped
    later = [stream.push(i) for i in tok.encode("ND>more text")]
    assert stream.stopped
    assert "".join(later) == "" and stream.finish() == ""
    assert stream.text == "Hello world"
    assert stream.push(tok.encode("x")[0]) == ""


def test_stop_string_inside_one_delta_and_earliest_wins(tok: TextTokenizer) -> None:
    stream = TextStream(tok.decode, stop_strings=["world", "lo w"])
    deltas = stream_all(stream, tok.encode("hello world"))
    assert stream.stopped and stream.text == "".join(deltas) == "hel"
    # a stop string made of multi-byte characters, completed by its last byte
    stream = TextStream(tok.decode, stop_strings=["界 🙂"])
    deltas = stream_all(stream, tok.encode("héllo 世界 🙂 after"))
    assert stream.text == "".join(deltas) == "héllo 世"


def test_partial_stop_prefix_is_released(tok: TextTokenizer) -> None:
    stream = TextStream(tok.decode, stop_strings=["STOP"])
    deltas = [stream.push(i) for i in tok.encode("a STOrm")]
    assert deltas == ["a", " ", "", "", "", "STOr", "m"]
    # a prefix still open at the end comes out of finish()
    tail = [stream.push(i) for i in tok.encode(" ST")]
    assert tail == [" ", "", ""]
    assert stream.finish() == "ST"
    assert not stream.stopped and stream.text == "a STOrm ST"


def test_overlapping_stop_prefixes(tok: TextTokenizer) -> None:
    # "aab" must be found although the held text "aa" first looked like a failed start of it
    stream = TextStream(tok.decode, stop_strings=["aab"])
    deltas = stream_all(stream, tok.encode("xaaab!"))
    assert stream.stopped and stream.text == "".join(deltas) == "xa"


def test_validation(tok: TextTokenizer) -> None:
    with pytest.raises(InputError, match="single string"):
        TextStream(tok.decode, stop_strings="END")
    with pytest.raises(InputError, match="non-empty"):
        TextStream(tok.decode, stop_strings=["ok", ""])
    with pytest.raises(InputError, match="non-empty"):
        TextStream(tok.decode, stop_strings=[3])  # type: ignore[list-item]
    with pytest.raises(InputError, match="integers"):
        TextStream(tok.decode).push("a")  # type: ignore[arg-type]
