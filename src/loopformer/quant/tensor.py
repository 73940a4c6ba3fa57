"""A quantized weight that the model code uses like the weight it replaces.

:class:`QuantizedWeight` is a tensor subclass with the logical shape and dtype of the original weight and no
storage of its own; it holds a :class:`~loopformer.quant.scheme.QuantData`. The model keeps calling
``F.linear(x, self.weight)``, ``F.embedding(ids, self.weight)`` (``nn.Embedding``) and ``self.fc[e]`` (MoE
experts); those three are intercepted:

* ``F.linear`` on CPU runs PyTorch's weight-only kernels on the integer weights (``_weight_int8pack_mm``,
  ``_weight_int4pack_mm_for_cpu``). Their fast path takes bf16 activations, so the input is rounded to bf16,
  multiplied with the int weights (fp32 accumulation) and the bf16 result is cast back to the input's dtype. On
  other devices, and on a CPU whose kernel variant is not known to be safe (:data:`KERNEL_CAPABILITIES`), the
  weight is dequantized for the product (``F.linear(x, dequantize())``, on the fly).
* ``F.embedding`` dequantizes only the looked-up rows.
* indexing a stack of experts with an int returns that expert's quantized weight (prepared once).

Any other operation sees the dequantized tensor (so ``state_dict()``, ``.float()`` or printing a slice work and
return plain tensors); metadata (``shape``, ``dtype``, ``device``) is the logical weight's. Moving the model with
``.to(device)`` moves the integer data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from loopformer.quant.scheme import QuantData, unpack_int4

KERNEL_DTYPE = torch.bfloat16  # the activation dtype of the CPU kernels' fast path

# What the CPU kernels accept, read from their source (aten/src/ATen/native/cpu/int8mm_kernel.cpp and
# int4mm_kernel.cpp) and checked shape by shape in a child process by tests/quant/test_kernel_shapes.py:
# * int8 (``_weight_int8pack_mm``) walks K in vector blocks with no tail (8 columns on AVX2 and NEON, 16 on
#   AVX-512) and reads them with *aligned* loads: every bf16 activation row must start on a 16-byte (AVX2) or
#   32-byte (AVX-512) boundary and every int8 weight row on a 16-byte one (AVX-512). Any other K, or an operand that
#   is not aligned, reads past the row or faults (issue 19 reports segmentation faults on AVX-512 for K = 8, 24, 33;
#   on AVX2 the sweep below faults at K = 1 without the padding and at K = 16 without the alignment). Hence K is
#   padded with zero columns to a multiple of 16 (a bf16 row then spans a multiple of 32 bytes, an int8 row of 16)
#   and both operands start on a 64-byte boundary, as torch's CPU allocator
#   places every new tensor (a view that does not is copied).
# * int4 (``_weight_int4pack_mm_for_cpu``) blocks N by 64 (AVX-512) or 32 (AVX2 and others) and takes tail blocks
#   of 16, 32 or 48 only; it reads K one column at a time with unaligned loads. Hence N is padded to a multiple of
#   16 (zero rows whose outputs are cut off); K is already a whole number of groups (see quant.scheme).
# Other CPU capabilities (a kernel variant not read) take the dequantized product instead.
INT8_K_MULTIPLE = 16
INT4_N_MULTIPLE = 16
KERNEL_ALIGNMENT = 64  # bytes
KERNEL_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


class QuantizedWeight(torch.Tensor):
    """A weight ``[..., N, K]`` stored as integers; see the module docstring."""

    data_: QuantData

    @staticmethod
    def __new__(cls, data: QuantData, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, dtype=dtype, device=data.device, requires_grad=False
        )

    def __init__(self, data: QuantData, dtype: torch.dtype = torch.float32) -> None:
        self.data_ = data
        self._kernel: tuple[torch.Tensor, torch.Tensor, int] | None = (
            _prepare_kernel(data) if data.device.type == "cpu" and kernel_supported() else None
        )
        self._experts = (
            [QuantizedWeight(data.select(i), dtype) for i in range(data.shape[0])] if len(data.shape) == 3 else None
        )

    def __repr__(self) -> str:  # type: ignore[override]
        scheme = "int8" if self.data_.bits == 8 else f"int4-g{self.data_.group_size}"
        return f"QuantizedWeight({scheme}, shape={list(self.data_.shape)}, device={self.data_.device})"

    def dequantize(self) -> torch.Tensor:
        return self.data_.dequantize(self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for ``x`` ``[..., K]`` (see the module docstring for the numerics)."""
        if self._kernel is None:
            return F.linear(x, self.data_.dequantize(x.dtype))
        n, k = self.data_.shape
        operand, extra, padded_k = self._kernel
        flat = x.reshape(-1, k).to(KERNEL_DTYPE)
        if padded_k != k:
            flat = F.pad(flat, (0, padded_k - k))
        flat = _kernel_operand(flat)
        if self.data_.bits == 8:
            out = torch._weight_int8pack_mm(flat, operand, extra)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, operand, self.data_.group_size, extra)[:, :n]
        return out.to(x.dtype).reshape(*x.shape[:-1], n)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _only_weight_quantized(args, kwargs):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = weight.linear(args[0])
            return out if bias is None else out + bias
        if func is F.embedding and isinstance(args[1], QuantizedWeight) and _plain_lookup(args, kwargs):
            weight = args[1]
            return weight.data_.rows(args[0], weight.dtype)
        if func is torch.Tensor.__getitem__ and _expert_index(args):
            return args[0]._experts[args[1]]
        if func is torch.Tensor.to and isinstance(args[0], QuantizedWeight):
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            weight = args[0]
            data = weight.data_ if device is None or device == weight.device else weight.data_.to(device)
            if data is weight.data_ and (dtype is None or dtype == weight.dtype):
                return weight
            return QuantizedWeight(data, dtype or weight.dtype)
        with torch._C.DisableTorchFunctionSubclass():  # metadata getters are answered by the wrapper itself;
            return func(*args, **kwargs)  # real operations reach __torch_dispatch__ below

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(value):
            return value.dequantize() if isinstance(value, QuantizedWeight) else value

        return func(*tree_map(plain, tuple(args)), **tree_map(plain, kwargs or {}))


