"""The chat format, built from the tokenizer's :class:`~loopformer.tokenizer.TokenRoles`.

With our roles:

    <|bos|><|system|>{system}<|end|><|user|>{text}<|end|><|assistant|>{reply}<|end|>...<|assistant|>

A message is its role's opening, its text and the end-of-turn token; the prompt for a reply ends with the assistant's
opening, and the reply ends at the end-of-turn (or end-of-sequence) token. Roles: system, user, assistant. An imported
tokenizer brings its own openings (Huginn: ``<|begin_header|>user<|end_header|>\n\n``, end of turn ``<|end_turn|>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loopformer.errors import InputError
from loopformer.tokenizer import CHAT_ROLES, TextTokenizer

ROLES = CHAT_ROLES


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
    openings = tokenizer.roles.openings
    ids = [tokenizer.bos_id]
    for message in messages:
        ids += [*tokenizer.encode(openings[message.role]), *tokenizer.encode(message.content)]
        ids.append(tokenizer.end_of_turn_id)
    ids += tokenizer.encode(openings["assistant"])
    return ids


def reply_stop_tokens(tokenizer: TextTokenizer) -> tuple[int, ...]:
    """The tokens that end an assistant reply."""
    return (tokenizer.end_of_turn_id, tokenizer.eos_id)
