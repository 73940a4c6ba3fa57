"""What this machine offers torch, and the compute dtype ``auto`` resolves to.

* :func:`cpu_info`: the CPU model, the feature flags that decide bf16 speed (``avx2``, ``avx512f``, ``avx512_bf16``,
  ``amx_bf16``, ``amx_tile``) and the instruction set torch dispatches its CPU kernels to
  (``torch.backends.cpu.get_cpu_capability()``: ``DEFAULT``, ``AVX2``, ``AVX512``, ...).
* :func:`resolve_dtype`: ``fp32`` / ``bf16`` as asked, or for ``auto``: bf16 autocast on a CUDA device that supports
  it; on a CPU, bf16 only where it has AMX or AVX512-BF16 **and** a timed product at the caller's shape runs faster
  under bf16 autocast than in fp32 (the cast of the fp32 weights included, as autocast does it); fp32 elsewhere.
  CPUs without those instructions emulate bf16 matmuls and run them several to a hundred times slower (the bf16
  rows of the recorded ``benchmarks/train_throughput.py`` runs on an AVX2 EPYC, docs/benchmarks.md).
  The environment variable ``LOOPFORMER_AUTO_DTYPE`` (``fp32`` or ``bf16``) overrides what ``auto`` picks.

Norms, softmax statistics, LTI coefficients, exit criteria and the latent state stay fp32 under either choice
(the modules that compute them leave autocast or keep the state's dtype).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loopformer.config import DTYPES
from loopformer.errors import InputError

AUTO_DTYPE_ENV = "LOOPFORMER_AUTO_DTYPE"
REPORTED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matmul instructions
# bf16 must beat fp32 by this factor in the probe: a tie is not worth the lower precision.
BF16_MIN_SPEEDUP = 1.1
_PROBE_REPEATS = 5


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, its bf16-relevant flags and torch's dispatch capability."""

    model: str
    flags: tuple[str, ...]
    capability: str

    @property
    def has_native_bf16(self) -> bool:
        return any(flag in self.flags for flag in BF16_CPU_FLAGS)

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "flags": list(self.flags), "torch_capability": self.capability}


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (from /proc/cpuinfo where it exists)."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        flags=tuple(flag for flag in REPORTED_CPU_FLAGS if flag in flags),
        capability=torch.backends.cpu.get_cpu_capability(),
    )


def cxx_compiler() -> str | None:
    """The path of a C++ compiler on the PATH (Inductor builds its CPU kernels with one), or None."""
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def has_cxx_compiler() -> bool:
    """Whether compiled decoding can build its kernels here."""
    return cxx_compiler() is not None


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype of a run: ``name`` (``fp32`` / ``bf16``), what was asked for, and why."""

    name: str
    requested: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: plain fp32)."""
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """A ``torch.autocast`` context for this choice on ``device`` (a no-op for fp32)."""
        device = torch.device(device)
        dtype = self.autocast_dtype
        return torch.autocast(device.type, dtype) if dtype is not None else contextlib.nullcontext()

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.name, "requested": self.requested, "reason": self.reason}


def resolve_dtype(
    requested: str, device: torch.device | str = "cpu", probe: tuple[int, int, int] | None = None
) -> DtypeChoice:
    """What ``requested`` (``auto`` / ``fp32`` / ``bf16``) means on ``device``; see the module docstring.

    ``probe`` = (rows, in features, out features): the product the CPU probe times (a typical linear layer of the
    run); without it ``auto`` on a bf16-capable CPU decides from a 256-row, 1024 x 1024 product.
    """
    if requested not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}.")
    if requested != "auto":
        return DtypeChoice(requested, requested, "asked for")
    forced = os.environ.get(AUTO_DTYPE_ENV)
    if forced:
        if forced not in ("fp32", "bf16"):
            raise InputError(f"{AUTO_DTYPE_ENV} must be fp32 or bf16, got {forced!r}.")
        return DtypeChoice(forced, "auto", f"set by {AUTO_DTYPE_ENV}")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bf16", "auto", "the CUDA device supports bf16")
        return DtypeChoice("fp32", "auto", "the CUDA device does not support bf16")
    if device.type != "cpu":
        return DtypeChoice("fp32", "auto", f"no bf16 policy for {device.type} devices")
    info = cpu_info()
    if not info.has_native_bf16:
        return DtypeChoice("fp32", "auto", "the CPU has neither AMX nor AVX512-BF16, so bf16 matmuls are emulated")
    speedup = _bf16_speedup(probe or (256, 1024, 1024))
    found = ", ".join(flag for flag in info.flags if flag in BF16_CPU_FLAGS)
    if speedup >= BF16_MIN_SPEEDUP:
        return DtypeChoice("bf16", "auto", f"the CPU has {found} and bf16 autocast measured {speedup:.2f}x fp32")
    return DtypeChoice("fp32", "auto", f"the CPU has {found} but bf16 autocast measured only {speedup:.2f}x fp32")


@functools.cache
def _bf16_speedup(probe: tuple[int, int, int]) -> float:
    """fp32 time / bf16-autocast time of ``F.linear`` at ``probe`` = (rows, in, out) on the CPU (best of a few)."""
    rows, inner, outer = probe
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=generator)
    weight = torch.randn(outer, inner, generator=generator)

    def best(autocast: bool) -> float:
        times = []
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            F.linear(x, weight)  # warm-up
            for _ in range(_PROBE_REPEATS):
                start = time.perf_counter()
                F.linear(x, weight)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(False) / max(best(True), 1e-12)


def available_memory() -> int | None:
    """Bytes of memory this process could still allocate (Linux ``MemAvailable``; None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits_memory(nbytes: int, what: str, device: torch.device) -> None:
    """Refuse, with one sentence, to allocate ``nbytes`` for ``what`` on the CPU when that exceeds the memory
    available (other devices report their own out-of-memory error)."""
    if device.type != "cpu":
        return
    available = available_memory()
    if available is not None and nbytes > available:
        raise InputError(
            f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB of memory available "
            "on this machine; use a smaller configuration."
        )
