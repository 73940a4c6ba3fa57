"""loopformer: recurrent-depth ("looped") transformer language models."""

from loopformer.lazy import lazy_exports

# Imported on first use: ``import loopformer`` and the command line's ``--help`` stay free of torch.
_EXPORTS = {
    "ConfigError": "loopformer.errors",
    "InputError": "loopformer.errors",
    "LoopformerError": "loopformer.errors",
    "ModelConfig": "loopformer.config",
    "RecurrenceConfig": "loopformer.config",
    "LoopLM": "loopformer.model",
    "LoopOutput": "loopformer.model",
    "build_model": "loopformer.model",
    "load": "loopformer.loading",
    "__version__": "loopformer.version",
}
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)

__all__ = [
    "ConfigError",
    "InputError",
    "LoopLM",
    "LoopOutput",
    "LoopformerError",
    "ModelConfig",
    "RecurrenceConfig",
    "__version__",
    "build_model",
    "load",
]
