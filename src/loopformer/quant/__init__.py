"""Weight-only int8 / int4 quantization for CPU inference: schemes, the quantized weight, checkpoints."""

from loopformer.quant.checkpoint import build_quantized_model, directory_bytes, quantization_note, save_quantized
from loopformer.quant.model import is_quantized, quantizable_names, quantize_model
from loopformer.quant.scheme import QuantData, QuantScheme, quantize
from loopformer.quant.tensor import QuantizedWeight

__all__ = [
    "QuantData",
    "QuantScheme",
    "QuantizedWeight",
    "build_quantized_model",
    "directory_bytes",
    "is_quantized",
    "quantizable_names",
    "quantization_note",
    "quantize",
    "quantize_model",
    "save_quantized",
]
