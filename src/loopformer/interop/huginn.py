"""Huginn-0125 (``model_type: huginn_raven``) checkpoints <-> loopformer checkpoints.

The layout is the one ../shared/REFERENCE.md section 2 describes. Most tensors map one to one::

    transformer.wte.weight                 tok_emb.weight (lm_head.weight is its duplicate when tied)
    transformer.{prelude,core_block,coda}.i.norm_k.weight        {prelude,core,coda}.i.norm_k.weight
    ... .attn.Wqkv.weight  [3h, h], rows Q|K|V    ... .attn.qkv.weight (kept fused, same row order)
    ... .attn.proj.weight                          ... .attn.out.weight
    ... .mlp.fc.weight     [2*inner, h], gate|up  ... .mlp.fc.weight (same order)
    ... .mlp.proj.weight                           ... .mlp.proj.weight
    transformer.ln_f.weight                final_norm.weight (applied twice by both)

and two are split: ``attn.qk_bias`` [2, 1, H, head_dim] -> ``attn.q_bias``, ``attn.k_bias`` [H, head_dim], and
``transformer.adapter.weight`` [h, 2h] on cat[state, e] -> ``injection.state_proj`` | ``injection.input_proj``.
``freqs_cis`` (precomputed interleaved RoPE) is dropped on import and written on export: our RoPE is recomputed from
``rope_base``, in fp32 as Huginn's code computes its table (``rope_precision: fp32``). An export records the model's
``rope_precision`` under :data:`ROPE_PRECISION_KEY`, which Huginn's code ignores and a real Huginn config lacks. Import
streams the source shard by shard; export writes shard by shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from loopformer.checkpoint import (
    TrainingState,
    check_state_dict,
    load_checkpoint,
    staged_directory,
    write_checkpoint_dir,
)
from loopformer.config import ModelConfig, RecurrenceConfig, read_text_file
from loopformer.errors import ConfigError, InputError
from loopformer.interop.shards import ShardedTensors, write_shards
from loopformer.interop.tokenizer_files import (
    ROLES_KEY,
    imported_chat_template,
    read_tokenizer_config,
    token_text,
    write_tokenizer_files,
)
from loopformer.model import build_model
from loopformer.nn.rope import rope_angles
from loopformer.tokenizer import TextTokenizer, TokenRoles

MODEL_TYPE = "huginn_raven"
ROPE_KEY = "freqs_cis"
ROPE_PRECISION_KEY = "loopformer_rope_precision"  # absent from Huginn's own configs: fp32, as its code computes RoPE
DEFAULT_SHARD_BYTES = 5 * 2**30
_PARTS = (
    ("transformer.prelude", "prelude", "n_prelude"),
    ("transformer.core_block", "core", "n_core"),
    ("transformer.coda", "coda", "n_coda"),
)
_BLOCK = (
    ("norm_1.weight", "norm_1.weight"),
    ("norm_2.weight", "norm_2.weight"),
    ("norm_3.weight", "norm_3.weight"),
    ("norm_4.weight", "norm_4.weight"),
    ("attn.Wqkv.weight", "attn.qkv.weight"),
    ("attn.proj.weight", "attn.out.weight"),
    ("mlp.fc.weight", "mlp.fc.weight"),
    ("mlp.proj.weight", "mlp.proj.weight"),
)
# Shape-defining config.json fields with no default; the others default as in Huginn's RavenConfig.
_REQUIRED = (
    "n_embd",
    "n_heads",
    "n_layers_in_prelude",
    "n_layers_in_recurrent_block",
    "n_layers_in_coda",
    "intermediate_size",
    "vocab_size",
    "block_size",
)
_DEFAULTS: dict[str, Any] = {
    "norm_eps": 1e-6,
    "rope_base": 50000.0,
    "qk_bias": True,
    "tie_embeddings": True,
    "mean_recurrence": 32,
    "mean_backprop_depth": 8,
}
# Fields this importer understands only at these values (Huginn-0125's own).
_FIXED: dict[str, Any] = {
    "bias": False,
    "injection_type": "linear",
    "state_init": "like-init",
    "block_class_name": "SandwichBlock",
    "mlp_class_name": "GatedMLP",
    "norm_class_name": "RMSNorm_llama",
    "nonlin_name": "SiLU",
}
_SAMPLING_SCHEME = "poisson-lognormal-filling"
# Huginn's special tokens and chat format (REFERENCE section 2); tokenizer_config.json may name bos / eos / pad.
HUGINN_TOKENS = {"bos": "<|begin_text|>", "eos": "<|end_text|>", "pad": "<|pad|>", "end_of_turn": "<|end_turn|>"}
HUGINN_ROLE_NAMES = {"system": "system", "user": "user", "assistant": "Huginn"}


_KIND_TEXT = {"int": "a non-negative integer", "number": "a number", "bool": "true or false"}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) and value >= 0 if kind == "int" else isinstance(value, int | float)


# ----- config -----------------------------------------------------------------------------------------------------
def config_from_huginn(data: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a Huginn ``config.json``; one :class:`InputError` lists everything unsupported."""
    if not isinstance(data, dict):
        raise InputError("config.json must hold a JSON object.")
    if data.get("model_type") != MODEL_TYPE:
        raise InputError(
            f"config.json has model_type {data.get('model_type')!r}; the Huginn importer reads {MODEL_TYPE!r}."
        )
    problems = [f"{name} is missing" for name in _REQUIRED if name not in data]
    values = {**_DEFAULTS, **_FIXED, **data}
    kinds = {
        **dict.fromkeys((*_REQUIRED, "mean_recurrence", "mean_backprop_depth"), "int"),
        "norm_eps": "number",
        "rope_base": "number",
        "qk_bias": "bool",
        "tie_embeddings": "bool",
    }
    for name, kind in kinds.items():
        if name in values and not _is_kind(values[name], kind):
            problems.append(f"{name}={values[name]!r} is not {_KIND_TEXT[kind]}")
    problems += [
        f"{name}={values[name]!r} is not supported (only {want!r})"
        for name, want in _FIXED.items()
        if values[name] != want
    ]
    if problems:
        raise InputError(f"The Huginn config.json cannot be imported: {'; '.join(problems)}.")
    dim, heads = values["n_embd"], values["n_heads"]
    derived = {
        "n_layers": values["n_layers_in_prelude"] + values["n_layers_in_recurrent_block"] + values["n_layers_in_coda"],
        "head_dim": dim // heads if heads else None,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "padded_vocab_size": values["vocab_size"],
    }
    problems = [
        f"{name}={values[name]!r} disagrees with the other fields (expected {want!r})"
        for name, want in derived.items()
        if name in values and values[name] != want
    ]
    embed_scale = (values.get("init_values") or {}).get("embed_scale", math.sqrt(dim))
    if not math.isclose(embed_scale, math.sqrt(dim), rel_tol=1e-6):
        problems.append(f"init_values.embed_scale={embed_scale!r} is not sqrt(n_embd)")
    if problems:
        raise InputError(f"The Huginn config.json cannot be imported: {'; '.join(problems)}.")
    try:
        return ModelConfig(
            vocab_size=values["vocab_size"],
            dim=dim,
            n_heads=heads,
            n_prelude=values["n_layers_in_prelude"],
            n_core=values["n_layers_in_recurrent_block"],
            n_coda=values["n_layers_in_coda"],
            mlp_hidden=values["intermediate_size"],
            norm_eps=float(values["norm_eps"]),
            norm_layout="sandwich",
            rope_style="interleaved",
            rope_base=float(values["rope_base"]),
            rope_precision=data.get(ROPE_PRECISION_KEY, "fp32"),
            qk_bias=values["qk_bias"],
            max_seq_len=values["block_size"],
            tie_embeddings=values["tie_embeddings"],
            embed_scale=True,
            injection="concat",
            state_init="like-init",
            state_init_std=math.sqrt(2 / 5),
            recurrence=RecurrenceConfig(
                mean_loops=values["mean_recurrence"],
                sampler="lognormal-poisson",
                backprop_loops=values["mean_backprop_depth"],
            ),
        )
    except ConfigError as exc:
        raise InputError(f"The Huginn config.json cannot be imported: {exc}") from None


