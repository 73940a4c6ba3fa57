"""The chat format of loopformer checkpoints, built from the tokenizer's reserved special tokens.

    <|bos|><|system|>{system}<|end|><|user|>{text}<|end|><|assistant|>{reply}<|end|>...<|assistant|>

A message is its role token, its text and ``<|end|>``; the prompt for a reply ends with ``<|assistant|>``, and the
reply ends at ``<|end|>`` (or ``<|eos|>``). Roles: system, user, assistant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loopformer.errors import InputError
from loopformer.training.tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InputError(f"unknown chat role {self.role!r}; roles are {', '.join(ROLES)}.")
        if not isinstance(self.content, str):
            raise InputError(f"the content of a {self.role} message must be a string.")


def encode_prompt(tokenizer: TextTokenizer, text: str) -> list[int]:
    """A plain prompt as the model saw documents in training: ``<|bos|>`` then the text's tokens."""
    if not text:
        raise InputError("the prompt is empty; give some text.")
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def encode_chat(tokenizer: TextTokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a conversation followed by the opening of the assistant's reply."""
    if not messages:
        raise InputError("a chat prompt needs at least one message.")
    ids = [tokenizer.bos_id]
    for message in messages:
        ids += [tokenizer.token_id(f"<|{message.role}|>"), *tokenizer.encode(message.content)]
        ids.append(tokenizer.token_id(END_OF_TURN))
    ids.append(tokenizer.token_id("<|assistant|>"))
    return ids


def reply_stop_tokens(tokenizer: TextTokenizer) -> tuple[int, ...]:
    """The tokens that end an assistant reply."""
    return (tokenizer.token_id(END_OF_TURN), tokenizer.eos_id)
