"""Training checkpoints: one directory per save, written aside and renamed into place.

    <run>/checkpoints/step-00000120/
        model.safetensors       weights (a tensor shared under several names is stored once)
        ema.safetensors         optional fp32 weight averages
        optimizer.safetensors   optimizer state tensors, with optimizer.json (everything else)
        rng.safetensors         named generator states (uint8)
        config.json             the ModelConfig
        tokenizer.json          optional tokenizer text
        token_roles.json        optional TokenRoles of an imported tokenizer (absent: our special tokens)
        trainer.json            step and the caller's JSON metadata
    <run>/checkpoints/latest    the name of the newest complete checkpoint directory

Nothing here unpickles: tensors are safetensors, everything else is JSON. A crash at any point of
:func:`save_checkpoint` leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loopformer.config import ModelConfig, atomic_write_text, read_text_file, shown
from loopformer.errors import ConfigError, InputError
from loopformer.filemode import tree_as_created

FORMAT_VERSION = 1
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# ModelConfig fields that decide parameter names or shapes; every other field (recurrence, RoPE base,
# norm eps, init, overflow policy, ...) may differ between a checkpoint and the config loading it.
SHAPE_FIELDS = (
    "vocab_size", "dim", "n_heads", "n_kv_heads", "head_dim", "n_prelude", "n_core", "n_coda", "mlp_hidden",
    "norm_layout", "qk_bias", "qk_norm", "tie_embeddings", "injection", "loop_embedding", "lora_rank",
    "per_loop_slots", "halting", "halting_input", "attention", "mla_kv_rank", "mla_q_rank", "mla_rope_dim",
    "moe_routed", "moe_shared", "moe_hidden", "memory_dim",
)  # fmt: skip


@dataclass
class TrainingState:
    """Everything a checkpoint holds; ``meta`` is any JSON-serialisable extra (sampler state, metrics...)."""

    step: int
    model: dict[str, torch.Tensor]
    config: ModelConfig
    optimizer: dict | None = None
    ema: dict[str, torch.Tensor] | None = None
    rng: dict[str, torch.Tensor] | None = None
    tokenizer_json: str | None = None
    token_roles: dict | None = None
    meta: dict = field(default_factory=dict)


# ----- tensors -----------------------------------------------------------------------------------
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write contiguous CPU copies; identical views are stored once and recorded as aliases."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    used: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        cpu = tensor.to("cpu").contiguous()
        if cpu.numel() and cpu.untyped_storage().data_ptr() in used:
            cpu = cpu.clone()  # overlapping views of one storage: safetensors needs separate copies
        used.add(cpu.untyped_storage().data_ptr())
        out[name] = cpu
    save_file(out, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    _fsync(path)


def _load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file and restore aliases (one tensor under several names)."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
            if not isinstance(aliases, dict) or not all(isinstance(t, str) for t in aliases.values()):
                raise ValueError("its aliases metadata is not a mapping of tensor names")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        tensors.update({name: tensors[target] for name, target in aliases.items()})
    except (SafetensorError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"Checkpoint file {str(path)!r} is missing or corrupt ({_short(exc)}).") from None
    return tensors


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__


def _fsync(path: Path) -> None:
    """fsync a file or directory (some filesystems cannot fsync a directory: ignored)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, data: Any) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise InputError(f"The data for {path.name} is not JSON-serialisable ({_short(exc)}).") from None
    _write_text(path, text)


def _read_text(path: Path) -> str:
    return read_text_file(path, "Checkpoint file", InputError)


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except ValueError as exc:  # not JSON, or an integer of more digits than Python reads (4300)
        raise InputError(f"Checkpoint file {str(path)!r} is corrupt ({_short(exc)}).") from None