def config_to_huginn(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A Huginn ``config.json`` for ``config``; an :class:`InputError` names every field Huginn cannot express.

    Only the mean depth and the backprop depth of the training recurrence are carried (Huginn has one sampler).
    """
    dim, layers = config.dim, (config.n_prelude, config.n_core, config.n_coda)
    depth = config.n_prelude + config.n_coda + config.n_core * config.recurrence.mean_loops
    std = math.sqrt(2 / (5 * dim))
    data = {
        "model_type": MODEL_TYPE,
        "architectures": ["RavenForCausalLM"],
        "n_embd": dim,
        "n_heads": config.n_heads,
        "n_layers": sum(layers),
        "n_layers_in_prelude": layers[0],
        "n_layers_in_recurrent_block": layers[1],
        "n_layers_in_coda": layers[2],
        "block_size": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.vocab_size,
        "intermediate_size": config.mlp_hidden,
        "tie_embeddings": config.tie_embeddings,  # not tie_word_embeddings: RavenConfig passes that one itself
        "norm_eps": config.norm_eps,
        "rope_base": config.rope_base,
        ROPE_PRECISION_KEY: config.rope_precision,
        "qk_bias": config.qk_bias,
        "mean_recurrence": config.recurrence.mean_loops,
        "mean_backprop_depth": config.recurrence.backprop_loops,
        "sampling_scheme": _SAMPLING_SCHEME,
        **_FIXED,
        "architecture_class_name": "RecurrentGPT",
        "init_strategy": "takase",
        "init_orthogonal": False,
        "activation_checkpoint_impl": "per-iteration",
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "head_dim": dim // config.n_heads,
        "effective_expected_depth": depth,
        "init_values": {
            "std": std,
            "out_proj": std / math.sqrt(2 * depth),
            "embedding": std,
            "embed_scale": math.sqrt(dim),
        },
        "torch_dtype": torch_dtype,
    }
    back = config_from_huginn(json.loads(json.dumps(data)))
    problems = [
        f"{f.name}={getattr(config, f.name)!r} (Huginn: {getattr(back, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name != "recurrence" and getattr(config, f.name) != getattr(back, f.name)
    ]
    if problems:
        raise InputError(f"The Huginn layout cannot express this model: {', '.join(problems)}.")
    return data


# ----- tensors ----------------------------------------------------------------------------------------------------
def _renames(config: ModelConfig) -> dict[str, str]:
    """Huginn name -> our name of every tensor that maps one to one."""
    names = {"transformer.wte.weight": "tok_emb.weight", "transformer.ln_f.weight": "final_norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "head.weight"
    for theirs, ours, count in _PARTS:
        for i in range(getattr(config, count)):
            names.update({f"{theirs}.{i}.{a}": f"{ours}.{i}.{b}" for a, b in _BLOCK})
    return names


def _fused(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """Huginn name -> our two names of the tensors Huginn stores fused."""
    fused = {"transformer.adapter.weight": ("injection.state_proj.weight", "injection.input_proj.weight")}
    if config.qk_bias:
        for theirs, ours, count in _PARTS:
            for i in range(getattr(config, count)):
                fused[f"{theirs}.{i}.attn.qk_bias"] = (f"{ours}.{i}.attn.q_bias", f"{ours}.{i}.attn.k_bias")
    return fused


def _split(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "transformer.adapter.weight":
        return tensor.chunk(2, dim=1)  # cat[state, e]: state columns first
    return tensor[0, 0], tensor[1, 0]  # qk_bias [2, 1, H, D]: 0 = q, 1 = k


def _join(name: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    if name == "transformer.adapter.weight":
        return torch.cat((first, second), dim=1)
    return torch.stack((first, second))[:, None]


def rope_table(config: ModelConfig) -> torch.Tensor:
    """Huginn's ``freqs_cis`` [1, T, 1, head_dim / 2, 2]: (cos, sin) of the interleaved RoPE angles, fp32."""
    cos, sin = rope_angles(torch.arange(config.max_seq_len), config.head_dim, config.rope_base, config.rope_precision)
    return torch.stack((cos, sin), dim=-1)


def from_huginn(name: str, tensor: torch.Tensor, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs for one Huginn tensor ([] for the tied head duplicate and ``freqs_cis``)."""
    renames, fused = _renames(config), _fused(config)
    if name in renames:
        return [(renames[name], tensor)]
    if name in fused:
        return list(zip(fused[name], _split(name, tensor), strict=True))
    return []


def to_huginn(weights: Mapping[str, torch.Tensor], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our weights as Huginn (name, tensor) pairs: fused tensors joined, the tied embedding twice, ``freqs_cis``.

    A weight with no place in the Huginn layout (or a missing one) is an :class:`InputError` naming it.
    """
    renames, fused = _renames(config), _fused(config)
    placed = set(renames.values()) | {ours for pair in fused.values() for ours in pair}
    shapes = {name: tensor.shape for name, tensor in weights.items()}
    # names only: a placed weight is expected with the shape it has
    check_state_dict({name: shapes.get(name, ()) for name in placed}, shapes, "The model, in the Huginn layout,")
    for theirs, ours in renames.items():
        yield theirs, weights[ours]
    for theirs, (first, second) in fused.items():
        yield theirs, _join(theirs, weights[first], weights[second])
    if config.tie_embeddings:
        yield "lm_head.weight", weights["tok_emb.weight"]
    yield ROPE_KEY, rope_table(config)


def huginn_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a Huginn checkpoint of ``config`` holds (built on the meta device); the tied
    ``lm_head.weight`` and ``freqs_cis`` are among them but may be absent from a checkpoint."""
    weights = build_model(config, device="meta").state_dict()
    shapes = {name: tuple(tensor.shape) for name, tensor in to_huginn(weights, config) if name != ROPE_KEY}
    cos_sin = (1, config.max_seq_len, 1, config.head_dim // 2, 2)
    return {**shapes, ROPE_KEY: cos_sin}


# ----- tokenizer --------------------------------------------------------------------------------------------------
def huginn_roles(tokenizer_config: dict[str, Any]) -> TokenRoles:
    """The token roles of a Huginn ``tokenizer_config.json`` (ours when it carries them from an export)."""
    if ROLES_KEY in tokenizer_config:
        return TokenRoles.from_dict(tokenizer_config[ROLES_KEY])
    tokens = dict(HUGINN_TOKENS)
    for role in ("bos", "eos", "pad"):
        tokens[role] = token_text(tokenizer_config.get(f"{role}_token")) or tokens[role]
    openings = {role: f"<|begin_header|>{name}<|end_header|>\n\n" for role, name in HUGINN_ROLE_NAMES.items()}
    return TokenRoles(**tokens, openings=openings, chat_template=imported_chat_template(tokenizer_config))


def _import_tokenizer(src: Path, vocab_size: int) -> tuple[str | None, dict[str, Any] | None]:
    """``tokenizer.json`` text and the roles to store ((None, None) when the source has no tokenizer)."""
    path = src / "tokenizer.json"
    if not path.is_file():
        return None, None
    text = read_text_file(path, "Tokenizer file", InputError)
    tokenizer = TextTokenizer.from_json(text, str(path), roles=huginn_roles(read_tokenizer_config(src)))
    if tokenizer.vocab_size > vocab_size:
        raise InputError(f"{path} has {tokenizer.vocab_size} tokens, more than the model's {vocab_size}.")
    return text, tokenizer.roles_dict()


# ----- conversions ------------------------------------------------------------------------------------------------
def _read_config(src: Path) -> Any:
    path = src / "config.json"
    try:
        return json.loads(read_text_file(path, "Huginn config", InputError))
    except json.JSONDecodeError as exc:
        raise InputError(f"{str(path)!r} is not valid JSON ({exc}).") from None


def import_huginn(src: Path, dst: Path, dtype: torch.dtype | None = None) -> Path:
    """Convert the Huginn checkpoint directory ``src`` into the loopformer checkpoint directory ``dst``.

    ``dtype`` casts floating-point tensors (None keeps the stored dtype). The source is read one shard at a time.
    """
    src = Path(src)
    config = config_from_huginn(_read_config(src))
    tensors = ShardedTensors(src)
    found = tensors.shapes()
    expected = huginn_shapes(config)
    optional = (ROPE_KEY, "lm_head.weight") if config.tie_embeddings else (ROPE_KEY,)
    for name in optional:
        if name not in found:
            del expected[name]  # the RoPE table is recomputed from rope_base; a tied head is the embedding
    check_state_dict(expected, found, f"The Huginn checkpoint {str(src)!r}")
    tokenizer_json, roles = _import_tokenizer(src, config.vocab_size)
    weights: dict[str, torch.Tensor] = {}
    head = None
    for name, tensor in tensors.iter_tensors():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if name == "lm_head.weight" and config.tie_embeddings:
            head = tensor
        weights.update(from_huginn(name, tensor, config))
        if head is not None and "tok_emb.weight" in weights:
            if not torch.equal(head, weights["tok_emb.weight"]):
                raise InputError("lm_head.weight differs from transformer.wte.weight although tie_embeddings is true.")
            head = None
    state = TrainingState(
        step=0,
        model=weights,
        config=config,
        tokenizer_json=tokenizer_json,
        token_roles=roles,
        meta={"imported_from": {"format": MODEL_TYPE, "path": str(src)}},
    )
    return write_checkpoint_dir(Path(dst), state)


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_huginn(src: Path, dst: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the loopformer checkpoint ``src`` (or a run's latest) as a Huginn checkpoint directory ``dst``."""
    state = load_checkpoint(Path(src), load_optimizer=False)
    config = state.config
    dtype = state.model["tok_emb.weight"].dtype if "tok_emb.weight" in state.model else torch.float32
    data = config_to_huginn(config, _DTYPE_NAMES.get(dtype, "float32"))
    tokenizer = None
    if state.tokenizer_json is not None:
        tokenizer = TextTokenizer.from_json(state.tokenizer_json, roles=state.token_roles)
        data.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with staged_directory(Path(dst)) as tmp:
        write_shards(tmp, to_huginn(state.model, config), max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            write_tokenizer_files(tmp, state.tokenizer_json, tokenizer.roles, {})
    return Path(dst)
