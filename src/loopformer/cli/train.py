"""``loopformer train``: every ModelConfig, RecurrenceConfig and TrainConfig field as a flag.

Settings are layered: the preset (or, with ``--resume``, the run's own saved configs) < the ``--config``
file < flags given on the command line. A run file is a JSON/YAML mapping of field names (flat, or under
``model:`` / ``recurrence:`` / ``train:`` sections) plus an optional ``preset:``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from loopformer.cli.arguments import add_renamed_flag, path_text
from loopformer.config import (
    ATTENTIONS,
    DEPTH_SAMPLERS,
    DTYPES,
    HALTING_INPUTS,
    HALTING_MODES,
    INJECTIONS,
    LOOP_EMBEDDINGS,
    LOOP_OVERFLOW_POLICIES,
    NORM_LAYOUTS,
    ROPE_PRECISIONS,
    ROPE_STYLES,
    STATE_INITS,
    ModelConfig,
    RecurrenceConfig,
    read_config_file,
    shown,
)
from loopformer.deprecation import RENAMED, upgrade_keys
from loopformer.errors import ConfigError
from loopformer.presets import PRESETS, get_preset
from loopformer.tasks.builtin import TASKS
from loopformer.training.config import SCHEDULES, STRATEGIES, TrainConfig

SECTIONS: dict[str, type] = {"model": ModelConfig, "recurrence": RecurrenceConfig, "train": TrainConfig}
SKIPPED_FIELDS = {("model", "recurrence")}
HELP = {
    "data": "stdlib (embedded), stdlib+topics, a text file, a folder of .txt/.md/.py, or JSONL with 'text'",
    "val_data": "a separate validation source (default: a hash split of --data)",
    "task": f"train on a built-in reasoning task instead of text: {', '.join(TASKS)}",
    "task_difficulty": "training difficulty of --task: N or LOW-HIGH (default: the task's own)",
    "task_curriculum_steps": "grow the --task-difficulty range from its lowest difficulty to its full width over "
    "this many steps (0: the full range from the start)",
    "eval_difficulty": "validation difficulty of --task (default: twice the hardest training difficulty)",
    "task_data": 'JSONL of {"input": ..., "target": ...} examples (whitespace-separated symbols) to train on',
    "eval_data": "JSONL examples to validate a task run on (default: a --val-fraction share of --task-data)",
    "tokenizer": "bpe (trained on the data and cached), byte, or a tokenizer.json path",
    "steps": "total optimizer steps (the schedule's length)",
    "eval_loops": "comma-separated depths for validation perplexity (and exact match on tasks)",
    "init_from": "fine-tune: start from this checkpoint's weights, tokenizer and model config (a model that adds "
    "a halting head, --halting act, starts that head fresh)",
    "init_from_ema": "start --init-from from the checkpoint's EMA weights (the ones its evaluation scored)",
    "trainable": "train only the parameters whose names start with one of these comma-separated prefixes, e.g. "
    "halting (none: every parameter trains)",
    "time_limit_minutes": "stop with a checkpoint after this many minutes",
    "vocab_size": "set from the tokenizer for new runs (padded to a multiple of 64)",
    # choices, with what each means
    "norm_layout": "sandwich: norms before and after attention / MLP (Huginn); pre: pre-norm only",
    "rope_style": "half: rotate the two halves of a head (Llama); interleaved: rotate adjacent pairs (Huginn)",
    "rope_precision": "precision of the RoPE angles before cos / sin: fp64, or fp32 as Huginn-0125 computes them",
    "injection": "how the encoded input re-enters every loop: concat (Huginn's adapter over [state, input]), add, "
    "lti (Parcae's linear time-invariant update, stable by construction)",
    "state_init": "the first loop's state: like-init (random, the std below) or zero",
    "loop_embedding": "a per-loop signal added to the state: none, sinusoidal or learned (one vector per slot)",
    "loop_overflow": "loops beyond per_loop_slots: reuse-last slot, cycle through the slots, or off (no signal)",
    "attention": "mha (multi-head, grouped with n_kv_heads) or mla (multi-head latent attention, DeepSeek-style)",
    "halting": "none, or act: a learned halting head trained with a ponder cost (adaptive computation time)",
    "halting_input": "what the halting head reads: state, or state+change (the state and its last update)",
    "sampler": "how each step draws its loop count around mean_loops: lognormal-poisson (Huginn), fixed, uniform, "
    "poisson or geometric",
    "schedule": "learning-rate schedule after the warm-up: constant, cosine, or wsd (warmup-stable-decay)",
    "dtype": "compute dtype: auto (bf16 autocast where this machine runs it faster), fp32 or bf16",
    "strategy": "multi-process training (torchrun): ddp (replicated weights) or fsdp (sharded)",
    # None means derived from the other fields, or off
    "n_kv_heads": "key/value heads, grouped-query attention when below n_heads (default: n_heads)",
    "head_dim": "width of one attention head (default: dim // n_heads)",
    "mlp_hidden": "SwiGLU hidden width (default: 8/3 x dim rounded up to a multiple of 32)",
    "per_loop_slots": "trained per-loop slots (LoRA, loop embedding) (default: 2 x mean_loops)",
    "init_std": "weight initialisation std (default: sqrt(2 / (5 x dim)))",
    "moe_hidden": "width of one routed expert (default: mlp_hidden / (moe_shared + moe_top_k))",
    "mla_kv_rank": "MLA's compressed key/value width (default: dim // 4)",
    "mla_rope_dim": "MLA's rotated part of a head (default: about head_dim / 2)",
    "halting_prior": "mean of the geometric prior the halting KL pulls towards (default: none, no KL term)",
    "max_loops": "cap on the sampled loop count (default: none)",
    "sliding_window": "attention sees this many positions back (default: none, the whole context)",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "norm_layout": NORM_LAYOUTS,
    "rope_style": ROPE_STYLES,
    "rope_precision": ROPE_PRECISIONS,
    "injection": INJECTIONS,
    "state_init": STATE_INITS,
    "loop_embedding": LOOP_EMBEDDINGS,
    "loop_overflow": LOOP_OVERFLOW_POLICIES,
    "attention": ATTENTIONS,
    "halting": HALTING_MODES,
    "halting_input": HALTING_INPUTS,
    "sampler": DEPTH_SAMPLERS,
    "schedule": SCHEDULES,
    "dtype": DTYPES,
    "strategy": STRATEGIES,
}


def field_kind(annotation: str) -> tuple[Any, bool]:
    """(parser for one value, whether None is allowed) of a dataclass field's annotation."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    parsers: dict[str, Any] = {
        "int": int,
        "float": float,
        "str": str,
        "bool": bool,
        "tuple[int, ...]": str,
        "tuple[str, ...]": str,
    }
    return parsers[base], optional


