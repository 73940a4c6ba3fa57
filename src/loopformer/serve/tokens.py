"""The tokenizer endpoints, as vLLM has them: ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``.

``/tokenize`` gives the ids that the completion and chat endpoints would feed the model, so a client can count and
align tokens (lm-eval's ``remote`` tokenizer backend uses all three). Their bodies are bounded by the server's
``--max-body-bytes`` like every other request.
"""

from __future__ import annotations

from typing import Any

from loopformer.inference.chat import encode_chat, encode_prompt
from loopformer.inference.engine import Engine
from loopformer.serve.errors import APIError
from loopformer.serve.plans import check_model, field_errors
from loopformer.serve.prompts import chat_messages
from loopformer.serve.schemas import DetokenizeRequest, TokenizeRequest
from loopformer.serve.settings import ServerSettings

MESSAGE_FIELDS = ("add_generation_prompt", "tools")  # what goes with messages only


def tokenize(request: TokenizeRequest, engine: Engine, settings: ServerSettings) -> dict[str, Any]:
    """``{"tokens", "count", "max_model_len"}`` of the request's prompt or conversation."""
    if request.model is not None:
        check_model(request.model, settings)
    tokenizer = engine.tokenizer
    if request.prompt is not None and request.messages is not None:
        raise APIError(400, "give prompt or messages, not both.", param="prompt")
    if request.prompt is None and request.messages is None:
        raise APIError(400, "the request needs the field prompt or messages.", param="prompt")
    if request.prompt is not None:
        misplaced = [name for name in MESSAGE_FIELDS if name in request.model_fields_set]
        if misplaced:
            raise APIError(400, f"{misplaced[0]} goes with messages, not with prompt.", param=misplaced[0])
        with field_errors("prompt"):
            if request.add_special_tokens:
                ids = encode_prompt(tokenizer, request.prompt)
            else:
                ids = tokenizer.encode(request.prompt)
    else:
        if "add_special_tokens" in request.model_fields_set:
            raise APIError(400, "add_special_tokens goes with prompt, not with messages.", param="add_special_tokens")
        with field_errors("messages"):
            ids = encode_chat(tokenizer, chat_messages(request.messages, request.tools))
        if not request.add_generation_prompt:  # drop the opening of the assistant's reply
            ids = ids[: len(ids) - len(tokenizer.encode(tokenizer.roles.openings["assistant"]))]
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.model.config.max_seq_len}


def detokenize(request: DetokenizeRequest, engine: Engine, settings: ServerSettings) -> dict[str, Any]:
    """``{"prompt"}``: the text of the ids, special tokens written out."""
    if request.model is not None:
        check_model(request.model, settings)
    tokenizer = engine.tokenizer
    vocab = tokenizer.vocab_size
    for index, token in enumerate(request.tokens):
        if not 0 <= token < vocab:
            raise APIError(400, f"tokens[{index}] is outside the vocabulary 0..{vocab - 1}.", param="tokens")
    return {"prompt": tokenizer.decode(request.tokens)}


def tokenizer_info(engine: Engine) -> dict[str, Any]:
    """The special tokens and sizes a remote-tokenizer client reads."""
    tokenizer = engine.tokenizer
    return {
        "tokenizer_class": "loopformer.TextTokenizer",
        "bos_token": tokenizer.decode([tokenizer.bos_id]),
        "eos_token": tokenizer.decode([tokenizer.eos_id]),
        "pad_token": tokenizer.decode([tokenizer.pad_id]),
        "vocab_size": tokenizer.vocab_size,
        "model_max_length": engine.model.config.max_seq_len,
    }
