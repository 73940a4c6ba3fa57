"""The native quantized kernels over a sweep of shapes, each sweep in a child process: a kernel that faults on this
CPU fails one test (naming the shape) instead of killing the test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loopformer.quant.tensor import kernel_supported
from support import needs_compiler

SWEEP = Path(__file__).with_name("kernel_sweep.py")


def run_sweep(mode: str) -> None:
    done = subprocess.run([sys.executable, str(SWEEP), mode], capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    last = lines[-1] if lines else "(no output)"
    assert done.returncode == 0, f"{mode} sweep exited {done.returncode} at {last!r}: {done.stderr[-2000:]}"
    assert last.startswith("ok ") and int(last.split()[1]) > 0


@pytest.mark.skipif(not kernel_supported(), reason="this CPU takes the dequantized product, not the native kernels")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_native_products_match_the_dequantized_weight_at_every_shape(mode: str) -> None:
    run_sweep(mode)


@needs_compiler
def test_compiled_int8_decoding_at_widths_that_are_no_multiple_of_16() -> None:
    run_sweep("compiled-int8")
