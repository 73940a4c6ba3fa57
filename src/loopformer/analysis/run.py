"""Run every loop analysis on one input set and write the report (what ``loopformer analyze`` calls).

The per-token analyses (trajectory, convergence, PCA, path independence, logit lens) use the first group's
batch and show row ``options.row``; exit statistics cover every group (e.g. several task difficulties); the
metric-vs-loops curves are computed by the caller and passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopformer.analysis.convergence import CONVERGED_CHANGE, convergence, settled_iteration
from loopformer.analysis.curves import Curve
from loopformer.analysis.exit_stats import exit_statistics
from loopformer.analysis.lens import logit_lens
from loopformer.analysis.path import NOISE_ULPS, PathIndependence, path_independence
from loopformer.analysis.pca import project_trajectory
from loopformer.analysis.plots import (
    MAX_LENS_COLS,
    describe_iterations,
    lens_iterations,
    plot_convergence,
    plot_curves,
    plot_exit_histograms,
    plot_logit_lens,
    plot_path_independence,
    plot_pca,
)
from loopformer.analysis.report import Figure, Section, Table, write_report
from loopformer.analysis.trajectory import record_trajectory
from loopformer.errors import InputError
from loopformer.inference.criteria import DEFAULT_RULES
from loopformer.model import LoopLM


@dataclass(frozen=True)
class AnalysisOptions:
    """Depths, seeds and selections of one analysis run."""

    loops: int = 32
    reference_loops: int = 128
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    exit_rules: tuple[str, ...] = DEFAULT_RULES
    pca_tokens: tuple[int, ...] | None = None
    row: int = 0
    seed: int = 0
    lens_k: int = 5
    on_disk: bool = False
    normed: bool = False

    def __post_init__(self) -> None:
        if self.loops < 2:
            raise InputError(f"the analysis needs at least 2 loops, got {self.loops}.")
        if self.reference_loops < self.loops:
            raise InputError(f"reference loops ({self.reference_loops}) must be >= loops ({self.loops}).")


@dataclass
class InputGroup:
    """One dataset or difficulty: ids [B, T], the positions whose prediction counts [B, T], token texts of a row."""

    name: str
    ids: torch.Tensor
    scored: torch.Tensor
    labels: list[str] = field(default_factory=list)


def _top_k_table(ids: torch.Tensor, probs: torch.Tensor, decode_token: Callable[[int], str]) -> Table:
    """Top-k predictions of the last position at every iteration: ``ids`` / ``probs`` [R, k]."""
    headers = ["iteration", *(f"top {j + 1}" for j in range(ids.shape[1]))]
    rows = [
        [i + 1, *(f"{decode_token(int(t))} ({float(p):.2f})" for t, p in zip(ids[i], probs[i], strict=True))]
        for i in range(ids.shape[0])
    ]
    return Table(headers, rows, "Top predictions of the last position at every iteration")


def _default_tokens(length: int) -> tuple[int, ...]:
    """Up to six positions spread over the sequence."""
    count = min(6, length)
    return tuple(sorted({round(i * (length - 1) / max(1, count - 1)) for i in range(count)}))


def _independence_verdict(result: PathIndependence) -> str:
    """E.g. "identical within float noise (max spread 3.2e-08, noise floor 3.8e-06 = 32 x float32 eps)"."""
    verdict = "identical within float noise" if result.within_noise else "depends on the start"
    floor = f"noise floor {result.noise_floor:.2g} = {NOISE_ULPS} x {result.dtype} eps"
    return f"{verdict} (max spread {result.max_spread:.2g}, {floor})"


def _exit_summary(numbers: dict[str, Any], loops: int) -> str:
    """Per group: the earliest-exiting rule, its mean exit iteration and the share of iterations it saves."""
    parts = []
    for name, group in numbers["groups"].items():
        means = {rule: stats["mean"] for rule, stats in group["exits"].items() if not math.isnan(stats["mean"])}
        if means:
            rule = min(means, key=means.get)
            low, high = min(means.values()), max(means.values())
            parts.append(
                f"{name}: {rule} exits earliest, at {means[rule]:.1f} of {loops} iterations on average "
                f"({1 - means[rule] / loops:.0%} saved; all rules {low:.1f}-{high:.1f})"
            )
    return "; ".join(parts) or "no scored positions"


def _curve_summary(curve: Curve) -> str:
    """First and best value of a metric-vs-loops curve."""
    best = (min if curve.metric == "perplexity" else max)(range(len(curve.values)), key=curve.values.__getitem__)
    text = f"{curve.label}: {curve.values[0]:.4g} at {curve.loops[0]} loop(s), best {curve.values[best]:.4g} at "
    text += f"{curve.loops[best]}"
    return text if best == len(curve.values) - 1 else f"{text}, {curve.values[-1]:.4g} at {curve.loops[-1]}"


@torch.inference_mode()
def analyze(
    model: LoopLM,
    groups: Sequence[InputGroup],
    options: AnalysisOptions,
    out_dir: Path,
    decode_token: Callable[[int], str],
    curves: Sequence[Curve] = (),
    title: str = "Inside the loop",
) -> dict[str, Any]:
    """Compute everything, write the PNGs, ``report.html`` and ``report.json`` into ``out_dir``; return the numbers."""
    if not groups:
        raise InputError("the analysis needs at least one input group.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = groups[0]
    row = options.row
    if not 0 <= row < main.ids.shape[0]:
        raise InputError(f"row {row} is out of range; the batch has {main.ids.shape[0]} rows.")
    labels = main.labels
    loops = options.loops
    numbers: dict[str, Any] = {"loops": loops, "reference_loops": options.reference_loops, "groups": {}}
    sections: list[Section] = []
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    summary = [
        (
            "Model",
            f"dim {config.dim}, {config.n_prelude} prelude + {config.n_core} core + {config.n_coda} coda layers, "
            f"{parameters / 1e6:.2f}M parameters",
        ),
        (
            "Loops analysed",
            f"{loops} (reference state s* after {options.reference_loops}); "
            + ", ".join(f"'{g.name}' {g.ids.shape[0]} x {g.ids.shape[1]} tokens" for g in groups),
        ),
    ]

    path = out_dir / "trajectory.npy" if options.on_disk else None
    trajectory = record_trajectory(model, main.ids, loops, seed=options.seed, normed=options.normed, path=path)
    reference = model(main.ids, loops=options.reference_loops, seed=options.seed).state
    conv = convergence(trajectory, reference)
    settled = int(settled_iteration(conv.change).max())
    numbers["convergence"] = {
        "final_distance_mean": float(conv.distance[..., -1].float().mean()),
        "final_change_mean": float(conv.change[..., -1].float().nanmean()),
        "contraction_median": float(conv.contraction.float().nanmedian()),
        "converged_by": settled if settled <= loops else None,
        "status": conv.counts(),
    }
    status = ", ".join(f"{count} {label}" for label, count in numbers["convergence"]["status"].items())
    median = numbers["convergence"]["contraction_median"]
    contraction = "median contraction " + ("n/a (no steps left)" if math.isnan(median) else f"{median:.2f}")
    if settled <= loops:
        finding = f"converged by iteration {settled} (every token's relative change < {CONVERGED_CHANGE:g} from there)"
    else:
        finding = (
            f"not converged within {loops} iterations (mean final relative change "
            f"{numbers['convergence']['final_change_mean']:.2g})"
        )
    summary.append(("Convergence", f"{finding}; {contraction}; tokens: {status}"))
    image = plot_convergence(conv.distance[row], conv.change[row], labels, out_dir / "convergence.png")
    flagged = [(i, labels[i], s) for i, s in enumerate(conv.status[row]) if s in ("orbit", "drift")]
    sections.append(
        Section(
            "Convergence",
            f"Distance of every token's state to its state after {options.reference_loops} loops, and its relative "
            f"change per iteration, for row {row}. Contraction: median ratio of successive changes over the last half.",
            [Figure(image, f"{finding}; {contraction}.")],
            [
                Table(["status", "tokens"], sorted(numbers["convergence"]["status"].items()), "Tokens per status"),
                Table(
                    ["position", "token", "status"],
                    flagged[:40] or [["-", "-", "no orbit or drift"]],
                    f"Tokens in orbit or drift, row {row}" + (" (first 40)" if len(flagged) > 40 else ""),
                ),
            ],
        )
    )

    projection = project_trajectory(trajectory, k=min(6, config.dim))
    tokens = options.pca_tokens or _default_tokens(main.ids.shape[1])
    image = plot_pca(projection.coords[:, row], projection.explained, labels, tokens, out_dir / "pca.png")
    numbers["pca"] = {"explained": [float(v) for v in projection.explained], "tokens": list(tokens)}
    explained = ", ".join(f"{float(v):.1%}" for v in projection.explained)
    sections.append(
        Section(
            "Trajectories (PCA)",
            "All states of the batch projected on their principal components.",
            [Figure(image, f"Variance explained by PC1..PC{len(projection.explained)}: {explained}.")],
        )
    )

    if config.state_init == "zero" or config.state_init_std == 0:
        numbers["path_independence"] = None
        summary.append(("Path independence", "not measured: every token starts from a zero state"))
        sections.append(Section("Path independence", "Not measured: this model starts every token from a zero state."))
    else:
        independence = path_independence(model, main.ids, loops, options.seeds)
        verdict = _independence_verdict(independence)
        numbers["path_independence"] = {
            "overall": float(independence.overall),
            "spread_mean": float(independence.spread.float().mean()),
            "spread_max": independence.max_spread,
            "noise_floor": independence.noise_floor,
            "within_noise": independence.within_noise,
            "seeds": list(options.seeds),
        }
        summary.append(("Path independence", f"{verdict}; mean cosine {independence.overall:.4f}"))
        image = plot_path_independence(
            independence.spread[row],
            independence.noise_floor,
            independence.dtype,
            labels,
            out_dir / "path_independence.png",
        )
        sections.append(
            Section(
                "Path independence",
                f"Final states after {loops} loops from {len(options.seeds)} random initial states: overall mean "
                f"pairwise cosine {independence.overall:.4f} (1 = every start reaches the same point). Spreads below "
                f"the noise floor ({NOISE_ULPS} x the {independence.dtype} epsilon, shaded) are rounding differences.",
                [Figure(image, f"Row {row}: {verdict}.")],
            )
        )

    lens = logit_lens(model, main.ids, loops, k=options.lens_k, seed=options.seed)
    first = lens.first_hit[row]
    numbers["logit_lens"] = {"first_hit_mean": float(lens.first_hit.float().mean())}
    summary.append(
        (
            "Logit lens",
            f"predictions settle at iteration {numbers['logit_lens']['first_hit_mean']:.2f} on average "
            f"(the last position at {int(first[-1])})",
        )
    )
    image = plot_logit_lens(
        lens.top_ids[:, row, :, 0], lens.top_probs[:, row, :, 0], decode_token, labels, out_dir / "logit_lens.png"
    )
    shown = [
        describe_iterations(lens_iterations(loops), loops) or f"all {loops} iterations",
        f"the last {MAX_LENS_COLS} of {len(labels)} positions" if len(labels) > MAX_LENS_COLS else "every position",
    ]
    table = [[i, labels[i], decode_token(int(lens.final_ids[row, i])), int(first[i])] for i in range(len(labels))]
    sections.append(
        Section(
            "Logit lens",
            "Intermediate states decoded with the coda and head; 'settles at' is the first iteration from which the "
            "prediction equals the final one.",
            [Figure(image, f"Row {row}: {shown[0]}, {shown[1]}; token texts are cut to fit their cell.")],
            [
                Table(
                    ["position", "token", "final prediction", "settles at"],
                    table[-40:],
                    "Final prediction per position" + (" (last 40)" if len(table) > 40 else ""),
                ),
                _top_k_table(lens.top_ids[:, row, -1], lens.top_probs[:, row, -1], decode_token),
            ],
        )
    )

    histograms: dict[str, dict[str, dict[int, int]]] = {}
    exit_rows = []
    for group in groups:
        stats = exit_statistics(model, group.ids, loops, options.exit_rules, seed=options.seed, mask=group.scored)
        for stat in stats:
            histograms.setdefault(stat.criterion_label, {})[group.name] = stat.histogram
            exit_rows.append([group.name, stat.criterion_label, stat.mean, f"{1 - stat.mean / loops:.0%}"])
        numbers["groups"][group.name] = {
            "rows": int(group.ids.shape[0]),
            "length": int(group.ids.shape[1]),
            "exits": {s.criterion_label: {"mean": s.mean, "histogram": s.histogram} for s in stats},
        }
    exits = _exit_summary(numbers, loops)
    summary.append(("Exit savings", exits))
    image = plot_exit_histograms(histograms, loops, out_dir / "exits.png")
    sections.append(
        Section(
            "Exit statistics",
            f"Zero-shot exit iteration of every scored position; savings relative to {loops} iterations (the quality "
            "of the prediction at the exit is not measured here).",
            [Figure(image, exits + ".")],
            [Table(["group", "rule", "mean exit iteration", "saved"], exit_rows, "Mean exit iteration per rule")],
        )
    )

    if curves:
        image = plot_curves(curves, out_dir / "curves.png")
        numbers["curves"] = [
            {"label": c.label, "metric": c.metric, "loops": c.loops, "values": c.values} for c in curves
        ]
        rows = [[c.label, *c.values] for c in curves]
        findings = "; ".join(_curve_summary(c) for c in curves)
        summary.append((f"{curves[0].metric.capitalize()} vs loops", findings))
        sections.append(
            Section(
                f"{curves[0].metric.capitalize()} vs loops",
                "",
                [Figure(image, findings + ".")],
                [Table(["", *map(str, curves[0].loops)], rows, f"{curves[0].metric} per loop count")],
            )
        )

    intro = f"{len(groups)} input group(s); per-token figures show row {row} of '{main.name}' at {loops} loops."
    write_report(out_dir, title, intro, sections, numbers, summary)
    return numbers
