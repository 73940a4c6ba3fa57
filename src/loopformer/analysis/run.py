"""Run every loop analysis on one input set and write the report (what ``loopformer analyze`` calls).

The per-token analyses (trajectory, convergence, PCA, path independence, logit lens) use the first group's
batch and show row ``options.row``; exit statistics cover every group (e.g. several task difficulties); the
metric-vs-loops curves are computed by the caller and passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopformer.analysis.convergence import convergence
from loopformer.analysis.curves import Curve
from loopformer.analysis.exit_stats import exit_statistics
from loopformer.analysis.lens import logit_lens
from loopformer.analysis.path import path_independence
from loopformer.analysis.pca import project_trajectory
from loopformer.analysis.plots import (
    plot_convergence,
    plot_curves,
    plot_exit_histograms,
    plot_logit_lens,
    plot_path_independence,
    plot_pca,
)
from loopformer.analysis.report import Section, write_report
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


def _top_k_table(
    ids: torch.Tensor, probs: torch.Tensor, decode_token: Callable[[int], str]
) -> tuple[list[str], list[list[Any]]]:
    """Top-k predictions of the last position at every iteration: ``ids`` / ``probs`` [R, k]."""
    headers = ["iteration", *(f"top {j + 1}" for j in range(ids.shape[1]))]
    rows = [
        [i + 1, *(f"{decode_token(int(t))} ({float(p):.2f})" for t, p in zip(ids[i], probs[i], strict=True))]
        for i in range(ids.shape[0])
    ]
    return headers, rows


def _default_tokens(length: int) -> tuple[int, ...]:
    """Up to six positions spread over the sequence."""
    count = min(6, length)
    return tuple(sorted({round(i * (length - 1) / max(1, count - 1)) for i in range(count)}))


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
    numbers: dict[str, Any] = {"loops": options.loops, "reference_loops": options.reference_loops, "groups": {}}
    sections: list[Section] = []

    path = out_dir / "trajectory.npy" if options.on_disk else None
    trajectory = record_trajectory(model, main.ids, options.loops, seed=options.seed, normed=options.normed, path=path)
    reference = model(main.ids, loops=options.reference_loops, seed=options.seed).state
    conv = convergence(trajectory, reference)
    numbers["convergence"] = {
        "final_distance_mean": float(conv.distance[..., -1].float().mean()),
        "final_change_mean": float(conv.change[..., -1].float().nanmean()),
        "contraction_median": float(conv.contraction.float().nanmedian()),
        "status": conv.counts(),
    }
    image = plot_convergence(conv.distance[row], conv.change[row], labels, out_dir / "convergence.png")
    flagged = [(i, labels[i], s) for i, s in enumerate(conv.status[row]) if s in ("orbit", "drift")]
    sections.append(
        Section(
            "Convergence",
            f"Distance of every token's state to its state after {options.reference_loops} loops, and its relative "
            f"change per iteration, for row {row}. Contraction: median ratio of successive changes over the last half.",
            [image],
            [
                (["status", "tokens"], sorted(numbers["convergence"]["status"].items())),
                (["position", "token", "status"], flagged[:40] or [["-", "-", "no orbit or drift"]]),
            ],
        )
    )

    projection = project_trajectory(trajectory, k=min(6, model.config.dim))
    tokens = options.pca_tokens or _default_tokens(main.ids.shape[1])
    image = plot_pca(projection.coords[:, row], projection.explained, labels, tokens, out_dir / "pca.png")
    numbers["pca"] = {"explained": [float(v) for v in projection.explained], "tokens": list(tokens)}
    sections.append(
        Section("Trajectories (PCA)", "All states of the batch projected on their principal components.", [image])
    )

    if model.config.state_init == "zero" or model.config.state_init_std == 0:
        numbers["path_independence"] = None
        sections.append(Section("Path independence", "Not measured: this model starts every token from a zero state."))
    else:
        independence = path_independence(model, main.ids, options.loops, options.seeds)
        numbers["path_independence"] = {
            "overall": float(independence.overall),
            "spread_mean": float(independence.spread.float().mean()),
            "seeds": list(options.seeds),
        }
        image = plot_path_independence(
            independence.spread[row], independence.overall, labels, out_dir / "path_independence.png"
        )
        sections.append(
            Section(
                "Path independence",
                f"Final states after {options.loops} loops from {len(options.seeds)} random initial states: overall "
                f"mean pairwise cosine {independence.overall:.4f} (1 = every start reaches the same point).",
                [image],
            )
        )

    lens = logit_lens(model, main.ids, options.loops, k=options.lens_k, seed=options.seed)
    first = lens.first_hit[row]
    numbers["logit_lens"] = {"first_hit_mean": float(lens.first_hit.float().mean())}
    image = plot_logit_lens(
        lens.top_ids[:, row, :, 0], lens.top_probs[:, row, :, 0], decode_token, labels, out_dir / "logit_lens.png"
    )
    table = [[i, labels[i], decode_token(int(lens.final_ids[row, i])), int(first[i])] for i in range(len(labels))]
    sections.append(
        Section(
            "Logit lens",
            "Intermediate states decoded with the coda and head; 'settles at' is the first iteration from which the "
            "prediction equals the final one.",
            [image],
            [
                (["position", "token", "final prediction", "settles at"], table[-40:]),
                _top_k_table(lens.top_ids[:, row, -1], lens.top_probs[:, row, -1], decode_token),
            ],
        )
    )

    histograms: dict[str, dict[str, dict[int, int]]] = {}
    exit_rows = []
    for group in groups:
        stats = exit_statistics(
            model, group.ids, options.loops, options.exit_rules, seed=options.seed, mask=group.scored
        )
        for stat in stats:
            histograms.setdefault(stat.criterion_label, {})[group.name] = stat.histogram
            exit_rows.append([group.name, stat.criterion_label, stat.mean])
        numbers["groups"][group.name] = {
            "rows": int(group.ids.shape[0]),
            "length": int(group.ids.shape[1]),
            "exits": {s.criterion_label: {"mean": s.mean, "histogram": s.histogram} for s in stats},
        }
    image = plot_exit_histograms(histograms, options.loops, out_dir / "exits.png")
    sections.append(
        Section(
            "Exit statistics",
            "Zero-shot exit iteration of every scored position.",
            [image],
            [(["group", "rule", "mean exit iteration"], exit_rows)],
        )
    )

    if curves:
        image = plot_curves(curves, out_dir / "curves.png")
        numbers["curves"] = [
            {"label": c.label, "metric": c.metric, "loops": c.loops, "values": c.values} for c in curves
        ]
        rows = [[c.label, *c.values] for c in curves]
        sections.append(
            Section(f"{curves[0].metric} vs loops", "", [image], [(["", *map(str, curves[0].loops)], rows)])
        )

    intro = f"{len(groups)} input group(s); per-token figures show row {row} of '{main.name}' at {options.loops} loops."
    write_report(out_dir, title, intro, sections, numbers)
    return numbers
