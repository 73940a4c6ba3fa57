"""Hugging Face style safetensors checkpoints: one ``model.safetensors`` or shards named by an index.

    model.safetensors                       every tensor in one file, or
    model.safetensors.index.json            {"metadata": {"total_size": N}, "weight_map": {name: shard file}}
    model-00001-of-00003.safetensors ...

:class:`ShardedTensors` reads the headers first (names, shapes) and then one shard at a time, so a conversion
holds about one shard in memory. :func:`write_shards` writes tensors as they come, one shard at a time.
Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loopformer.config import atomic_write_text
from loopformer.errors import InputError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


class ShardedTensors:
    """The tensors of a checkpoint directory and the file each lives in."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        if (self.directory / INDEX).is_file():
            self.files = self._read_index(self.directory / INDEX)
        elif (self.directory / SINGLE).is_file():
            with self._open(self.directory / SINGLE) as handle:
                self.files = {name: self.directory / SINGLE for name in handle.keys()}  # noqa: SIM118
        else:
            raise InputError(f"{str(self.directory)!r} holds neither {SINGLE} nor {INDEX}.")

    def _read_index(self, path: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            files = {str(name): self.directory / str(file) for name, file in weight_map.items()}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{str(path)!r} is not a safetensors index ({_reason(exc)}).") from None
        missing = sorted({file.name for file in files.values() if not file.is_file()})
        if missing:
            raise InputError(f"{str(path)!r} names shard files that do not exist: {', '.join(missing)}.")
        return files

    @contextmanager
    def _open(self, path: Path) -> Iterator[Any]:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                yield handle
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{str(path)!r} is not a readable safetensors file ({_reason(exc)}).") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the file headers only; a name the index places in a shard that does not
        hold it is an :class:`InputError`."""
        shapes: dict[str, tuple[int, ...]] = {}
        for path, names in self.by_file():
            with self._open(path) as handle:
                held = set(handle.keys())
                absent = [name for name in names if name not in held]
                if absent:
                    raise InputError(f"{path.name} lacks {', '.join(absent[:8])}, which the index places there.")
                for name in names:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes

    def by_file(self) -> list[tuple[Path, list[str]]]:
        """(file, the names it holds) in file order."""
        grouped: dict[Path, list[str]] = {}
        for name, path in self.files.items():
            grouped.setdefault(path, []).append(name)
        return sorted(grouped.items(), key=lambda item: item[0].name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one shard at a time; a shard is closed before the next one is opened."""
        for path, names in self.by_file():
            with self._open(path) as handle:
                for name in names:
                    yield name, handle.get_tensor(name)


def write_shards(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[Path]:
    """Write ``tensors`` into ``directory`` as shards of at most ``max_shard_bytes`` (a larger tensor gets its own).

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000N.safetensors`` with an index.
    Only the shard being filled is held in memory. Returns the files written.
    """
    if max_shard_bytes < 1:
        raise InputError(f"the shard size must be >= 1 byte, got {max_shard_bytes}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, list[str], int]] = []  # (temp file, names, bytes)
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            temp = directory / f".shard-{len(pending):05d}.tmp"
            save_file(shard, str(temp), metadata={"format": "pt"})
            pending.append((temp, list(shard), size))
        shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        tensor = tensor.detach().to("cpu").contiguous()
        if any(tensor.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in shard.values()):
            tensor = tensor.clone()  # safetensors stores no shared memory (e.g. a tied head beside its embedding)
        shard[name] = tensor
        size += nbytes
    flush()
    if not pending:
        raise InputError("there are no tensors to write.")
    if len(pending) == 1:
        os.replace(pending[0][0], directory / SINGLE)
        return [directory / SINGLE]
    count = len(pending)
    weight_map: dict[str, str] = {}
    written = []
    for number, (temp, names, _) in enumerate(pending, start=1):
        final = directory / f"model-{number:05d}-of-{count:05d}.safetensors"
        os.replace(temp, final)
        weight_map.update(dict.fromkeys(names, final.name))
        written.append(final)
    index = {"metadata": {"total_size": sum(nbytes for *_, nbytes in pending)}, "weight_map": weight_map}
    atomic_write_text(directory / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*written, directory / INDEX]
