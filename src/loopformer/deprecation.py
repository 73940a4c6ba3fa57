"""Names renamed to the one vocabulary ("loops" for core iterations); the old ones work for one more release.

:data:`RENAMED` maps every old config key to its new name (the config flags follow it; the other old flags and
keywords are named where they are accepted). :func:`warn_renamed` issues a
:class:`LoopformerDeprecationWarning` (a ``FutureWarning``, so Python shows it by default; the CLI prints it as one
``loopformer: warning:`` line) and :func:`upgrade_keys` rewrites the old keys of a config mapping, e.g. one read
from a checkpoint written before the rename.
"""

from __future__ import annotations

import warnings
from typing import Any

from loopformer.errors import ConfigError, InputError

RENAMED = {
    "mean_steps": "mean_loops",
    "backprop_depth": "backprop_loops",
    "max_steps": "max_loops",
    "min_steps": "min_loops",
    "eval_depths": "eval_loops",
}


class LoopformerDeprecationWarning(FutureWarning):
    """An old name was used; the message names its replacement."""


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}.",
        LoopformerDeprecationWarning,
        stacklevel=stacklevel,
    )


def upgrade_keys(data: dict[str, Any], fields: set[str], owner: str) -> dict[str, Any]:
    """``data`` with every old key whose new name is one of ``fields`` renamed (with a warning); refuses both."""
    old = [key for key in data if key in RENAMED and RENAMED[key] in fields and key not in fields]
    if not old:
        return data
    data = dict(data)
    for key in old:
        new = RENAMED[key]
        if new in data:
            raise ConfigError(f"{owner} sets both {key!r} and its new name {new!r}; keep only {new!r}.")
        warn_renamed(f"The {owner} field {key!r}", repr(new), stacklevel=4)
        data[new] = data.pop(key)
    return data


def keyword_alias(value: Any, old_value: Any, old: str, new: str) -> Any:
    """The value of keyword ``new``, or of its deprecated spelling ``old`` (with a warning) when only that is set."""
    if old_value is None:
        return value
    if value is not None:
        raise InputError(f"pass {new}= only; {old}= is its deprecated old name.")
    warn_renamed(f"The keyword {old}=", f"{new}=", stacklevel=4)
    return old_value
