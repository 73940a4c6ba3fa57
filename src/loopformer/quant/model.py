"""Which weights of a :class:`~loopformer.model.LoopLM` are quantized, and swapping them in place.

Quantized: every projection (``LoopLinear`` weights: attention, MLP, injection matrices, memory pathway, an untied
head), the routed experts of MoE layers (``fc`` / ``proj`` stacks) and, unless the scheme says otherwise, the
token embedding (with it a tied head), and on request the depth-wise LoRA adapters. Kept in full precision: norms,
the LTI coefficients (``log_a``, ``dt_bias``), loop embeddings, LoRA adapters by default, q/k biases, the halting
head, MoE routers and their biases (routing is a discrete choice that a small weight change can flip; a router is
dim x experts) and the memory pathway's null key.

A quantized weight replaces the parameter by a buffer of the same name holding a
:class:`~loopformer.quant.tensor.QuantizedWeight`, so the model code runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from loopformer.errors import InputError
from loopformer.model import LoopLM
from loopformer.nn.linear import LoopLinear
from loopformer.nn.moe import MoE
from loopformer.quant.scheme import QuantData, QuantScheme, quantize
from loopformer.quant.tensor import QuantizedWeight

KEPT_LINEARS = ("router",)  # LoopLinear attribute names that stay in full precision


def quantizable_names(model: LoopLM, scheme: QuantScheme) -> list[str]:
    """Fully qualified names of the weights ``scheme`` quantizes, in ``state_dict`` order."""
    names = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoopLinear) and name.rsplit(".", 1)[-1] not in KEPT_LINEARS:
            names.add(f"{prefix}weight")
            if scheme.adapters and module.lora_a is not None:
                names.update((f"{prefix}lora_a", f"{prefix}lora_b"))
        elif isinstance(module, MoE):
            names.update((f"{prefix}fc", f"{prefix}proj"))
    if scheme.embedding:
        names.add("tok_emb.weight")
    return [name for name in model.state_dict(keep_vars=True) if name in names]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(buffer, QuantizedWeight) for buffer in model.buffers())


def install(model: nn.Module, name: str, data: QuantData) -> None:
    """Replace the parameter ``name`` of ``model`` by a buffer holding ``data`` as a :class:`QuantizedWeight`."""
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attribute)
    weight = QuantizedWeight(data, old.dtype)
    delattr(owner, attribute)
    owner.register_buffer(attribute, weight)


def quantize_model(model: LoopLM, scheme: QuantScheme) -> list[str]:
    """Quantize ``model``'s weights in place with ``scheme``; returns the names of the quantized weights."""
    if is_quantized(model):
        raise InputError("this model is already quantized; quantize the full-precision checkpoint instead.")
    names = quantizable_names(model, scheme)
    weights = model.state_dict(keep_vars=True)
    for name in names:
        install(model, name, quantize(weights[name], scheme))
    return names


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that store ``model``: plain ones under their names, quantized ones as ``NAME.qweight`` etc."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, QuantizedWeight):
            out.update({f"{name}.{part}": value for part, value in tensor.data_.tensors().items()})
        else:
            out[name] = tensor.detach()
    return out
