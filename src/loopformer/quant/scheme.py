"""Weight-only quantization schemes: what is stored for one weight and how it maps back to real numbers.

Both schemes quantize along the last (input) dimension of a weight ``[..., N, K]`` (a linear layer's
``[out, in]``, a stack of experts ``[E, out, in]`` or an embedding ``[vocab, dim]``):

* **int8**, per output channel, symmetric: ``w ~ q * scale[n]`` with ``q`` in [-127, 127] (int8) and one fp32
  scale per row, ``scale = max|w_n| / 127``. Error per element <= scale / 2.
* **int4**, group-wise, asymmetric: each row is cut into groups of ``group_size`` columns and
  ``w ~ (q - 8) * scale[n, g] + zero[n, g]`` with ``q`` in [0, 15] stored two per byte (column 2j in the low
  nibble, 2j+1 in the high one) and bf16 ``scale`` / ``zero`` per group. This is the form the CPU int4 kernel
  takes, so the stored numbers are exactly what it computes with. ``zero`` is rounded to bf16 first and
  ``scale`` then rounded *up* so that ``[zero - 8 scale, zero + 7 scale]`` covers the group: error per element
  <= scale / 2. When K is not a multiple of ``group_size`` the last group is padded by repeating the row's last
  column (so the padding does not widen its range); the padded columns are never read back.

Everything here is plain tensor arithmetic on any device; :mod:`loopformer.quant.tensor` builds the inference
path on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from loopformer.errors import InputError

BITS = (8, 4)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
DEFAULT_GROUP_SIZE = 64
INT8_MAX = 127
INT4_LEVELS = 16
INT4_OFFSET = 8


@dataclass(frozen=True)
class QuantScheme:
    """How a model is quantized: ``bits`` 8 (per channel) or 4 (group-wise, ``group_size`` columns a group).

    ``embedding``: also quantize the token embedding (and with it a tied LM head). ``adapters``: also quantize the
    depth-wise LoRA adapters (per slot, like a stack of experts).
    """

    bits: int
    group_size: int | None = None
    embedding: bool = True
    adapters: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise InputError(f"bits must be 8 or 4, got {self.bits!r}.")
        if self.bits == 8 and self.group_size is not None:
            raise InputError("int8 quantization is per output channel and takes no group size; drop it.")
        if self.bits == 4:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            elif self.group_size not in INT4_GROUP_SIZES:
                sizes = ", ".join(map(str, INT4_GROUP_SIZES))
                raise InputError(f"the int4 group size must be one of {sizes}, got {self.group_size!r}.")

    @property
    def label(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "embedding": self.embedding,
            "adapters": self.adapters,
        }

    @classmethod
    def from_dict(cls, data: Any) -> QuantScheme:
        fields = {"bits", "group_size", "embedding", "adapters"}
        if not isinstance(data, dict) or set(data) != fields:
            raise InputError(f"the quantization note {data!r} is malformed; expected {', '.join(sorted(fields))}.")
        return cls(data["bits"], data["group_size"], bool(data["embedding"]), bool(data["adapters"]))


@dataclass
class QuantData:
    """The stored form of one quantized weight of logical shape ``shape`` ``[..., N, K]``.

    int8: ``qweight`` int8 ``[..., N, K]``, ``scale`` fp32 ``[..., N]``, ``zero`` None.
    int4: ``qweight`` uint8 ``[..., N, Kp / 2]`` (Kp = K rounded up to ``group_size``), ``scale`` and ``zero``
    bf16 ``[..., N, Kp / group_size]``.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, ...]
    group_size: int | None = None

    @property
    def bits(self) -> int:
        return 8 if self.group_size is None else 4

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the stored numbers stand for, ``shape``, in ``dtype`` (computed in fp32)."""
        if self.group_size is None:
            return (self.qweight.float() * self.scale.float()[..., None]).to(dtype)
        return dequantize_int4(self.qweight, self.scale, self.zero, self.group_size, self.shape[-1]).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows ``ids`` of a 2-D weight: ``[*ids.shape, K]`` (an embedding lookup)."""
        flat = ids.reshape(-1)
        if self.group_size is None:
            rows = self.qweight[flat].float() * self.scale[flat].float()[:, None]
        else:
            rows = dequantize_int4(
                self.qweight[flat], self.scale[flat], self.zero[flat], self.group_size, self.shape[-1]
            )
        return rows.to(dtype).reshape(*ids.shape, self.shape[-1])

    def select(self, index: int) -> QuantData:
        """The weight ``index`` along the first dimension (one expert of a stack), sharing storage."""
        zero = None if self.zero is None else self.zero[index]
        return QuantData(self.qweight[index], self.scale[index], zero, self.shape[1:], self.group_size)

    def to(self, device: torch.device | str) -> QuantData:
        zero = None if self.zero is None else self.zero.to(device)
        return QuantData(self.qweight.to(device), self.scale.to(device), zero, self.shape, self.group_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix (``qweight``, ``scale``, and ``zero`` for int4)."""
        out = {"qweight": self.qweight, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out


def stored_shapes(shape: tuple[int, ...], bits: int, group_size: int | None) -> dict[str, tuple[int, ...]]:
    """The shapes of the stored tensors of a weight of logical ``shape`` (see :class:`QuantData`)."""
    *lead, n, k = shape
    if bits == 8:
        return {"qweight": (*lead, n, k), "scale": (*lead, n)}
    groups = math.ceil(k / group_size)
    return {
        "qweight": (*lead, n, groups * group_size // 2),
        "scale": (*lead, n, groups),
        "zero": (*lead, n, groups),
    }


STORED_DTYPES = {
    8: {"qweight": torch.int8, "scale": torch.float32},
    4: {"qweight": torch.uint8, "scale": torch.bfloat16, "zero": torch.bfloat16},
}


def from_tensors(
    tensors: dict[str, torch.Tensor], shape: tuple[int, ...], bits: int, group_size: int | None, name: str
) -> QuantData:
    """A :class:`QuantData` from stored tensors, checked against the logical ``shape`` (errors name ``name``)."""
    expected = stored_shapes(shape, bits, group_size)
    if set(tensors) != set(expected):
        raise InputError(f"quantized weight {name!r} holds {sorted(tensors)}, expected {sorted(expected)}.")
    for part, tensor in tensors.items():
        if tuple(tensor.shape) != expected[part] or tensor.dtype != STORED_DTYPES[bits][part]:
            raise InputError(
                f"quantized weight {name}.{part} is {tensor.dtype} {list(tensor.shape)}, "
                f"expected {STORED_DTYPES[bits][part]} {list(expected[part])}."
            )
    return QuantData(
        tensors["qweight"], tensors["scale"], tensors.get("zero"), tuple(shape), group_size if bits == 4 else None
    )


def quantize(weight: torch.Tensor, scheme: QuantScheme) -> QuantData:
    """Quantize ``weight`` ``[..., N, K]`` with ``scheme`` (see the module docstring)."""
    if weight.dim() < 2:
        raise InputError(f"only weights with at least 2 dimensions can be quantized, got shape {list(weight.shape)}.")
    w = weight.detach().float()
    if scheme.bits == 8:
        return _quantize_int8(w)
    return _quantize_int4(w, scheme.group_size)


def _quantize_int8(w: torch.Tensor) -> QuantData:
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # an all-zero row is stored exactly
    q = torch.round(w / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantData(q, scale, None, tuple(w.shape))


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= ``x`` (fp32)."""
    rounded = x.to(torch.bfloat16)
    low = rounded.float() < x
    return torch.where(low, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded)


def _quantize_int4(w: torch.Tensor, group_size: int) -> QuantData:
    k = w.shape[-1]
    padded = math.ceil(k / group_size) * group_size
    if padded != k:  # repeat the last column: the last group's range stays that of its real columns
        w = torch.cat((w, w[..., -1:].expand(*w.shape[:-1], padded - k)), dim=-1)
    groups = w.reshape(*w.shape[:-1], padded // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    levels = INT4_LEVELS - 1
    zero = (lo + INT4_OFFSET * (hi - lo) / levels).to(torch.bfloat16)  # maps q = 8; lo -> 0, hi -> 15
    z = zero.float()
    needed = torch.maximum((hi - z) / (levels - INT4_OFFSET), (z - lo) / INT4_OFFSET)
    scale = _round_up_bf16(needed).clamp_min(torch.finfo(torch.bfloat16).tiny)
    s = scale.float()
    q = torch.round((groups - z[..., None]) / s[..., None]) + INT4_OFFSET
    q = q.clamp(0, levels).to(torch.uint8).reshape(*w.shape)
    return QuantData(pack_int4(q), scale, zero, (*w.shape[:-1], k), group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15] ``[..., 2m]`` -> bytes ``[..., m]``: column 2j low nibble, 2j+1 high nibble."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4` (uint8 ``[..., 2m]``)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, k: int
) -> torch.Tensor:
    """``(q - 8) * scale + zero`` per group, fp32, the padding columns dropped: ``[..., N, k]``."""
    q = unpack_int4(packed).float()
    groups = q.reshape(*q.shape[:-1], -1, group_size)
    w = (groups - INT4_OFFSET) * scale.float()[..., None] + zero.float()[..., None]
    return w.flatten(-2)[..., :k]


def error_bound(data: QuantData) -> torch.Tensor:
    """The per-element bound on ``|w - dequantize|``: half a quantization step, ``[..., N, K]``."""
    if data.group_size is None:
        return (data.scale.float() / 2)[..., None].expand(data.shape)
    step = data.scale.float().repeat_interleave(data.group_size, dim=-1)[..., : data.shape[-1]]
    return step / 2
