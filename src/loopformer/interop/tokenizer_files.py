"""Hugging Face tokenizer side files (``tokenizer_config.json``) <-> :class:`TokenRoles`.

An export writes ``tokenizer.json`` (unchanged, or with :func:`bos_first` for transformers) and a
``tokenizer_config.json`` that Hugging Face reads (bos / eos / pad tokens and a Jinja chat template) and that also
keeps our roles under :data:`ROLES_KEY`, so that converting back restores them exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from loopformer.config import atomic_write_text
from loopformer.errors import InputError
from loopformer.tokenizer import TextTokenizer, TokenRoles

CONFIG = "tokenizer_config.json"
ROLES_KEY = "loopformer_token_roles"


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """The ``tokenizer_config.json`` of ``directory`` ({} when there is none)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{str(path)!r} is not a readable JSON file ({exc}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{str(path)!r} must hold a JSON object.")
    return data


def token_text(value: Any) -> str | None:
    """A special token as Hugging Face writes it (a string or an ``AddedToken`` object) -> its text."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def imported_chat_template(config: dict[str, Any]) -> str | None:
    """The default chat template of a ``tokenizer_config.json`` (a string, or the entry named "default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def chat_template(roles: TokenRoles) -> str:
    """The roles' Jinja chat template: the imported one, or one that renders exactly our chat format."""
    if roles.chat_template is not None:
        return roles.chat_template
    openings = json.dumps(dict(roles.openings), ensure_ascii=True)
    return (
        f"{{% set openings = {openings} %}}{{{{ bos_token }}}}"
        "{% for message in messages %}{{ openings[message['role']] }}{{ message['content'] }}"
        f"{{{{ {json.dumps(roles.end_of_turn)} }}}}{{% endfor %}}"
        "{% if add_generation_prompt %}{{ openings['assistant'] }}{% endif %}"
    )


def bos_first(tokenizer: TextTokenizer) -> str:
    """``tokenizer.json`` text whose post-processor puts the bos token before a text (and before each of a pair),
    so that Hugging Face's ``tokenizer(text)`` gives the ids of our engine's prompts (``encode_prompt``); any other
    post-processing of the original is dropped. Our own encoding adds nothing, so it reads this file unchanged."""
    inner = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    bos = tokenizer.roles.bos
    inner.post_processor = processors.TemplateProcessing(
        single=[bos, "$A"], pair=[bos, "$A", bos, "$B:1"], special_tokens=[(bos, tokenizer.bos_id)]
    )
    return inner.to_str()


def write_tokenizer_files(directory: Path, tokenizer_json: str, roles: TokenRoles, extra: dict[str, Any]) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` (HF keys, ``extra``, and our roles) in ``directory``."""
    directory = Path(directory)
    atomic_write_text(directory / "tokenizer.json", tokenizer_json)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": roles.bos,
        "eos_token": roles.eos,
        "pad_token": roles.pad,
        "chat_template": chat_template(roles),
        **extra,
        ROLES_KEY: roles.to_dict(),
    }
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