def _only_weight_quantized(args: tuple, kwargs: dict) -> bool:
    """``F.linear(x, W, b)`` with a quantized 2-D ``W`` and plain ``x`` / ``b``."""
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    others = [args[0], args[2] if len(args) > 2 else kwargs.get("bias")]
    return (
        isinstance(weight, QuantizedWeight)
        and len(weight.shape) == 2
        and not any(isinstance(t, QuantizedWeight) for t in others)
    )


def _expert_index(args: tuple) -> bool:
    """``stack[e]`` with an int ``e`` on a quantized stack of experts."""
    return isinstance(args[0], QuantizedWeight) and args[0]._experts is not None and type(args[1]) is int


def _plain_lookup(args: tuple, kwargs: dict) -> bool:
    """An embedding lookup without max_norm (which would rewrite the weight)."""
    max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
    return max_norm is None and not isinstance(args[0], QuantizedWeight)


def _prepare_kernel(data: QuantData) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The CPU kernel's operands for a 2-D weight and the input width it takes (None for a stack of experts:
    each expert gets its own)."""
    if len(data.shape) != 2:
        return None
    n, k = data.shape
    if data.bits == 8:  # zero weight columns meet zero-padded inputs
        padded_k = math.ceil(k / INT8_K_MULTIPLE) * INT8_K_MULTIPLE
        weight = _kernel_operand(F.pad(data.qweight, (0, padded_k - k)))
        return weight, data.scale.to(KERNEL_DTYPE).contiguous(), padded_k
    rows = math.ceil(n / INT4_N_MULTIPLE) * INT4_N_MULTIPLE
    q = unpack_int4(data.qweight).to(torch.int32)
    scales_zeros = torch.stack((data.scale, data.zero), dim=-1).transpose(0, 1)  # [groups, N, 2]
    if rows != n:  # zero rows: their outputs are cut off again
        q = F.pad(q, (0, 0, 0, rows - n))
        scales_zeros = F.pad(scales_zeros, (0, 0, 0, rows - n))
    packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return packed, scales_zeros.to(KERNEL_DTYPE).contiguous(), q.shape[1]


def kernel_supported() -> bool:
    """Whether this CPU's kernel variant is one whose shape and alignment rules are known (see the constants)."""
    return torch.backends.cpu.get_cpu_capability() in KERNEL_CAPABILITIES


def _kernel_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a :data:`KERNEL_ALIGNMENT` boundary (a fresh copy where it is not).

    While compiling, the pointer is not known; the operands there are the cast / pad results above, which Inductor
    allocates as new (aligned) buffers, or whole rows of a contiguous input (aligned once K is padded).
    """
    if not t.is_contiguous():
        return t.contiguous()
    if torch.compiler.is_compiling() or t.data_ptr() % KERNEL_ALIGNMENT == 0:
        return t
    return t.clone()
