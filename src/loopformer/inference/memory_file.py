"""Memory vectors from a file, for the memory pathway: ``.safetensors`` or ``.npy`` (never a pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loopformer.errors import InputError

MEMORY_KEY = "memory"


def load_memory_file(path: str | Path) -> torch.Tensor:
    """The float32 vectors in ``path``: [M, memory_dim] (shared by every prompt) or [B, M, memory_dim].

    A ``.safetensors`` file holds one tensor, or several with the vectors under the key ``memory``; a ``.npy`` file
    holds one numeric array (object arrays are refused: loading them would unpickle).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"memory file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise InputError(f"memory file {path} is not a readable safetensors file ({error}).") from None
        if len(tensors) == 1:
            (vectors,) = tensors.values()
        elif MEMORY_KEY in tensors:
            vectors = tensors[MEMORY_KEY]
        else:
            raise InputError(
                f"memory file {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); "
                f"name the vectors {MEMORY_KEY!r}."
            )
    elif suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise InputError(f"memory file {path} is not a numeric .npy array ({error}).") from None
        if not np.issubdtype(array.dtype, np.number):
            raise InputError(f"memory file {path} holds {array.dtype} values, not numbers.")
        vectors = torch.from_numpy(np.ascontiguousarray(array))
    else:
        raise InputError(f"memory file {path} must end in .safetensors or .npy.")
    if vectors.dim() not in (2, 3) or vectors.numel() == 0:
        raise InputError(
            f"memory file {path} holds a tensor of shape {tuple(vectors.shape)}; "
            "expected [vectors, dim] or [prompts, vectors, dim]."
        )
    return vectors.float()
