"""TextTokenizer: byte-level round trip, special ids, BPE training, save / load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopformer.errors import ConfigError, InputError
from loopformer.tokenizer import SPECIAL_TOKENS, TextTokenizer

SAMPLES = [
    "",
    "hello world",
    "  leading spaces\n\ttabs\r\nand CRLF\n",
    "unicode: héllo wörld, ελληνικά, 中文, 🎉🐍 and a ZWJ 👩‍💻",
    "def f(x):\n    return x ** 2  # comment\n",
    "\x00\x01\x7f control bytes \u2028",
]

CORPUS = [f"def function_{i}(value):\n    return value * {i} + {i * i}  # note {i % 7}\n" for i in range(200)]


@pytest.fixture(scope="module")
def byte_tok() -> TextTokenizer:
    return TextTokenizer.byte_level()


@pytest.fixture(scope="module")
def bpe_tok() -> TextTokenizer:
    return TextTokenizer.train_bpe(CORPUS, vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_round_trips(byte_tok: TextTokenizer, text: str) -> None:
    ids = byte_tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text


def test_byte_level_ids_are_specials_then_bytes(byte_tok: TextTokenizer) -> None:
    assert byte_tok.vocab_size == 256 + len(SPECIAL_TOKENS) == 270
    assert [byte_tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (byte_tok.bos_id, byte_tok.eos_id, byte_tok.pad_id) == (0, 1, 2)
    n = len(SPECIAL_TOKENS)
    assert [byte_tok.encode(chr(b))[0] for b in range(128)] == [n + b for b in range(128)]
    assert byte_tok.encode("é") == [n + b for b in "é".encode()]


def test_special_strings_in_text_are_recognised(byte_tok: TextTokenizer) -> None:
    ids = byte_tok.encode("a<think>b<|eos|>")
    assert ids == [*byte_tok.encode("a"), byte_tok.token_id("<think>"), *byte_tok.encode("b"), byte_tok.eos_id]
    assert byte_tok.decode(ids) == "a<think>b<|eos|>"
    assert byte_tok.decode(ids, skip_special=True) == "ab"


def test_encode_batch_matches_encode(byte_tok: TextTokenizer, bpe_tok: TextTokenizer) -> None:
    for tok in (byte_tok, bpe_tok):
        assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_unknown_token_and_bad_ids_raise(byte_tok: TextTokenizer) -> None:
    with pytest.raises(InputError, match="not in the vocabulary"):
        byte_tok.token_id("<|nope|>")
    with pytest.raises(InputError, match="outside the vocabulary"):
        byte_tok.decode([270])


def test_bpe_vocab_specials_and_round_trip(bpe_tok: TextTokenizer) -> None:
    assert bpe_tok.vocab_size == 400
    assert [bpe_tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = CORPUS[3]
    ids = bpe_tok.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges compress the training text
    for sample in [text, *SAMPLES]:
        assert bpe_tok.decode(bpe_tok.encode(sample)) == sample  # full byte alphabet: nothing is unknown


def test_bpe_is_deterministic(bpe_tok: TextTokenizer) -> None:
    again = TextTokenizer.train_bpe(CORPUS, vocab_size=400)
    assert again.to_json() == bpe_tok.to_json()
    assert again.fingerprint == bpe_tok.fingerprint
    other = TextTokenizer.train_bpe(CORPUS, vocab_size=350)
    assert other.fingerprint != bpe_tok.fingerprint


@pytest.mark.parametrize("size", [0, 269, 255, 4096.0])
def test_bpe_rejects_small_vocab(size: object) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        TextTokenizer.train_bpe(CORPUS, vocab_size=size)  # type: ignore[arg-type]


def test_save_load_round_trip(tmp_path: Path, bpe_tok: TextTokenizer) -> None:
    path = tmp_path / "run" / "tokenizer.json"
    bpe_tok.save(path)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = TextTokenizer.load(path)
    assert loaded.fingerprint == bpe_tok.fingerprint
    assert loaded.vocab_size == bpe_tok.vocab_size
    assert loaded.encode(SAMPLES[3]) == bpe_tok.encode(SAMPLES[3])
    assert TextTokenizer.from_json(bpe_tok.to_json()).fingerprint == bpe_tok.fingerprint
    with pytest.raises(InputError, match="not a tokenizer file"):
        TextTokenizer.from_json("{}")


def test_load_bad_files(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    with pytest.raises(InputError, match="does not exist"):
        TextTokenizer.load(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("this is not json")
    with pytest.raises(InputError, match="not a tokenizer file"):
        TextTokenizer.load(garbage)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"hello": 1}')
    with pytest.raises(InputError, match="not a tokenizer file"):
        TextTokenizer.load(wrong)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError):
        TextTokenizer.load(binary)


def test_missing_specials_rejected(tmp_path: Path, byte_tok: TextTokenizer) -> None:
    data = json.loads(byte_tok.to_json())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|memory|>"]
    del data["model"]["vocab"]["<|memory|>"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="<\\|memory\\|>"):
        TextTokenizer.load(path)


@pytest.mark.parametrize("text", [b"hi \xff\xfe\x80 there".decode("utf-8", "surrogateescape"), 42])
def test_text_that_is_not_utf8_gets_one_sentence(byte_tok: TextTokenizer, text: object) -> None:
    with pytest.raises(InputError, match=r"UTF-8|must be a string") as info:
        byte_tok.encode(text)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"UTF-8|must be a string"):
        byte_tok.encode_batch(["fine", text])
    assert byte_tok.encode_batch(["fine"]) == [byte_tok.encode("fine")]
