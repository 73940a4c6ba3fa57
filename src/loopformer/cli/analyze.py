"""``loopformer analyze``: look inside the loop of a checkpoint, on a text or on a reasoning task.

Writes PNG figures, ``report.json`` and a self-contained ``report.html`` into ``--out``: convergence heatmaps,
PCA trajectories, path independence, the logit lens, exit statistics and metric-vs-loops curves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from loopformer.cli.arguments import parse_counts, path_text
from loopformer.errors import InputError
from loopformer.inference.chat import encode_prompt
from loopformer.inference.criteria import DEFAULT_RULES
from loopformer.tasks.builtin import get_task

if TYPE_CHECKING:  # the command line imports torch only when a command runs
    from loopformer.analysis.run import InputGroup
    from loopformer.tokenizer import TextTokenizer


def _token_text(tokenizer: TextTokenizer, token: int) -> str:
    """A token as a short printable label (whitespace made visible; ids past the tokenizer as ``<id>``)."""
    if token >= tokenizer.vocab_size:  # the model's vocabulary is padded beyond the tokenizer's
        return f"<{token}>"
    text = tokenizer.decode([token]).replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text) or "\u2205"


def _text_group(tokenizer: TextTokenizer, text: str, max_len: int) -> tuple[InputGroup, SimpleNamespace]:
    import torch

    from loopformer.analysis.run import InputGroup

    ids = encode_prompt(tokenizer, text)
    if len(ids) < 2:
        raise InputError("the text must have at least one token.")
    if len(ids) > max_len:
        raise InputError(f"the text has {len(ids)} tokens, more than the model's context of {max_len}.")
    tensor = torch.tensor([ids])
    scored = torch.ones_like(tensor, dtype=torch.bool)
    scored[:, -1] = False
    labels = [_token_text(tokenizer, t) for t in ids]
    return InputGroup("text", tensor, scored, labels), SimpleNamespace(input_ids=tensor, labels=tensor)


def _task_groups(args: argparse.Namespace, tokenizer: TextTokenizer, name: str) -> tuple[list[InputGroup], dict]:
    import torch

    from loopformer.analysis.run import InputGroup
    from loopformer.tasks.encoding import TaskEncoder

    task = get_task(name)
    encoder = TaskEncoder(tokenizer)
    groups, examples = [], {}
    for difficulty in parse_counts(args.difficulty, "--difficulty"):
        task.check_difficulty(difficulty)
        chosen = task.generate(difficulty, args.count, seed=args.seed)
        encoder.check(chosen, f"{name} at {task.difficulty_name} {difficulty}")
        batch = encoder.batch(chosen)
        scored = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        scored[:, :-1] = batch.labels[:, 1:] != -100
        if not 0 <= args.row < len(chosen):
            raise InputError(f"--row {args.row} is out of range: {len(chosen)} examples per difficulty (--count).")
        labels = [_token_text(tokenizer, int(t)) for t in batch.input_ids[args.row]]
        groups.append(InputGroup(f"{task.difficulty_name} {difficulty}", batch.input_ids, scored, labels))
        examples[difficulty] = chosen
    return groups, examples


def run(args: argparse.Namespace) -> int:
    from loopformer.analysis.curves import perplexity_curve, task_accuracy_curve
    from loopformer.analysis.run import AnalysisOptions, analyze
    from loopformer.inference.exits import parse_exit_rule
    from loopformer.loading import load_trained_model
    from loopformer.tokenizer import TextTokenizer

    if (args.text is None) == (args.task is None):
        raise InputError("give either --text TEXT or --task NAME --difficulty D.")
    if args.task is not None and args.difficulty is None:
        raise InputError("--task needs --difficulty (comma-separated for several).")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise InputError(f"--out {out} exists and is not empty (nor an earlier report); choose a new folder.")
    model, state, path = load_trained_model(Path(args.ckpt), use_ema=args.ema)
    if state.tokenizer_json is None:
        raise InputError(f"{path} has no tokenizer.json; the analysis needs the checkpoint's tokenizer.")
    tokenizer = TextTokenizer.from_json(state.tokenizer_json, roles=state.token_roles)
    rules = tuple(parse_exit_rule(r).label for r in args.exit.split(",") if r.strip())
    options = AnalysisOptions(
        loops=args.loops,
        reference_loops=args.reference_loops or 4 * args.loops,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        exit_rules=rules,
        pca_tokens=tuple(parse_counts(args.tokens, "--tokens")) if args.tokens else None,
        row=args.row,
        seed=args.seed,
        on_disk=args.on_disk,
        normed=args.normed,
    )
    curve_loops = parse_counts(args.curve_loops, "--curve-loops")
    others = [(Path(p), load_trained_model(Path(p), use_ema=args.ema)[0]) for p in args.compare]
    models = [(path, model), *others]
    if args.text is not None:
        if args.row != 0:
            raise InputError("--row selects a task example; a --text analysis has the one row 0.")
        group, batch = _text_group(tokenizer, args.text, model.config.max_seq_len)
        groups = [group]
        curves = [perplexity_curve(m, [batch], curve_loops, p.name) for p, m in models]
    else:
        groups, examples = _task_groups(args, tokenizer, args.task)
        curves = [
            task_accuracy_curve(m, tokenizer, chosen, curve_loops, f"{p.name}, {args.task} {d}")
            for p, m in models
            for d, chosen in examples.items()
        ]
    print(f"analysing {path} at {options.loops} loops ...", file=sys.stderr)
    analyze(
        model,
        groups,
        options,
        Path(args.out),
        lambda token: _token_text(tokenizer, token),
        curves,
        title=f"Inside the loop: {path}",
    )
    print(f"wrote {Path(args.out) / 'report.html'} and report.json", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="trajectories, convergence, logit lens, exits and plots of the loop")
    parser.add_argument(
        "--ckpt", type=path_text, required=True, help="a checkpoint directory or a run directory (uses its latest)"
    )
    parser.add_argument("--text", help="text to analyse (fed as <|bos|> + its tokens)")
    parser.add_argument("--task", help="a built-in reasoning task (with --difficulty)")
    parser.add_argument("--difficulty", help="task difficulty, comma-separated for several groups")
    parser.add_argument("--count", type=int, default=16, help="task examples per difficulty (default: 16)")
    parser.add_argument(
        "--out", type=path_text, required=True, help="folder for the figures, report.json and report.html"
    )
    parser.add_argument("--loops", type=int, default=32, help="iterations analysed (default: 32)")
    parser.add_argument("--reference-loops", type=int, help="depth of the reference state s* (default: 4x --loops)")
    parser.add_argument("--seeds", default="0,1,2,3", help="initial-state seeds for path independence")
    parser.add_argument("--exit", default=",".join(DEFAULT_RULES), help="comma-separated exit rules")
    parser.add_argument("--tokens", help="positions drawn in the PCA figure (default: six spread out)")
    parser.add_argument("--row", type=int, default=0, help="batch row shown in per-token figures")
    parser.add_argument("--curve-loops", default="1,2,4,8,16,32,64", help="loop counts of the metric curve")
    parser.add_argument("--compare", action="append", default=[], metavar="CKPT", help="more checkpoints for the curve")
    parser.add_argument("--on-disk", action="store_true", help="record the trajectory to OUT/trajectory.npy (float16)")
    parser.add_argument("--normed", action="store_true", help="analyse states after the final norm")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint has them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial state and of the task examples")
    parser.set_defaults(run=run)
