"""Exceptions that describe a user mistake; the CLI prints their message (one sentence) and exits 2."""


class LoopformerError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(LoopformerError, ValueError):
    """An invalid configuration value; the message names the field, the value and what is allowed."""


class InputError(LoopformerError, ValueError):
    """Invalid arguments to a model or library call (shapes, depths, ...)."""


class TrainingError(LoopformerError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""