def optional_value(parse: Any) -> Any:
    def parser(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parser.__name__ = parse.__name__
    return parser


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, ``dest`` = ``section.field``; absent flags leave no attribute (SUPPRESS)."""
    for section, cls in SECTIONS.items():
        title = {
            "model": "model (defaults shown are ModelConfig's; --preset supplies its own)",
            "recurrence": "depth sampling (recurrence)",
            "train": "training",
        }[section]
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if (section, f.name) in SKIPPED_FIELDS:
                continue
            parse, optional = field_kind(str(f.type))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default_text = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else default
            default_text = "none" if default_text is None else default_text
            text = HELP.get(f.name, "")
            helptext = text if "(default:" in text else f"{text} (default: {default_text})".lstrip()
            flag = "--" + f.name.replace("_", "-")
            dest = f"{section}.{f.name}"
            if parse is bool:
                group.add_argument(
                    flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext
                )
            else:
                kind = optional_value(parse) if optional else parse
                choices = CHOICES.get(f.name)
                action = group.add_argument(
                    flag,
                    dest=dest,
                    type=kind,
                    choices=choices,
                    default=argparse.SUPPRESS,
                    metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
                    help=helptext,
                )
                for old in (name for name, new in RENAMED.items() if new == f.name):
                    add_renamed_flag(group, action, "--" + old.replace("_", "-"))


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config fields given explicitly on the command line, by section."""
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in SECTIONS and name:
            out[section][name] = value
    return out


def file_overrides(path: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(preset, fields by section) of a run file; flat keys are routed to the section that owns them."""
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"Run file {path!r} must be a mapping of field names to values.")
    preset = data.pop("preset", None)
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    owners = {
        f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if (s, f.name) not in SKIPPED_FIELDS
    }
    for key, value in upgrade_keys(data, set(owners), "run file").items():
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(
                f"Run file {path!r}: section {key!r} must be a mapping of {SECTIONS[key].__name__} field names to "
                f"values, got {shown(value)}."
            )
        if key in SECTIONS:
            fields = {f.name for f in dataclasses.fields(SECTIONS[key])}
            for name, inner in upgrade_keys(value, fields, f"run file section {key!r}").items():
                if name == "recurrence" and key == "model" and isinstance(inner, dict):
                    out["recurrence"].update(inner)
                elif name not in fields:
                    raise ConfigError(f"Run file {path!r}: {key}.{name} is not a {SECTIONS[key].__name__} field.")
                else:
                    out[key][name] = inner
        elif key in owners:
            out[owners[key]][key] = value
        else:
            raise ConfigError(f"Run file {path!r}: unknown field {key!r} (see `loopformer train --help`).")
    return preset, out


def merge(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for layer in layers:
        for section, values in layer.items():
            merged[section].update(values)
    return merged


def resolve_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """Model and training configs from base (preset or resumed run) < run file < flags."""
    from loopformer.checkpoint import load_checkpoint, resolve_checkpoint

    preset, from_file = file_overrides(args.config) if args.config else (None, {})
    from_flags = flag_overrides(args)
    changes = merge(from_file, from_flags)
    train_base: dict[str, Any] = {}
    if args.resume:
        saved = load_checkpoint(resolve_checkpoint(Path(args.out)), load_optimizer=False)
        model = saved.config
        train_base = dict(saved.meta.get("train_config", {}))
        if args.preset or preset:
            model = get_preset(args.preset or preset).replace(vocab_size=saved.config.vocab_size)
    elif changes["train"].get("init_from"):
        model = load_checkpoint(resolve_checkpoint(Path(changes["train"]["init_from"])), load_optimizer=False).config
    else:
        model = get_preset(args.preset or preset or "tiny")
    model_changes = dict(changes["model"])
    if changes["recurrence"]:
        model_changes["recurrence"] = changes["recurrence"]
    model = model.replace(**model_changes)
    train = TrainConfig.from_dict({**train_base, **changes["train"]})
    return model, train


def run(args: argparse.Namespace) -> int:
    from loopformer.training.trainer import Trainer

    model_config, train_config = resolve_configs(args)
    trainer = Trainer(
        model_config,
        train_config,
        args.out,
        resume=args.resume,
        stop_at=args.stop_at,
        progress=False if args.no_progress else None,
    )
    result = trainer.fit()
    if result.evaluation and trainer.dist.is_main:
        from loopformer.evaluation.perplexity import format_loops_table
        from loopformer.tasks.evaluate import format_accuracy_table

        table = format_accuracy_table if train_config.is_task else format_loops_table
        print(table(result.evaluation))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a recurrent-depth LM (default: the tiny preset on the embedded standard-library corpus)",
        description="Train a recurrent-depth LM. Settings: preset (or the resumed run) < --config file < flags.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default: tiny)")
    parser.add_argument(
        "--config", type=path_text, help="run file (JSON/YAML): field names flat or under model/recurrence/train"
    )
    parser.add_argument("--out", type=path_text, default="runs/default", help="run directory (default: runs/default)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step; continue with --resume")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is always written)")
    add_config_flags(parser)
    parser.set_defaults(run=run)
