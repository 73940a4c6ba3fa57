"""Model configuration: frozen dataclasses validated at construction, with a JSON/YAML form.

A bad value raises :class:`ConfigError` whose message names the field, the value and what is allowed.
Optional fields left as ``None`` (``n_kv_heads``, ``head_dim``, ``mlp_hidden``, ``init_std``,
``per_loop_slots``) are resolved to concrete values during construction, so a saved config is explicit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loopformer.deprecation import upgrade_keys
from loopformer.errors import ConfigError
from loopformer.filemode import as_created

NORM_LAYOUTS = ("sandwich", "pre")
ROPE_STYLES = ("half", "interleaved")
ROPE_PRECISIONS = ("fp64", "fp32")  # of the RoPE angles before cos / sin; fp32 is Huginn's own table
INJECTIONS = ("concat", "add", "lti")
STATE_INITS = ("like-init", "zero")
LOOP_EMBEDDINGS = ("none", "sinusoidal", "learned")
LOOP_OVERFLOW_POLICIES = ("reuse-last", "cycle", "off")
DEPTH_SAMPLERS = ("lognormal-poisson", "fixed", "uniform", "poisson", "geometric")
HALTING_MODES = ("none", "act")
HALTING_INPUTS = ("state", "state+change")
ATTENTIONS = ("mha", "mla")
DTYPES = ("auto", "fp32", "bf16")  # compute dtype choices; "auto" is resolved by loopformer.hardware


def _check(ok: bool, owner: str, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{name}={shown(value)} is invalid: {allowed}.")


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, shortened past ``limit`` characters (an integer too long for Python to
    print, over 4300 digits, is described by its size)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


INT_LIMIT = 2**63  # integer fields hold 64-bit signed values (what torch, numpy and every consumer can take)


_PY_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _check_types(obj: Any) -> None:
    """Every scalar field holds a value of its annotated type (bool is not accepted as a number)."""
    owner = type(obj).__name__
    for f in dataclasses.fields(obj):
        parts = [p.strip() for p in str(f.type).split("|")]
        if not any(p in _PY_TYPES for p in parts):
            continue
        value = getattr(obj, f.name)
        if value is None and "None" in parts:
            continue
        allowed = tuple(t for p in parts for t in _PY_TYPES.get(p, ()))
        ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
        _check(ok, owner, f.name, value, f"expected {f.type}")
        if isinstance(value, int) and not isinstance(value, bool):
            _check(-INT_LIMIT <= value < INT_LIMIT, owner, f.name, value, "integers must lie in -2**63..2**63-1")
        elif isinstance(value, float):  # a JSON 1e999 reads as inf: no setting means anything at inf or nan
            _check(math.isfinite(value), owner, f.name, value, "must be a finite number")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, owner, name, value, "allowed values are " + ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class RecurrenceConfig:
    """How many core iterations run, in training (sampled) and at inference (``mean_loops``).

    ``sampler`` draws the training depth r; the last ``backprop_loops`` iterations carry gradient
    and the first ``r - backprop_loops`` run without it (truncated backprop). ``per_sequence`` draws
    one depth per row instead of one per batch; rows whose depth is reached keep their state.
    """

    mean_loops: int = 8
    sampler: str = "lognormal-poisson"
    backprop_loops: int = 4
    sigma: float = 0.5
    max_loops: int | None = None
    per_sequence: bool = False

    def __post_init__(self) -> None:
        owner = "RecurrenceConfig"
        _check_types(self)
        _check(self.mean_loops >= 1, owner, "mean_loops", self.mean_loops, "must be >= 1")
        _check_choice(owner, "sampler", self.sampler, DEPTH_SAMPLERS)
        _check(self.backprop_loops >= 1, owner, "backprop_loops", self.backprop_loops, "must be >= 1")
        _check(self.sigma > 0, owner, "sigma", self.sigma, "must be > 0")
        if self.max_loops is not None:
            _check(
                self.max_loops >= self.mean_loops,
                owner,
                "max_loops",
                self.max_loops,
                f"must be None or >= mean_loops ({self.mean_loops})",
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a recurrent-depth LM: prelude -> core x r -> coda -> head."""

    vocab_size: int = 256
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    n_prelude: int = 1
    n_core: int = 2
    n_coda: int = 1
    mlp_hidden: int | None = None
    norm_eps: float = 1e-6
    norm_layout: str = "sandwich"
    rope_style: str = "half"
    rope_base: float = 10000.0
    rope_precision: str = "fp64"
    qk_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    embed_scale: bool = False
    injection: str = "concat"
    lti_eps: float = 1e-4
    state_init: str = "like-init"
    state_init_std: float = math.sqrt(2 / 5)
    loop_embedding: str = "none"
    loop_embedding_scale: float = 1.0
    lora_rank: int = 0
    per_loop_slots: int | None = None
    loop_overflow: str = "reuse-last"
    init_std: float | None = None
    moe_routed: int = 0
    moe_shared: int = 1
    moe_top_k: int = 2
    moe_hidden: int | None = None
    moe_bias_rate: float = 1e-3
    moe_aux_weight: float = 0.0
    # Multi-Latent Attention (loopformer.nn.mla): "mla" caches a latent of width mla_kv_rank and one shared RoPE key
    # of width mla_rope_dim per token; mla_q_rank > 0 gives low-rank queries ("mha" covers GQA via n_kv_heads)
    attention: str = "mha"
    mla_kv_rank: int | None = None
    mla_q_rank: int = 0
    mla_rope_dim: int | None = None
    memory_dim: int = 0
    # learned ACT halting (loopformer.nn.halting): head bias, Graves ponder cost, optional PonderNet prior
    halting: str = "none"
    halting_input: str = "state"
    halting_bias_init: float = -3.0
    ponder_cost: float = 1e-3
    halting_prior: float | None = None
    halting_kl_weight: float = 0.01
    halting_warmup_steps: int = 0
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)

    def __post_init__(self) -> None:
        owner = "ModelConfig"
        if isinstance(self.recurrence, dict):
            object.__setattr__(self, "recurrence", RecurrenceConfig(**self.recurrence))
        _check(
            isinstance(self.recurrence, RecurrenceConfig),
            owner,
            "recurrence",
            self.recurrence,
            "expected a RecurrenceConfig",
        )
        _check_types(self)
        for name in ("vocab_size", "dim", "n_heads", "n_core", "max_seq_len"):
            _check(getattr(self, name) >= 1, owner, name, getattr(self, name), "must be >= 1")
        for name in ("n_prelude", "n_coda", "lora_rank"):
            _check(getattr(self, name) >= 0, owner, name, getattr(self, name), "must be >= 0")
        if self.head_dim is None:
            _check(
                self.dim % self.n_heads == 0,
                owner,
                "n_heads",
                self.n_heads,
                f"n_heads must divide dim ({self.dim}), or set head_dim explicitly",
            )
        for name, default in self.derived_defaults().items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        _check_types(self)  # the derived values too (e.g. mlp_hidden of a dim near 2**63)
        _check(
            self.head_dim >= 2 and self.head_dim % 2 == 0,
            owner,
            "head_dim",
            self.head_dim,
            "must be a positive even number (RoPE rotates pairs)",
        )
        _check(
            self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
            owner,
            "n_kv_heads",
            self.n_kv_heads,
            f"must be >= 1 and divide n_heads ({self.n_heads})",
        )
        for name in ("mlp_hidden", "per_loop_slots", "moe_hidden"):
            _check(getattr(self, name) >= 1, owner, name, getattr(self, name), "must be >= 1")
        for name in ("moe_routed", "moe_shared", "moe_bias_rate", "moe_aux_weight", "memory_dim"):
            _check(getattr(self, name) >= 0, owner, name, getattr(self, name), "must be >= 0")
        if self.moe_routed:
            _check(
                1 <= self.moe_top_k <= self.moe_routed,
                owner,
                "moe_top_k",
                self.moe_top_k,
                f"must lie in 1..moe_routed ({self.moe_routed})",
            )
        for name in ("norm_eps", "init_std"):
            _check(getattr(self, name) > 0, owner, name, getattr(self, name), "must be > 0")
        _check(self.rope_base > 1, owner, "rope_base", self.rope_base, "must be > 1")
        if self.sliding_window is not None:
            _check(self.sliding_window >= 1, owner, "sliding_window", self.sliding_window, "must be None or >= 1")
        _check_choice(owner, "norm_layout", self.norm_layout, NORM_LAYOUTS)
        _check_choice(owner, "rope_style", self.rope_style, ROPE_STYLES)
        _check_choice(owner, "rope_precision", self.rope_precision, ROPE_PRECISIONS)
        _check_choice(owner, "injection", self.injection, INJECTIONS)
        _check_choice(owner, "state_init", self.state_init, STATE_INITS)
        _check_choice(owner, "loop_embedding", self.loop_embedding, LOOP_EMBEDDINGS)
        _check_choice(owner, "loop_overflow", self.loop_overflow, LOOP_OVERFLOW_POLICIES)
        _check(0 < self.lti_eps < 1, owner, "lti_eps", self.lti_eps, "must lie in (0, 1)")
        _check(self.state_init_std >= 0, owner, "state_init_std", self.state_init_std, "must be >= 0")
        _check_choice(owner, "halting", self.halting, HALTING_MODES)
        _check_choice(owner, "halting_input", self.halting_input, HALTING_INPUTS)
        bias = self.halting_bias_init
        _check(math.isfinite(bias), owner, "halting_bias_init", bias, "must be finite")
        for name in ("ponder_cost", "halting_kl_weight"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, owner, name, value, "must be a finite number >= 0")
        warmup = self.halting_warmup_steps
        _check(warmup >= 0, owner, "halting_warmup_steps", warmup, "must be >= 0")
        if self.halting_prior is not None:
            _check(0 < self.halting_prior < 1, owner, "halting_prior", self.halting_prior, "must be None or in (0, 1)")
        self._check_mla()

    def _check_mla(self) -> None:
        owner = "ModelConfig"
        _check_choice(owner, "attention", self.attention, ATTENTIONS)
        _check(self.mla_kv_rank >= 1, owner, "mla_kv_rank", self.mla_kv_rank, "must be >= 1")
        _check(self.mla_q_rank >= 0, owner, "mla_q_rank", self.mla_q_rank, "must be >= 0 (0 = full-rank queries)")
        rope = self.mla_rope_dim
        _check(rope >= 2 and rope % 2 == 0, owner, "mla_rope_dim", rope, "must be a positive even number")
        if self.attention == "mla":
            for name in ("qk_bias", "qk_norm"):
                _check(not getattr(self, name), owner, name, getattr(self, name), "must be False with attention='mla'")
            _check(
                self.n_kv_heads == self.n_heads,
                owner,
                "n_kv_heads",
                self.n_kv_heads,
                f"must equal n_heads ({self.n_heads}) with attention='mla' (its keys and values come from one latent)",
            )

    # ----- derived quantities -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Distinct layers (the parameter cost): prelude + core + coda."""
        return self.n_prelude + self.n_core + self.n_coda

    def effective_depth(self, steps: int | None = None) -> int:
        """Layers a token passes through at ``steps`` core iterations (default: ``mean_loops``)."""
        r = self.recurrence.mean_loops if steps is None else steps
        return self.n_prelude + r * self.n_core + self.n_coda

    @property
    def attention_kind(self) -> str:
        """Human-readable attention variant, e.g. ``GQA 8/2`` or ``MHA, window 64``."""
        kind = "MHA" if self.n_kv_heads == self.n_heads else f"GQA {self.n_heads}/{self.n_kv_heads}"
        if self.attention == "mla":
            kind = f"MLA latent {self.mla_kv_rank} + RoPE key {self.mla_rope_dim}"
        if self.sliding_window is not None:
            kind += f", window {self.sliding_window}"
        return kind

    def derived_defaults(self) -> dict[str, Any]:
        """What each optional field resolves to when left as None, given the other fields."""
        return {
            "head_dim": self.dim // self.n_heads if self.dim % self.n_heads == 0 else None,
            "n_kv_heads": self.n_heads,
            "mlp_hidden": 32 * math.ceil(8 * self.dim / 3 / 32),
            "per_loop_slots": 2 * self.recurrence.mean_loops,
            # fine-grained experts: the active experts together are about as wide as the dense MLP
            "moe_hidden": max(
                1,
                (self.mlp_hidden or 32 * math.ceil(8 * self.dim / 3 / 32)) // max(1, self.moe_shared + self.moe_top_k),
            ),
            "init_std": math.sqrt(2 / (5 * self.dim)),
            "mla_kv_rank": max(1, self.dim // 4),
            "mla_rope_dim": max(2, 2 * ((self.head_dim or self.dim // self.n_heads) // 4)),
        }

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of a query / key: ``head_dim``, or ``mla_rope_dim`` with MLA."""
        return self.mla_rope_dim if self.attention == "mla" else self.head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied and validated; ``recurrence`` may be a dict of changes.

        Optional fields still at their derived default (e.g. ``head_dim = dim // n_heads``) are
        derived again from the new values unless ``changes`` sets them.
        """
        for name, default in self.derived_defaults().items():
            if name not in changes and getattr(self, name) == default:
                changes[name] = None
        rec = changes.pop("recurrence", None)
        if isinstance(rec, dict):
            changes["recurrence"] = dataclasses.replace(self.recurrence, **known_fields(RecurrenceConfig, rec))
        elif rec is not None:
            changes["recurrence"] = rec
        return dataclasses.replace(self, **changes)

    # ----- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"A model config must be a mapping, got {type(data).__name__}.")
        data = dict(known_fields(cls, data))
        rec = data.get("recurrence")
        if isinstance(rec, dict):
            data["recurrence"] = RecurrenceConfig(**known_fields(RecurrenceConfig, rec))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except ValueError as exc:  # not JSON, or an integer of more digits than Python reads (4300)
            raise ConfigError(f"The model config is not valid JSON: {exc}.") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON atomically (temp file + rename)."""
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read a JSON or YAML config file (safe loaders only)."""
        return cls.from_dict(read_config_file(path))


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with renamed keys upgraded (:func:`~loopformer.deprecation.upgrade_keys`); raises
    :class:`ConfigError` naming every other key that is not a field of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    data = upgrade_keys(data, names, cls.__name__)
    # YAML keys may be numbers; a key with line breaks or other unprintable characters is shown as its repr
    unknown = sorted(
        key if isinstance(key, str) and key.isprintable() else shown(key) for key in data if key not in names
    )
    if unknown:
        listed = ", ".join(unknown)
        listed = listed if len(listed) <= 200 else listed[:197] + "..."
        raise ConfigError(f"Unknown {cls.__name__} field(s): {listed}.")
    return data


def read_text_file(path: Path, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of ``path``, or ``error`` with one sentence naming ``what`` is missing or unreadable."""
    named = shown(str(path))
    try:
        found = path.is_file()
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise error(f"{what} {named} cannot be read ({exc.strerror or exc}).") from None
    if not found:
        raise error(f"{what} {named} does not exist.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {named} cannot be read as UTF-8 text (not UTF-8 at byte {exc.start}).") from None
    except OSError as exc:
        raise error(f"{what} {named} cannot be read ({exc.strerror or exc}).") from None


def read_jsonl_records(path: Path, what: str, error: type[Exception]) -> list[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSON-lines file.

    Lines are separated by ``\\n`` only (a JSON string may hold other Unicode line breaks); a line that is not
    JSON raises ``error`` naming the place.
    """
    records = []
    for number, line in enumerate(read_text_file(path, what, error).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: not valid JSON ({exc.msg}).") from None
    return records


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON or YAML file (safe loaders only) into plain data; one-sentence errors."""
    path = Path(path)
    text = read_text_file(path, "Config file", ConfigError)
    if path.suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML ({_yaml_problem(exc)}).") from None
        except ValueError as exc:  # a value YAML parses but Python refuses: 2020-13-45, an integer of 5000 digits
            problem = str(exc).split(":")[0].strip() or type(exc).__name__
            raise ConfigError(f"Config file {str(path)!r} holds a value that cannot be read ({problem}).") from None
    try:
        return json.loads(text)
    except ValueError as exc:  # not JSON, or an integer of more digits than Python reads (4300)
        raise ConfigError(f"Config file {str(path)!r} is not valid JSON: {exc}.") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML parse error: what went wrong and where."""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        as_created(fd)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
