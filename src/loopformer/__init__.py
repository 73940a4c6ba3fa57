"""loopformer: recurrent-depth ("looped") transformer language models."""

from importlib.metadata import PackageNotFoundError, version

from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.errors import ConfigError, InputError, LoopformerError
from loopformer.model import LoopLM, LoopOutput, build_model

try:
    __version__ = version("loopformer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"


def __getattr__(name: str) -> object:
    """``loopformer.load`` (:func:`loopformer.loading.load`), imported on first use: it pulls in safetensors, the
    tokenizer library and the quantized weights, which ``import loopformer`` alone does not need."""
    if name == "load":
        from loopformer.loading import load

        return load
    raise AttributeError(f"module 'loopformer' has no attribute {name!r}")


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