# ----- optimizer state <-> tensors + JSON --------------------------------------------------------
def _encode(value: Any, where: str) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise InputError(f"Optimizer state {where} has a mapping with non-string keys; it cannot be saved.")
        return {k: _encode(v, where) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"Optimizer state {where} holds a {type(value).__name__}, which cannot be saved as JSON.")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    return value


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``state/<i>/<name>``, ``group/<g>/<name>``) and JSON.

    ``i`` is the position of the parameter key in ``state["state"]``; the keys themselves (ints or
    FQN strings), non-tensor values and ``param_groups`` go to the JSON part, in order.
    """
    tensors: dict[str, torch.Tensor] = {}

    def put(value: Any, flat_name: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[flat_name] = value
            return {"__tensor__": flat_name}
        return _encode(value, flat_name)

    keys = list(state.get("state", {}))
    for key in keys:
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise InputError(f"Optimizer state key {key!r} is neither an int nor a string.")
    entries = [
        [[name, put(value, f"state/{i}/{name}")] for name, value in per_param.items()]
        for i, per_param in enumerate(state.get("state", {}).values())
    ]
    groups = [
        {name: put(value, f"group/{g}/{name}") for name, value in group.items()}
        for g, group in enumerate(state.get("param_groups", []))
    ]
    return tensors, {"format_version": FORMAT_VERSION, "keys": keys, "state": entries, "param_groups": groups}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_to_flat` (an exact round trip)."""

    def value_of(encoded: Any) -> Any:
        if isinstance(encoded, dict) and set(encoded) == {"__tensor__"}:
            if encoded["__tensor__"] not in tensors:
                raise InputError(f"Optimizer tensor {encoded['__tensor__']!r} is missing from the checkpoint.")
            return tensors[encoded["__tensor__"]]
        return _decode(encoded)

    try:
        state = {
            key: {name: value_of(v) for name, v in entry}
            for key, entry in zip(meta["keys"], meta["state"], strict=True)
        }
        groups = [{name: value_of(v) for name, v in group.items()} for group in meta["param_groups"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"The optimizer metadata is malformed ({_short(exc)}).") from None
    return {"state": state, "param_groups": groups}


# ----- RNG -----------------------------------------------------------------------------------------
def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Named generator states plus the global ``torch_cpu`` state (and ``cuda``, the current device's)."""
    reserved = {"torch_cpu", "cuda"} & set(generators)
    if reserved:
        raise InputError(f"Generator name {sorted(reserved)[0]!r} is reserved for a global RNG state.")
    states = {name: gen.get_state().clone() for name, gen in generators.items()}
    states["torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`capture_rng` saved; generators absent from ``states`` are left as they are."""
    for name, gen in generators.items():
        if name in states:
            gen.set_state(states[name].to("cpu", torch.uint8))
    if "torch_cpu" in states:
        torch.set_rng_state(states["torch_cpu"].to("cpu", torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].to("cpu", torch.uint8))


# ----- saving ------------------------------------------------------------------------------------
def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _read_latest(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _write_files(tmp: Path, state: TrainingState) -> None:
    _save_tensors(tmp / "model.safetensors", state.model)
    if state.ema is not None:
        _save_tensors(tmp / "ema.safetensors", state.ema)
    if state.optimizer is not None:
        tensors, meta = optimizer_to_flat(state.optimizer)
        _save_tensors(tmp / "optimizer.safetensors", tensors)
        _write_json(tmp / "optimizer.json", meta)
    if state.rng is not None:
        _save_tensors(tmp / "rng.safetensors", state.rng)
    _write_json(tmp / "config.json", state.config.to_dict())
    if state.tokenizer_json is not None:
        _write_text(tmp / "tokenizer.json", state.tokenizer_json)
    if state.token_roles is not None:
        _write_json(tmp / "token_roles.json", state.token_roles)
    _write_json(tmp / "trainer.json", {"format_version": FORMAT_VERSION, "step": state.step, "meta": state.meta})
    _fsync(tmp)


def save_checkpoint(run_dir: Path, state: TrainingState, keep_last: int = 3) -> Path:
    """Write ``<run_dir>/checkpoints/step-XXXXXXXX`` atomically, point ``latest`` at it, prune old ones.

    ``keep_last < 1`` keeps every checkpoint. Returns the checkpoint directory. One writer per run
    directory is assumed (rank 0): what an interrupted save left (``.tmp-*`` directories, ``.latest.*`` temp
    files) is deleted.
    """
    if isinstance(state.step, bool) or not isinstance(state.step, int) or state.step < 0:
        raise InputError(f"A checkpoint step must be an integer >= 0, got {state.step!r}.")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        _write_files(tmp, state)
        tree_as_created(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # No atomic directory swap: point `latest` at the complete temp dir while the old one moves aside.
        atomic_write_text(root / LATEST, tmp.name + "\n")
        aside = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=root))
        os.rename(final, aside / name)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, final, keep_last)
    return final


@contextlib.contextmanager
def staged_directory(directory: Path) -> Iterator[Path]:
    """A temp directory beside ``directory`` to fill; renamed to ``directory`` when the block ends without error.

    An existing non-empty ``directory`` is refused; on error the temp directory is deleted.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InputError(f"{str(directory)!r} already exists and is not an empty directory; choose a new one.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        tree_as_created(tmp)
        _fsync(tmp)
        if directory.exists():
            directory.rmdir()
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(directory.parent)


def write_checkpoint_dir(directory: Path, state: TrainingState) -> Path:
    """Write ``state`` as the checkpoint directory ``directory`` itself (e.g. a converted model), atomically."""
    with staged_directory(directory) as tmp:
        _write_files(tmp, state)
    return Path(directory)


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Delete step dirs beyond the newest ``keep_last`` (never ``keep``) and leftover temp dirs and files."""
    latest = _read_latest(root)
    if keep_last >= 1:
        dirs = [p for _, p in _step_dirs(root) if p != keep]
        for old in dirs[: max(len(dirs) - (keep_last - 1), 0)]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale.is_dir() and stale.name != latest:
            shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{LATEST}.*"):  # the temp file of a write of `latest` killed before its rename
        with contextlib.suppress(OSError):
            stale.unlink()


# ----- loading -----------------------------------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    return (path / "model.safetensors").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a run directory or its ``checkpoints/`` directory.

    ``latest`` decides; when it is missing or names a directory that is gone, the highest-numbered
    complete ``step-*`` directory is used.
    """
    if isinstance(path, str) and not path.strip():
        raise InputError("The checkpoint path is empty; name a checkpoint or run directory.")
    path = Path(path)
    try:
        if _is_checkpoint(path):
            return path
        for root in (path / "checkpoints", path):
            if not root.is_dir():
                continue
            latest = _read_latest(root)
            if latest and "/" not in latest and _is_checkpoint(root / latest):
                return root / latest
            complete = [p for _, p in _step_dirs(root) if _is_checkpoint(p)]
            if complete:
                return complete[-1]
    except OSError as exc:  # e.g. a name longer than the filesystem allows, a folder that cannot be listed
        raise InputError(f"Checkpoint path {shown(str(path))} cannot be read ({exc.strerror or exc}).") from None
    raise InputError(f"No checkpoint found in {shown(str(path))}.")


def load_model_config(path: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint (any path :func:`resolve_checkpoint` accepts, or a config.json file)."""
    path = Path(path)
    try:
        is_file = path.is_file()
    except OSError:  # resolve_checkpoint names the problem
        is_file = False
    file = path if is_file else resolve_checkpoint(path) / "config.json"
    data = _read_json(file)
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise InputError(f"Checkpoint config {str(file)!r} is invalid: {_short(exc)}.") from None


def load_checkpoint(
    path: Path, *, map_location: str | torch.device = "cpu", load_optimizer: bool = True
) -> TrainingState:
    """Read a checkpoint (see :func:`resolve_checkpoint` for accepted paths) into a :class:`TrainingState`."""
    ckpt = resolve_checkpoint(path)
    config = load_model_config(ckpt / "config.json")
    trainer = _read_json(ckpt / "trainer.json")
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int):
        raise InputError(f"Checkpoint file {str(ckpt / 'trainer.json')!r} has no integer step.")
    if not isinstance(trainer.get("meta") or {}, dict):
        raise InputError(f"Checkpoint file {str(ckpt / 'trainer.json')!r} has a meta that is not a JSON object.")
    state = TrainingState(
        step=trainer["step"],
        model=_load_tensors(ckpt / "model.safetensors", map_location),
        config=config,
        meta=trainer.get("meta") or {},
    )
    if (ckpt / "ema.safetensors").exists():
        state.ema = _load_tensors(ckpt / "ema.safetensors", map_location)
    if (ckpt / "rng.safetensors").exists():
        state.rng = _load_tensors(ckpt / "rng.safetensors", "cpu")
    if load_optimizer and (ckpt / "optimizer.json").exists():
        tensors = _load_tensors(ckpt / "optimizer.safetensors", map_location)
        state.optimizer = optimizer_from_flat(tensors, _read_json(ckpt / "optimizer.json"))
    if (ckpt / "tokenizer.json").exists():
        state.tokenizer_json = _read_text(ckpt / "tokenizer.json")
    if (ckpt / "token_roles.json").exists():
        state.token_roles = _read_json(ckpt / "token_roles.json")
    return state


def check_layer_count(state: TrainingState, directory: Path) -> None:
    """Refuse a checkpoint whose config asks for more layers than its model.safetensors holds tensors (every layer
    holds at least one), before any model is built from it: a million layers take minutes to build, even on the meta
    device."""
    if state.config.n_layers > len(state.model):
        raise InputError(
            f"{directory} does not fit the model: its config asks for {state.config.n_layers} layers and its "
            f"model.safetensors holds {len(state.model)} tensors."
        )


def _shape_view(config: ModelConfig, name: str) -> Any:
    """The part of field ``name`` that affects parameter shapes."""
    uses_slots = config.lora_rank > 0 or config.loop_embedding == "learned" or config.moe_routed > 0
    if name == "loop_embedding":
        return config.loop_embedding == "learned"  # "none" and "sinusoidal" have no parameters
    if name == "per_loop_slots" and not uses_slots:
        return None
    if name.startswith("mla_") and config.attention != "mla":
        return None
    if name in ("moe_shared", "moe_hidden") and not config.moe_routed:
        return None
    if name == "halting_input" and config.halting == "none":
        return None
    return getattr(config, name)


def adds_halting_head(saved: ModelConfig, requested: ModelConfig) -> bool:
    """Whether ``requested`` has halting-head parameters that ``saved`` lacks and none that it would drop: no head
    -> a head, or a ``state`` head -> a ``state+change`` head (a fine-tune then starts the new ones fresh)."""
    if requested.halting != "act" or (saved.halting == "act" and saved.halting_input == requested.halting_input):
        return False
    return saved.halting == "none" or saved.halting_input == "state"


def check_compatible(saved: ModelConfig, requested: ModelConfig) -> None:
    """Raise InputError naming every shape-relevant field where the two configs differ."""
    diffs = [name for name in SHAPE_FIELDS if _shape_view(saved, name) != _shape_view(requested, name)]
    if diffs:
        have = ", ".join(f"{n}={getattr(saved, n)!r}" for n in diffs)
        want = ", ".join(f"{n}={getattr(requested, n)!r}" for n in diffs)
        raise InputError(f"The checkpoint has {have}, the requested config has {want}.")


def check_state_dict(
    expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], source: str, listed: int = 8
) -> None:
    """Raise one :class:`InputError` naming the missing and unexpected tensors and the wrong shapes in ``found``.

    Both map tensor names to shapes; at most ``listed`` names of each kind are spelled out.
    """

    def some(names: list[str]) -> str:
        more = f" and {len(names) - listed} more" if len(names) > listed else ""
        return ", ".join(names[:listed]) + more

    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [
        f"{name} {list(found[name])} (expected {list(expected[name])})"
        for name in sorted(set(expected) & set(found))
        if tuple(found[name]) != tuple(expected[name])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {some(missing)}")
    if extra:
        problems.append(f"unexpected tensors {some(extra)}")
    if shapes:
        problems.append(f"wrong shapes {some(shapes)}")
    if problems:
        raise InputError(f"{source} does not fit the model: {'; '.join(problems)}.")
