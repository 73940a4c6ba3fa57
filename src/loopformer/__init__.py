"""loopformer: recurrent-depth ("looped") transformer language models."""

from importlib.metadata import PackageNotFoundError, version

from loopformer.config import ModelConfig, RecurrenceConfig
from loopformer.errors import ConfigError, InputError, LoopformerError
from loopformer.model import LoopLM, LoopOutput, build_model

try:
    __version__ = version("loopformer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

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
]
