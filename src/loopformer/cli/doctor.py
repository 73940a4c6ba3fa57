"""``loopformer doctor``: what this machine offers loopformer, for bug reports.

Versions (loopformer, torch, Python), the CPU with its bf16-relevant flags and torch's kernel capability, what
``--dtype auto`` picks for training and decoding here and why, whether compiled decoding can run (a C++ compiler),
whether the int8 / int4 kernels run natively, CUDA, and which optional extras are installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from typing import Any

EXTRAS = {
    "transformers": "hf",
    "fastapi": "serve",
    "uvicorn": "serve",
    "lm_eval": "eval",
    "tensorboard": "tensorboard",
    "matplotlib": "plot",
}
# the products ``auto`` is probed at: a training batch (8 x 256 tokens) and a decoding pass (8 rows) at width 1024
TRAINING_PROBE = (2048, 1024, 4096)
DECODING_PROBE = (8, 1024, 4096)


def report() -> dict[str, Any]:
    """Everything ``doctor`` prints, as one JSON-ready dict."""
    import torch

    from loopformer import __version__
    from loopformer.hardware import cpu_info, cxx_compiler, resolve_dtype
    from loopformer.quant.tensor import kernel_supported

    cuda = torch.cuda.is_available()
    return {
        "loopformer": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info().to_dict(),
        "threads": torch.get_num_threads(),
        "dtype_auto": {
            "training": resolve_dtype("auto", "cpu", TRAINING_PROBE).to_dict(),
            "decoding": resolve_dtype("auto", "cpu", DECODING_PROBE).to_dict(),
            **({"cuda": resolve_dtype("auto", "cuda").to_dict()} if cuda else {}),
        },
        "compiled_decoding": {"cxx_compiler": cxx_compiler()},
        "quantized_kernels": "native" if kernel_supported() else "dequantized product (unknown kernel variant)",
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "extras": {name: importlib.util.find_spec(name) is not None for name in EXTRAS},
    }


def run(args: argparse.Namespace) -> int:
    info = report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cpu = info["cpu"]
    lines = [
        f"loopformer {info['loopformer']}, torch {info['torch']}, Python {info['python']}",
        f"platform     {info['platform']}",
        f"cpu          {cpu['model']}",
        f"cpu flags    {', '.join(cpu['flags']) or 'none of avx2, avx512f, avx512_bf16, amx_bf16, amx_tile'}",
        f"torch kernels {cpu['torch_capability']}, {info['threads']} threads",
    ]
    for use, choice in info["dtype_auto"].items():
        lines.append(f"dtype auto   {use}: {choice['dtype']} ({choice['reason']})")
    compiler = info["compiled_decoding"]["cxx_compiler"]
    lines.append(
        f"compile      {'available, C++ compiler ' + compiler if compiler else 'unavailable: no C++ compiler'}"
    )
    lines.append(f"int8 / int4  {info['quantized_kernels']}")
    lines.append(f"cuda         {', '.join(info['cuda']) or 'none'}")
    missing = sorted({EXTRAS[name] for name, present in info["extras"].items() if not present})
    lines.append(f"extras       {'all installed' if not missing else 'missing: ' + ', '.join(missing)}")
    print("\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="versions, CPU, dtype choice and compile support (for bug reports)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)
